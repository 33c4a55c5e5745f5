"""The authors' inference protocol (team BBox, NTIRE 2025 SR x4), run on our HAT and MambaIRv2 instances.

Facts, with file:line references into ZZXF11/BBox_Solution_NTIRE2025_ImageSR_x4, are in docs/bbox_protocol.md;
this module reproduces their arithmetic (order of accumulation, dtypes) so the uint8 outputs match theirs:

- HAT (:func:`hat_bbox`): the x8 geometric self-ensemble in their order; each transformed image padded by
  flip-concatenation (edge repeated; rows first, then columns) to ``(h // 16 + 1) * 16`` (always at least one
  pixel), run whole, cropped; the 8 outputs combined by ``torch.mean(torch.stack(...), 0)``.
- MambaIRv2 (:func:`mambairv2_bbox`): for each split size S in 100..500 the four non-transposed transforms,
  then for each S the four transposed ones; per image ``h // S + 1`` tiles per side after reflect padding of the
  bottom/right to a size the tile count divides, overlap ``core // 10``, tiles of one shape batched 4 at a time,
  hard paste; weights 1.0/1.0/1.2/0.8/0.8 over their sum, accumulated in that loop order and divided by the
  summed weights. Gumbel routing at eval, seeded once per run (:data:`BBOX_SEED`), the stream carried across
  images: every pass runs (no tiling is skipped as a duplicate), because each one draws its own noise.
- Outputs: clamp, x255, round half to even, uint8 (:func:`smt.data.images.tensor_to_image`). Fusion
  (:func:`fuse_bbox`): 0.5/0.5 in float64, then ``astype(uint8)``, i.e. ``floor((a + b) / 2)``.

Ours (``infer.protocol: smt``, :mod:`smt.infer.runner`) differs: blended tiles, per-image seeds, a fitted fusion
weight, rounding; see docs/bbox_protocol.md.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn as nn

from smt.data.images import image_to_tensor, tensor_to_image
from smt.infer.ensemble import apply_transform, invert_transform
from smt.models.common import pad_reflect_any

__all__ = ["PROTOCOLS", "check_protocol", "BBOX_SEED", "BBOX_SPLIT_SIZES", "BBOX_SPLIT_WEIGHTS", "HAT_ORDER",
           "NON_TRANSPOSED", "TRANSPOSED", "hat_bbox", "mambairv2_bbox", "split_tiles", "bbox_forward",
           "fuse_bbox", "BBoxMethod", "gumbel_routing"]

PROTOCOLS = ("smt", "bbox")  # ours (the default) and the authors'
BBOX_SEED = 42  # their models/team15_SMT/io.py main(): torch.manual_seed(42) once, before the first image
BBOX_SPLIT_SIZES = (100, 200, 300, 400, 500)
BBOX_SPLIT_WEIGHTS = (1.0, 1.0, 1.2, 0.8, 0.8)
_PAD_MULTIPLE = 16  # HAT's flip padding: a literal 16 in their io.py (their window size)
_TILE_BATCH = 4

# Their transforms as (hflip, vflip, transpose) of smt.infer.ensemble (flips first, transpose last). Their
# transposed ones transpose first: permute(...).flip(-1) == flip(-2) then transpose, so (F, T, T) comes before
# (T, F, T). The order matters: it is the order of the mean's and the weighted sum's additions.
NON_TRANSPOSED = ((False, False, False), (True, False, False), (False, True, False), (True, True, False))
TRANSPOSED = ((False, False, True), (False, True, True), (True, False, True), (True, True, True))
HAT_ORDER = NON_TRANSPOSED + TRANSPOSED


def check_protocol(name: str, flag: str = "protocol") -> str:
    """``name`` if it is a protocol, else an error naming the valid ones."""
    if name not in PROTOCOLS:
        raise ValueError(f"{flag}: unknown protocol {name!r} (valid: {', '.join(PROTOCOLS)})")
    return name


def _flip_pad_always(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Their HAT padding: bottom/right to ``(h // multiple + 1) * multiple`` by mirroring with the edge repeated
    (``cat([x, flip(x)])``, rows then columns). Pads larger than the image (theirs fails there) keep mirroring."""
    h, w = x.shape[-2:]
    return pad_reflect_any(x, (h // multiple + 1) * multiple - h, (w // multiple + 1) * multiple - w, "symmetric")


@torch.no_grad()
def hat_bbox(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Their HAT protocol on ``x`` (1, 3, H, W), float32 in [0, 1]: the float SR image (1, 3, sH, sW)."""
    scale = net.upscale
    outs = []
    for tf in HAT_ORDER:
        t = apply_transform(x, tf)
        h, w = t.shape[-2:]
        y = net(_flip_pad_always(t, _PAD_MULTIPLE))[..., : h * scale, : w * scale]
        outs.append(invert_transform(y, tf))
    return torch.mean(torch.stack(outs), dim=0)


def split_tiles(h: int, w: int, split_size: int) -> tuple[int, int, list[tuple[slice, slice, int, int]], int, int]:
    """Their tiling of an ``h x w`` image at split size S: ``(pad_h, pad_w, tiles, core_h, core_w)``; each tile is
    ``(rows, cols, i, j)`` in the padded image: the core ``core_h x core_w`` cell (i, j) grown by ``core // 10``
    on each inner side."""
    n_h, n_w = h // split_size + 1, w // split_size + 1
    pad_h, pad_w = (-h) % n_h, (-w) % n_w
    core_h, core_w = (h + pad_h) // n_h, (w + pad_w) // n_w
    shave_h, shave_w = core_h // 10, core_w // 10

    def span(k: int, n: int, core: int, shave: int) -> slice:
        return slice(k * core - (shave if k > 0 else 0), (k + 1) * core + (shave if k < n - 1 else 0))

    tiles = [(span(i, n_h, core_h, shave_h), span(j, n_w, core_w, shave_w), i, j)
             for i in range(n_h) for j in range(n_w)]
    return pad_h, pad_w, tiles, core_h, core_w


def _tiled_once(net: nn.Module, x: torch.Tensor, split_size: int, scale: int) -> torch.Tensor:
    """One transformed image at one split size: tiles run in same-shape batches of 4 (in the order their dict of
    shapes gives: first appearance), pasted without blending, cropped to ``scale * (h, w)``."""
    _, c, h, w = x.shape
    pad_h, pad_w, tiles, core_h, core_w = split_tiles(h, w, split_size)
    padded = pad_reflect_any(x, pad_h, pad_w, "reflect")  # F.pad(..., 'reflect'): pads < the tile count
    chops = [padded[..., rows, cols] for rows, cols, _, _ in tiles]
    groups: dict[tuple[int, int], list[int]] = {}
    for k, chop in enumerate(chops):
        groups.setdefault(tuple(chop.shape[-2:]), []).append(k)
    outputs: list[torch.Tensor | None] = [None] * len(chops)
    for members in groups.values():
        for start in range(0, len(members), _TILE_BATCH):
            batch = members[start:start + _TILE_BATCH]
            inp = chops[batch[0]] if len(batch) == 1 else torch.cat([chops[k] for k in batch], 0)
            y = net(inp)
            for n, k in enumerate(batch):
                outputs[k] = y[n:n + 1]
    out = x.new_zeros(1, c, (h + pad_h) * scale, (w + pad_w) * scale)
    for (_, _, i, j), y in zip(tiles, outputs):
        top = 0 if i == 0 else (core_h // 10) * scale
        left = 0 if j == 0 else (core_w // 10) * scale
        out[..., i * core_h * scale:(i + 1) * core_h * scale, j * core_w * scale:(j + 1) * core_w * scale] = \
            y[..., top:top + core_h * scale, left:left + core_w * scale]
    return out[..., : h * scale, : w * scale]


@torch.no_grad()
def mambairv2_bbox(net: nn.Module, x: torch.Tensor, split_sizes: Sequence[int] = BBOX_SPLIT_SIZES,
                   split_weights: Sequence[float] = BBOX_SPLIT_WEIGHTS) -> torch.Tensor:
    """Their MambaIRv2 protocol on ``x`` (1, 3, H, W), float32 in [0, 1]: the float SR image. Draws Gumbel noise
    from the global generator when the model routes by Gumbel (seed it once per run: :class:`BBoxMethod`)."""
    if len(split_sizes) != len(split_weights) or not split_sizes:
        raise ValueError(f"need one weight per split size, got {list(split_sizes)} and {list(split_weights)}")
    scale = net.upscale
    weights = [wt / sum(split_weights) for wt in split_weights]  # python floats, as theirs
    final, total = None, 0
    for group in (NON_TRANSPOSED, TRANSPOSED):
        for size, weight in zip(split_sizes, weights):
            for tf in group:  # each image on its own, in the order their list of outputs gives
                y = invert_transform(_tiled_once(net, apply_transform(x, tf), size, scale), tf) * weight
                final = y if final is None else final.add_(y)
                total += weight
    return final / total


@contextlib.contextmanager
def gumbel_routing(net: nn.Module) -> Iterator[nn.Module]:
    """MambaIRv2 routes by Gumbel noise inside the block (their protocol), whatever its ``routing`` was."""
    before = getattr(net, "routing", None)
    if before is not None:
        net.routing = "gumbel"
    try:
        yield net
    finally:
        if before is not None:
            net.routing = before


def bbox_forward(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Their protocol for ``net``'s architecture: HAT's or MambaIRv2's (the float SR image)."""
    from smt.models import HAT, MambaIRv2

    if isinstance(net, MambaIRv2):
        with gumbel_routing(net):
            return mambairv2_bbox(net, x)
    if isinstance(net, HAT):
        return hat_bbox(net, x)
    raise TypeError(f"the bbox protocol runs HAT and MambaIRv2, got {type(net).__name__}")


def fuse_bbox(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Their fusion of two uint8 images (test.py): adaptive weights, exactly 0.5 and 0.5 for two images, mixed
    in float64, clipped, truncated by ``astype(uint8)``: ``floor((a + b) / 2)``."""
    if a.dtype != np.uint8 or b.dtype != np.uint8 or a.shape != b.shape:
        raise ValueError(f"fuse_bbox: two uint8 images of one shape needed, got {a.dtype} {a.shape} and "
                         f"{b.dtype} {b.shape}")
    mixed = 0 + a * 0.5 + b * 0.5  # float64, in their order (sum() from 0); exact
    return np.clip(mixed, 0, 255).astype(np.uint8)


@dataclass
class BBoxMethod:
    """Their whole method on our models, for ``python -m smt upscale --protocol bbox`` and the infer stage: each
    model by its protocol, then :func:`fuse_bbox` of the uint8 outputs (one model: its output). The global
    generator is seeded once, at the first image; images run in the caller's order (sorted file names), the
    stream carried across them. Their tiling is fixed: ``with_tile`` keeps it."""

    models: dict[str, nn.Module]
    seed: int = BBOX_SEED
    precision: str = field(default="fp32", init=False)  # their protocol: fp32 throughout
    overlap: int = field(default=0, init=False)  # (upscale_files reads these of runners with own settings)
    batch: int = field(default=_TILE_BATCH, init=False)
    _seeded: bool = field(default=False, init=False, repr=False)

    def __post_init__(self) -> None:
        if not 1 <= len(self.models) <= 2:
            raise ValueError(f"the bbox protocol runs one or two models, got {len(self.models)}")

    @property
    def scale(self) -> int:
        return next(iter(self.models.values())).upscale

    @property
    def device(self) -> torch.device:
        return next(next(iter(self.models.values())).parameters()).device

    @property
    def window(self) -> int:
        return max(n.window_size for n in self.models.values())

    @property
    def tile(self) -> int:
        return 0

    def nets(self) -> list[nn.Module]:
        return list(self.models.values())

    def with_tile(self, tile: int) -> "BBoxMethod":
        return self

    def tiles(self, h: int, w: int) -> int:
        return 1

    def outputs(self, x: torch.Tensor) -> dict[str, np.ndarray]:
        """Each model's uint8 output (their protocol) on ``x``, in the order of ``models``."""
        if not self._seeded:
            torch.manual_seed(self.seed)
            self._seeded = True
        return {name: tensor_to_image(bbox_forward(net, x)) for name, net in self.models.items()}

    def __call__(self, lr: np.ndarray) -> np.ndarray:
        """uint8 HxWx3 LR image -> uint8 SR image."""
        return self.run(image_to_tensor(lr, self.device))

    def run_float255(self, x: torch.Tensor, image: int = 0) -> np.ndarray:
        """:meth:`run` as floats on the [0, 255] scale, for ``upscale``'s writer (its rounding leaves them as they
        are): their protocol ends in uint8, so a 16-bit or grey output is made from those levels."""
        return self.run(x, image).astype(np.float32)

    @torch.no_grad()
    def run(self, x: torch.Tensor, image: int = 0) -> np.ndarray:
        """uint8 SR image of ``x``; ``image`` is unused (one seed per run, not per image)."""
        outs = list(self.outputs(x).values())
        return outs[0] if len(outs) == 1 else fuse_bbox(outs[0], outs[1])
