"""``python -m smt upscale``: super-resolve a user's images with the pipeline's method, a bundle or one checkpoint.

Three sources of the method (:class:`Method`):
- nothing given: the pipeline's final method from the current run — the last round's trained models, the
  ``infer`` section's self-ensemble and multi-window settings and the fusion weight the infer stage fitted
  (``results/fusion.json``). It runs through the infer stage's own code (:func:`smt.infer.runner.model_outputs`,
  :func:`smt.infer.runner.best_float255`, :func:`smt.infer.fusion.fuse`) with the stage's per-image seed, so a
  validation LR image gives the bytes of ``results/valid/fused/<id>x4.png``;
- ``--bundle FILE``: the same method from a file written by ``python -m smt export bundle``;
- ``--checkpoint FILE``: one model. Its architecture comes from ``--model`` (a preset), from our
  ``.safetensors`` metadata, or from the weights themselves (:func:`smt.models.detect.detect_architecture`).

SR-tool conventions: outputs are ``<name><suffix>.png`` in the output folder, where ``<name>`` is the input's
name without a trailing scale tag (``0801x4.png`` -> ``0801x4.png``, not ``0801x4x4.png``) and the suffix
defaults to ``x<scale>``. ``--tile auto`` picks the largest tile the free memory holds (whole images when they
fit) and, on CUDA out-of-memory, retries with half the tile. A per-tile progress bar with an ETA is shown for
images of several tiles. The output keeps the input's form (:func:`smt.data.images.read_as_given` has the table):
grey stays grey, 16-bit grey stays 16-bit (run in float at full precision), transparency is kept (colour goes
through the model, the alpha channel is upscaled with the pipeline's bicubic, :func:`smt.data.imresize.imresize`);
the model itself always sees RGB. A folder contributes every file Pillow can open (by suffix: GIF, WebP, TIFF,
BMP, JPEG, PNG, ...); its other entries are reported as skipped, with a count. An existing output is never
overwritten unless ``--overwrite`` is given. A file that fails is reported with a one-line reason and skipped;
the exit code says whether any failed.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from tqdm import tqdm

from smt.config import InferConfig, parse_section
from smt.data.images import (ImageError, float255_to_uint8, image_to_tensor, pillow_suffixes, read_as_given,
                             tensor_to_float255, uint8_to_unit, write_as_given)
from smt.data.imresize import imresize, to_uint8
from smt.infer.bbox_protocol import BBoxMethod
from smt.infer.ensemble import self_ensemble, window_tilings
from smt.infer.fusion import fused_float255
from smt.infer.precision import Precision, with_precision
from smt.infer.tiling import count_tiles, tile_progress, tiled_forward
from smt.models import ARCHITECTURES, CheckpointError, read_metadata

__all__ = ["scan_inputs", "InputScan", "output_name", "image_id", "Method",
           "SingleModel", "method_from_run", "method_from_bundle", "auto_tile", "run_with_oom_retry",
           "check_settings", "upscale_files", "UpscaleSummary"]


# --- inputs and outputs --------------------------------------------------------------------------------------

@dataclass
class InputScan:
    """The images to upscale, and the folder entries left out with the reason (reported, never silent)."""

    files: list[Path]
    skipped: list[tuple[Path, str]]

    def describe_skipped(self, shown: int = 5) -> str:
        """One line: the count and the first few names with their reason."""
        names = "; ".join(f"{p.name} ({why})" for p, why in self.skipped[:shown])
        more = f"; and {len(self.skipped) - shown} more" if len(self.skipped) > shown else ""
        return f"skipped {len(self.skipped)} folder entr{'y' if len(self.skipped) == 1 else 'ies'}: {names}{more}"


def scan_inputs(paths: Sequence[str | Path]) -> InputScan:
    """Files as given (whatever their suffix: Pillow reads the content), folders expanded to the files whose
    suffix is a format Pillow opens (sorted, not recursive); other folder entries are listed as skipped. A
    missing path, or no image at all, is an error."""
    readable = pillow_suffixes()
    files: list[Path] = []
    skipped: list[tuple[Path, str]] = []
    for p in map(Path, paths):
        if p.is_dir():
            for f in sorted(p.iterdir()):
                if f.is_dir():
                    skipped.append((f, "a folder: folders are not searched"))
                elif f.suffix.lower() in readable:
                    files.append(f)
                else:
                    skipped.append((f, f"not an image format Pillow reads ({f.suffix or 'no suffix'})"))
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such file or folder")
    if not files:
        scan = InputScan(files, skipped)
        raise FileNotFoundError(f"no images found in {', '.join(map(str, paths))}"
                                + (f" ({scan.describe_skipped()})" if skipped else ""))
    return InputScan(files, skipped)


def _base_name(src: Path, scale: int) -> str:
    """The input's stem without a trailing scale tag ``x<scale>`` (the LR naming of DIV2K and the challenge)."""
    stem = src.stem
    m = re.fullmatch(rf"(.+?)x{scale}", stem, flags=re.IGNORECASE)
    return m.group(1) if m else stem


def output_name(src: Path, scale: int, suffix: str | None = None) -> str:
    """``<stem without its scale tag><suffix>.png``; ``suffix`` defaults to ``x<scale>``."""
    return f"{_base_name(src, scale)}{f'x{scale}' if suffix is None else suffix}.png"


def image_id(src: Path, scale: int) -> int:
    """The image's number for the per-image seed of the infer stage (``0801x4.png`` -> 801); 0 when not numeric."""
    base = _base_name(src, scale)
    return int(base) if base.isdigit() else 0


def upscale_alpha(alpha: np.ndarray, scale: int) -> np.ndarray:
    """uint8 HxW alpha -> uint8 (H*scale)x(W*scale), MATLAB-style bicubic, the pipeline's rounding rule."""
    return to_uint8(imresize(uint8_to_unit(alpha), scale))


def check_settings(tile: int | str, overlap: int, out_dir: str | Path) -> None:
    """Refuse invalid values before any work, naming the flag."""
    if tile != "auto" and (not isinstance(tile, int) or tile < 0):
        raise ValueError(f"--tile: must be 'auto', 0 (whole image) or a positive LR tile size, got {tile!r}")
    if overlap < 0:
        raise ValueError(f"--tile-overlap: must be >= 0, got {overlap}")
    if isinstance(tile, int) and tile > 0 and overlap >= tile:
        raise ValueError(f"--tile-overlap: must be smaller than --tile ({tile}), got {overlap}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--output: {out_dir} exists and is not a folder")
    if not out_dir.parent.is_dir():
        raise ValueError(f"--output: the parent folder {out_dir.parent} does not exist")


# --- the models ----------------------------------------------------------------------------------------------

def _channels(net: torch.nn.Module) -> int:
    first = getattr(net, "conv_first", None)
    return first.in_channels if first is not None else 3


@dataclass
class SingleModel:
    """One model, optionally with the x8 self-ensemble, tiled."""

    net: torch.nn.Module
    tile: int = 0
    overlap: int = 8
    use_self_ensemble: bool = False
    precision: Precision = "fp32"
    batch: int = 4

    @property
    def scale(self) -> int:
        return self.net.upscale

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    @property
    def window(self) -> int:
        return getattr(self.net, "window_size", 1)

    def nets(self) -> list[torch.nn.Module]:
        return [self.net]

    def with_tile(self, tile: int) -> "SingleModel":
        return dataclasses.replace(self, tile=tile)

    def tiles(self, h: int, w: int) -> int:
        per_channel = 3 if _channels(self.net) == 1 else 1
        return per_channel * count_tiles(h, w, self.tile, self.overlap)

    def run(self, x: torch.Tensor, image: int = 0) -> np.ndarray:
        """uint8 SR image of ``x``; ``image`` (:func:`image_id`) seeds Gumbel routing, as in the infer stage
        with ``infer.seed`` 0."""
        return float255_to_uint8(self.run_float255(x, image))

    @torch.no_grad()
    def run_float255(self, x: torch.Tensor, image: int = 0) -> np.ndarray:
        """:meth:`run` before rounding: float HxWx3 on the [0, 255] scale (16-bit outputs are written from it)."""
        base = with_precision(self.net, self.precision)
        fwd = (lambda t: self_ensemble(base, t)) if self.use_self_ensemble else base
        torch.manual_seed(image)
        if _channels(self.net) == 1:  # grayscale models (JPEG artefact removal): each channel on its own
            y = torch.cat([tiled_forward(fwd, x[:, c:c + 1], self.scale, self.tile, self.overlap, self.batch)
                           for c in range(x.shape[1])], 1)
        else:
            y = tiled_forward(fwd, x, self.scale, self.tile, self.overlap, self.batch)
        return tensor_to_float255(y)


@dataclass
class Method:
    """The whole method: ``infer.models`` through their configurations (:func:`model_outputs`) and the fusion."""

    models: dict[str, torch.nn.Module]
    cfg: InferConfig
    scale: int
    weight_a: float | None = None  # the fitted fusion weight of the first model (two models)
    source: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if len(self.models) == 2 and self.weight_a is None:
            raise ValueError(f"{self.source}: two models but no fusion weight")

    @property
    def device(self) -> torch.device:
        return next(next(iter(self.models.values())).parameters()).device

    @property
    def window(self) -> int:
        return max(n.window_size for n in self.models.values())

    def nets(self) -> list[torch.nn.Module]:
        return list(self.models.values())

    def with_tile(self, tile: int) -> "Method":
        return dataclasses.replace(self, cfg=dataclasses.replace(self.cfg, tile=tile))

    def tiles(self, h: int, w: int) -> int:
        c = self.cfg
        n = 0
        for name in self.models:
            n += count_tiles(h, w, c.tile, c.tile_overlap) * (2 if c.self_ensemble else 1)
            if name == c.multi_window_model:
                n += sum(count_tiles(h, w, t, min(c.tile_overlap, max(t - 1, 0)))
                         for t, _ in window_tilings(h, w, c.window_tiles, c.window_weights, c.tile_overlap).values())
        return n

    def __call__(self, lr: np.ndarray, image: int = 0) -> np.ndarray:
        """uint8 HxWx3 LR image -> uint8 SR image."""
        return self.run(image_to_tensor(lr, self.device), image)

    def run(self, x: torch.Tensor, image: int = 0) -> np.ndarray:
        """uint8 SR image of ``x``; ``image`` (:func:`image_id`, the infer stage's image number) gives the
        stage's per-image seed (:func:`smt.infer.runner.image_seed`)."""
        return float255_to_uint8(self.run_float255(x, image))

    @torch.no_grad()
    def run_float255(self, x: torch.Tensor, image: int = 0) -> np.ndarray:
        """:meth:`run` before rounding: float HxWx3 on the [0, 255] scale (16-bit outputs are written from it)."""
        from smt.infer.runner import best_float255, image_seed, model_outputs

        seed = image_seed(self.cfg, image)
        bests = [best_float255(model_outputs(net, x, name, self.cfg, self.scale, seed))
                 for name, net in self.models.items()]
        if len(bests) == 1:
            return bests[0]
        return fused_float255(bests[0], bests[1], self.weight_a)


def method_from_run(params_path: str | Path = "params.yaml", results_dir: str | Path = "results",
                    device: str = "cpu") -> Method:
    """The pipeline's final method from the current run (trained models, ``infer`` settings, fitted weight)."""
    from smt.config import load_section
    from smt.infer.runner import load_method_models, read_fusion_fit

    infer_cfg, train_cfg = load_section("infer", params_path), load_section("train", params_path)
    scale = load_section("data", params_path).scale
    weight = None
    if len(infer_cfg.models) == 2:
        weight = read_fusion_fit(Path(results_dir) / "fusion.json", infer_cfg.models,
                                 "run the pipeline first (make repro), or pass --checkpoint or --bundle")["weight_a"]
    try:
        models = load_method_models(infer_cfg, train_cfg, device)
    except CheckpointError as exc:
        raise CheckpointError(f"{exc}\n  (no trained models: run the pipeline first, or pass --checkpoint or "
                              "--bundle)") from None
    return Method(models, infer_cfg, scale, weight, source=str(params_path))


def method_from_bundle(path: str | Path, device: str = "cpu") -> Method:
    """The method stored by ``python -m smt export bundle``."""
    from safetensors.torch import load_file

    from smt.export import BUNDLE_FORMAT
    from smt.models.loading import compare_state_dicts

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--bundle {path}: no such file")
    meta = read_metadata(path)
    if meta.get("format") != BUNDLE_FORMAT:
        raise CheckpointError(f"--bundle {path}: not an smt bundle (metadata format {meta.get('format')!r}, "
                              f"expected {BUNDLE_FORMAT!r}; write one with `python -m smt export bundle`)")
    settings = json.loads(meta["infer"])
    cfg = parse_section(InferConfig, {**settings, "device": "cpu" if device == "cpu" else "cuda"}, "infer")
    tensors = load_file(str(path))
    models = {}
    for spec in json.loads(meta["models"]):
        name = spec["name"]
        net = ARCHITECTURES[spec["arch"]](**spec["model_args"])
        if hasattr(net, "routing"):
            net.routing = cfg.routing
        state = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(f"{name}.")}
        missing, _, unexpected, shapes = compare_state_dicts(net.state_dict(), state)
        if missing or unexpected or shapes:
            raise CheckpointError(f"--bundle {path}: model {name!r} does not fit its architecture "
                                  f"({len(missing)} missing, {len(unexpected)} unexpected, {len(shapes)} shapes)")
        net.load_state_dict(state, strict=True)
        models[name] = net.to(device).eval()
    fusion = json.loads(meta["fusion"])
    return Method(models, cfg, int(meta["scale"]), fusion.get("weight_a"), source=str(path))


# --- memory: --tile auto and the out-of-memory retry ---------------------------------------------------------

def _bytes_per_lr_pixel(net: torch.nn.Module) -> float:
    """A generous estimate of the activation memory per LR pixel of one forward: about 24 live feature maps of
    ``embed_dim`` channels, one layer's attention scores and bias (heads x window^2 per pixel, three copies) and
    the reconstruction head (64 channels on up to ``scale^2`` pixels), in float32."""
    embed = net.conv_first.out_channels
    heads = max((m.num_heads for m in net.modules() if hasattr(m, "relative_position_bias_table")
                 and hasattr(m, "num_heads")), default=1)
    ws = net.window_size
    return 4.0 * (24 * embed + 3 * heads * ws * ws + 64 * net.upscale ** 2)


def available_bytes(device: torch.device) -> int:
    """Free memory of ``device``: CUDA's free memory, or the machine's available RAM."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 2 * 2**30


def auto_tile(nets: Sequence[torch.nn.Module], h: int, w: int, batch: int, free_bytes: int,
              fraction: float = 0.5) -> int:
    """The largest LR tile (a multiple of the window) whose ``batch`` tiles fit ``fraction`` of ``free_bytes``
    for the hungriest model; 0 (whole image) when the whole image fits."""
    per_px = max(_bytes_per_lr_pixel(n) for n in nets)
    window = max(n.window_size for n in nets)
    budget = fraction * free_bytes
    if h * w * per_px <= budget:
        return 0
    side = int(math.sqrt(budget / (per_px * max(1, batch))))
    return max(window, side - side % window)


def run_with_oom_retry(run: Callable[[int], np.ndarray], tile: int, h: int, w: int, overlap: int, min_tile: int,
                       log: Callable[[str], None] = print) -> np.ndarray:
    """``run(tile)``; on CUDA out-of-memory, again with half the tile (the whole image counts as its longer side)
    until it fits or the tile would fall below ``min_tile`` (or not exceed the overlap)."""
    while True:
        try:
            return run(tile)
        except torch.cuda.OutOfMemoryError:
            smaller = (tile if tile > 0 else max(h, w)) // 2
            if smaller < min_tile or smaller <= overlap:
                raise
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            log(f"CUDA out of memory at tile {tile or 'whole image'}; retrying with tile {smaller}")
            tile = smaller


# --- the command ---------------------------------------------------------------------------------------------

@dataclass
class UpscaleSummary:
    written: list[Path]
    skipped: list[tuple[Path, str]]


def upscale_files(files: Sequence[Path], out_dir: str | Path,
                  runner: "SingleModel | Method | BBoxMethod | torch.nn.Module",
                  tile: int | str | None = None, suffix: str | None = None, overwrite: bool = False,
                  progress: bool = True, log: Callable[[str], None] = lambda m: tqdm.write(m)) -> UpscaleSummary:
    """Upscale ``files`` into ``out_dir`` with ``runner``; ``tile`` (``None``: the runner's own, ``'auto'`` or an
    int) sets the single-window tile; a bare model runs as :class:`SingleModel`. Failures are collected with their
    reason, never raised."""
    out_dir = Path(out_dir)
    if isinstance(runner, torch.nn.Module):
        runner = SingleModel(runner)
    written, skipped = [], []
    scale, device = runner.scale, runner.device
    own = isinstance(runner, (SingleModel, BBoxMethod))  # settings of their own, not an infer section's
    overlap = runner.overlap if own else runner.cfg.tile_overlap
    batch = runner.batch if own else runner.cfg.tile_batch
    for f in tqdm(files, desc="upscale", unit="img", disable=not progress or len(files) < 2):
        target = out_dir / output_name(f, scale, suffix)
        if target.exists() and not overwrite:
            skipped.append((f, f"{f}: {target} exists (use --overwrite)"))
            continue
        try:
            given = read_as_given(f)
            for note in given.notes:
                log(f"{f}: {note}")
            h, w = given.rgb.shape[:2]
            chosen = tile
            if tile == "auto":
                chosen = auto_tile(runner.nets(), h, w, batch, available_bytes(device))
            job = runner if chosen is None else runner.with_tile(int(chosen))
            x = given.to_tensor(device)

            def run(t: int, job=job) -> np.ndarray:
                j = job.with_tile(t)
                total = j.tiles(h, w)
                with tqdm(total=total, desc=f.name, unit="tile", leave=False,
                          disable=not progress or total < 2) as bar, tile_progress(bar.update):
                    return j.run_float255(x, image_id(f, scale))

            start = job.tile if own else job.cfg.tile
            sr = run_with_oom_retry(run, start, h, w, overlap, min_tile=runner.window, log=log)
            write_as_given(target, sr, given, None if given.alpha is None else upscale_alpha(given.alpha, scale))
            written.append(target)
        except (ImageError, ValueError, RuntimeError, OSError) as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            skipped.append((f, reason if reason.startswith(str(f)) else f"{f}: {reason}"))
    return UpscaleSummary(written, skipped)
