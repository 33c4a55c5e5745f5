"""Test-time ensembles: x8 geometric self-ensemble and the multi-window (multi-tile-size) ensemble.

Self-ensemble: the 8 dihedral transforms of the input (identity, flips, transpose and their compositions),
each output mapped back by the exact inverse, averaged (Lim et al. 2017; used for both models in the BBox
solution). Multi-window: the tiled result at several tile sizes, averaged with weights (the submission ran
MambaIRv2 at 100..500 LR pixels with weights 1, 1, 1.2, 0.8, 0.8); tile sizes that produce the same tiling of
an image (e.g. every size at least as large as the image) are computed once and their weights summed.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from smt.infer.tiling import tile_starts, tiled_forward

__all__ = ["TRANSFORMS", "apply_transform", "invert_transform", "self_ensemble", "multi_window", "tiling_key",
           "window_tilings"]

# (hflip, vflip, transpose), applied in that order
TRANSFORMS: tuple[tuple[bool, bool, bool], ...] = tuple((h, v, t) for t in (False, True) for v in (False, True)
                                                        for h in (False, True))


def apply_transform(x: torch.Tensor, tf: tuple[bool, bool, bool]) -> torch.Tensor:
    h, v, t = tf
    if h:
        x = x.flip(-1)
    if v:
        x = x.flip(-2)
    if t:
        x = x.transpose(-1, -2)
    return x


def invert_transform(y: torch.Tensor, tf: tuple[bool, bool, bool]) -> torch.Tensor:
    h, v, t = tf
    if t:
        y = y.transpose(-1, -2)
    if v:
        y = y.flip(-2)
    if h:
        y = y.flip(-1)
    return y


Forward = Callable[[torch.Tensor], torch.Tensor]


@torch.no_grad()
def self_ensemble(forward: Forward, x: torch.Tensor, batch: bool = False) -> torch.Tensor:
    """Mean of the 8 inverse-transformed outputs. ``batch=True`` runs the 4 same-shape variants of each
    orientation as one batch (faster, more memory); results are identical either way."""
    if not batch:
        return sum(invert_transform(forward(apply_transform(x, tf)), tf) for tf in TRANSFORMS) / len(TRANSFORMS)
    total = 0
    for transposed in (False, True):
        tfs = [tf for tf in TRANSFORMS if tf[2] == transposed]
        outs = forward(torch.cat([apply_transform(x, tf) for tf in tfs]))
        total = total + sum(invert_transform(outs[i:i + 1], tf) for i, tf in enumerate(tfs))
    return total / len(TRANSFORMS)


def tiling_key(h: int, w: int, tile: int, overlap: int) -> tuple:
    """Identifies the tiling of an ``h x w`` image: equal keys give identical results."""
    if tile <= 0 or (h <= tile and w <= tile):
        return ("whole",)
    return (tuple(tile_starts(h, tile, overlap)), tuple(tile_starts(w, tile, overlap)), min(tile, h), min(tile, w))


def window_tilings(h: int, w: int, tiles: Sequence[int], weights: Sequence[float], overlap: int
                   ) -> dict[tuple, list]:
    """The distinct tilings of an ``h x w`` image over ``tiles``: ``{tiling_key: [tile, summed weight]}``."""
    if len(tiles) != len(weights) or not tiles:
        raise ValueError(f"need one weight per tile size, got tiles {list(tiles)} and weights {list(weights)}")
    groups: dict[tuple, list] = {}
    for tile, wt in zip(tiles, weights):
        key = tiling_key(h, w, tile, min(overlap, max(tile - 1, 0)))
        groups.setdefault(key, [tile, 0.0])[1] += wt
    return groups


@torch.no_grad()
def multi_window(forward: Forward, x: torch.Tensor, scale: int, tiles: Sequence[int], weights: Sequence[float],
                 overlap: int, batch: int = 4, per_tile: Callable[[Forward, torch.Tensor], torch.Tensor] | None = None
                 ) -> tuple[torch.Tensor, int]:
    """Weighted mean of tiled results over ``tiles``; returns (result, number of distinct tilings computed).

    ``per_tile(forward, tile_input)`` wraps each tile's forward (e.g. with :func:`self_ensemble`).
    """
    h, w = x.shape[-2:]
    groups = window_tilings(h, w, tiles, weights, overlap)
    fwd = (lambda t: per_tile(forward, t)) if per_tile else forward
    total, wsum = 0, 0.0
    for tile, wt in groups.values():
        total = total + wt * tiled_forward(fwd, x, scale, tile, min(overlap, max(tile - 1, 0)), batch)
        wsum += wt
    return total / wsum, len(groups)
