"""Colour augmentation that keeps a training pair exactly consistent with the bicubic degradation.

The LR of a pair is ``bicubic_degrade(HR)``: MATLAB's antialiased bicubic, linear and separate per channel,
then rounded to uint8. Two colour augmentations follow from that:

* a **channel permutation** commutes with the degradation exactly (rounding included), so it is applied to the
  stored LR and HR patches;
* a **colour matrix** (a hue rotation about the grey axis and a saturation scale) mixes channels and the mixed
  HR is rounded and clipped to uint8, so the LR is re-made from the transformed HR:
  ``LR' = bicubic_degrade(colour(HR))``. For one patch this needs HR context around it; :func:`degrade_patch`
  takes :data:`CONTEXT` LR pixels of it, which is more than the kernel's reach, so the patch equals the same
  region of the whole transformed image degraded at once (tested).

Photographs with few hues (the demo's) otherwise teach a small model their palette: it shifts the colour of
unseen images (a blue sky turns grey). The ntire2025 profile keeps the paper's recipe (flips and rotations only).
"""
from __future__ import annotations

import math

import numpy as np

from smt.data.imresize import bicubic_degrade

__all__ = ["CONTEXT", "PERMUTATIONS", "color_matrix", "apply_color", "degrade_patch"]

# The antialiased x1/s cubic kernel is 4 LR pixels wide: an LR pixel reads HR within 2 LR pixels of its
# centre. One more pixel of context costs little and keeps the patch clear of the crop's own (symmetric) border.
CONTEXT = 3

PERMUTATIONS: tuple[tuple[int, int, int], ...] = ((0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0))

_GREY = np.full((3, 3), 1.0 / 3.0)  # projection onto the grey axis (1, 1, 1) / sqrt(3)


def color_matrix(hue_degrees: float, saturation: float) -> np.ndarray:
    """The 3x3 RGB matrix that rotates hue by ``hue_degrees`` about the grey axis, then scales saturation.

    Both keep grey pixels grey and keep the mean of R, G and B; ``color_matrix(0, 1)`` is the identity."""
    t = math.radians(hue_degrees)
    k = np.array([[0.0, -1.0, 1.0], [1.0, 0.0, -1.0], [-1.0, 1.0, 0.0]]) / math.sqrt(3.0)  # cross product with the axis
    rotation = math.cos(t) * np.eye(3) + math.sin(t) * k + (1.0 - math.cos(t)) * _GREY
    return _GREY + saturation * (np.eye(3) - _GREY) @ rotation


def apply_color(hr: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """``matrix`` applied to every pixel of a uint8 ``HxWx3`` image, rounded (half to even) and clipped."""
    if hr.dtype != np.uint8 or hr.ndim != 3 or hr.shape[2] != 3:
        raise ValueError(f"expected a uint8 HxWx3 image, got {hr.dtype} {hr.shape}")
    out = hr.astype(np.float64) @ np.asarray(matrix, dtype=np.float64).T
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def degrade_patch(hr: np.ndarray, top: int, left: int, patch_size: int, scale: int,
                  matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The (LR, HR) patch at LR corner ``(top, left)`` of the pair (``bicubic_degrade(colour(hr))``,
    ``colour(hr)``), computed from a crop of ``hr`` with :data:`CONTEXT` LR pixels of context.

    ``hr`` is the whole uint8 ``HxWx3`` HR image (its sides multiples of ``scale``)."""
    h, w = hr.shape[0] // scale, hr.shape[1] // scale
    if top < 0 or left < 0 or top + patch_size > h or left + patch_size > w:
        raise ValueError(f"patch {patch_size} at ({top}, {left}) is outside the {w}x{h} LR image")
    # where the crop meets the image border it is the image border, so the degradation pads it the same way
    t0, l0 = max(top - CONTEXT, 0), max(left - CONTEXT, 0)
    t1, l1 = min(top + patch_size + CONTEXT, h), min(left + patch_size + CONTEXT, w)
    crop = apply_color(hr[scale * t0:scale * t1, scale * l0:scale * l1], matrix)
    lr = bicubic_degrade(crop, scale)
    dt, dl = top - t0, left - l0
    return (lr[dt:dt + patch_size, dl:dl + patch_size],
            crop[scale * dt:scale * (dt + patch_size), scale * dl:scale * (dl + patch_size)])
