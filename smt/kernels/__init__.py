"""Kernels behind one function each, with a reference implementation beside every fast path.

- :func:`window_attention`: multi-head attention with an additive bias (relative position, shifted-window
  mask), plain matmul-softmax reference or ``scaled_dot_product_attention`` (bf16 inference on a CPU with
  AVX-512 BF16: the C kernel ``csrc/window_attention.c``).
- :func:`selective_scan`: mamba_ssm's selective scan (reference loop; fast paths in ``selective_scan``).
- ``cpu_generator.neg_uniform53``: PyTorch's CPU generator stepped in bulk (``csrc/mt19937.c``) for MambaIRv2's
  Gumbel draws; ``neg_uniform53_reference`` is PyTorch's own serial draw.
"""
from smt.kernels.attention import window_attention
from smt.kernels.selective_scan import selective_scan, selective_scan_ref

__all__ = ["window_attention", "selective_scan", "selective_scan_ref"]
