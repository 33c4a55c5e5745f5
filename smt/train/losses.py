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

from typing import Literal, Mapping

import torch
import torch.nn.functional as F

from smt.data.imresize import imresize_torch

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
    if resize == "matlab":
        return imresize_torch(hr, s / main_scale)
    if resize == "bicubic":
        h, w = hr.shape[-2:]
        return F.interpolate(hr, size=(h // main_scale * s, w // main_scale * s), mode="bicubic", align_corners=False)
    raise ValueError(f"train.aux_target_resize: {resize!r} is not a resize (valid: {', '.join(TARGET_RESIZES)})")


def multiscale_targets(hr: torch.Tensor, main_scale: int, scales: tuple[int, ...],
                       resize: str = "bicubic") -> dict[int, torch.Tensor]:
    """HR resized to ``s / main_scale`` for every auxiliary scale ``s`` (HR itself for the main scale)."""
    return {s: hr if s == main_scale else _resize(hr, main_scale, s, resize) for s in (main_scale, *scales)}


def multiscale_loss(outputs: Mapping[int, torch.Tensor], hr: torch.Tensor, main_scale: int,
                    weights: Mapping[int, float], kind: LossKind,
                    resize: str = "bicubic") -> tuple[torch.Tensor, dict[int, float]]:
    """Weighted sum of per-scale losses divided by the total weight; returns (loss, per-scale values)."""
    aux = tuple(s for s in outputs if s != main_scale)
    targets = multiscale_targets(hr, main_scale, aux, resize)
    total = torch.zeros((), device=hr.device, dtype=torch.float32)
    parts = {}
    for s, out in outputs.items():
        target = targets[s]
        if out.shape != target.shape:
            raise ValueError(f"x{s} output {tuple(out.shape)} does not match its target {tuple(target.shape)}")
        value = pixel_loss(out.float(), target.float(), kind)
        parts[s] = float(value.detach())
        total = total + weights.get(s, 1.0) * value
    norm = sum(weights.get(s, 1.0) for s in outputs)
    return total / norm, parts
