"""Weighted fusion of two models' outputs, with the weight fit on validation images.

``fused = w * a + (1 - w) * b`` in float, then rounded (not truncated, unlike the submission's uint8 cast) to
uint8 by the pipeline's one rule (:mod:`smt.data.images`). The weight maximises the challenge score, the mean
PSNR-Y of the rounded outputs over the validation images: a grid search over ``w`` in [0, 1] (``grid`` points;
PSNR-Y is smooth and unimodal in w in practice, and the grid evaluates exactly the quantity reported, rounding
included). The closed-form least-squares weight on the pooled Y channel is reported beside it as a check.

The fit reads each image once and scores every grid weight on it while it is in memory
(:func:`fusion_squared_errors`: per-weight sums of squared Y errors, in float64 PyTorch on the given device, a
GPU in the full profile), so the images may come from a generator and only one is held at a time. The
fused pixels are exactly those :func:`fuse` makes; only the order of the float64 sums differs from the per-weight
NumPy loop kept as :func:`fit_fusion_weight_reference` (the curves agree to ~1e-12 dB; a test compares them).
The per-image sums also let ranks score disjoint shards of the images: :class:`ShardedFit` (what the infer stage
uses under ``torchrun``) gives each image one row of a zero array (:func:`fusion_image_terms`), sums the arrays
over the ranks and fits every rank the same weight; as each row comes from one rank and zeros from the others,
the sum is exact and the fit equals the one-process fit bit for bit (:func:`fit_from_image_terms` adds the
rows up in image order whichever rank scored them).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import torch

from smt.data.images import float255_to_uint8
from smt.distributed import all_reduce_sum
from smt.metrics import _Y_WEIGHTS, NTIRE2025, Protocol, prepare_pair, psnr, rgb_to_y

__all__ = ["FusionFit", "fuse", "fused_float255", "fit_fusion_weight", "fit_fusion_weight_reference",
           "least_squares_weight", "fusion_squared_errors", "fit_from_squared_errors", "fusion_grid",
           "fusion_image_terms", "fit_from_image_terms", "ShardedFit"]


def fused_float255(a: np.ndarray, b: np.ndarray, w: float) -> np.ndarray:
    """The fusion of float HxWx3 outputs in [0, 255], before rounding: ``w * a + (1 - w) * b``."""
    return w * a + (1.0 - w) * b


def fuse(a: np.ndarray, b: np.ndarray, w: float) -> np.ndarray:
    """Float HxWx3 outputs in [0, 255] -> uint8 by the pipeline's one rule (:func:`float255_to_uint8`)."""
    return float255_to_uint8(fused_float255(a, b, w))


@dataclass
class FusionFit:
    weight: float
    psnr_y: float
    grid: list[float]
    curve: list[float]  # mean PSNR-Y at each grid weight
    least_squares_weight: float


def least_squares_weight(pairs: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]],
                         protocol: Protocol = NTIRE2025) -> float:
    """argmin_w sum ||Y(w a + (1-w) b) - Y(hr)||^2 over all pixels (Y is linear), clipped to [0, 1]."""
    num = den = 0.0
    for a, b, hr in pairs:
        n, d = _least_squares_terms(a, b, hr, protocol)
        num, den = num + n, den + d
    return _least_squares_from(num, den)


def _least_squares_terms(a: np.ndarray, b: np.ndarray, hr: np.ndarray, protocol: Protocol) -> tuple[float, float]:
    ya, yb, yh = (rgb_to_y(_crop(x, protocol)) for x in (a, b, hr))
    d = ya - yb
    return float(np.sum(d * (yh - yb))), float(np.sum(d * d))


def _least_squares_from(num: float, den: float) -> float:
    return float(np.clip(num / den, 0.0, 1.0)) if den > 0 else 0.5


def _crop(x: np.ndarray, protocol: Protocol) -> np.ndarray:
    """The protocol's modcrop and border shave, for float or uint8 arrays."""
    h, w = x.shape[:2]
    if protocol.modcrop > 1:
        h, w = h - h % protocol.modcrop, w - w % protocol.modcrop
    b = protocol.crop_border
    x = x[:h, :w]
    return x[b:-b, b:-b] if b else x


def fusion_grid(grid: int) -> list[float]:
    """The ``grid`` weights searched, evenly spaced over [0, 1]."""
    if grid < 2:
        raise ValueError(f"the fusion grid needs at least 2 weights, got {grid}")
    return np.linspace(0.0, 1.0, grid).tolist()


@torch.no_grad()
def fusion_squared_errors(a: np.ndarray, b: np.ndarray, hr: np.ndarray, weights: Sequence[float],
                          protocol: Protocol = NTIRE2025, device: str | torch.device = "cpu") -> tuple[np.ndarray, int]:
    """For one image: the sum over the protocol's pixels of the squared Y error of ``fuse(a, b, w)`` against
    ``hr``, for every ``w`` in ``weights`` (float64, shape (len(weights),)), and the pixel count."""
    if a.shape != b.shape or a.shape != hr.shape:
        raise ValueError(f"fusion: outputs {a.shape}, {b.shape} and HR {hr.shape} differ in size")
    prepare_pair(hr, hr, protocol)  # the same checks as the metric (uint8 HxWx3 HR)
    # channels first, so each channel is one contiguous plane; every op below writes into a preallocated buffer
    ta, tb, th = (torch.from_numpy(_crop(x, protocol)).to(device).permute(2, 0, 1).to(torch.float64).contiguous()
                  for x in (a, b, hr))
    if torch.isnan(ta).any() or torch.isnan(tb).any():
        raise ValueError("float255_to_uint8: the image has NaN values")  # what fuse() says
    c0, c1, c2 = (float(c) for c in _Y_WEIGHTS)
    neg_yh = -(th[0] * c0 + th[1] * c1 + th[2] * c2)  # the constant 16 cancels in the difference
    fused, part, err = torch.empty_like(ta), torch.empty_like(tb), torch.empty_like(neg_yh)
    sse = torch.empty(len(weights), dtype=torch.float64, device=device)
    for i, w in enumerate(weights):
        torch.mul(ta, w, out=fused)  # w * a + (1 - w) * b, as fuse() computes it
        torch.mul(tb, 1.0 - w, out=part)
        fused.add_(part).round_().clamp_(0.0, 255.0)  # float255_to_uint8's values (round half to even)
        torch.add(neg_yh, fused[0], alpha=c0, out=err)
        err.add_(fused[1], alpha=c1).add_(fused[2], alpha=c2)
        sse[i] = torch.dot(err.view(-1), err.view(-1))
    return sse.cpu().numpy(), err.numel()


def fit_from_squared_errors(sse: Sequence[np.ndarray], counts: Sequence[int], weights: Sequence[float],
                            least_squares: float) -> FusionFit:
    """The fit from every image's :func:`fusion_squared_errors` (in image order): mean PSNR-Y per weight."""
    scores = np.array([[math.inf if e == 0 else 10.0 * math.log10(255.0 ** 2 / (e / n)) for e in row]
                       for row, n in zip(sse, counts)])  # (images, weights)
    curve = [float(np.mean(np.ascontiguousarray(scores[:, j]))) for j in range(len(weights))]
    best = int(np.argmax(curve))
    return FusionFit(weights[best], curve[best], list(weights), curve, least_squares)


def fusion_image_terms(a: np.ndarray, b: np.ndarray, hr: np.ndarray, weights: Sequence[float],
                       protocol: Protocol = NTIRE2025, device: str | torch.device = "cpu") -> np.ndarray:
    """One image's part of the fit as one float64 row of ``len(weights) + 3`` values: the squared Y error per
    weight (:func:`fusion_squared_errors`), the pixel count, and the two least-squares terms."""
    sse, n = fusion_squared_errors(a, b, hr, weights, protocol, device)
    ln, ld = _least_squares_terms(a, b, hr, protocol)
    return np.concatenate([sse, np.array([n, ln, ld], dtype=np.float64)])


def fit_from_image_terms(rows: np.ndarray, weights: Sequence[float]) -> FusionFit:
    """The fit from every image's :func:`fusion_image_terms`, one row per image in image order."""
    rows = np.asarray(rows, dtype=np.float64)
    k = len(weights)
    if rows.ndim != 2 or rows.shape[1] != k + 3:
        raise ValueError(f"fusion: expected rows of {k + 3} terms for {k} weights, got shape {rows.shape}")
    if len(rows) == 0:
        raise ValueError("fit_fusion_weight needs at least one validation image")
    unscored = np.flatnonzero(rows[:, k] == 0)
    if len(unscored):
        raise ValueError(f"fusion: image(s) {unscored.tolist()} (in manifest order) were scored by no rank")
    num = den = 0.0
    for ln, ld in rows[:, k + 1:]:  # in image order, as one process adds them
        num, den = num + float(ln), den + float(ld)
    return fit_from_squared_errors(list(rows[:, :k]), [int(n) for n in rows[:, k]], weights,
                                   _least_squares_from(num, den))


def fit_fusion_weight(pairs: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]], grid: int = 101,
                      protocol: Protocol = NTIRE2025, device: str | torch.device = "cpu") -> FusionFit:
    """``pairs``: (output a as float HxWx3 in [0,255], output b likewise, HR uint8), any iterable (read once).
    Returns the best grid weight; the scoring runs on ``device``."""
    weights = fusion_grid(grid)
    rows = [fusion_image_terms(a, b, hr, weights, protocol, device) for a, b, hr in pairs]
    return fit_from_image_terms(np.array(rows).reshape(len(rows), len(weights) + 3), weights)


class ShardedFit:
    """The fit over ``n_images`` images (in manifest order) of which this process scores some (:meth:`add`,
    with the image's position); :meth:`fit` sums every process's rows (one all-reduce; none outside a process
    group) and returns the same fit on every rank, equal to :func:`fit_fusion_weight` over all the images."""

    def __init__(self, n_images: int, grid: int = 101, protocol: Protocol = NTIRE2025,
                 device: str | torch.device = "cpu"):
        self.weights, self.protocol, self.device = fusion_grid(grid), protocol, torch.device(device)
        self.rows = np.zeros((n_images, len(self.weights) + 3), dtype=np.float64)

    def add(self, index: int, a: np.ndarray, b: np.ndarray, hr: np.ndarray) -> None:
        self.rows[index] = fusion_image_terms(a, b, hr, self.weights, self.protocol, self.device)

    def fit(self) -> FusionFit:
        """Collective under a process group: every rank calls it once its images are added."""
        return fit_from_image_terms(all_reduce_sum(self.rows, self.device), self.weights)


def fit_fusion_weight_reference(pairs: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]], grid: int = 101,
                                protocol: Protocol = NTIRE2025) -> FusionFit:
    """The reference: every grid weight fuses every image and scores it with the metric code (slow)."""
    if not pairs:
        raise ValueError("fit_fusion_weight needs at least one validation image")
    weights = fusion_grid(grid)
    curve = []
    for w in weights:
        scores = []
        for a, b, hr in pairs:
            sr, hc = prepare_pair(fuse(a, b, w), hr, protocol)
            scores.append(psnr(rgb_to_y(sr), rgb_to_y(hc)))
        curve.append(float(np.mean(scores)))
    best = int(np.argmax(curve))
    return FusionFit(weights[best], curve[best], weights, curve, least_squares_weight(pairs, protocol))
