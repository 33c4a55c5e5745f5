"""Attention with an additive bias, as used by HAT's (overlapping) window attention and MambaIRv2's.

``window_attention(q, k, v, bias, scale, impl)`` computes ``softmax(q*scale @ k^T + bias) @ v``.
``impl="reference"`` is the plain computation in the official order (scale q first, then matmul, add bias,
softmax); ``impl="sdpa"`` calls ``torch.nn.functional.scaled_dot_product_attention`` with the bias as a float
mask (fused on CUDA, and on CPU avoids materialising the softmax twice). Tests compare the two.

Which SDPA kernel runs on CUDA (PyTorch's ``sdp_utils``): flash attention takes no arbitrary float mask, so
with a bias the candidates are memory-efficient attention and cuDNN, both of which need the head dimension to
be a multiple of the GEMM alignment (8 for bf16/fp16 on sm80+, 4 for fp32; cuDNN: 8). HAT-L's heads are 30 wide
(180 / 6) and MambaIRv2-L's 29 (174 / 6): left as they are, every window attention would fall back to the math
backend, which materialises the (windows x heads, n, n) scores in fp32. On CUDA the head dimension is therefore
zero-padded to a multiple of 8 (q . k and the output's first d columns are unchanged; the padded output columns
are dropped), which makes the memory-efficient kernel eligible.

CPU inference fast paths (issue 17) are switched off together by :func:`reference_paths` (benchmarks and
tests compare both): on CPU, SDPA's flash kernel needs unit stride in the head dimension, else it falls back
to the math path (2-3x slower: it materialises the scores and softmax); HAT's overlapping cross-attention
takes k and v straight from ``unfold`` (head dimension strided), so ``_sdpa`` makes such inputs contiguous.
bf16 q, k, v on a CPU with AVX-512 BF16 go to the C kernel ``csrc/window_attention.c`` instead
(:func:`cpu_bf16_attention_available`; inference only): PyTorch's CPU flash kernel is no faster in bf16 than in
float32, the kernel runs (16, 6, 256, 32) windows 2.5x faster than it, with float32 scores and a float32 bias
(SDPA rounds the bias to bf16).
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Literal

import torch
import torch.nn.functional as F

__all__ = ["window_attention", "AttentionImpl", "fast_paths_enabled", "reference_paths",
           "cpu_bf16_attention_available", "bf16_kernel_applies"]

AttentionImpl = Literal["reference", "sdpa"]

_fast_paths = True


def fast_paths_enabled() -> bool:
    """Whether the inference fast paths (this module's, :mod:`smt.models.common`'s and the models' eval-mode
    ones in :mod:`smt.models.hat` and :mod:`smt.models.mambairv2`) are on (the default)."""
    return _fast_paths


@contextlib.contextmanager
def reference_paths() -> Iterator[None]:
    """Within this block the fast paths are off: every call takes its reference path (not thread-safe)."""
    global _fast_paths
    before, _fast_paths = _fast_paths, False
    try:
        yield
    finally:
        _fast_paths = before


def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
                     scale: float, impl: AttentionImpl = "sdpa") -> torch.Tensor:
    """``q`` (B, H, Nq, D), ``k``/``v`` (B, H, Nk, D), ``bias`` broadcastable to (B, H, Nq, Nk)."""
    if impl == "reference":
        attn = (q * scale) @ k.transpose(-2, -1)
        if bias is not None:
            attn = attn + bias
        return attn.softmax(dim=-1) @ v
    if impl == "sdpa":
        if bf16_kernel_applies(q, k, v):
            return _cpu_bf16_attention(q, k, v, bias, scale)
        if bias is not None:
            bias = bias.to(q.dtype)
        return _sdpa(q, k, v, bias, scale, SDPA_HEAD_ALIGN if q.is_cuda else 1)
    raise ValueError(f"unknown attention impl {impl!r} (valid: 'reference', 'sdpa')")


SDPA_HEAD_ALIGN = 8  # head dims padded to a multiple of this on CUDA (see the module docstring)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, scale: float,
          align: int) -> torch.Tensor:
    """SDPA with q, k, v zero-padded in the head dimension to a multiple of ``align`` (exact: zero columns add
    nothing to q . k, and the padded output columns, zero, are cut off)."""
    d = q.shape[-1]
    if _fast_paths and not q.is_cuda:  # flash kernel eligibility on CPU (see the module docstring)
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    pad = -d % align
    if pad:
        q, k, v = (F.pad(t, (0, pad)) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)
    return out[..., :d] if pad else out


def cpu_bf16_attention_available() -> bool:
    """Whether bf16 attention on this CPU can run the C kernel (``csrc/window_attention.c``): the kernel library
    loads, its OpenMP build runs on PyTorch's threads, and the compiler had AVX-512 BF16 for this CPU."""
    from smt.kernels.cpu_build import load_library, openmp_library

    lib = load_library()
    return lib is not None and openmp_library() is not None and bool(lib.attn_bf16_available())


KERNEL_MAX_HEAD = 64  # csrc/window_attention.c: head dimension even and at most 64


def bf16_kernel_applies(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether :func:`window_attention` of these q, k, v (any ``impl`` but ``"reference"``) runs the bf16 C
    kernel, which reads its bias in float32."""
    d = q.shape[-1]
    return (_fast_paths and q.device.type == "cpu" and q.dim() == 4
            and q.dtype == k.dtype == v.dtype == torch.bfloat16 and d <= KERNEL_MAX_HEAD and d % 2 == 0
            and not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad))
            and cpu_bf16_attention_available())


def _cpu_bf16_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
                        scale: float) -> torch.Tensor:
    """:func:`window_attention` of bf16 (B, H, N, D) q and (B, H, M, D) k, v by the C kernel, on PyTorch's OpenMP
    threads: bf16 output. The bias is read in float32, broadcast by stride."""
    from smt.kernels.cpu_build import openmp_library

    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    b, h, n, d = q.shape
    m = k.shape[-2]
    bias = q.new_zeros((1, 1, 1, m), dtype=torch.float32) if bias is None else bias.float()
    bias = (bias if bias.stride(-1) == 1 else bias.contiguous()).expand(b, h, n, m)
    out = torch.empty((b, h, n, d), dtype=torch.bfloat16)
    status = openmp_library().attn_bf16_omp(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), bias.data_ptr(), out.data_ptr(), h, n, m, d, scale,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *bias.stride()[:3], *out.stride()[:3], b * h,
        torch.get_num_threads())
    if status:
        raise MemoryError("window attention kernel: out of memory for its scratch buffers") if status == -1 else \
            RuntimeError(f"window attention kernel refused (D={d}): status {status}")
    return out
