"""Weighted fusion of two models' outputs, with the weight fit on validation images.

``fused = w * a + (1 - w) * b`` in float, then rounded (not truncated, unlike the submission's uint8 cast) to
uint8 by the pipeline's one rule (:mod:`smt.data.images`). The weight maximises the challenge score, the mean
PSNR-Y of the rounded outputs over the validation images: a grid search over ``w`` in [0, 1] (``grid`` points;
PSNR-Y is smooth and unimodal in w in practice, and the grid evaluates exactly the quantity reported, rounding
included). The closed-form least-squares weight on the pooled Y channel is reported beside it as a check.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from smt.data.images import float255_to_uint8
from smt.metrics import NTIRE2025, Protocol, prepare_pair, psnr, rgb_to_y

__all__ = ["FusionFit", "fuse", "fit_fusion_weight", "least_squares_weight"]


def fuse(a: np.ndarray, b: np.ndarray, w: float) -> np.ndarray:
    """Float HxWx3 outputs in [0, 255] -> uint8 by the pipeline's one rule (:func:`float255_to_uint8`)."""
    return float255_to_uint8(w * a + (1.0 - w) * b)


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
        ya, yb, yh = (rgb_to_y(_crop(x, protocol)) for x in (a, b, hr))
        d = ya - yb
        num += float(np.sum(d * (yh - yb)))
        den += float(np.sum(d * d))
    return float(np.clip(num / den, 0.0, 1.0)) if den > 0 else 0.5


def _crop(x: np.ndarray, protocol: Protocol) -> np.ndarray:
    """The protocol's modcrop and border shave, for float or uint8 arrays."""
    h, w = x.shape[:2]
    if protocol.modcrop > 1:
        h, w = h - h % protocol.modcrop, w - w % protocol.modcrop
    b = protocol.crop_border
    x = x[:h, :w]
    return x[b:-b, b:-b] if b else x


def fit_fusion_weight(pairs: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]], grid: int = 101,
                      protocol: Protocol = NTIRE2025) -> FusionFit:
    """``pairs``: (output a as float HxWx3 in [0,255], output b likewise, HR uint8). Returns the best grid weight."""
    if not pairs:
        raise ValueError("fit_fusion_weight needs at least one validation image")
    weights = np.linspace(0.0, 1.0, grid).tolist()
    curve = []
    for w in weights:
        scores = []
        for a, b, hr in pairs:
            sr, hc = prepare_pair(fuse(a, b, w), hr, protocol)
            scores.append(psnr(rgb_to_y(sr), rgb_to_y(hc)))
        curve.append(float(np.mean(scores)))
    best = int(np.argmax(curve))
    return FusionFit(weights[best], curve[best], weights, curve, least_squares_weight(pairs, protocol))
