"""MATLAB-compatible bicubic ``imresize`` (the recipe that made DIV2K's ``X4`` LR images).

Follows MATLAB's ``imresize(img, scale, 'bicubic')`` with antialiasing on downscale, as re-implemented by
BasicSR's ``matlab_functions.imresize``: the cubic kernel with a = -0.5, a kernel widened by ``1/scale`` when
downscaling, symmetric (edge-including) border handling and output size ``ceil(in * scale)``.

Each axis is resized by one dense ``(out, in)`` matrix whose rows hold the normalised kernel weights; the
symmetric border is folded into that matrix, so a resize is two matrix products. Weights are computed in
float64; BasicSR computes the sample positions in float32, which is why it differs from this (and from MATLAB)
by up to 1e-5 at non-dyadic scales.
"""
from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

from smt.data.images import uint8_to_unit, unit_to_uint8

__all__ = ["imresize", "imresize_torch", "resize_matrix", "to_uint8", "bicubic_degrade"]


def _cubic(x: np.ndarray) -> np.ndarray:
    ax = np.abs(x)
    ax2, ax3 = ax * ax, ax * ax * ax
    near = (1.5 * ax3 - 2.5 * ax2 + 1.0) * (ax <= 1)
    far = (-0.5 * ax3 + 2.5 * ax2 - 4.0 * ax + 2.0) * ((ax > 1) & (ax <= 2))
    return near + far


@lru_cache(maxsize=64)
def resize_matrix(in_length: int, out_length: int, scale: float, antialiasing: bool = True) -> np.ndarray:
    """The ``(out_length, in_length)`` float64 matrix that resizes one axis."""
    if in_length < 1 or out_length < 1:
        raise ValueError(f"cannot resize an axis of length {in_length} to {out_length}")
    kernel_width = 4.0
    shrink = scale < 1 and antialiasing
    if shrink:
        kernel_width = kernel_width / scale
    x = np.arange(1, out_length + 1, dtype=np.float64)
    # centre of output pixel k (1-based) in input coordinates, MATLAB's convention
    u = x / scale + 0.5 * (1 - 1 / scale)
    left = np.floor(u - kernel_width / 2)
    taps = math.ceil(kernel_width) + 2
    idx = left[:, None] + np.arange(taps)[None, :]  # 1-based input indices
    dist = u[:, None] - idx
    w = scale * _cubic(dist * scale) if shrink else _cubic(dist)
    w = w / w.sum(axis=1, keepdims=True)
    # symmetric padding: index 0 -> 1, -1 -> 2, ..., n+1 -> n, n+2 -> n-1 (1-based), repeated for long pads
    zero_based = idx.astype(np.int64) - 1
    period = 2 * in_length
    folded = np.mod(zero_based, period)
    folded = np.where(folded >= in_length, period - 1 - folded, folded)
    mat = np.zeros((out_length, in_length), dtype=np.float64)
    rows = np.repeat(np.arange(out_length), taps)
    np.add.at(mat, (rows, folded.ravel()), w.ravel())
    return mat


def imresize(img: np.ndarray, scale: float, antialiasing: bool = True) -> np.ndarray:
    """Resize an ``HxW`` or ``HxWxC`` float image by ``scale``; returns float64, not clipped or rounded.

    Output size is ``ceil(H*scale) x ceil(W*scale)``, as in MATLAB.
    """
    if scale <= 0:
        raise ValueError(f"scale must be positive, got {scale}")
    arr = np.asarray(img, dtype=np.float64)
    if arr.ndim not in (2, 3):
        raise ValueError(f"expected an HxW or HxWxC image, got shape {arr.shape}")
    h, w = arr.shape[:2]
    out_h, out_w = math.ceil(h * scale), math.ceil(w * scale)
    mh = resize_matrix(h, out_h, float(scale), antialiasing)
    mw = resize_matrix(w, out_w, float(scale), antialiasing)
    if arr.ndim == 2:
        return mh @ arr @ mw.T
    # rows first, then columns (the order MATLAB and BasicSR use)
    tmp = np.einsum("oh,hwc->owc", mh, arr)
    return np.einsum("pw,owc->opc", mw, tmp)


def to_uint8(img: np.ndarray) -> np.ndarray:
    """``[0, 1]`` float -> uint8 by the pipeline's one rule (:func:`smt.data.images.unit_to_uint8`: clip, scale by
    255 in float32, round half to even, as BasicSR's ``tensor2img``)."""
    return unit_to_uint8(img)


def bicubic_degrade(hr: np.ndarray, scale: int) -> np.ndarray:
    """DIV2K-style LR: antialiased MATLAB bicubic downscale of a uint8 HR image by ``1/scale``, rounded to uint8."""
    if hr.dtype != np.uint8:
        raise TypeError(f"expected a uint8 image, got {hr.dtype}")
    return to_uint8(imresize(uint8_to_unit(hr), 1.0 / scale))


def imresize_torch(x: "torch.Tensor", scale: float, antialiasing: bool = True) -> "torch.Tensor":
    """:func:`imresize` for a batch of (..., H, W) tensors (e.g. training targets), as two matrix products.

    The resize matrices are the float64 ones of :func:`resize_matrix`, cast to ``x``'s dtype; differentiable.
    """
    import torch

    h, w = x.shape[-2:]
    out_h, out_w = math.ceil(h * scale), math.ceil(w * scale)
    mh = torch.as_tensor(resize_matrix(h, out_h, float(scale), antialiasing), dtype=x.dtype, device=x.device)
    mw = torch.as_tensor(resize_matrix(w, out_w, float(scale), antialiasing), dtype=x.dtype, device=x.device)
    return mh @ x @ mw.T
