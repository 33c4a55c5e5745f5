"""Building blocks shared by HAT and MambaIRv2 (Swin-style windows, relative positions, upsampler, padding).

Window tensors use the layout of the official code: ``(batch * windows, window_size**2, channels)`` with windows
in row-major order, so masks and relative-position indices line up with the official checkpoints.

Window attention (both models) goes through :func:`relative_position_bias` and :func:`attend_windows`. The
official code adds the shifted-window mask to the relative-position bias for every window, materialising a
(batch * windows, heads, n, n) float32 bias (GBs for the many windows of a large tile) from a mask built on the
CPU and copied to the device on every forward. Only four masks occur (interior windows, the last window column,
the last window row, the corner: :func:`shift_region_masks`, cached per device), so the windows are attended
in those four groups, each with one (1, heads, n, n) bias broadcast over its windows: the same sums, the same
outputs.

Inference fast paths (off inside :func:`smt.kernels.attention.reference_paths`, tested against it): the
gathered bias cached per module (:class:`RelativeBiasCache`, eval mode with grad off), and the shifted-window
groups written into one output tensor instead of concatenated. Linear layers (:class:`FastLinear`, an
``nn.Linear`` with the same parameters) run :func:`fast_linear` in eval mode: in float32 PyTorch's oneDNN
linear with the bias (and a following GELU) fused into the GEMM, under bf16 autocast a GEMM whose output rows
are zero-padded to a multiple of the CPU's vector width (the padding sliced off). The models' eval forwards also
replace roll +
partition (and reverse + roll back) by one row gather (one scatter) through a cached :func:`window_order`,
whose windows come grouped by shifted-window mask so each group is a contiguous slice (:func:`windows_gather`,
:func:`attend_window_groups`, :func:`attend_ordered_windows`, :func:`windows_scatter`).
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Literal, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from smt.kernels.attention import bf16_kernel_applies, cpu_bf16_attention_available, fast_paths_enabled
from smt.models.sample_noise import uniforms as _per_sample_uniforms

__all__ = ["SRHeads", "AUX_PREFIX", "LEGACY_AUX_PREFIX",
           "window_partition", "window_reverse", "relative_position_index",
           "overlap_relative_position_index", "shifted_window_mask", "shift_region_masks", "relative_position_bias",
           "RelativeBiasCache", "attend_windows", "WindowOrder", "window_order", "windows_gather", "windows_scatter",
           "attend_window_groups", "attend_ordered_windows", "head_padded_qkv", "FastLinear", "fast_linear",
           "gemm_row_multiple", "onednn_linear_available", "onednn_conv_available", "depthwise_tokens",
           "inference_fast_path", "Upsample", "Mlp", "DropPath", "pad_to_multiple", "pad_reflect_any", "RGB_MEAN"]

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


@functools.lru_cache(maxsize=32)
def shift_region_masks(ws: int, shift: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The four distinct windows of :func:`shifted_window_mask`, (2, 2, ws*ws, ws*ws) indexed by (last window
    row?, last window column?), for any image size: a window not in the last row or column holds one region
    (mask 0). Built once per (window, shift, device, dtype); callers must not modify the result."""
    return shifted_window_mask(2 * ws, 2 * ws, ws, shift).view(2, 2, ws * ws, ws * ws).to(device, dtype)


def relative_position_bias(table: torch.Tensor, rpi: torch.Tensor, n: int) -> torch.Tensor:
    """(1, heads, n, m) bias from a ((2ws-1)^2, heads) table and an (n, m) index (m = n unless given by rpi)."""
    return table[rpi.reshape(-1)].reshape(n, -1, table.shape[1]).permute(2, 0, 1).unsqueeze(0)


class RelativeBiasCache:
    """Eval-mode fast path for :func:`relative_position_bias`: the gathered (1, heads, n, m) bias of one
    attention module, kept between forwards while nothing can change it (no autograd, module in eval mode).

    The key holds the table's storage pointer and in-place version counter (bumped by ``load_state_dict``,
    optimiser steps and ``.copy_``), the index's, and the dtype/device, so any change to the weights rebuilds
    it; in training or with grad enabled the reference gather runs and nothing is kept."""

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._bias: torch.Tensor | None = None

    def get(self, module: nn.Module, table: torch.Tensor, rpi: torch.Tensor, n: int) -> torch.Tensor:
        if (module.training or torch.is_grad_enabled() or not fast_paths_enabled() or table.is_inference()
                or rpi.is_inference()):
            self._key = self._bias = None
            return relative_position_bias(table, rpi, n)
        # the tensors themselves are held (not just pointers), so their storage cannot be reused unseen
        key = (table, table.data_ptr(), table._version, table.dtype, table.device,
               rpi, rpi.data_ptr(), rpi._version, tuple(rpi.shape), n)
        if self._key is None or self._bias is None or not _same_key(key, self._key):
            self._bias = relative_position_bias(table, rpi, n).contiguous()
            self._key = key
        return self._bias


def _same_key(a: tuple, b: tuple) -> bool:
    return all(x is y if isinstance(x, torch.Tensor) else x == y for x, y in zip(a, b))


AttendFn = Callable[..., torch.Tensor]  # (q, k, v, bias, scale, impl) -> out, e.g. smt.kernels.window_attention


def attend_windows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, scale: float, impl: str,
                   attend: AttendFn, grid: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """Window attention over (B * nh * nw, heads, n, d) windows (row-major, as :func:`window_partition`) with a
    (1, heads, n, n) relative-position ``bias``; ``grid = (nh, nw, ws, shift)`` adds the shifted-window mask
    (None: unshifted windows). Returns (B * nh * nw, heads, n, d)."""
    if grid is None:
        return attend(q, k, v, bias, scale, impl)
    nh, nw, ws, shift = grid
    masks = shift_region_masks(ws, shift, q.device, bias.dtype)
    q, k, v = (t.unflatten(0, (-1, nh, nw)) for t in (q, k, v))
    if fast_paths_enabled() and not torch.is_grad_enabled():
        # fast path: each group's output written into its place (one copy, not two concatenations)
        result = q.new_empty(q.shape[:-1] + (v.shape[-1],))
        for r, rs in ((0, slice(0, nh - 1)), (1, slice(nh - 1, nh))):
            for c, cs in ((0, slice(0, nw - 1)), (1, slice(nw - 1, nw))):
                qs = q[:, rs, cs]
                if qs.numel() == 0:
                    continue
                out = attend(qs.flatten(0, 2), k[:, rs, cs].flatten(0, 2), v[:, rs, cs].flatten(0, 2),
                             bias + masks[r, c], scale, impl)
                result[:, rs, cs] = out.unflatten(0, qs.shape[:3])
        return result.flatten(0, 2)
    rows = []
    for r, rs in ((0, slice(0, nh - 1)), (1, slice(nh - 1, nh))):
        cols = []
        for c, cs in ((0, slice(0, nw - 1)), (1, slice(nw - 1, nw))):
            qs = q[:, rs, cs]
            if qs.numel() == 0:  # one window row or column: no interior windows
                continue
            out = attend(qs.flatten(0, 2), k[:, rs, cs].flatten(0, 2), v[:, rs, cs].flatten(0, 2),
                         bias + masks[r, c], scale, impl)
            cols.append(out.unflatten(0, qs.shape[:3]))
        if cols:
            rows.append(torch.cat(cols, dim=2))
    return torch.cat(rows, dim=1).flatten(0, 2)


class WindowOrder(NamedTuple):
    """Tokens of a (B, H, W) grid in (shifted-)window order: ``index[p]`` is the flat (b*H*W + y*W + x) token
    at window-order position p; ``groups`` are (first window, end window, last row?, last column?) slices of
    the window batch sharing one shifted-window mask (r = c = -1: unshifted, no mask)."""

    index: torch.Tensor
    groups: tuple[tuple[int, int, int, int], ...]


@functools.lru_cache(maxsize=64)
def window_order(b: int, h: int, w: int, ws: int, shift: int, device: torch.device) -> WindowOrder:
    """:class:`WindowOrder` of ``torch.roll(x, (-shift, -shift))`` partitioned into ws x ws windows: the
    mapping of roll + :func:`window_partition`, with the windows grouped as :func:`attend_windows` attends
    them (interior, last column, last row, corner; batch-major, then row-major within a group). Cached;
    callers must not modify the result."""
    nh, nw = h // ws, w // ws
    src = ((torch.arange(h) + shift) % h)[:, None] * w + ((torch.arange(w) + shift) % w)[None, :]
    win = rearrange(src, "(nh a) (nw c) -> nh nw (a c)", a=ws, c=ws)  # the source token of each window pixel
    if shift == 0:
        sel = [(slice(None), slice(None), -1, -1)]
    else:
        sel = [(rs, cs, r, c) for r, rs in ((0, slice(0, nh - 1)), (1, slice(nh - 1, nh)))
               for c, cs in ((0, slice(0, nw - 1)), (1, slice(nw - 1, nw)))]
    parts, groups, start = [], [], 0
    for rs, cs, r, c in sel:
        g = win[rs, cs].reshape(-1, ws * ws)
        if g.numel() == 0:  # one window row or column: no interior windows
            continue
        parts.append((torch.arange(b)[:, None, None] * (h * w) + g[None]).reshape(-1))
        groups.append((start, start + b * g.shape[0], r, c))
        start += b * g.shape[0]
    return WindowOrder(torch.cat(parts).to(device), tuple(groups))


def windows_gather(x: torch.Tensor, order: WindowOrder, ws: int) -> torch.Tensor:
    """(B, H*W, C) tokens -> (B * windows, ws*ws, C) windows in ``order`` (one row gather)."""
    return x.reshape(-1, x.shape[-1]).index_select(0, order.index).view(-1, ws * ws, x.shape[-1])


def windows_scatter(windows: torch.Tensor, order: WindowOrder, b: int) -> torch.Tensor:
    """Inverse of :func:`windows_gather`: (B * windows, n, C) -> (B, H*W, C) (one row scatter)."""
    c = windows.shape[-1]
    out = windows.new_empty(order.index.numel(), c)
    return out.index_copy_(0, order.index, windows.reshape(-1, c)).view(b, -1, c)


def attend_window_groups(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, scale: float,
                         impl: str, attend: AttendFn, order: WindowOrder, ws: int, shift: int) -> torch.Tensor:
    """:func:`attend_windows` for windows in :func:`window_order`: each group a contiguous slice of the
    (B * windows, heads, n, d) batch, attended with ``bias`` plus its shifted-window mask (``shift`` > 0) or
    ``bias`` alone. Inference only (writes into a preallocated output)."""
    groups = order.groups
    if shift == 0:
        return attend(q, k, v, bias, scale, impl)
    if impl != "reference" and bias.dtype != torch.float32 and bf16_kernel_applies(q, k, v):
        bias = bias.float()  # the kernel reads float32: one cast here, not one per group, and an exact mask sum
    # the three masked biases in one pass (not cached: 3x the bias's memory per attention module); windows
    # off the last row and column have mask 0 and take the bias itself
    masks = shift_region_masks(ws, shift, bias.device, bias.dtype).flatten(0, 1)[1:, None, None]
    biases = [bias, *(bias[None] + masks)]  # indexed by 2 * (last row?) + (last column?)
    result = q.new_empty(q.shape[:-1] + (v.shape[-1],))
    for start, end, r, c in groups:
        result[start:end] = attend(q[start:end], k[start:end], v[start:end], biases[2 * r + c], scale, impl)
    return result


def inference_fast_path(module: nn.Module) -> bool:
    """Whether ``module`` takes its inference fast path: eval mode, autograd off, and the fast paths on (not
    inside :func:`smt.kernels.attention.reference_paths`)."""
    return not (module.training or torch.is_grad_enabled()) and fast_paths_enabled()


CPU_HEAD_MULTIPLE = 16  # head_padded_qkv zero-pads CPU head dims to a multiple of this (1: off) ...
BF16_KERNEL_HEAD_MULTIPLE = 2  # ... or of this where bf16 attention runs the C kernel (its bf16 pairs)


def _cpu_head_multiple(weight: torch.Tensor) -> int:
    bf16 = weight.dtype == torch.bfloat16 or (torch.is_autocast_enabled("cpu")
                                              and torch.get_autocast_dtype("cpu") == torch.bfloat16)
    return BF16_KERNEL_HEAD_MULTIPLE if bf16 and cpu_bf16_attention_available() else CPU_HEAD_MULTIPLE


def head_padded_qkv(x: torch.Tensor, qkv: nn.Linear, num_heads: int) -> tuple[torch.Tensor, int]:
    """``qkv(x)`` (``(..., 3 * num_heads * d)``, q, k, v each split in heads of width d) and d, with each head
    zero-padded on the CPU for :func:`attend_ordered_windows` (HAT-L's and MambaIRv2-L's heads are 30 and 29
    wide): to a multiple of :data:`CPU_HEAD_MULTIPLE` for PyTorch's CPU flash attention, which ran
    (16, 6, 256, 32) 10% (fp32) to 17% (bf16) faster than (16, 6, 256, 30); to an even width only
    (:data:`BF16_KERNEL_HEAD_MULTIPLE`) where bf16 attention runs the C kernel
    (:func:`smt.kernels.attention.cpu_bf16_attention_available`), which takes any even width up to 64 and does
    no work for padding it is not given. The padding is put into a per-call copy of the weight's rows and the
    bias (zero rows, zero bias), so the GEMM writes the padded layout itself: each output column is the same dot
    product as in ``qkv(x)``, with no copy of the activations."""
    d = qkv.weight.shape[0] // (3 * num_heads)
    pad = -d % _cpu_head_multiple(qkv.weight) if x.device.type == "cpu" else 0
    if not pad:
        return qkv(x), d
    w = F.pad(qkv.weight.detach().view(3 * num_heads, d, -1), (0, 0, 0, pad)).flatten(0, 1)
    b = None if qkv.bias is None else F.pad(qkv.bias.detach().view(3 * num_heads, d), (0, pad)).flatten()
    return fast_linear(x, w, b), d


def attend_ordered_windows(qkv: torch.Tensor, num_heads: int, head_dim: int, scale: float, bias: torch.Tensor,
                           impl: str, attend: AttendFn, order: WindowOrder, ws: int, shift: int,
                           proj: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """The window-attention inference fast path shared by HAT and MambaIRv2: ``qkv`` (B * windows, n, 3 H D)
    windows in :func:`window_order`, each head ``head_dim`` wide or zero-padded to D (:func:`head_padded_qkv`;
    zero columns add nothing to q . k, and the output's padded columns, zero, are cut off; ``scale`` is given,
    not derived from the width), split into heads, attended by :func:`attend_window_groups` with the (1, heads,
    n, n) relative-position ``bias``, heads merged and ``proj`` applied: (B * windows, n, C)."""
    q, k, v = rearrange(qkv, "b n (three h d) -> three b h n d", three=3, h=num_heads)
    out = attend_window_groups(q, k, v, bias, scale, impl, attend, order, ws, shift)
    if out.shape[-1] != head_dim:
        out = out[..., :head_dim]
    return proj(rearrange(out, "b h n d -> b n (h d)"))


@functools.lru_cache(maxsize=1)
def gemm_row_multiple() -> int:
    """Floats in one SIMD vector of this CPU, as PyTorch detected it at run time (16 with AVX-512, else 8):
    :class:`FastLinear` pads GEMM output widths to a multiple of it."""
    return 16 if torch.backends.cpu.get_cpu_capability().startswith("AVX512") else 8


@functools.lru_cache(maxsize=1)
def onednn_linear_available() -> bool:
    """Whether PyTorch's oneDNN linear with fused epilogues (``torch.ops.mkldnn._linear_pointwise``, the CPU
    linear of PyTorch's own compiler) runs in this build and equals ``F.linear`` (+ ``F.gelu``) on a probe."""
    if not torch.backends.mkldnn.is_available():
        return False
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(7, 5, generator=g), torch.randn(6, 5, generator=g), torch.randn(6, generator=g)
    with torch.no_grad(), torch.autocast("cpu", enabled=False):  # the first call may come under autocast
        try:
            plain = torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")
            gelu = torch.ops.mkldnn._linear_pointwise(x, w, b, "gelu", [], "none")
        except (RuntimeError, AttributeError, TypeError):
            return False
        ref = F.linear(x, w, b)
        return bool(torch.allclose(plain, ref, rtol=1e-5, atol=1e-6)
                    and torch.allclose(gelu, F.gelu(ref), rtol=1e-5, atol=1e-6))


def fast_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                gelu: bool = False) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` (``weight`` (out, ...) flattened to (out, in): a 1x1 conv's works), followed
    by the exact (erf) GELU if ``gelu``. On the CPU without autograd (inside
    :func:`smt.kernels.attention.reference_paths`: plain ``F.linear``):

    - float32 outside autocast, and bfloat16 weights (``bf16-weights``): PyTorch's oneDNN linear
      (:func:`onednn_linear_available`), bias and GELU fused into the GEMM's epilogue and a contiguous output.
      Measured here (2 threads, 4096 tokens, fp32): 174 -> 348 2.9 ms against 3.8 (MKL ``addmm``, which first
      copies the bias into every output row) and 3.9 padded; 348 -> 174 3.0 / 4.7 / 3.7; 180 -> 540 4.3 / 7.4 /
      6.5; the fused GELU costs 0.3 ms, where a separate GELU pass costs 0.45 ms or more (bf16: 0.3 against
      1.4-2.2 ms).
    - otherwise (bf16 autocast over float32 weights): the output rows padded to a multiple of
      :func:`gemm_row_multiple` and the padding sliced off (the same dot products; a strided result), which ran
      such shapes 1.3-2x faster."""
    n = weight.shape[0]
    w2 = weight.reshape(n, -1)
    if torch.is_grad_enabled() or not fast_paths_enabled() or x.device.type != "cpu" or weight.is_inference():
        y = F.linear(x, w2, bias)
        return F.gelu(y) if gelu else y
    autocast = torch.is_autocast_enabled("cpu")
    if onednn_linear_available() and (
            (weight.dtype == torch.float32 and x.dtype == torch.float32 and not autocast)
            or (weight.dtype == torch.bfloat16 and (x.dtype == torch.bfloat16 or autocast
                                                    and torch.get_autocast_dtype("cpu") == torch.bfloat16))):
        # bfloat16 weights (the bf16-weights copy): x and the bias in bf16, as autocast's linear casts them; the
        # GELU then rounds once to bf16, from the GEMM's float accumulator
        x, bias = x.to(weight.dtype).contiguous(), None if bias is None else bias.to(weight.dtype)
        return torch.ops.mkldnn._linear_pointwise(x, w2.detach(), bias, "gelu" if gelu else "none", [],
                                                  "none" if gelu else "")
    pad = -n % gemm_row_multiple()
    if pad:
        # padded per call, not cached: a long-lived padded copy allocated mid-forward among the activations
        # fragments glibc's heap (measured: MambaIRv2-L at 128 px, peak RSS growth 526 MB -> 3.0 GB with a
        # per-layer cache), while padding costs a copy of the weight, nothing beside the GEMM
        w2 = F.pad(w2.detach(), (0, 0, 0, pad))
        bias = None if bias is None else F.pad(bias.detach(), (0, pad))
    y = F.linear(x, w2, bias)
    y = y[..., :n] if pad else y
    return F.gelu(y) if gelu else y


@functools.lru_cache(maxsize=1)
def onednn_conv_available() -> bool:
    """Whether PyTorch's oneDNN convolution with a fused activation (``torch.ops.mkldnn._convolution_pointwise``,
    the CPU convolution of PyTorch's own compiler) runs in this build and equals ``F.conv2d`` + ``F.gelu`` and
    + ``sigmoid`` on a probe (a depthwise conv of a channels-last input, as :func:`depthwise_tokens` runs it)."""
    if not torch.backends.mkldnn.is_available():
        return False
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 5, 6, 4, generator=g).permute(0, 3, 1, 2)  # (1, 4, 5, 6) channels-last
    w, b = torch.randn(4, 1, 3, 3, generator=g), torch.randn(4, generator=g)
    with torch.no_grad(), torch.autocast("cpu", enabled=False):  # the first call may come under autocast
        try:
            gelu = torch.ops.mkldnn._convolution_pointwise(x, w, b, [1, 1], [1, 1], [1, 1], 4, "gelu", [], "none")
            sig = torch.ops.mkldnn._convolution_pointwise(x, w, b, [1, 1], [1, 1], [1, 1], 4, "sigmoid", [], "")
        except (RuntimeError, AttributeError, TypeError):
            return False
        ref = F.conv2d(x, w, b, padding=1, groups=4)
        return bool(torch.allclose(gelu, F.gelu(ref), rtol=1e-5, atol=1e-6)
                    and torch.allclose(sig, ref.sigmoid(), rtol=1e-5, atol=1e-6))


def depthwise_tokens(x: torch.Tensor, size: tuple[int, int], conv: nn.Conv2d,
                     activation: Literal["gelu", "sigmoid"]) -> torch.Tensor | None:
    """``activation(conv(x))`` for (B, H*W, C) tokens ``x`` and a depthwise ``conv`` (C groups, stride 1, zero
    padding (k-1)/2), as (B, H*W, C) tokens (a view of the conv's channels-last output), by oneDNN's
    convolution with the activation (exact GELU, or sigmoid) fused into its epilogue; ``None`` where that
    path does not apply (autograd on, the fast paths off, not the CPU, :func:`onednn_conv_available` false, a
    conv of another kind, float32 under bf16 autocast): the caller then runs the module. Measured here
    (MambaIRv2-L's 348 channels at 64 px, 2 threads, same process, alternating): ConvFFN's
    ``x + GELU(dwconv5x5(x))`` 1.57 -> 1.40 ms in float32, 1.34 -> 1.00 ms in bf16; ASSM's
    ``x * sigmoid(CPE3x3(x))`` 1.04 -> 0.98 and 0.86 -> 0.74 ms (the module's output needed a transposing copy
    back to tokens and a separate activation pass). Under bf16 autocast the weights are cast to bf16, as autocast's
    convolution casts them."""
    if torch.is_grad_enabled() or not fast_paths_enabled() or x.device.type != "cpu" or x.dim() != 3:
        return None
    b, n, c = x.shape
    k = conv.kernel_size
    if not (conv.groups == c == conv.in_channels == conv.out_channels and conv.stride == (1, 1)
            and conv.dilation == (1, 1) and conv.padding_mode == "zeros" and k[0] % 2 == 1 and k[1] % 2 == 1
            and conv.padding == (k[0] // 2, k[1] // 2) and size[0] * size[1] == n):
        return None
    weight, bias = conv.weight, conv.bias
    if torch.is_autocast_enabled("cpu"):
        if x.dtype != torch.get_autocast_dtype("cpu"):
            return None
        weight, bias = weight.to(x.dtype), None if bias is None else bias.to(x.dtype)
    if weight.dtype != x.dtype or x.dtype not in (torch.float32, torch.bfloat16) or not onednn_conv_available():
        return None
    image = x.view(b, size[0], size[1], c).permute(0, 3, 1, 2)  # channels-last, no copy
    y = torch.ops.mkldnn._convolution_pointwise(image, weight.detach(), None if bias is None else bias.detach(),
                                                list(conv.padding), [1, 1], [1, 1], c, activation, [],
                                                "none" if activation == "gelu" else "")
    return y.permute(0, 2, 3, 1).reshape(b, n, c)


class FastLinear(nn.Linear):
    """``nn.Linear`` (same parameters, names and initialisation) whose eval forward without autograd runs
    :func:`fast_linear`; training and autograd use ``nn.Linear``'s. :meth:`forward_gelu` is ``F.gelu`` of the
    forward, fused on the fast path."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            return super().forward(x)
        return fast_linear(x, self.weight, self.bias)

    def forward_gelu(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            return F.gelu(super().forward(x))
        return fast_linear(x, self.weight, self.bias, gelu=True)


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
        self.fc1 = FastLinear(in_features, hidden_features)
        self.act = nn.GELU()
        self.fc2 = FastLinear(hidden_features, in_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if inference_fast_path(self):  # dropout is the identity here; GELU fused into fc1
            return self.fc2(self.fc1.forward_gelu(x))
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class DropPath(nn.Module):
    """Stochastic depth per sample; identity in eval mode or with ``p = 0``. Inside
    :func:`smt.models.sample_noise.per_sample` (the training loop) each sample's mask is a function of its global
    index in the step's batch (the same on any number of processes); elsewhere a Bernoulli draw from the global
    generator."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        u = _per_sample_uniforms(x.shape[0])
        if u is None:
            mask = torch.empty(shape, dtype=x.dtype, device=x.device).bernoulli_(keep)
        else:  # built on the host: a copy of a few bytes, no kernel per sample
            mask = torch.tensor([1.0 if v < keep else 0.0 for v in u], dtype=x.dtype).view(shape).to(x.device)
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




# Key prefix of the extra upsamplers of multi-scale training (``aux_upsample.x<s>.*``). A model built without
# ``aux_scales`` has exactly the official keys; loaders drop or allow these keys by this prefix.
AUX_PREFIX = "aux_upsample."
# Prefix of the previous releases' auxiliary heads (each with its own conv_before_upsample and conv_last): files
# of those releases still load for inference, their extra heads reported as unused.
LEGACY_AUX_PREFIX = "aux_heads."


class SRHeads(nn.Module):
    """Shared parts of HAT and MambaIRv2: argument checks, the input mean, the x``upscale`` head, optional
    extra upsamplers, de-normalisation and the crop back to the input's size.

    Multi-scale ("scale-aware") training as the authors built it: every scale shares the body, the x``upscale``
    head's ``conv_before_upsample`` and its ``conv_last``; only the upsampler differs per scale (``upsample`` for
    the main scale, ``aux_upsample.x<s>`` for each of ``aux_scales``; the authors' MambaIRv2_Multiscale names
    them ``upsample2/3/4``, their MSHAT ``upsample``/``upsample_1x``/``upsample_2x``: see
    :mod:`smt.models.layouts`). Subclasses define
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
            self.aux_upsample = nn.ModuleDict({f"x{s}": Upsample(s, num_feat) for s in self.aux_scales})

    def _body(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        raise NotImplementedError

    def _upsampler(self, scale: int) -> nn.Module:
        return self.upsample if scale == self.upscale else self.aux_upsample[f"x{scale}"]

    def _head(self, feat: torch.Tensor, h: int, w: int, scale: int) -> torch.Tensor:
        """Scale ``scale``'s output from the features after ``conv_before_upsample``."""
        y = self.conv_last(self._upsampler(scale)(feat))
        y = y / self.img_range + self.mean.to(y.dtype)
        return y[..., : h * scale, : w * scale]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feat, h, w = self._body(x)
        return self._head(self.conv_before_upsample(feat), h, w, self.upscale)

    def forward_multiscale(self, x: torch.Tensor) -> dict[int, torch.Tensor]:
        """Outputs of the main scale and every auxiliary scale, keyed by scale, from one pass of the body and of
        the shared ``conv_before_upsample``."""
        feat, h, w = self._body(x)
        feat = self.conv_before_upsample(feat)
        return {s: self._head(feat, h, w, s) for s in (self.upscale, *self.aux_scales)}
