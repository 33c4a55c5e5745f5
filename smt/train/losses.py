"""The multi-scale ("scale-aware") loss of the NTIRE 2025 BBox solution.

``loss = (l(SR_x4, HR) + 0.5 l(SR_x3, HR_x3) + 0.5 l(SR_x2, HR_x2)) / 2`` where ``HR_xs`` is HR resized to s/4
of its size and ``l`` is L1 or MSE. The resize (``train.aux_target_resize``): ``bicubic``, the authors'
(``F.interpolate(hr, size=(h // 4 * s, w // 4 * s), mode='bicubic', align_corners=False)``, no antialiasing, not
clamped: ``models/team15_SMT/models/sr_mutliscale_model.py``), or ``matlab``, MATLAB-bicubic with antialiasing,
the kernel that made the LR images.
Scales and weights come from params; the normaliser is the sum of the weights (1 + 0.5 + 0.5 = 2 for the
defaults), so with no auxiliary heads the loss is plain ``l(SR_x4, HR)``.
"""
from __future__ import annotations

import functools
import math
from typing import Literal, Mapping

import torch
import torch.nn.functional as F

from smt.data.imresize import resize_matrix

__all__ = ["pixel_loss", "multiscale_loss", "multiscale_targets", "TARGET_RESIZES"]

LossKind = Literal["l1", "mse"]
TARGET_RESIZES = ("bicubic", "matlab")


def pixel_loss(pred: torch.Tensor, target: torch.Tensor, kind: LossKind) -> torch.Tensor:
    if kind == "l1":
        return F.l1_loss(pred, target)
    if kind == "mse":
        return F.mse_loss(pred, target)
    raise ValueError(f"unknown loss {kind!r} (valid: 'l1', 'mse')")


def _resize(hr: torch.Tensor, main_scale: int, s: int, resize: str) -> torch.Tensor:
    if resize == "matlab":  # imresize_torch's values, its matrices made once per shape, dtype and device
        mh, mw = _resize_matrices(*hr.shape[-2:], s / main_scale, hr.dtype, hr.device)
        return mh @ hr @ mw.T
    if resize == "bicubic":
        h, w = hr.shape[-2:]
        return F.interpolate(hr, size=(h // main_scale * s, w // main_scale * s), mode="bicubic", align_corners=False)
    raise ValueError(f"train.aux_target_resize: {resize!r} is not a resize (valid: {', '.join(TARGET_RESIZES)})")


def multiscale_targets(hr: torch.Tensor, main_scale: int, scales: tuple[int, ...],
                       resize: str = "bicubic") -> dict[int, torch.Tensor]:
    """HR resized to ``s / main_scale`` for every auxiliary scale ``s`` (HR itself for the main scale)."""
    return {s: hr if s == main_scale else _resize(hr, main_scale, s, resize) for s in (main_scale, *scales)}


@functools.lru_cache(maxsize=32)
def _resize_matrices(h: int, w: int, scale: float, dtype: torch.dtype,
                     device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`imresize_torch`'s matrices for an (h, w) input, on ``device`` (not copied to the GPU for every
    micro-batch)."""
    out_h, out_w = math.ceil(h * scale), math.ceil(w * scale)
    return (torch.as_tensor(resize_matrix(h, out_h, float(scale)), dtype=dtype, device=device),
            torch.as_tensor(resize_matrix(w, out_w, float(scale)), dtype=dtype, device=device))


def multiscale_loss(outputs: Mapping[int, torch.Tensor], hr: torch.Tensor, main_scale: int,
                    weights: Mapping[int, float], kind: LossKind,
                    resize: str = "bicubic") -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Weighted sum of per-scale losses divided by the total weight; returns (loss, per-scale values as detached
    scalar tensors: reading them is left to the caller, so a training step need not wait for the device)."""
    aux = tuple(s for s in outputs if s != main_scale)
    targets = multiscale_targets(hr, main_scale, aux, resize)
    total = torch.zeros((), device=hr.device, dtype=torch.float32)
    parts = {}
    for s, out in outputs.items():
        target = targets[s]
        if out.shape != target.shape:
            raise ValueError(f"x{s} output {tuple(out.shape)} does not match its target {tuple(target.shape)}")
        value = pixel_loss(out.float(), target.float(), kind)
        parts[s] = value.detach()
        total = total + weights.get(s, 1.0) * value
    norm = sum(weights.get(s, 1.0) for s in outputs)
    return total / norm, parts
