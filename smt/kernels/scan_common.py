"""Pieces every selective-scan implementation shares: the compute dtype, the step sizes (``delta_bias`` and
softplus), the B/C layout the kernels read, the group check, the autograd wrapper of a compiled scan core, and
the element-wise epilogue (``D`` skip, ``z`` gate, cast back). One home, so the reference, the C-kernel
wrapper and the Triton wrapper cannot drift apart; the Triton module imports these from here rather than from
:mod:`smt.kernels.selective_scan` (which imports the Triton module: no cycle)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["compute_dtype", "step_sizes", "grouped_bc", "check_groups", "core_shape", "KernelScan",
           "scan_epilogue"]


def compute_dtype(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor) -> torch.dtype:
    """float64 when any of ``u``, ``delta``, ``A`` is float64, else float32."""
    return torch.float64 if torch.float64 in (u.dtype, delta.dtype, A.dtype) else torch.float32


def step_sizes(delta: torch.Tensor, delta_bias: torch.Tensor | None, delta_softplus: bool,
               ct: torch.dtype) -> torch.Tensor:
    """``dt = softplus(delta + delta_bias)`` in ``ct``, (batch, D, L); the bias and the softplus each only if
    asked for."""
    delta = delta.to(ct)
    if delta_bias is not None:
        delta = delta + delta_bias.to(ct)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    return delta


def grouped_bc(M: torch.Tensor, batch: int, dim: int, length: int, ct: torch.dtype) -> torch.Tensor:
    """B or C as a contiguous (batch, G, L, N) tensor (time-invariant (D, N) becomes G = D)."""
    M = M.to(ct)
    if M.dim() == 2:
        return M[None, :, None, :].expand(batch, dim, length, M.shape[1]).contiguous()
    if M.dim() == 3:
        M = M[:, None]
    return M.transpose(-1, -2).contiguous()


def check_groups(dim: int, Bg: torch.Tensor, Cg: torch.Tensor) -> None:
    """B and C (batch, G, ...) must have the same group count, and it must divide the channels."""
    if dim % Bg.shape[1] or Bg.shape[1] != Cg.shape[1]:
        raise ValueError(f"selective_scan: {dim} channels cannot be split into B's {Bg.shape[1]} and C's "
                         f"{Cg.shape[1]} groups")


def core_shape(u: torch.Tensor, B: torch.Tensor) -> tuple[int, int, int, int, int]:
    """``(batch, length, dim, groups, nstate)`` of a compiled core's inputs: ``u`` (batch, L, D) and ``B``
    (batch, G, L, N)."""
    batch, length, dim = u.shape
    return batch, length, dim, B.shape[1], B.shape[3]


class KernelScan(torch.autograd.Function):
    """Autograd around a compiled scan core (the C kernel, the Triton kernels): ``y, last = scan(u, dt, A, B, C)``
    with ``u``, ``dt``, ``y`` (batch, L, D) and ``B``, ``C`` (batch, G, L, N); ``last`` (the final state) is not
    differentiable. Called as ``KernelScan.apply(core_fwd, core_bwd, u, dt, A, B, C)``, where
    ``core_fwd(u, dt, A, B, C)`` returns ``(y, last, extra)`` (``extra``: a tuple of tensors the backward needs)
    and ``core_bwd(dy, u, dt, A, B, C, *extra)`` returns ``(du, ddt, dA, dB, dC)`` for a contiguous ``dy``."""

    @staticmethod
    def forward(ctx, core_fwd, core_bwd, u, dt, A, B, C):
        y, last, extra = core_fwd(u, dt, A, B, C)
        ctx.core_bwd = core_bwd
        ctx.save_for_backward(u, dt, A, B, C, *extra)
        ctx.mark_non_differentiable(last)
        return y, last

    @staticmethod
    def backward(ctx, dy, _dlast):
        return (None, None, *ctx.core_bwd(dy.contiguous(), *ctx.saved_tensors))


def scan_epilogue(y: torch.Tensor, u: torch.Tensor, D: torch.Tensor | None, z: torch.Tensor | None,
                  ct: torch.dtype, dtype_in: torch.dtype) -> torch.Tensor:
    """``(y + D*u) * silu(z)`` in the compute dtype ``ct`` (each part only if given), cast to ``dtype_in``.
    ``y``, ``u``, ``z``: (batch, D, L); ``u`` already in ``ct``."""
    out = y if D is None else y + u * D.to(ct)[:, None]
    if z is not None:
        out = out * F.silu(z.to(ct))
    return out.to(dtype_in)
