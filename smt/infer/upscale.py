"""``python -m smt upscale``: super-resolve a user's images with a trained or official checkpoint.

The architecture comes from ``--model`` (a preset name) or, for checkpoints written by this project
(``model.safetensors``), from the file's own metadata. Images are read with the pipeline's rules (grayscale and
16-bit converted, transparency refused with a message) and written as ``<stem>x<scale>.png`` in ``--out``; an
existing output is never overwritten unless ``--overwrite`` is given. A file that cannot be read is reported
and skipped; the exit code says whether any failed.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from tqdm import tqdm

from smt.data.images import IMAGE_SUFFIXES, ImageError, image_to_tensor, read_image, tensor_to_image, write_png
from smt.infer.ensemble import self_ensemble
from smt.infer.precision import Precision, with_precision
from smt.infer.tiling import tiled_forward
from smt.models import ARCHITECTURES, CheckpointError, build_model, load_weights

__all__ = ["collect_inputs", "model_from_checkpoint", "upscale_files", "UpscaleSummary"]


def collect_inputs(paths: Sequence[str | Path]) -> list[Path]:
    """Files as given, folders expanded to their images (sorted); a missing path is an error."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such file or folder")
    if not files:
        raise FileNotFoundError(f"no images found in {', '.join(map(str, paths))}")
    return files


def _metadata(path: Path) -> dict[str, str]:
    if path.suffix != ".safetensors":
        return {}
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as fh:
            return fh.metadata() or {}
    except Exception as exc:  # corrupt header
        raise CheckpointError(f"{path}: not a readable checkpoint ({exc})") from None


def model_from_checkpoint(checkpoint: str | Path, model: str | None, device: str,
                          routing: str = "argmax") -> torch.nn.Module:
    """Build the architecture (preset ``model`` or the checkpoint's metadata) and load the weights strictly."""
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise CheckpointError(f"{checkpoint}: checkpoint file not found")
    meta = _metadata(checkpoint)
    if model:
        net = build_model(model)
    elif "arch" in meta and "model_args" in meta:
        kwargs = json.loads(meta["model_args"])
        kwargs.pop("aux_scales", None)  # exported weights may carry auxiliary heads; inference uses x4 only
        net = ARCHITECTURES[meta["arch"]](**kwargs)
    else:
        raise CheckpointError(f"{checkpoint}: no architecture metadata; pass --model (e.g. hat_l, mambairv2_l)")
    if hasattr(net, "routing"):
        net.routing = routing
    # exported EMA weights carry the auxiliary heads of training; inference uses the x4 head only
    load_weights(net, checkpoint, ignore_unexpected=("aux_heads.",))
    return net.to(device).eval()


@dataclass
class UpscaleSummary:
    written: list[Path]
    skipped: list[tuple[Path, str]]


def upscale_files(files: Sequence[Path], out_dir: str | Path, net: torch.nn.Module, tile: int = 0,
                  overlap: int = 8, use_self_ensemble: bool = False, overwrite: bool = False,
                  precision: Precision = "fp32", seed: int = 0) -> UpscaleSummary:
    out_dir = Path(out_dir)
    device = next(net.parameters()).device
    scale = net.upscale
    written, skipped = [], []
    for f in tqdm(files, desc="upscale", unit="img"):
        target = out_dir / f"{f.stem}x{scale}.png"
        if target.exists() and not overwrite:
            skipped.append((f, f"{target} exists (use --overwrite)"))
            continue
        try:
            lr = read_image(f)
        except ImageError as exc:
            skipped.append((f, str(exc)))
            continue
        x = image_to_tensor(lr, device)
        torch.manual_seed(seed)
        with torch.no_grad():
            base = with_precision(net, precision)
            fwd = (lambda t: self_ensemble(base, t)) if use_self_ensemble else base
            y = tiled_forward(fwd, x, scale, tile, overlap)
        write_png(target, tensor_to_image(y))
        written.append(target)
    return UpscaleSummary(written, skipped)
