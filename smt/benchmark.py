"""``python -m smt benchmark``: a checkpoint (or the pipeline's final method) on the SR literature's test sets.

Every SR paper reports PSNR-Y/SSIM-Y on Set5, Set14, B100, Urban100 and Manga109; reproducing those numbers fails
on conventions more often than on models. This module fixes them in code:

- **Data.** HR images live in ``ROOT/<Set>/HR/``. A missing set is downloaded through the project's data-source
  machinery (``smt/data/sources.json``: URL, licence, expected image count; :mod:`smt.data.download`: resumable,
  size + SHA-256 pinned in a lock file on first download) and copied into ``ROOT/<Set>/HR`` through a hidden
  staging folder renamed into place, so ``ROOT`` only ever holds complete sets. A root that already holds the HR
  folders works offline. Manga109 has no public download (its owners hand it out on request): put it in place.
- **LR.** Each HR image is cropped (bottom/right) to a multiple of the scale, as the standard sets were made
  (MATLAB ``modcrop``), and downscaled with the MATLAB-compatible bicubic (:func:`smt.data.imresize.bicubic_degrade`).
  The crop is reported. Gray images (one channel, or R = G = B: Set14 has two) are replicated to three channels
  for the model and scored on Y like every other image; they are counted and named in the report.
- **Scores.** The literature's convention (BasicSR's ``calculate_psnr``/``calculate_ssim`` with
  ``test_y_channel``: Y of BT.601 in 16-235, float, not rounded; ``crop_border`` = the scale; SSIM with an 11x11
  Gaussian window, sigma 1.5) and, beside it, the NTIRE challenge protocol (:data:`smt.metrics.NTIRE2025`: modcrop 4,
  shave 4). Both use :mod:`smt.metrics`; at x4 on HR cropped to a multiple of 4 they coincide, and the table says
  so. The mean over images is reported, as in the papers.
- **Published numbers** (PSNR-Y, x4, the papers' tables) sit beside ours when the architecture is known.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
from tqdm import tqdm

from smt.config import BENCHMARK_SETS, BenchmarkConfig
from smt.data.dataset_builder import prepare_hr
from smt.data.download import DownloadError, HashLock, download, extract
from smt.data.images import IMAGE_SUFFIXES, float255_to_uint8, read_image
from smt.data.imresize import bicubic_degrade
from smt.data.sources import Source, load_sources
from smt.files import build_aside
from smt.metrics import BASICSR, NTIRE2025, Protocol, prepare_pair, psnr, rgb_to_y, ssim

__all__ = ["SETS", "PUBLISHED", "BenchmarkConfig", "BenchImage", "SetResult", "literature_protocol", "ensure_set",
           "list_hr_images", "prepare_image", "is_gray", "score_y", "published_psnr", "preset_of",
           "benchmark_sets", "format_table", "results_json", "bicubic_upscaler",
           "load_benchmark_config", "run_benchmark_stage", "run_cli_methods", "BenchmarkRun"]

# each set is the data source of the same name in smt/data/sources.json (DIV2K_valid: the pipeline's own)
SETS = BENCHMARK_SETS

# PSNR-Y (dB) of the authors' released weights in their papers' x4 tables, literature convention
PUBLISHED: dict[str, dict] = {
    "hat_l": {"label": "HAT-L x4, ImageNet pre-training (Chen et al., CVPR 2023)", "scale": 4,
              "psnr_y": {"Set5": 33.30, "Set14": 29.47, "B100": 28.09, "Urban100": 28.60, "Manga109": 33.09}},
    "mambairv2_l": {"label": "MambaIRv2-L x4 (Guo et al., CVPR 2025)", "scale": 4,
                    "psnr_y": {"Set5": 33.19, "Set14": 29.29, "B100": 28.01, "Urban100": 28.07, "Manga109": 32.66}},
    # the floor as the papers tabulate it (e.g. RCAN, Zhang et al., ECCV 2018): a check of the conventions
    "bicubic": {"label": "bicubic x4 (as tabulated in the SR papers)", "scale": 4,
                "psnr_y": {"Set5": 28.42, "Set14": 26.00, "B100": 25.96, "Urban100": 23.14, "Manga109": 24.89}},
}

# LR uint8 HxWx3 -> SR as float HxWx3 on the [0, 255] scale, before rounding (fusion mixes these)
Upscaler = Callable[[np.ndarray], np.ndarray]


def load_benchmark_config(params_path: str | Path = "params.yaml") -> BenchmarkConfig:
    """The ``benchmark`` section of ``params_path``, validated; its defaults when the section is absent."""
    from smt.config import load_params, parse_section

    return parse_section(BenchmarkConfig, load_params(params_path).get("benchmark"), "benchmark")


def literature_protocol(scale: int) -> Protocol:
    """The SR papers' convention: BasicSR's computation with ``crop_border`` = the scale, no modcrop."""
    return dataclasses.replace(BASICSR, name=f"literature (BasicSR, shave {scale})", crop_border=scale)


# ------------------------------------------------------------------------------------------------------ data


def _check_set(name: str) -> str:
    """The data source of benchmark set ``name`` (the same name); an unknown set is an error naming it."""
    if name not in SETS:
        raise ValueError(f"unknown benchmark set {name!r} (known: {', '.join(SETS)})")
    return name


def list_hr_images(hr_dir: str | Path) -> list[Path]:
    """The images of a set's HR folder (sorted); a folder without images is an error naming it."""
    hr_dir = Path(hr_dir)
    files = sorted(p for p in hr_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"{hr_dir}: no images (looked for {', '.join(IMAGE_SUFFIXES)})")
    return files


def ensure_set(name: str, root: str | Path, sources: Mapping[str, Source] | None = None,
               downloads: str | Path = "~/.cache/smt/downloads", lock: str | Path = "data/sources.lock.json",
               log: Callable[[str], None] = print) -> Path:
    """``ROOT/<name>/HR``: as found, or downloaded (verified, resumed), extracted and copied into place."""
    source_name = _check_set(name)
    root = Path(root)
    hr_dir = root / name / "HR"
    if hr_dir.is_dir():
        return hr_dir
    if (root / name).exists():
        raise FileNotFoundError(f"{hr_dir}: not found ({root / name} exists without it); put the HR images there, "
                                f"or remove {root / name} to download the set")
    sources = sources if sources is not None else load_sources()
    if source_name not in sources:
        raise ValueError(f"benchmark set {name}: data source {source_name!r} is not in the sources file")
    src = sources[source_name]
    if not src.archives:
        raise FileNotFoundError(f"{hr_dir}: not found, and {name} cannot be downloaded ({src.description}); "
                                f"put its HR images there")
    log(f"{name}: not in {root}; downloading. Licence: {src.license}")
    downloads = Path(downloads).expanduser()
    pins = HashLock(lock)
    folders = []
    for archive in src.archives:
        path = download(archive, downloads, pins, log=log)
        stem = archive.filename.split(".")[0]
        folders.append(extract(path, downloads / "extracted" / source_name / stem, pins.expected(archive)[1]))
    files = sorted((p for f in folders for p in f.glob(src.hr or "") if p.is_file()
                    and p.suffix.lower() in IMAGE_SUFFIXES), key=lambda p: p.name)
    if src.images is not None and len(files) != src.images:
        raise DownloadError(f"benchmark set {name}: the archives hold {len(files)} HR images matching "
                            f"{src.hr!r}, expected {src.images}")
    # built aside and renamed into place: ROOT holds complete sets or none (a crash leaves only the hidden
    # staging folder, removed by the next run)
    with build_aside(root / name, root / f".{name}.partial") as staging:
        (staging / "HR").mkdir()
        for f in files:
            if (staging / "HR" / f.name).exists():
                raise DownloadError(f"benchmark set {name}: two HR images are named {f.name}")
            shutil.copyfile(f, staging / "HR" / f.name)
    log(f"{name}: {len(files)} HR images in {hr_dir}")
    return hr_dir


@dataclass(frozen=True)
class BenchImage:
    id: str
    hr: np.ndarray  # uint8 HxWx3, cropped to a multiple of the scale
    lr: np.ndarray  # MATLAB bicubic of ``hr``
    gray: bool
    original_size: tuple[int, int]  # (height, width) before the crop
    one_channel: bool = False  # the file itself has one channel (not gray content stored as RGB)


def is_gray(img: np.ndarray) -> bool:
    """True when every pixel has R = G = B (a one-channel file, or gray content stored as RGB)."""
    return bool(np.array_equal(img[..., 0], img[..., 1]) and np.array_equal(img[..., 1], img[..., 2]))


def prepare_image(path: str | Path, scale: int) -> BenchImage:
    """Read an HR image (gray -> 3 channels), crop it to a multiple of ``scale``, make its bicubic LR."""
    from PIL import Image

    path = Path(path)
    full = read_image(path)
    hr = prepare_hr(full, scale, name=str(path))  # an HR smaller than the scale raises, naming the file
    with Image.open(path) as fh:
        one_channel = len(fh.getbands()) == 1
    return BenchImage(path.stem, hr, bicubic_degrade(hr, scale), is_gray(full), full.shape[:2], one_channel)


def score_y(sr: np.ndarray, hr: np.ndarray, protocol: Protocol) -> tuple[float, float]:
    """(PSNR-Y, SSIM-Y) of a uint8 pair under ``protocol``: the Y part of :func:`smt.metrics.evaluate_pair`."""
    sr_c, hr_c = prepare_pair(sr, hr, protocol)
    sr_y, hr_y = rgb_to_y(sr_c), rgb_to_y(hr_c)
    return psnr(sr_y, hr_y), ssim(sr_y, hr_y)


# ------------------------------------------------------------------------------------------------------ models


def preset_of(checkpoint: str | Path | None, model: str | None) -> str | None:
    """The preset a checkpoint is an instance of, for the published numbers: ``model`` when given; else the
    preset whose constructor arguments match the checkpoint's (our ``.safetensors`` metadata, or the arguments
    read back from an official file's weights by :func:`smt.models.detect.detect_architecture`); None if none."""
    from smt.models import CheckpointError, read_state_dict
    from smt.models.detect import detect_architecture
    from smt.models.presets import PRESETS

    if model:
        return model
    if checkpoint is None:
        return None
    try:
        meta = {}
        if Path(checkpoint).suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(checkpoint), "pt") as fh:
                meta = fh.metadata() or {}
        if "arch" in meta and "model_args" in meta:
            arch, args = meta["arch"], json.loads(meta["model_args"])
        else:
            arch, args = detect_architecture(read_state_dict(checkpoint)[0], str(checkpoint))
    except (CheckpointError, OSError, ValueError):  # the loader reports unreadable files; here: unknown
        return None
    args = {k: list(v) if isinstance(v, tuple) else v for k, v in args.items()}
    for name, (preset_arch, kwargs) in PRESETS.items():
        ref = {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()}
        shared = (set(ref) & set(args)) - {"img_size"}  # img_size leaves no trace in the weights
        if preset_arch == arch and {"embed_dim", "depths"} <= shared and all(args[k] == ref[k] for k in shared):
            return name
    return None


def published_psnr(preset: str | None, set_name: str, scale: int) -> float | None:
    entry = PUBLISHED.get(preset or "")
    if entry is None or entry["scale"] != scale:
        return None
    return entry["psnr_y"].get(set_name)


def _from_uint8(run: Callable[[np.ndarray], np.ndarray], scale: int) -> Upscaler:
    """An upscaler from a function returning uint8 SR (the rounding is already done: the floats are integers)."""
    up = lambda lr: run(lr).astype(np.float64)  # noqa: E731
    up.scale = scale  # type: ignore[attr-defined]
    return up


def bicubic_upscaler(scale: int) -> Upscaler:
    """The floor: :func:`smt.evaluate.bicubic_upscale` (MATLAB bicubic, rounded) as an upscaler."""
    from smt.evaluate import bicubic_upscale

    return lambda lr: bicubic_upscale(lr, scale).astype(np.float64)


def parse_protocols(value: str) -> tuple[str, ...]:
    """``--protocol``: ``smt``, ``bbox``, a comma list of them or ``both`` (= ``smt,bbox``), in that order."""
    from smt.infer.bbox_protocol import PROTOCOLS, check_protocol

    names = PROTOCOLS if value.strip() == "both" else tuple(v.strip() for v in value.split(",") if v.strip())
    if not names:
        raise ValueError(f"--protocol: no protocol given (valid: {', '.join(PROTOCOLS)}, or both)")
    for n in names:
        check_protocol(n, "--protocol")
    return tuple(dict.fromkeys(names))


def _timed(fn: Upscaler, seconds: dict[str, list[float]], label: str) -> Upscaler:
    """``fn`` that also appends each call's wall-clock seconds to ``seconds[label]``."""
    def run(lr: np.ndarray):
        t = time.perf_counter()
        out = fn(lr)
        seconds.setdefault(label, []).append(time.perf_counter() - t)
        return out

    run.scale = getattr(fn, "scale", None)  # type: ignore[attr-defined]
    return run


def run_cli_methods(checkpoint: str | None, model: str | None, bundle: str | None, device: str,
                    use_self_ensemble: bool = False, tile: int = 0, overlap: int = 8,
                    protocols: Sequence[str] = ("smt",), seconds: dict[str, list[float]] | None = None
                    ) -> tuple[dict[str, Upscaler], dict[str, str | None], str]:
    """The command line's method: ``({label: upscaler}, {label: preset or None}, label)``, run by
    :mod:`smt.infer.upscale` (one model: :class:`SingleModel`) or :func:`smt.infer.bundle.load_bundle`. A checkpoint
    that does not fit its architecture raises :class:`smt.models.CheckpointError` naming the file and the keys.
    ``protocols``: ours (``smt``) and/or the authors' (``bbox``, :mod:`smt.infer.bbox_protocol`) on the same
    weights, labelled ``<label>`` and ``<label> [bbox]`` (``label`` is the first); ``seconds`` collects each
    method's seconds per call."""
    import torch

    from smt.data.images import image_to_tensor
    from smt.infer.bbox_protocol import BBoxMethod
    from smt.infer.upscale import SingleModel
    from smt.models import load_model

    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    seconds = {} if seconds is None else seconds

    def with_bbox(methods: dict[str, Upscaler], label: str, models: dict, scale: int, preset: str | None):
        out, pub = {}, {}
        for p in protocols:
            name = label if p == "smt" else f"{label} [bbox]"
            fn = methods[label] if p == "smt" else _from_uint8(BBoxMethod(dict(models)).__call__, scale)
            out[name], pub[name] = _timed(fn, seconds, name), preset
        return out, pub, next(iter(out))

    if bundle:
        if model or use_self_ensemble or tile:
            raise ValueError("--model, --self-ensemble and --tile apply to --checkpoint; a bundle carries its "
                             "models and inference settings")
        from smt.infer.bundle import load_bundle

        run = load_bundle(bundle, device)
        return with_bbox({"bundle": run}, "bundle", run.method.models, run.scale, None)
    if "bbox" in protocols and (use_self_ensemble or tile):
        raise ValueError("--self-ensemble and --tile: the bbox protocol has its own ensemble and tiling; "
                         "give them with --protocol smt only")
    if tile < 0 or overlap < 0:
        raise ValueError(f"--tile and --tile-overlap must be >= 0, got {tile} and {overlap}")
    if model is not None:
        from smt.models.presets import PRESETS

        if model not in PRESETS:
            raise ValueError(f"--model: unknown preset {model!r} (valid: {', '.join(PRESETS)})")
    single = SingleModel(load_model(checkpoint, model, device, routing="argmax"), tile, overlap, use_self_ensemble)
    preset = preset_of(checkpoint, model)
    label = (preset or Path(checkpoint).stem) + ("+SE" if use_self_ensemble else "")
    upscaler = _from_uint8(lambda lr: single.run(image_to_tensor(lr, single.device)), single.scale)
    return with_bbox({label: upscaler}, label, {label: single.net}, single.scale, preset)


# ------------------------------------------------------------------------------------------------------ runs


@dataclass
class SetResult:
    set: str
    method: str
    n: int
    psnr_y: float
    ssim_y: float
    challenge_psnr_y: float
    challenge_ssim_y: float
    gray: list[str] = field(default_factory=list)
    published_psnr_y: float | None = None


@dataclass
class BenchmarkRun:
    scale: int
    results: dict[str, dict[str, SetResult]]  # set -> method -> result
    per_image: pd.DataFrame
    crops: dict[str, list[str]]  # set -> "id WxH -> W'xH'" for every image the crop changed
    notes: list[str]


def benchmark_sets(methods: Mapping[str, Upscaler], scale: int, sets: Sequence[str], root: str | Path,
                   fused: Mapping[str, tuple[str, str, float]] | None = None,
                   published: Mapping[str, str | None] | None = None, sources: Mapping[str, Source] | None = None,
                   downloads: str | Path = "~/.cache/smt/downloads", lock: str | Path = "data/sources.lock.json",
                   log: Callable[[str], None] = print, progress: bool = True) -> BenchmarkRun:
    """Run every method on every image of ``sets`` and score it under both protocols.

    A method's function returns the SR image (float HxWx3 on the [0, 255] scale), or a dict of them when one
    run gives several named results (a model's plain, +SE and +MW configurations: the dict's names are the
    methods, in its order). ``fused``: name -> (method a, method b, weight of a): ``w * a + (1 - w) * b`` of
    the float outputs, rounded.
    ``published``: method -> preset name, for the papers' numbers beside ours (a method named ``bicubic`` gets
    the papers' bicubic numbers).
    """
    for name in sets:
        _check_set(name)
    lit, challenge = literature_protocol(scale), NTIRE2025
    fused = dict(fused or {})
    names: list[str] = []  # every method, in table order: known once the first image has run
    hr_dirs = {name: ensure_set(name, root, sources, downloads, lock, log) for name in sets}
    rows, crops = [], {}
    for set_name in sets:
        files = list_hr_images(hr_dirs[set_name])
        crops[set_name] = []
        for path in tqdm(files, desc=f"benchmark {set_name}", unit="img", disable=not progress):
            img = prepare_image(path, scale)
            if img.hr.shape[:2] != img.original_size:
                (h, w), (ch, cw) = img.original_size, img.hr.shape[:2]
                crops[set_name].append(f"{img.id} {w}x{h} -> {cw}x{ch}")
            floats: dict[str, np.ndarray] = {}
            for m, fn in methods.items():
                out = fn(img.lr)
                floats.update(out if isinstance(out, dict) else {m: out})
            for m, (a, b, w) in fused.items():
                floats[m] = w * floats[a] + (1.0 - w) * floats[b]
            names = names or list(floats)
            for m in names:
                sr = float255_to_uint8(floats[m])
                if sr.shape != img.hr.shape:
                    raise ValueError(f"{path}: {m} gave {sr.shape[1]}x{sr.shape[0]} for an HR of "
                                     f"{img.hr.shape[1]}x{img.hr.shape[0]} (is the model x{scale}?)")
                try:
                    lit_scores = score_y(sr, img.hr, lit)
                    # the two protocols crop alike when the HR is a multiple of 4 and the shave is 4 (x4)
                    same = img.hr.shape[0] % challenge.modcrop == 0 and img.hr.shape[1] % challenge.modcrop == 0 \
                        and lit.crop_border == challenge.crop_border
                    ch_scores = lit_scores if same else score_y(sr, img.hr, challenge)
                except ValueError as exc:
                    raise ValueError(f"{path}: cannot be scored ({exc})") from None
                rows.append({"set": set_name, "method": m, "id": img.id, "gray": img.gray,
                             "one_channel": img.one_channel,
                             "psnr_y": lit_scores[0], "ssim_y": lit_scores[1],
                             "challenge_psnr_y": ch_scores[0], "challenge_ssim_y": ch_scores[1]})
    per_image = pd.DataFrame(rows, columns=["set", "method", "id", "gray", "one_channel", "psnr_y", "ssim_y",
                                            "challenge_psnr_y", "challenge_ssim_y"])
    results: dict[str, dict[str, SetResult]] = {}
    for set_name in sets:
        results[set_name] = {}
        for m in names:
            df = per_image[(per_image["set"] == set_name) & (per_image["method"] == m)]
            pub = published_psnr({"bicubic": "bicubic", **(published or {})}.get(m), set_name, scale)
            results[set_name][m] = SetResult(
                set_name, m, len(df), float(df["psnr_y"].mean()), float(df["ssim_y"].mean()),
                float(df["challenge_psnr_y"].mean()), float(df["challenge_ssim_y"].mean()),
                [i + (" [1-channel file]" if one else "") for i, one in
                 sorted(zip(df.loc[df["gray"], "id"], df.loc[df["gray"], "one_channel"]))], pub)
    notes = [f"LR: MATLAB-bicubic x1/{scale} of the HR cropped (bottom/right) to a multiple of {scale}.",
             f"Literature: {lit.describe()}.", f"Challenge: {challenge.describe()}."]
    if lit.crop_border == challenge.crop_border and scale % challenge.modcrop == 0:
        notes.append(f"At x{scale} the HR is a multiple of {challenge.modcrop} and both shave {lit.crop_border} px: "
                     "the two protocols give the same numbers (they differ at x2 and x3).")
    notes.append("Gray images (R = G = B) are replicated to three channels for the model and scored on Y, as "
                 "BasicSR (HAT, MambaIR) does. MATLAB-era tables (the bicubic rows) scored one-channel files on "
                 "their raw gray values instead: 20 log10(255/219) = 1.32 dB lower on such an image (Set14's "
                 "bridge: 0.09 dB on the Set14 mean).")
    return BenchmarkRun(scale, results, per_image, crops, notes)


def format_table(run: BenchmarkRun, set_name: str) -> str:
    """One set's table: every method's means under both protocols, the published number beside ours."""
    res = run.results[set_name]
    any_res = next(iter(res.values()))
    gray = f", {len(any_res.gray)} gray ({', '.join(any_res.gray)})" if any_res.gray else ""
    crops = run.crops.get(set_name, [])
    crop = (f"HR cropped to a multiple of {run.scale}: {len(crops)} of {any_res.n} images"
            + (f" (e.g. {crops[0]})" if crops else ""))
    head = f"{set_name} x{run.scale}: {any_res.n} images{gray}. {crop}"
    cols = ["method", "PSNR-Y", "SSIM-Y", "challenge PSNR-Y", "challenge SSIM-Y", "published PSNR-Y",
            "ours - published"]
    lines = []
    for m, r in res.items():
        pub = "-" if r.published_psnr_y is None else f"{r.published_psnr_y:.2f}"
        diff = "-" if r.published_psnr_y is None else f"{r.psnr_y - r.published_psnr_y:+.2f}"
        lines.append([m, f"{r.psnr_y:.2f}", f"{r.ssim_y:.4f}", f"{r.challenge_psnr_y:.2f}",
                      f"{r.challenge_ssim_y:.4f}", pub, diff])
    widths = [max(len(c), *(len(row[i]) for row in lines)) for i, c in enumerate(cols)]

    def fmt(row: list[str]) -> str:
        return "  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(row, widths)))

    return "\n".join([head, fmt(cols), "  ".join("-" * w for w in widths), *map(fmt, lines)])


def results_json(run: BenchmarkRun, method: str) -> dict[str, dict]:
    """``{set: {"psnr_y", "ssim_y", "n"}}`` of one method (literature convention)."""
    return {s: {"psnr_y": r[method].psnr_y, "ssim_y": r[method].ssim_y, "n": r[method].n}
            for s, r in run.results.items()}


# ------------------------------------------------------------------------------------------------ the DVC stage


def run_benchmark_stage(params_path: str | Path, results_dir: str | Path, report_dir: str | Path,
                        metrics_path: str | Path, log: Callable[[str], None] = print) -> BenchmarkRun:
    """The ``benchmark`` stage: bicubic, every configuration of each final model as the infer stage runs it
    (:func:`smt.infer.runner.model_outputs`: plain, +SE, +MW) and the fused method (the weight the infer stage
    fitted, ``results/fusion.json``, mixing each model's most complete configuration) on ``benchmark.sets``.
    Writes ``report_dir/per_image.csv``, ``report_dir/tables.txt`` and ``metrics_path``
    (``{"benchmark": {method: {set: {psnr_y, ssim_y, n}}}}``)."""
    from smt.config import load_section
    from smt.data.images import image_to_tensor, tensor_to_float255
    from smt.distributed import device_for
    from smt.infer.runner import METHOD_ORDER, load_method_models, model_outputs

    cfg = load_benchmark_config(params_path)
    infer_cfg, train_cfg = load_section("infer", params_path), load_section("train", params_path)
    scale = load_section("data", params_path).scale
    device = device_for(infer_cfg.device)
    order = METHOD_ORDER(infer_cfg)
    methods: dict[str, Callable] = {"bicubic": bicubic_upscaler(scale)}
    published: dict[str, str | None] = {}
    best: dict[str, str] = {}
    for m, net in load_method_models(infer_cfg, train_cfg, device).items():
        def run(lr: np.ndarray, net=net, m=m) -> dict[str, np.ndarray]:
            outs = model_outputs(net, image_to_tensor(lr, device), m, infer_cfg, scale, infer_cfg.seed)
            return {k: tensor_to_float255(v) for k, v in outs.items()}

        methods[m] = run
        mine = [k for k in order if k == m or k.startswith(f"{m}+")]
        published.update({k: train_cfg.models[m].preset for k in mine})
        best[m] = mine[-1]  # the most complete configuration: what the fusion mixes
    fused = {}
    fusion_json = Path(results_dir) / "fusion.json"
    if len(infer_cfg.models) == 2:
        if not fusion_json.is_file():
            raise FileNotFoundError(f"{fusion_json}: no fitted fusion weight (run the infer stage first)")
        fit = json.loads(fusion_json.read_text())
        fused["fused"] = (best[fit["model_a"]], best[fit["model_b"]], float(fit["weight_a"]))
    run = benchmark_sets(methods, scale, cfg.sets, cfg.root, fused, published, downloads=cfg.downloads,
                         lock=cfg.lock, log=log)
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    run.per_image.to_csv(report_dir / "per_image.csv", index=False, float_format="%.6f")
    (report_dir / "tables.txt").write_text("\n\n".join(format_table(run, s) for s in cfg.sets) + "\n")
    names = list(next(iter(run.results.values())))
    metrics = {m: results_json(run, m) for m in names}
    Path(metrics_path).parent.mkdir(parents=True, exist_ok=True)
    Path(metrics_path).write_text(json.dumps({"benchmark": metrics}, indent=2) + "\n")
    return run
