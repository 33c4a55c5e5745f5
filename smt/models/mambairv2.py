"""MambaIRv2: attentive state-space restoration (Guo et al., CVPR 2025), and MambaIRv2Light.

Written from the paper and the official code's structure (csguoh/MambaIR, ``basicsr/archs/mambairv2_arch.py``):
module and parameter names, constructor arguments, layer order and constants are those of the official class,
so the official ``params`` checkpoints load with ``strict=True``. Every head of the official class is
implemented: ``upsampler='pixelshuffle'`` (classic SR), ``'pixelshuffledirect'`` (lightweight SR: one conv to
``scale**2 * in_chans`` channels and a pixel shuffle), ``'nearest+conv'`` (real-world SR, x4 only: two nearest x2
steps each followed by a conv) and ``''`` (x1 restoration: denoising and JPEG artefact removal, the output is the
input plus a residual). :class:`MambaIRv2Light` (``basicsr/archs/mambairv2light_arch.py``) is the same network
with a gated MLP (``GatedMLP``: fc1, GELU, a half-channel gate of LayerNorm and a 5x5 depthwise conv, fc2) in
place of each ConvFFN.

The attentive state-space module (ASSM) routes every pixel to one of ``num_tokens`` learned prompts, sorts the
pixels by route so semantically similar ones are adjacent, runs one selective scan over the sorted sequence with
the prompt added to ``C``, and unsorts. The official forward draws the route with
``F.gumbel_softmax(hard=True)`` even in eval mode; ``routing="gumbel"`` (default) keeps that exactly (seed the
global generator for reproducible outputs), ``routing="argmax"`` routes to the most likely prompt without
noise (deterministic inference; no gradient reaches the router). Ties in the sort follow ``stable=False`` as
in the official code.

Differences from the official class, off the default numerical path: ``aux_scales`` (extra upsampling heads for
the multi-scale loss, :meth:`MambaIRv2.forward_multiscale`), ``routing``, ``attn_impl``, ``scan_impl``, a
working ``use_checkpoint``, and padding that works for pads larger than the image (mirror repeated).
"""
from __future__ import annotations

import math
from typing import Literal, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint as cp
from einops import rearrange

from smt.kernels.attention import AttentionImpl, window_attention
from smt.kernels.cpu_generator import neg_uniform53, neg_uniform53_reference
from smt.kernels.selective_scan import ScanImpl, scan_reads_rows, selective_scan, selective_scan_rows
from smt.models.sample_noise import exponential as _per_sample_exponential
from smt.models.common import (FastLinear, RelativeBiasCache, SRHeads, WindowOrder,
                               attend_ordered_windows, attend_windows, depthwise_tokens, head_padded_qkv,
                               inference_fast_path, pad_to_multiple, fast_linear, relative_position_index,
                               window_order, window_partition, window_reverse, windows_gather, windows_scatter)
from smt.models.hat import _init_weights, _PatchEmbed

__all__ = ["MambaIRv2", "MambaIRv2Light", "UPSAMPLERS"]

UPSAMPLERS = ("pixelshuffle", "pixelshuffledirect", "nearest+conv", "")

Routing = Literal["gumbel", "argmax"]


class dwconv(nn.Module):  # noqa: N801 - official module name (appears in checkpoint keys)
    def __init__(self, hidden_features: int, kernel_size: int) -> None:
        super().__init__()
        self.depthwise_conv = nn.Sequential(
            nn.Conv2d(hidden_features, hidden_features, kernel_size, 1, (kernel_size - 1) // 2,
                      groups=hidden_features), nn.GELU())

    def forward(self, x: torch.Tensor, x_size: tuple[int, int]) -> torch.Tensor:
        y = self.depthwise_conv(rearrange(x, "b (h w) c -> b c h w", h=x_size[0]))
        return rearrange(y, "b c h w -> b (h w) c")


class ConvFFN(nn.Module):
    """fc1 -> GELU -> (+ depthwise conv branch) -> fc2."""

    def __init__(self, in_features: int, hidden_features: int, kernel_size: int) -> None:
        super().__init__()
        self.fc1 = FastLinear(in_features, hidden_features)
        self.act = nn.GELU()
        self.dwconv = dwconv(hidden_features, kernel_size)
        self.fc2 = FastLinear(hidden_features, in_features)

    def forward(self, x: torch.Tensor, x_size: tuple[int, int]) -> torch.Tensor:
        if inference_fast_path(self):
            x = self.fc1.forward_gelu(x)  # GELU fused
            branch = depthwise_tokens(x, x_size, self.dwconv.depthwise_conv[0], "gelu")  # conv + GELU fused
            return self.fc2(x + (self.dwconv(x, x_size) if branch is None else branch))
        x = self.act(self.fc1(x))
        return self.fc2(x + self.dwconv(x, x_size))


class Gate(nn.Module):
    """Spatial gate of MambaIRv2Light: the second half of the channels, normalised and depthwise-convolved,
    multiplies the first half."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.conv = nn.Conv2d(dim, dim, 5, 1, 2, groups=dim)

    def forward(self, x: torch.Tensor, x_size: tuple[int, int]) -> torch.Tensor:
        x1, x2 = x.chunk(2, dim=-1)
        x2 = self.conv(rearrange(self.norm(x2), "b (h w) c -> b c h w", h=x_size[0]))
        return x1 * rearrange(x2, "b c h w -> b (h w) c")


class GatedMLP(nn.Module):
    """MambaIRv2Light's feed-forward: fc1 -> GELU -> gate (halves the channels) -> fc2."""

    def __init__(self, in_features: int, hidden_features: int) -> None:
        super().__init__()
        self.fc1 = FastLinear(in_features, hidden_features)
        self.act = nn.GELU()
        self.sg = Gate(hidden_features // 2)
        self.fc2 = FastLinear(hidden_features // 2, in_features)

    def forward(self, x: torch.Tensor, x_size: tuple[int, int]) -> torch.Tensor:
        return self.fc2(self.sg(self.act(self.fc1(x)), x_size))


class WindowAttention(nn.Module):
    """Window attention over precomputed qkv (the layer's ``wqkv`` projects), relative-position bias."""

    def __init__(self, dim: int, window_size: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        self.proj = FastLinear(dim, dim)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self._bias_cache = RelativeBiasCache()  # eval/no-grad fast path; training gathers every call

    def forward(self, qkv: torch.Tensor, rpi: torch.Tensor, grid: tuple[int, int, int, int] | None,
                impl: AttentionImpl) -> torch.Tensor:
        """``qkv`` (B*nW, n, 3C) windows; ``grid`` (nh, nw, ws, shift) for shifted windows (see
        :func:`smt.models.common.attend_windows`), None for unshifted ones."""
        q, k, v = rearrange(qkv, "b n (three h d) -> three b h n d", three=3, h=self.num_heads)
        bias = self._bias_cache.get(self, self.relative_position_bias_table, rpi, qkv.shape[1])
        out = attend_windows(q, k, v, bias, self.scale, impl, window_attention, grid)
        return self.proj(rearrange(out, "b h n d -> b n (h d)"))

    def forward_ordered(self, qkv: torch.Tensor, head_dim: int, rpi: torch.Tensor, order: WindowOrder, ws: int,
                        shift: int, impl: AttentionImpl) -> torch.Tensor:
        """Inference fast path of :meth:`forward`: ``qkv`` windows in :func:`window_order` (mask groups as
        contiguous slices), heads ``head_dim`` wide or zero-padded (:func:`head_padded_qkv`)."""
        bias = self._bias_cache.get(self, self.relative_position_bias_table, rpi, qkv.shape[1])
        return attend_ordered_windows(qkv, self.num_heads, head_dim, self.scale, bias, impl, window_attention,
                                      order, ws, shift, self.proj)


class Selective_Scan(nn.Module):  # noqa: N801 - official module name
    """Projections of the S6 layer (one scan direction, expand=1): x -> (dt, B, C), dt rank ceil(d/16)."""

    def __init__(self, d_model: int, d_state: int, dt_min: float = 0.001, dt_max: float = 0.1,
                 dt_init_floor: float = 1e-4) -> None:
        super().__init__()
        self.d_state, self.d_inner = d_state, d_model
        self.dt_rank = math.ceil(d_model / 16)
        self.x_proj_weight = nn.Parameter(torch.empty(1, self.dt_rank + 2 * d_state, d_model))
        bound = d_model ** -0.5  # nn.Linear's default init
        nn.init.uniform_(self.x_proj_weight, -bound, bound)
        dt_std = self.dt_rank ** -0.5
        self.dt_projs_weight = nn.Parameter(torch.empty(1, d_model, self.dt_rank).uniform_(-dt_std, dt_std))
        dt = torch.exp(torch.rand(d_model) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_init_floor)
        self.dt_projs_bias = nn.Parameter((dt + torch.log(-torch.expm1(-dt)))[None])  # softplus^-1(dt)
        self.A_logs = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(d_model, 1))
        self.Ds = nn.Parameter(torch.ones(d_model))

    def forward(self, x: torch.Tensor, prompt: torch.Tensor, impl: ScanImpl) -> torch.Tensor:
        """``x`` (B, L, D), ``prompt`` (B, L, N) -> (B, L, D).

        Everything stays channel-last; the scan receives (B, D, L) *views*, which the CPU kernel reads with
        contiguous SIMD loads (no transposed copies).
        """
        dts, Bs, Cs = self._project(x)
        Cs = Cs.float() + prompt.float()
        y = selective_scan(
            x.float().transpose(1, 2), dts.float().transpose(1, 2), -torch.exp(self.A_logs.float()),
            Bs.float().transpose(1, 2)[:, None], Cs.transpose(1, 2)[:, None], self.Ds.float(), z=None,
            delta_bias=self.dt_projs_bias.float().view(-1), delta_softplus=True, impl=impl)
        return y.transpose(1, 2)

    def _project(self, x: torch.Tensor, fast: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The row-wise projections of ``x`` (B, L, D): dt (B, L, D), B and C (B, L, N) (views of x_proj's).
        ``fast`` (inference): through :func:`~smt.models.common.fast_linear` (oneDNN where it runs), whose
        dt_rank-deep dt projection (22 for the L model) runs at several times the speed of the plain matmul on
        the strided slice (MambaIRv2-L, 128 px: about 10 -> 3 ms per call, 54 calls per forward)."""
        proj = (lambda t, w: fast_linear(t, w, None)) if fast else (lambda t, w: t @ w.t())
        x_dbl = proj(x, self.x_proj_weight[0])  # (B, L, dt_rank + 2N)
        dts, Bs, Cs = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        return proj(dts, self.dt_projs_weight[0]), Bs, Cs

    def forward_rows(self, x: torch.Tensor, order: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
        """Inference on the CPU kernel: :meth:`forward` of ``x`` gathered along L by ``order`` (b, L), returned
        scattered back (row ``order[b, l]`` of the output is step l's), without either permuted copy: the
        projections are row-wise, so they run on ``x`` as it is; the kernel reads and writes rows through
        ``order`` (:func:`smt.kernels.selective_scan.selective_scan_rows`); C joins the prompt in step order,
        as in :meth:`forward`. ``x`` (B, L, D) with unit channel stride."""
        dts, Bs, Cs = self._project(x, fast=True)  # rows in token order
        Cs = torch.gather(Cs, 1, order[..., None].expand_as(Cs)) + prompt.float()  # step order
        y = selective_scan_rows(
            x.transpose(1, 2), dts.transpose(1, 2), -torch.exp(self.A_logs.float()), Bs.transpose(1, 2),
            Cs.transpose(1, 2), self.Ds.float(), delta_bias=self.dt_projs_bias.float().view(-1),
            delta_softplus=True, rows=order)
        return y.transpose(1, 2)


def _standard_exponential_like(t: torch.Tensor) -> torch.Tensor:
    """``torch.empty_like(t).exponential_()`` (contiguous): the same values and the same generator state, faster
    for float32, bfloat16 and float16 CPU tensors; other tensors draw with ``exponential_`` itself.

    PyTorch's CPU ``exponential_`` is a serial loop that per element draws ``random64()`` from the global
    generator and returns ``float(-log1p(-u))`` with ``u = (bits & (2**53 - 1)) * 2**-53`` (double). Here the
    draws come in bulk (:func:`smt.kernels.cpu_generator.neg_uniform53`: MT19937 in C, 8x faster than the
    serial loop; where it does not run, ``random_()`` on int64, the same serial ``random64()`` per element,
    5x faster than ``exponential_``) and the transform runs vectorised. The vectorised double ``log1p`` may
    differ from the scalar one by an ulp or two, which changes the float result only where the double lies next
    to a float rounding boundary (the 29 bits that the float cast drops are within 16 of half way): those few
    elements (about one in 16M) are recomputed with the C library's scalar ``log1p`` (Python's
    ``math.log1p``). For bfloat16 and float16 the serial kernel casts the same double to the type, through
    float (c10's constructors round a float): float32 values rounded to the type (the bf16 autocast's route
    logits; before, this draw was 19% of MambaIRv2-L's bf16 forward)."""
    if t.device.type != "cpu" or t.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return torch.empty_like(t, memory_format=torch.legacy_contiguous_format).exponential_()
    neg_u = neg_uniform53(t.numel())
    if neg_u is None:
        neg_u = neg_uniform53_reference(t.numel())
    return _exponential_from_neg_uniform(neg_u).view(t.shape).to(t.dtype)


def _exponential_from_neg_uniform(neg_u: torch.Tensor) -> torch.Tensor:
    """float32 ``-log1p(-u)`` from float64 ``-u`` (``u`` a multiple of 2**-53 in [0, 1)), rounded as the scalar
    C library computation rounds (see :func:`_standard_exponential_like`)."""
    e = torch.log1p(neg_u).neg_()
    out = e.float()
    # (low 29 bits - (half way - 16)) mod 2**29 <= 32; e is positive and far from float's subnormal range
    unsure = e.view(torch.int64).sub_((1 << 28) - 16).bitwise_and_((1 << 29) - 1).le_(32)
    if unsure.any():
        flat_out, flat_neg_u = out.view(-1), neg_u.view(-1)
        for i in unsure.view(-1).nonzero().view(-1).tolist():
            flat_out[i] = -math.log1p(float(flat_neg_u[i]))
    return out


def _gumbel_policy(logits: torch.Tensor) -> torch.Tensor:
    """``F.gumbel_softmax(logits, hard=True, dim=-1)``; inside :func:`smt.models.sample_noise.per_sample` (the
    training loop) each sample's noise comes from its own generator, seeded from its global index in the step's
    batch, so the routes do not depend on which process holds the sample."""
    noise = _per_sample_exponential(tuple(logits.shape), logits.dtype, logits.device)
    if noise is None:
        return F.gumbel_softmax(logits, hard=True, dim=-1)
    return _gumbel_hard(logits, noise)


def _gumbel_hard(logits: torch.Tensor, exponential: torch.Tensor) -> torch.Tensor:
    """The straight-through hard Gumbel-softmax (tau 1) of ``logits`` with the noise ``-log(exponential)``: the
    one-hot of the noisy argmax forward, the softmax's gradient backward (``F.gumbel_softmax``'s computation,
    given its draw)."""
    soft = (logits + -exponential.log()).softmax(-1)
    hard = torch.zeros_like(logits).scatter_(-1, soft.max(-1, keepdim=True)[1], 1.0)
    return hard - soft.detach() + soft


def _one_hot_argmax(logits: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(logits).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)


class ASSM(nn.Module):
    """Attentive state-space module: prompt routing, semantic sort, selective scan, unsort."""

    def __init__(self, dim: int, d_state: int, num_tokens: int, inner_rank: int, mlp_ratio: float) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.num_tokens, self.d_state = num_tokens, d_state
        self.selectiveScan = Selective_Scan(hidden, d_state)
        self.out_norm = nn.LayerNorm(hidden)
        self.out_proj = FastLinear(hidden, dim)
        self.in_proj = nn.Sequential(nn.Conv2d(dim, hidden, 1))
        self.CPE = nn.Sequential(nn.Conv2d(hidden, hidden, 3, 1, 1, groups=hidden))
        self.embeddingB = nn.Embedding(num_tokens, inner_rank)
        nn.init.uniform_(self.embeddingB.weight, -1 / num_tokens, 1 / num_tokens)
        self.route = nn.Sequential(FastLinear(dim, dim // 3), nn.GELU(), FastLinear(dim // 3, num_tokens),
                                   nn.LogSoftmax(dim=-1))

    def forward(self, x: torch.Tensor, x_size: tuple[int, int], token: nn.Embedding, routing: Routing,
                scan_impl: ScanImpl) -> torch.Tensor:
        if inference_fast_path(self):
            return self._forward_fast(x, x_size, token, routing, scan_impl)
        b, n, _ = x.shape
        prompts = self.embeddingB.weight @ token.weight  # (num_tokens, d_state)
        logits = self.route(x)
        policy = _gumbel_policy(logits) if routing == "gumbel" else _one_hot_argmax(logits)
        prompt = (policy @ prompts).view(b, n, self.d_state)
        route = policy.detach().argmax(-1)
        order = torch.sort(route, dim=-1, stable=False).indices
        inverse = torch.empty_like(order).scatter_(-1, order, torch.arange(n, device=x.device).expand(b, n))
        x = self.in_proj(rearrange(x, "b (h w) c -> b c h w", h=x_size[0]))
        x = rearrange(x * torch.sigmoid(self.CPE(x)), "b c h w -> b (h w) c")
        x = torch.gather(x, 1, order[..., None].expand_as(x))
        y = self.out_proj(self.out_norm(self.selectiveScan(x, prompt, scan_impl)))
        return torch.gather(y, 1, inverse[..., None].expand_as(y))

    def _forward_fast(self, x: torch.Tensor, x_size: tuple[int, int], token: nn.Embedding, routing: Routing,
                      scan_impl: ScanImpl) -> torch.Tensor:
        """Inference fast path of :meth:`forward` (eval mode, no autograd), equal to it within float rounding.

        - Routing: the route index is taken directly (``argmax`` of the noisy logits for ``"gumbel"``, drawing
          the same noise from the same generator as ``F.gumbel_softmax``, through the faster
          :func:`_standard_exponential_like`, bit for bit; the reference's softmax is monotonic
          and its one-hot straight-through policy is 1 (to within 1 ulp) at that index and 0 elsewhere), so the
          one-hot matrix, its matmul with the prompts and the scatter of the inverse permutation go; the prompt
          is a row lookup.
        - ``in_proj`` (a 1x1 conv) runs as a matmul on the channel-last tokens, and ``CPE`` with the sigmoid
          fused on a channels-last view of its output (:func:`~smt.models.common.depthwise_tokens`; where that
          does not run, the module: no NCHW copies either way; oneDNN's depthwise conv is faster channels-last).
        - The sort and the unsort move whole rows (``index_select`` / ``index_copy_``) instead of gathering
          element by element through an expanded index. (The prompt stays in token order, as in the reference
          and the official code.)
        - The CPU scan writes its output channel-last (:func:`smt.kernels.selective_scan._fused_forward`), so
          ``out_norm`` reads it without a transposing copy. Where the CPU kernel runs the scan
          (:func:`~smt.kernels.selective_scan.scan_reads_rows`), it reads its steps' rows through the sort's
          indices and writes each output to its token's row (:meth:`Selective_Scan.forward_rows`): no sorted
          copy, no unsort.
        """
        b, n, c = x.shape
        h, w = x_size
        prompts = self.embeddingB.weight @ token.weight  # (num_tokens, d_state)
        route_in, _, route_out, log_softmax = self.route
        logits = log_softmax(route_out(route_in.forward_gelu(x)))  # GELU fused into the first linear
        if routing == "gumbel":
            # F.gumbel_softmax(hard=True): gumbels = -log(Exp(1)), index = argmax(softmax(logits + gumbels))
            logits = logits - _standard_exponential_like(logits).log_()
        # widened first: the same values, so the same index (the first of equal maxima), and PyTorch's float32
        # argmax is about 3x faster than its bfloat16 one (MambaIRv2-L, 4096 x 128: 0.33 vs 0.94 ms)
        route = logits.float().argmax(-1)
        prompt = F.embedding(route, prompts)  # (b, n, d_state)
        order = torch.sort(route, dim=-1, stable=False).indices  # the same call as the reference: same ties
        conv = self.in_proj[0]
        xs = fast_linear(x, conv.weight, conv.bias)  # (b, n, hidden)
        gate = depthwise_tokens(xs, x_size, self.CPE[0], "sigmoid")  # conv + sigmoid fused, as tokens
        if gate is None:  # channels-last in, channels-last out
            gate = rearrange(self.CPE(xs.view(b, h, w, -1).permute(0, 3, 1, 2)), "b c h w -> b (h w) c").sigmoid()
        if scan_reads_rows(xs, scan_impl):  # the CPU kernel scans in sorted order through the indices
            xs = xs * gate  # contiguous, like the scan's delta
            return self.out_proj(self.out_norm(self.selectiveScan.forward_rows(xs, order, prompt)))
        xs = xs.mul_(gate)
        sorted_x = torch.empty_like(xs)
        for i in range(b):
            torch.index_select(xs[i], 0, order[i], out=sorted_x[i])
        y = self.out_proj(self.out_norm(self.selectiveScan(sorted_x, prompt, scan_impl)))
        out = torch.empty_like(y)
        for i in range(b):
            out[i].index_copy_(0, order[i], y[i])
        return out


class AttentiveLayer(nn.Module):
    """Window-attention half and ASSM half, each with a ConvFFN and a learned residual scale."""

    def __init__(self, dim: int, d_state: int, num_heads: int, window_size: int, shift_size: int, inner_rank: int,
                 num_tokens: int, convffn_kernel_size: int, mlp_ratio: float, qkv_bias: bool,
                 norm_layer: type[nn.Module], gated_ffn: bool = False) -> None:
        super().__init__()
        self.window_size, self.shift_size = window_size, shift_size
        self.norm1, self.norm2, self.norm3, self.norm4 = (norm_layer(dim) for _ in range(4))
        self.scale1 = nn.Parameter(1e-4 * torch.ones(dim))
        self.scale2 = nn.Parameter(1e-4 * torch.ones(dim))
        self.wqkv = FastLinear(dim, 3 * dim, bias=qkv_bias)
        self.win_mhsa = WindowAttention(dim, window_size, num_heads)
        self.assm = ASSM(dim, d_state, num_tokens, inner_rank, mlp_ratio)
        hidden = int(dim * mlp_ratio)
        if gated_ffn:  # MambaIRv2Light
            self.convffn1: nn.Module = GatedMLP(dim, hidden)
            self.convffn2: nn.Module = GatedMLP(dim, hidden)
        else:
            self.convffn1 = ConvFFN(dim, hidden, convffn_kernel_size)
            self.convffn2 = ConvFFN(dim, hidden, convffn_kernel_size)
        self.embeddingA = nn.Embedding(inner_rank, d_state)
        nn.init.uniform_(self.embeddingA.weight, -1 / inner_rank, 1 / inner_rank)

    def forward(self, x: torch.Tensor, x_size: tuple[int, int], params: dict) -> torch.Tensor:
        h, w = x_size
        s, ws = self.shift_size, self.window_size
        shortcut = x
        if inference_fast_path(self):
            # inference: roll + partition as one row gather, reverse + roll back as one scatter
            order = window_order(x.shape[0], h, w, ws, s, x.device)
            # rows gathered before the (row-wise) norm and projection: 174 channels move, not 3 x 6 x 32
            qkv, d = head_padded_qkv(self.norm1(windows_gather(x, order, ws)), self.wqkv, self.win_mhsa.num_heads)
            attn = self.win_mhsa.forward_ordered(qkv, d, params["rpi_sa"], order, ws, s, params["attn_impl"])
            return self._forward_tail(windows_scatter(attn, order, x.shape[0]) + shortcut, shortcut, x_size,
                                      params)
        qkv = rearrange(self.wqkv(self.norm1(x)), "b (h w) c -> b h w c", h=h)
        if s > 0:
            qkv = torch.roll(qkv, shifts=(-s, -s), dims=(1, 2))
        grid = (h // ws, w // ws, ws, s) if s > 0 else None  # shifted windows: masked across regions
        attn = self.win_mhsa(window_partition(qkv, ws), params["rpi_sa"], grid, params["attn_impl"])
        attn = window_reverse(attn, ws, h, w)
        if s > 0:
            attn = torch.roll(attn, shifts=(s, s), dims=(1, 2))
        return self._forward_tail(rearrange(attn, "b h w c -> b (h w) c") + shortcut, shortcut, x_size, params)

    def _forward_tail(self, x_win: torch.Tensor, shortcut: torch.Tensor, x_size: tuple[int, int],
                      params: dict) -> torch.Tensor:
        """Everything after the window attention: ConvFFN, residual scale, ASSM, ConvFFN, residual scale."""
        x_win = self.convffn1(self.norm2(x_win), x_size) + x_win
        x = shortcut * self.scale1 + x_win
        shortcut = x
        x_aca = self.assm(self.norm3(x), x_size, self.embeddingA, params["routing"], params["scan_impl"]) + x
        x = x_aca + self.convffn2(self.norm4(x_aca), x_size)
        return shortcut * self.scale2 + x


class BasicBlock(nn.Module):
    def __init__(self, depth: int, use_checkpoint: bool, window_size: int, **layer_kwargs) -> None:
        super().__init__()
        self.use_checkpoint = use_checkpoint
        self.layers = nn.ModuleList([
            AttentiveLayer(window_size=window_size, shift_size=0 if i % 2 == 0 else window_size // 2,
                           **layer_kwargs)
            for i in range(depth)])

    def forward(self, x: torch.Tensor, x_size: tuple[int, int], params: dict) -> torch.Tensor:
        for layer in self.layers:
            if self.use_checkpoint and self.training:
                x = cp.checkpoint(layer, x, x_size, params, use_reentrant=False)
            else:
                x = layer(x, x_size, params)
        return x


class ASSB(nn.Module):
    """Attentive state-space group: layers, then a conv, with a residual connection around both."""

    def __init__(self, dim: int, resi_connection: str, **block_kwargs) -> None:
        super().__init__()
        self.residual_group = BasicBlock(dim=dim, **block_kwargs)
        if resi_connection == "1conv":
            self.conv = nn.Conv2d(dim, dim, 3, 1, 1)
        elif resi_connection == "3conv":
            self.conv = _three_conv(dim)
        else:
            raise ValueError(f"resi_connection must be '1conv' or '3conv', got {resi_connection!r}")

    def forward(self, x: torch.Tensor, x_size: tuple[int, int], params: dict) -> torch.Tensor:
        y = rearrange(self.residual_group(x, x_size, params), "b (h w) c -> b c h w", h=x_size[0])
        return rearrange(self.conv(y), "b c h w -> b (h w) c") + x


def _three_conv(dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(dim, dim // 4, 3, 1, 1), nn.LeakyReLU(0.2, inplace=True),
                         nn.Conv2d(dim // 4, dim // 4, 1, 1, 0), nn.LeakyReLU(0.2, inplace=True),
                         nn.Conv2d(dim // 4, dim, 3, 1, 1))


class MambaIRv2(SRHeads):
    """MambaIRv2 for SR. Arguments as the official class; ours (keyword-only) after ``resi_connection``."""

    _gated_ffn = False  # MambaIRv2Light: GatedMLP instead of ConvFFN

    def __init__(self, img_size: int = 64, patch_size: int = 1, in_chans: int = 3, embed_dim: int = 48,
                 d_state: int = 8, depths: Sequence[int] = (6, 6, 6, 6), num_heads: Sequence[int] = (4, 4, 4, 4),
                 window_size: int = 16, inner_rank: int = 32, num_tokens: int = 64, convffn_kernel_size: int = 5,
                 mlp_ratio: float = 2.0, qkv_bias: bool = True, norm_layer: type[nn.Module] = nn.LayerNorm,
                 ape: bool = False, patch_norm: bool = True, use_checkpoint: bool = False, upscale: int = 2,
                 img_range: float = 1.0, upsampler: str = "", resi_connection: str = "1conv", *,
                 aux_scales: Sequence[int] = (), routing: Routing = "gumbel", attn_impl: AttentionImpl = "sdpa",
                 scan_impl: ScanImpl = "auto", num_feat: int = 64) -> None:
        super().__init__()
        self._check_args(upsampler, patch_size, depths, num_heads, upscale, aux_scales)
        if routing not in ("gumbel", "argmax"):
            raise ValueError(f"MambaIRv2: routing must be 'gumbel' or 'argmax', got {routing!r}")
        self.window_size, self.img_range, self.upscale, self.upsampler = window_size, img_range, upscale, upsampler
        self.aux_scales = tuple(aux_scales)
        self.routing: Routing = routing
        self.attn_impl: AttentionImpl = attn_impl
        self.scan_impl: ScanImpl = scan_impl
        self._register_mean(in_chans)
        self.conv_first = nn.Conv2d(in_chans, embed_dim, 3, 1, 1)
        self.patch_embed = _PatchEmbed(embed_dim, norm_layer if patch_norm else None)
        self.ape = ape
        if ape:
            self.absolute_pos_embed = nn.Parameter(torch.zeros(1, (img_size // patch_size) ** 2, embed_dim))
            nn.init.trunc_normal_(self.absolute_pos_embed, std=0.02)
        self.register_buffer("relative_position_index_SA", relative_position_index(window_size))
        self.layers = nn.ModuleList([
            ASSB(dim=embed_dim, resi_connection=resi_connection, depth=depth, use_checkpoint=use_checkpoint,
                 window_size=window_size, d_state=d_state, num_heads=heads, inner_rank=inner_rank,
                 num_tokens=num_tokens, convffn_kernel_size=convffn_kernel_size, mlp_ratio=mlp_ratio,
                 qkv_bias=qkv_bias, norm_layer=norm_layer, gated_ffn=self._gated_ffn)
            for depth, heads in zip(depths, num_heads)])
        self.norm = norm_layer(embed_dim)
        self.conv_after_body = nn.Conv2d(embed_dim, embed_dim, 3, 1, 1) if resi_connection == "1conv" \
            else _three_conv(embed_dim)
        self._build_heads(embed_dim, in_chans, num_feat)
        self.apply(_init_weights)

    # --- heads: the official four upsamplers (auxiliary heads only with 'pixelshuffle') ---------------------

    def _check_args(self, upsampler, patch_size, depths, num_heads, upscale, aux_scales) -> None:
        name = type(self).__name__
        if upsampler not in UPSAMPLERS:
            raise ValueError(f"{name}: upsampler must be one of {', '.join(map(repr, UPSAMPLERS))}, "
                             f"got {upsampler!r}")
        if upsampler == "nearest+conv" and upscale != 4:
            raise ValueError(f"{name}: upsampler='nearest+conv' supports upscale 4 only, got {upscale}")
        if upsampler == "" and upscale != 1:
            raise ValueError(f"{name}: upsampler='' (denoising / JPEG artefact removal) needs upscale 1, "
                             f"got {upscale}")
        if upsampler != "pixelshuffle" and aux_scales:
            raise ValueError(f"{name}: aux_scales need upsampler='pixelshuffle', got {upsampler!r}")
        super()._check_args("pixelshuffle", patch_size, depths, num_heads, upscale, aux_scales)

    def _build_heads(self, embed_dim: int, in_chans: int, num_feat: int = 64) -> None:
        if self.upsampler == "pixelshuffle":
            super()._build_heads(embed_dim, in_chans, num_feat)
        elif self.upsampler == "pixelshuffledirect":
            # official UpsampleOneStep: parameters 'upsample.0.*'
            self.upsample = nn.Sequential(nn.Conv2d(embed_dim, self.upscale ** 2 * in_chans, 3, 1, 1),
                                          nn.PixelShuffle(self.upscale))
        elif self.upsampler == "nearest+conv":
            self.conv_before_upsample = nn.Sequential(nn.Conv2d(embed_dim, num_feat, 3, 1, 1),
                                                      nn.LeakyReLU(inplace=True))
            self.conv_up1 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
            self.conv_up2 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
            self.conv_hr = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
            self.conv_last = nn.Conv2d(num_feat, in_chans, 3, 1, 1)
            self.lrelu = nn.LeakyReLU(0.2, inplace=True)
        else:  # '': x1 restoration, a residual on the input
            self.conv_last = nn.Conv2d(embed_dim, in_chans, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.upsampler == "pixelshuffle":
            return super().forward(x)
        feat, h, w = self._body(x)
        if self.upsampler == "pixelshuffledirect":
            y = self.upsample(feat)
        elif self.upsampler == "nearest+conv":
            y = self.conv_before_upsample(feat)
            y = self.lrelu(self.conv_up1(F.interpolate(y, scale_factor=2, mode="nearest")))
            y = self.lrelu(self.conv_up2(F.interpolate(y, scale_factor=2, mode="nearest")))
            y = self.conv_last(self.lrelu(self.conv_hr(y)))
        else:
            # the normalised, padded input, recomputed exactly as _body makes it
            xn = (pad_to_multiple(x, self.window_size, "symmetric")[0] - self.mean.to(x.dtype)) * self.img_range
            y = xn + self.conv_last(feat)
        y = y / self.img_range + self.mean.to(y.dtype)
        return y[..., : h * self.upscale, : w * self.upscale]

    def forward_multiscale(self, x: torch.Tensor) -> dict[int, torch.Tensor]:
        if self.upsampler != "pixelshuffle":
            return {self.upscale: self(x)}
        return super().forward_multiscale(x)

    def forward_features(self, x: torch.Tensor, params: dict) -> torch.Tensor:
        x_size = (x.shape[2], x.shape[3])
        x = self.patch_embed(x)
        if self.ape:
            x = x + self.absolute_pos_embed
        for layer in self.layers:
            x = layer(x, x_size, params)
        return rearrange(self.norm(x), "b (h w) c -> b c h w", h=x_size[0])

    def _body(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        x, h, w = pad_to_multiple(x, self.window_size, "symmetric")
        x = (x - self.mean.to(x.dtype)) * self.img_range
        params = {
            "rpi_sa": self.relative_position_index_SA, "routing": self.routing, "attn_impl": self.attn_impl,
            "scan_impl": self.scan_impl,
        }
        x = self.conv_first(x)
        return self.conv_after_body(self.forward_features(x, params)) + x, h, w


class MambaIRv2Light(MambaIRv2):
    """MambaIRv2-light (official ``MambaIRv2Light``): MambaIRv2 with GatedMLP feed-forwards; same arguments
    (the released lightweight-SR checkpoints use ``mlp_ratio=1.0``, ``upsampler='pixelshuffledirect'``)."""

    _gated_ffn = True
