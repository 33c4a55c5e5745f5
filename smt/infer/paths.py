"""Which compute paths an inference run takes, in one line for the user (``python -m smt upscale`` prints it,
the infer stage logs it).

Nothing here chooses: the models take their fastest tested path on their own (the eval-mode fast paths of
:mod:`smt.models`, each tested equal to its reference; SDPA attention, or the C kernel for bf16 on CPUs with
AVX-512 BF16; the compiled selective scan, on PyTorch's OpenMP threads where it can), and the precision is the
run's (fp32 unless asked). This module says which of them this machine gets, and why where one is missing (no C
compiler, no native bf16).
"""
from __future__ import annotations

from typing import Iterable

import torch

from smt.infer.malloc import malloc_status
from smt.infer.precision import Precision, cpu_has_native_bf16
from smt.kernels.attention import cpu_bf16_attention_available, fast_paths_enabled

__all__ = ["describe_paths"]


def _scan_path(device: torch.device) -> str:
    if device.type == "cuda":
        from smt.kernels.selective_scan import cuda_scan_backend

        name, why = cuda_scan_backend()
        return f"selective scan {name} ({why})"
    from smt.kernels.cpu_build import build_error, load_library, openmp_status

    lib = load_library()
    if lib is None:
        return f"selective scan: the PyTorch reference loop, slow ({build_error()})"
    threads = ("PyTorch's OpenMP threads" if openmp_status().startswith("OpenMP")
               else f"Python threads ({openmp_status()})")
    return f"selective scan: C kernel, {lib.scan_block_width()} channels per SIMD vector, on {threads}"


def describe_paths(nets: Iterable[torch.nn.Module], precision: Precision) -> str:
    """One line: the device and threads (on the CPU also :func:`smt.infer.malloc.malloc_status`), the precision,
    whether the inference fast paths are on, the attention kernel and (for models with a selective scan) the
    scan's implementation."""
    nets = list(nets)
    device = next(nets[0].parameters()).device
    parts = [f"{device.type}" + (f", {torch.get_num_threads()} threads, {malloc_status()}" if device.type == "cpu"
                                 else "")]
    if precision == "fp32":
        parts.append("fp32 (the reference precision)")
    else:
        native = device.type != "cpu" or cpu_has_native_bf16()
        parts.append(f"{precision} ({'native bf16 units' if native else 'bf16 EMULATED: slower than fp32'})")
    if not fast_paths_enabled():
        parts.append("reference paths (fast paths switched off)")
        return "inference paths: " + "; ".join(parts)
    from smt.models.common import onednn_conv_available, onednn_linear_available
    from smt.models.mambairv2 import ASSM, Selective_Scan

    gemm = ("oneDNN linear with bias and GELU fused" if onednn_linear_available()
            else "GEMMs padded to the SIMD width (no oneDNN linear in this PyTorch)")
    if device.type == "cpu" and onednn_conv_available() and any(
            isinstance(m, ASSM) for n in nets for m in n.modules()):  # its CPE (and ConvFFN's) run depthwise_tokens
        gemm += ", oneDNN depthwise convs with the activation fused"
    parts.append(f"eval fast paths (ordered windows, {gemm}; each tested equal to its reference)")
    impls = {getattr(n, "attn_impl", None) for n in nets} - {None}
    if impls:
        if device.type == "cuda":
            kernel = "SDPA, heads zero-padded to a multiple of 8"
        elif precision != "fp32" and cpu_bf16_attention_available():
            kernel = "C kernel with AVX-512 BF16 dot products and float32 scores (bf16 q, k, v)"
        else:
            kernel = "SDPA (CPU flash kernel), heads zero-padded to a multiple of 16"
        parts.append("attention: " + ", ".join(sorted(kernel if i == "sdpa" else "plain matmul + softmax"
                                                      for i in impls)))
    scanning = [n for n in nets if any(isinstance(m, Selective_Scan) for m in n.modules())]
    if scanning:
        forced = {getattr(n, "scan_impl", "auto") for n in scanning} - {"auto"}
        parts.append(f"selective scan: scan_impl={', '.join(sorted(forced))}" if forced else _scan_path(device))
    return "inference paths: " + "; ".join(parts)
