"""Inference precision: ``fp32`` (the reference) or ``bf16`` autocast (matrix products and convolutions in
bfloat16, accumulation and the selective scan in float32; outputs returned as float32).

bf16 pays off where the hardware has it natively (CUDA GPUs; CPUs with AVX-512 BF16 or AMX). On CPUs without it
PyTorch emulates bf16 and it is much slower than fp32 — ``benchmarks/bench_kernels.py --bf16`` measures both.
"""
from __future__ import annotations

from typing import Callable, Literal

import torch

__all__ = ["Precision", "with_precision", "cpu_has_native_bf16"]

Precision = Literal["fp32", "bf16"]


def with_precision(net: Callable[[torch.Tensor], torch.Tensor], precision: Precision,
                   ) -> Callable[[torch.Tensor], torch.Tensor]:
    """``net`` as a forward function in ``precision`` (inputs and outputs float32)."""
    if precision == "fp32":
        return net
    if precision != "bf16":
        raise ValueError(f"unknown precision {precision!r} (valid: 'fp32', 'bf16')")

    def forward(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            return net(x).float()

    return forward


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX-512 BF16 or AMX); Linux only, False when unknown."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags
