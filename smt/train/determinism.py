"""Deterministic mode for training on GPUs (``SMT_DETERMINISTIC=1``): run-to-run identical updates where PyTorch
can give them cheaply. An execution setting (environment, not params): on the CPU every op is already
deterministic and the mode changes nothing.

What it does: ``torch.use_deterministic_algorithms(True, warn_only=True)`` (PyTorch's deterministic kernels for
what it has them: the backward of MambaIRv2's token gathers, ``gather``/``scatter_add_``/``index_add``/
``index_select`` on CUDA, sort-based instead of atomic accumulation; an op without one warns instead of failing),
cuDNN in deterministic mode without autotuning, and ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` (cuBLAS's fixed
workspaces; it must be set before the process's first cuBLAS call, so set it in the environment to be sure).

What it cannot cover: kernels PyTorch does not know. The selective scan's backward on CUDA (mamba_ssm's extension
and our Triton kernel alike) accumulates dA/dB/dC/dD with float atomics, so MambaIRv2's gradients can differ in
the last bits from run to run even in this mode; HAT-L's training has no such kernel. The cost is measured by
``python -m smt smoke`` on a GPU (one training step with and without the mode, same process); see
docs/cluster.md.
"""
from __future__ import annotations

import os

import torch

__all__ = ["DETERMINISTIC_ENV", "deterministic_requested", "set_deterministic"]

DETERMINISTIC_ENV = "SMT_DETERMINISTIC"


def deterministic_requested() -> bool:
    """Whether ``SMT_DETERMINISTIC`` asks for the mode (any value but empty, ``0``, ``false``, ``no``)."""
    return os.environ.get(DETERMINISTIC_ENV, "").strip().lower() not in ("", "0", "false", "no")


def set_deterministic(device: torch.device, enabled: bool = True) -> str:
    """Switch the mode on (or off) for this process; returns a line for the log saying what it covers."""
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(enabled, warn_only=True)
    torch.backends.cudnn.deterministic = enabled
    torch.backends.cudnn.benchmark = False
    if not enabled:
        return "deterministic mode off"
    if device.type != "cuda":
        return "deterministic mode: on (the CPU's kernels are deterministic already)"
    from smt.kernels.selective_scan import cuda_scan_backend

    scan, _ = cuda_scan_backend()
    caveat = "" if scan == "reference" else (f"; not covered: the selective scan's backward ({scan}) accumulates "
                                             f"with float atomics, so MambaIRv2's gradients may still differ "
                                             f"in the last bits")
    return f"deterministic mode: on (PyTorch's deterministic kernels, cuDNN deterministic){caveat}"
