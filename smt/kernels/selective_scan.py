"""Selective scan (Mamba's S6 recurrence) with mamba_ssm's semantics, behind one function.

For channel ``d``, state ``n`` and position ``l``::

    dt[d,l] = softplus(delta[d,l] + delta_bias[d])          (softplus only if delta_softplus)
    h[d,n,l] = exp(dt[d,l] * A[d,n]) * h[d,n,l-1] + dt[d,l] * B[n,l] * u[d,l]
    y[d,l] = sum_n C[n,l] * h[d,n,l] + D[d] * u[d,l]        (then * silu(z[d,l]) if z is given)

``B``/``C`` are (D, N) (time-invariant), (batch, N, L), or grouped (batch, G, N, L) with D/G channels per group.
Computation is in float32 (float64 when the inputs are float64); the output has ``u``'s dtype.

Implementations: :func:`selective_scan_ref` (a loop over L, kept as the reference for tests).
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

__all__ = ["selective_scan", "selective_scan_ref", "ScanImpl"]

ScanImpl = Literal["auto", "reference"]


def _prepare(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    """Shared preamble: compute dtype, dt, and B/C expanded to (batch, D, N, L) or kept (D, N)."""
    dtype_in = u.dtype
    ct = torch.float64 if torch.float64 in (u.dtype, delta.dtype, A.dtype) else torch.float32
    u, delta, A = u.to(ct), delta.to(ct), A.to(ct)
    if delta_bias is not None:
        delta = delta + delta_bias.to(ct)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    dim = A.shape[0]

    def expand(M):
        M = M.to(ct)
        if M.dim() == 4:  # (batch, G, N, L) -> (batch, D, N, L)
            return M.repeat_interleave(dim // M.shape[1], dim=1)
        if M.dim() == 3:  # (batch, N, L) -> (batch, 1, N, L), broadcast over channels
            return M[:, None]
        return M  # (D, N)

    return dtype_in, ct, u, delta, A, expand(B), expand(C)


def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False):
    """Reference: the recurrence as a loop over positions (slow; O(L) Python steps)."""
    dtype_in, ct, u, delta, A, B, C = _prepare(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    batch, dim, length = u.shape
    dA = torch.exp(delta[:, :, :, None] * A[None, :, None, :])  # (b, d, l, n)
    if B.dim() == 2:
        dBu = (delta * u)[:, :, :, None] * B[None, :, None, :]
    else:
        dBu = (delta * u)[:, :, :, None] * B.transpose(-1, -2)  # (b, d|1, l, n) -> (b, d, l, n)
    h = u.new_zeros(batch, dim, A.shape[1])
    ys = []
    for i in range(length):
        h = dA[:, :, i] * h + dBu[:, :, i]
        if C.dim() == 2:
            ys.append((h * C[None]).sum(-1))
        else:
            ys.append((h * C[..., i]).sum(-1))
    y = torch.stack(ys, dim=-1)
    out = y if D is None else y + u * D.to(ct)[:, None]
    if z is not None:
        out = out * F.silu(z.to(ct))
    out = out.to(dtype_in)
    return (out, h) if return_last_state else out


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False, impl: ScanImpl = "auto"):
    """Dispatch to an implementation: ``"auto"`` picks the best available for the inputs' device."""
    if impl not in ("auto", "reference"):
        raise ValueError(f"unknown selective scan impl {impl!r} (valid: 'auto', 'reference')")
    return selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
