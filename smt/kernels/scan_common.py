"""Pieces every selective-scan implementation shares: the B/C layout the kernels read, the group check, and
the element-wise epilogue (``D`` skip, ``z`` gate, cast back). One home, so the reference, the C-kernel
wrapper and the Triton wrapper cannot drift apart; the Triton module imports these from here rather than from
:mod:`smt.kernels.selective_scan` (which imports the Triton module: no cycle)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["grouped_bc", "check_groups", "scan_epilogue"]


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


def scan_epilogue(y: torch.Tensor, u: torch.Tensor, D: torch.Tensor | None, z: torch.Tensor | None,
                  ct: torch.dtype, dtype_in: torch.dtype) -> torch.Tensor:
    """``(y + D*u) * silu(z)`` in the compute dtype ``ct`` (each part only if given), cast to ``dtype_in``.
    ``y``, ``u``, ``z``: (batch, D, L); ``u`` already in ``ct``."""
    out = y if D is None else y + u * D.to(ct)[:, None]
    if z is not None:
        out = out * F.silu(z.to(ct))
    return out.to(dtype_in)
