"""Tiled inference with bounded memory and seamless blending.

The LR image is cut into ``tile x tile`` tiles whose starts step by ``tile - overlap`` (the last tile is
shifted back to end at the border, so every tile is full-size when the image is at least one tile). Each
tile's SR output is weighted by a separable window that is 1 in its interior and ramps linearly (in HR
pixels) over the overlap toward each *inner* edge; the weighted outputs are summed and divided by the summed
weights. Image borders keep weight 1, so a single tile covering the image reproduces whole-image inference
exactly. Tiles are run ``batch`` at a time. The model pads inputs to its window internally (any size works).

Progress: inside ``with tile_progress(callback):`` every :func:`tiled_forward` (also those run by the
ensembles) calls ``callback(n)`` after each batch of ``n`` tiles (a whole-image forward counts as one tile), so a
caller can show per-tile progress without threading a parameter through every ensemble.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Callable, Iterator

import torch

__all__ = ["tile_starts", "tiled_forward", "blend_window", "tile_progress", "count_tiles"]

_PROGRESS: contextvars.ContextVar[Callable[[int], None] | None] = contextvars.ContextVar("tile_progress",
                                                                                         default=None)


@contextlib.contextmanager
def tile_progress(callback: Callable[[int], None]) -> Iterator[None]:
    """Report every batch of tiles run by :func:`tiled_forward` inside the block to ``callback(n_tiles)``."""
    token = _PROGRESS.set(callback)
    try:
        yield
    finally:
        _PROGRESS.reset(token)


def _report(n: int) -> None:
    callback = _PROGRESS.get()
    if callback is not None:
        callback(n)


def count_tiles(h: int, w: int, tile: int, overlap: int) -> int:
    """How many tiles :func:`tiled_forward` runs for an ``h x w`` image (1 for a whole-image forward)."""
    if tile <= 0 or (h <= tile and w <= tile):
        return 1
    return len(tile_starts(h, tile, overlap)) * len(tile_starts(w, tile, overlap))

Forward = Callable[[torch.Tensor], torch.Tensor]


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets covering ``[0, length)`` with tiles of ``tile`` (clipped to the length) and ``overlap``."""
    if tile <= 0:
        raise ValueError(f"tile size must be positive, got {tile}")
    if not 0 <= overlap < tile:
        raise ValueError(f"tile overlap must be in [0, tile), got {overlap} for tile {tile}")
    if length <= tile:
        return [0]
    step = tile - overlap
    starts = list(range(0, length - tile, step))
    starts.append(length - tile)
    return starts


def _ramp(n: int, lo_ramp: int, hi_ramp: int, device, dtype) -> torch.Tensor:
    w = torch.ones(n, device=device, dtype=dtype)
    if lo_ramp:
        w[:lo_ramp] = torch.arange(1, lo_ramp + 1, device=device, dtype=dtype) / (lo_ramp + 1)
    if hi_ramp:
        w[n - hi_ramp:] = torch.minimum(w[n - hi_ramp:], torch.arange(hi_ramp, 0, -1, device=device,
                                                                      dtype=dtype) / (hi_ramp + 1))
    return w


def blend_window(h: int, w: int, ramps: tuple[int, int, int, int], device=None, dtype=torch.float32) -> torch.Tensor:
    """(h, w) weights: linear ramps of the given widths at (top, bottom, left, right), 1 elsewhere."""
    top, bottom, left, right = ramps
    return _ramp(h, top, bottom, device, dtype)[:, None] * _ramp(w, left, right, device, dtype)[None, :]


@torch.no_grad()
def tiled_forward(forward: Forward, x: torch.Tensor, scale: int, tile: int, overlap: int,
                  batch: int = 4) -> torch.Tensor:
    """SR of ``x`` (1, C, H, W) by tiles; ``tile <= 0`` or a tile covering the image = one whole forward."""
    if x.shape[0] != 1:
        raise ValueError(f"tiled_forward takes one image at a time, got a batch of {x.shape[0]}")
    _, c, h, w = x.shape
    if tile <= 0 or (h <= tile and w <= tile):
        y = forward(x)
        _report(1)
        return y
    ys, xs = tile_starts(h, tile, overlap), tile_starts(w, tile, overlap)
    boxes = [(t, l, min(tile, h), min(tile, w)) for t in ys for l in xs]
    out = x.new_zeros(1, c, h * scale, w * scale)
    weight = x.new_zeros(1, 1, h * scale, w * scale)
    ramp = overlap * scale
    for i in range(0, len(boxes), batch):
        chunk = boxes[i:i + batch]
        sr = forward(torch.cat([x[..., t:t + th, l:l + tw] for t, l, th, tw in chunk]))
        for k, (t, l, th, tw) in enumerate(chunk):
            win = blend_window(th * scale, tw * scale,
                               (ramp if t > 0 else 0, ramp if t + th < h else 0,
                                ramp if l > 0 else 0, ramp if l + tw < w else 0), x.device, x.dtype)
            out[..., t * scale:(t + th) * scale, l * scale:(l + tw) * scale] += sr[k:k + 1] * win
            weight[..., t * scale:(t + th) * scale, l * scale:(l + tw) * scale] += win
        _report(len(chunk))
    return out / weight
