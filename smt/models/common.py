"""Building blocks shared by HAT and MambaIRv2 (Swin-style windows, relative positions, upsampler, padding).

Window tensors use the layout of the official code: ``(batch * windows, window_size**2, channels)`` with windows
in row-major order, so masks and relative-position indices line up with the official checkpoints.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
from einops import rearrange

__all__ = ["SRHeads", "AuxHead", "window_partition", "window_reverse", "relative_position_index", "overlap_relative_position_index",
           "shifted_window_mask", "Upsample", "Mlp", "DropPath", "pad_to_multiple", "pad_reflect_any",
           "RGB_MEAN"]

RGB_MEAN = (0.4488, 0.4371, 0.4040)  # DIV2K mean, subtracted by both official models when in_chans == 3


def window_partition(x: torch.Tensor, ws: int) -> torch.Tensor:
    """(B, H, W, C) -> (B * H/ws * W/ws, ws*ws, C)."""
    return rearrange(x, "b (nh wh) (nw ww) c -> (b nh nw) (wh ww) c", wh=ws, ww=ws)


def window_reverse(windows: torch.Tensor, ws: int, h: int, w: int) -> torch.Tensor:
    """(B * H/ws * W/ws, ws*ws, C) -> (B, H, W, C)."""
    return rearrange(windows, "(b nh nw) (wh ww) c -> b (nh wh) (nw ww) c", nh=h // ws, nw=w // ws, wh=ws)


def relative_position_index(ws: int) -> torch.Tensor:
    """(ws*ws, ws*ws) index into a ((2ws-1)^2, heads) bias table, Swin's convention."""
    coords = torch.stack(torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (ws - 1)
    return rel[..., 0] * (2 * ws - 1) + rel[..., 1]


def overlap_relative_position_index(ws: int, ows: int) -> torch.Tensor:
    """(ws*ws, ows*ows) index for HAT's overlapping cross-attention (queries ws x ws, keys ows x ows)."""
    q = torch.stack(torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij")).flatten(1)
    k = torch.stack(torch.meshgrid(torch.arange(ows), torch.arange(ows), indexing="ij")).flatten(1)
    rel = (k[:, None, :] - q[:, :, None]).permute(1, 2, 0) + (ws - ows + 1)
    return rel[..., 0] * (ws + ows - 1) + rel[..., 1]


def shifted_window_mask(h: int, w: int, ws: int, shift: int) -> torch.Tensor:
    """(windows, ws*ws, ws*ws) additive mask for shifted windows: 0 within a region, -100 across regions."""
    img = torch.zeros(1, h, w, 1)
    cnt = 0
    for hs in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
        for wsl in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
            img[:, hs, wsl, :] = cnt
            cnt += 1
    regions = window_partition(img, ws).squeeze(-1)  # (nW, ws*ws)
    diff = regions[:, None, :] - regions[:, :, None]
    return torch.where(diff != 0, torch.tensor(-100.0), torch.tensor(0.0))


class Upsample(nn.Sequential):
    """Conv + PixelShuffle steps: log2(scale) x2 steps for powers of two, one x3 step for 3."""

    def __init__(self, scale: int, num_feat: int) -> None:
        layers: list[nn.Module] = []
        if scale & (scale - 1) == 0:
            for _ in range(int(math.log2(scale))):
                layers += [nn.Conv2d(num_feat, 4 * num_feat, 3, 1, 1), nn.PixelShuffle(2)]
        elif scale == 3:
            layers += [nn.Conv2d(num_feat, 9 * num_feat, 3, 1, 1), nn.PixelShuffle(3)]
        else:
            raise ValueError(f"upsampling scale {scale} is not supported (powers of 2 and 3)")
        super().__init__(*layers)


class Mlp(nn.Module):
    def __init__(self, in_features: int, hidden_features: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class DropPath(nn.Module):
    """Stochastic depth per sample; identity in eval mode or with ``p = 0``."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = torch.empty((x.shape[0],) + (1,) * (x.ndim - 1), dtype=x.dtype, device=x.device).bernoulli_(keep)
        return x * mask / keep


def pad_reflect_any(x: torch.Tensor, pad_h: int, pad_w: int, mode: str) -> torch.Tensor:
    """Pad the bottom/right of (B, C, H, W) by mirroring, for any pad size (even larger than the image).

    ``mode="reflect"`` mirrors without repeating the edge (``F.pad`` reflect, HAT's test-time padding);
    ``mode="symmetric"`` repeats it (MambaIRv2's ``cat([x, flip(x)])``). Pads beyond one mirror length keep
    mirroring back and forth; within one mirror length the result equals the official padding exactly.
    """
    if pad_h == 0 and pad_w == 0:
        return x
    h, w = x.shape[-2:]
    idx_h = _mirror_index(h, h + pad_h, mode, x.device)
    idx_w = _mirror_index(w, w + pad_w, mode, x.device)
    return x.index_select(-2, idx_h).index_select(-1, idx_w)


def _mirror_index(n: int, total: int, mode: str, device: torch.device) -> torch.Tensor:
    i = torch.arange(total, device=device)
    if mode == "symmetric":
        period = 2 * n
        i = i % period
        return torch.where(i >= n, period - 1 - i, i)
    if mode == "reflect":
        if n == 1:
            return torch.zeros_like(i)
        period = 2 * (n - 1)
        i = i % period
        return torch.where(i >= n, period - i, i)
    raise ValueError(f"unknown padding mode {mode!r}")


def pad_to_multiple(x: torch.Tensor, multiple: int, mode: str) -> tuple[torch.Tensor, int, int]:
    """Pad (B, C, H, W) at the bottom/right to a multiple of ``multiple``; returns (padded, H, W)."""
    h, w = x.shape[-2:]
    pad_h, pad_w = (-h) % multiple, (-w) % multiple
    return pad_reflect_any(x, pad_h, pad_w, mode), h, w




class AuxHead(nn.Module):
    """An extra upsampling head (scale-aware training): conv + LeakyReLU, Upsample(scale), conv to RGB."""

    def __init__(self, embed_dim: int, num_feat: int, scale: int, out_chans: int) -> None:
        super().__init__()
        self.conv_before_upsample = nn.Sequential(nn.Conv2d(embed_dim, num_feat, 3, 1, 1), nn.LeakyReLU(inplace=True))
        self.upsample = Upsample(scale, num_feat)
        self.conv_last = nn.Conv2d(num_feat, out_chans, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_last(self.upsample(self.conv_before_upsample(x)))


class SRHeads(nn.Module):
    """Shared parts of HAT and MambaIRv2: argument checks, the input mean, the x``upscale`` head, optional
    auxiliary heads, de-normalisation and the crop back to the input's size. Subclasses define
    ``_body(x) -> (features, h, w)`` and call :meth:`_check_args`, :meth:`_register_mean` and
    :meth:`_build_heads` where the official constructor creates those parts (so parameters are created, and
    the RNG consumed, in the official order)."""

    upscale: int
    aux_scales: tuple[int, ...]
    img_range: float

    def _check_args(self, upsampler: str, patch_size: int, depths, num_heads, upscale: int, aux_scales) -> None:
        name = type(self).__name__
        if upsampler != "pixelshuffle":
            raise ValueError(f"{name}: only upsampler='pixelshuffle' is implemented, got {upsampler!r}")
        if patch_size != 1:
            raise ValueError(f"{name}: patch_size must be 1 for SR, got {patch_size}")
        if len(depths) != len(num_heads):
            raise ValueError(f"{name}: depths {tuple(depths)} and num_heads {tuple(num_heads)} differ in length")
        if upscale in aux_scales:
            raise ValueError(f"{name}: aux_scales {tuple(aux_scales)} must not contain the main scale {upscale}")

    def _register_mean(self, in_chans: int) -> None:
        # not in the official state dicts: a non-persistent buffer (follows .to(device))
        self.register_buffer("mean", torch.tensor(RGB_MEAN if in_chans == 3 else (0.0,)).view(1, -1, 1, 1),
                             persistent=False)

    def _build_heads(self, embed_dim: int, in_chans: int, num_feat: int = 64) -> None:
        self.conv_before_upsample = nn.Sequential(nn.Conv2d(embed_dim, num_feat, 3, 1, 1), nn.LeakyReLU(inplace=True))
        self.upsample = Upsample(self.upscale, num_feat)
        self.conv_last = nn.Conv2d(num_feat, in_chans, 3, 1, 1)
        if self.aux_scales:
            self.aux_heads = nn.ModuleDict({f"x{s}": AuxHead(embed_dim, num_feat, s, in_chans)
                                            for s in self.aux_scales})

    def _body(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        raise NotImplementedError

    def _head(self, feat: torch.Tensor, h: int, w: int, scale: int) -> torch.Tensor:
        if scale == self.upscale:
            y = self.conv_last(self.upsample(self.conv_before_upsample(feat)))
        else:
            y = self.aux_heads[f"x{scale}"](feat)
        y = y / self.img_range + self.mean.to(y.dtype)
        return y[..., : h * scale, : w * scale]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feat, h, w = self._body(x)
        return self._head(feat, h, w, self.upscale)

    def forward_multiscale(self, x: torch.Tensor) -> dict[int, torch.Tensor]:
        """Outputs of the main head and every auxiliary head, keyed by scale, from one body pass."""
        feat, h, w = self._body(x)
        return {s: self._head(feat, h, w, s) for s in (self.upscale, *self.aux_scales)}
