"""Attention with an additive bias, as used by HAT's (overlapping) window attention and MambaIRv2's.

``window_attention(q, k, v, bias, scale, impl)`` computes ``softmax(q*scale @ k^T + bias) @ v``.
``impl="reference"`` is the plain computation in the official order (scale q first, then matmul, add bias,
softmax); ``impl="sdpa"`` calls ``torch.nn.functional.scaled_dot_product_attention`` with the bias as a float
mask (fused on CUDA, and on CPU avoids materialising the softmax twice). Tests compare the two.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

__all__ = ["window_attention", "AttentionImpl"]

AttentionImpl = Literal["reference", "sdpa"]


def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
                     scale: float, impl: AttentionImpl = "sdpa") -> torch.Tensor:
    """``q`` (B, H, Nq, D), ``k``/``v`` (B, H, Nk, D), ``bias`` broadcastable to (B, H, Nq, Nk)."""
    if impl == "reference":
        attn = (q * scale) @ k.transpose(-2, -1)
        if bias is not None:
            attn = attn + bias
        return attn.softmax(dim=-1) @ v
    if impl == "sdpa":
        if bias is not None:
            bias = bias.to(q.dtype)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)
    raise ValueError(f"unknown attention impl {impl!r} (valid: 'reference', 'sdpa')")
