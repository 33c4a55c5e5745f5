"""Selective scan on GPUs without mamba_ssm: Triton kernels for the forward and backward recurrence.

One program per (batch, block of ``BLOCK_D`` channels) walks the sequence, holding the state h (BLOCK_D x N) in
registers: ``h = exp(dt*A) * h + dt*u*B_t``, ``y_t = C_t . h``. The forward also stores h at the start of every
``CHUNK`` steps. The backward walks the chunks in reverse: it recomputes the chunk's states from its stored start
(into a per-program scratch buffer), then runs the adjoint recurrence ``g = g*exp(dt*A) + C_t*dy_t`` backwards,
writing du and ddt per step and adding dB, dC (summed over the channels of a group) and dA (summed over the
batch) with atomics. ``delta_bias``/softplus, the ``D`` skip and the ``z`` gate are element-wise and stay in
PyTorch (fused by the GPU's own kernels), so the Triton part is exactly :class:`smt.kernels.selective_scan`'s
core recurrence and is compared with the reference in the tests.

Runs wherever Triton runs: CUDA, or on CPU tensors under ``TRITON_INTERPRET=1`` (how the CPU tests check it).
Triton launches on the *current* CUDA device, so every launch runs under the input's device (:func:`_on_device`):
on rank k of a multi-GPU job the kernel runs on GPU k, where its pointers live.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from smt.kernels.selective_scan import check_groups, grouped_bc

__all__ = ["selective_scan_triton"]

_CHUNK = 64


@triton.jit
def _channel_block(a_ptr, pid_d, D, N, G, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's channels d, states n, their masks, each channel's group and its rows of A."""
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    n = tl.arange(0, BLOCK_N)
    md = d < D
    m2 = md[:, None] & (n < N)[None, :]
    grp = d // (D // G)
    a = tl.load(a_ptr + d[:, None] * N + n[None, :], mask=m2, other=0.0)
    return d, n, md, m2, grp, a


@triton.jit
def _scan_fwd(u_ptr, dt_ptr, a_ptr, b_ptr, c_ptr, y_ptr, last_ptr, hs_ptr,
              L, D, N, G, NCHUNK,
              CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_b = tl.program_id(0)
    pid_d = tl.program_id(1)
    d, n, md, m2, grp, a = _channel_block(a_ptr, pid_d, D, N, G, BLOCK_D, BLOCK_N)
    h = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    for c in range(0, NCHUNK):
        tl.store(hs_ptr + ((pid_b * NCHUNK + c) * D + d[:, None]) * N + n[None, :], h, mask=m2)
        t_end = tl.minimum(c * CHUNK + CHUNK, L)
        for t in range(c * CHUNK, t_end):
            row = (pid_b * L + t) * D + d
            u = tl.load(u_ptr + row, mask=md, other=0.0)
            dt = tl.load(dt_ptr + row, mask=md, other=0.0)
            bc = ((pid_b * G + grp[:, None]) * L + t) * N + n[None, :]
            bt = tl.load(b_ptr + bc, mask=m2, other=0.0)
            ct = tl.load(c_ptr + bc, mask=m2, other=0.0)
            h = tl.exp(dt[:, None] * a) * h + (dt * u)[:, None] * bt
            tl.store(y_ptr + row, tl.sum(ct * h, axis=1), mask=md)
    tl.store(last_ptr + (pid_b * D + d[:, None]) * N + n[None, :], h, mask=m2)


@triton.jit
def _scan_bwd(u_ptr, dt_ptr, a_ptr, b_ptr, c_ptr, dy_ptr, hs_ptr, work_ptr,
              du_ptr, ddt_ptr, da_ptr, db_ptr, dc_ptr,
              L, D, N, G, NCHUNK, NBLOCK_D,
              CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_b = tl.program_id(0)
    pid_d = tl.program_id(1)
    d, n, md, m2, grp, a = _channel_block(a_ptr, pid_d, D, N, G, BLOCK_D, BLOCK_N)
    tile = tl.arange(0, BLOCK_D)[:, None] * BLOCK_N + n[None, :]  # this program's scratch layout
    work = work_ptr + (pid_b * NBLOCK_D + pid_d) * (CHUNK + 1) * BLOCK_D * BLOCK_N
    g = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)  # dLoss/dh_t, carried backwards
    da = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    for ci in range(0, NCHUNK):
        c = NCHUNK - 1 - ci
        t0 = c * CHUNK
        t_end = tl.minimum(t0 + CHUNK, L)
        # slot k of the scratch holds h_{t0 + k - 1}; slot 0 the chunk's starting state
        h = tl.load(hs_ptr + ((pid_b * NCHUNK + c) * D + d[:, None]) * N + n[None, :], mask=m2, other=0.0)
        tl.store(work + tile, h)
        for t in range(t0, t_end):
            row = (pid_b * L + t) * D + d
            u = tl.load(u_ptr + row, mask=md, other=0.0)
            dt = tl.load(dt_ptr + row, mask=md, other=0.0)
            bt = tl.load(b_ptr + ((pid_b * G + grp[:, None]) * L + t) * N + n[None, :], mask=m2, other=0.0)
            h = tl.exp(dt[:, None] * a) * h + (dt * u)[:, None] * bt
            tl.store(work + (t - t0 + 1) * BLOCK_D * BLOCK_N + tile, h)
        for ti in range(0, t_end - t0):
            t = t_end - 1 - ti
            row = (pid_b * L + t) * D + d
            u = tl.load(u_ptr + row, mask=md, other=0.0)
            dt = tl.load(dt_ptr + row, mask=md, other=0.0)
            dy = tl.load(dy_ptr + row, mask=md, other=0.0)
            bc = ((pid_b * G + grp[:, None]) * L + t) * N + n[None, :]
            bt = tl.load(b_ptr + bc, mask=m2, other=0.0)
            ct = tl.load(c_ptr + bc, mask=m2, other=0.0)
            h_t = tl.load(work + (t - t0 + 1) * BLOCK_D * BLOCK_N + tile)
            h_prev = tl.load(work + (t - t0) * BLOCK_D * BLOCK_N + tile)
            tl.atomic_add(dc_ptr + bc, dy[:, None] * h_t, mask=m2)
            g += ct * dy[:, None]
            decay = tl.exp(dt[:, None] * a)
            tl.atomic_add(db_ptr + bc, g * (dt * u)[:, None], mask=m2)
            tl.store(du_ptr + row, tl.sum(g * bt, axis=1) * dt, mask=md)
            tl.store(ddt_ptr + row, tl.sum(g * (a * decay * h_prev + bt * u[:, None]), axis=1), mask=md)
            da += g * dt[:, None] * decay * h_prev
            g = g * decay
    tl.atomic_add(da_ptr + d[:, None] * N + n[None, :], da, mask=m2)


def _on_device(x: torch.Tensor) -> contextlib.AbstractContextManager:
    """Make ``x``'s GPU the current device for a kernel launch (a no-op for CPU tensors)."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def _launch_dims(batch: int, dim: int, nstate: int) -> tuple[int, int, int]:
    block_n = max(triton.next_power_of_2(nstate), 2)
    block_d = max(2, min(32, triton.next_power_of_2(dim), 2048 // block_n))
    return block_d, block_n, triton.cdiv(dim, block_d)


class _TritonScan(torch.autograd.Function):
    """``y, last = scan(u, dt, A, B, C)``; u, dt: (b, L, D) contiguous fp32, B/C: (b, G, L, N) contiguous."""

    @staticmethod
    def forward(ctx, u, dt, A, B, C):
        batch, length, dim = u.shape
        groups, nstate = B.shape[1], B.shape[3]
        block_d, block_n, nblock = _launch_dims(batch, dim, nstate)
        nchunk = triton.cdiv(length, _CHUNK)
        y = torch.empty_like(u)
        last = u.new_empty(batch, dim, nstate)
        hs = u.new_empty(batch, nchunk, dim, nstate)
        with _on_device(u):
            _scan_fwd[(batch, nblock)](u, dt, A, B, C, y, last, hs, length, dim, nstate, groups, nchunk,
                                       CHUNK=_CHUNK, BLOCK_D=block_d, BLOCK_N=block_n)
        ctx.save_for_backward(u, dt, A, B, C, hs)
        ctx.mark_non_differentiable(last)
        return y, last

    @staticmethod
    def backward(ctx, dy, _dlast):
        u, dt, A, B, C, hs = ctx.saved_tensors
        batch, length, dim = u.shape
        groups, nstate = B.shape[1], B.shape[3]
        block_d, block_n, nblock = _launch_dims(batch, dim, nstate)
        nchunk = hs.shape[1]
        dy = dy.contiguous()
        du, ddt = torch.empty_like(u), torch.empty_like(dt)
        dA, dB, dC = torch.zeros_like(A), torch.zeros_like(B), torch.zeros_like(C)
        work = u.new_empty(batch * nblock * (_CHUNK + 1) * block_d * block_n)
        with _on_device(u):
            _scan_bwd[(batch, nblock)](u, dt, A, B, C, dy, hs, work, du, ddt, dA, dB, dC,
                                       length, dim, nstate, groups, nchunk, nblock,
                                       CHUNK=_CHUNK, BLOCK_D=block_d, BLOCK_N=block_n)
        return du, ddt, dA, dB, dC


def selective_scan_triton(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                          return_last_state=False):
    """Same semantics as :func:`smt.kernels.selective_scan.selective_scan_ref`; computes in float32."""
    dtype_in = u.dtype
    u32, delta = u.float(), delta.float()
    if delta_bias is not None:
        delta = delta + delta_bias.float()[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    batch, dim, length = u.shape
    Bg, Cg = grouped_bc(B, batch, dim, length, torch.float32), grouped_bc(C, batch, dim, length, torch.float32)
    check_groups(dim, Bg, Cg)
    y, last = _TritonScan.apply(u32.transpose(1, 2).contiguous(), delta.transpose(1, 2).contiguous(),
                                A.float().contiguous(), Bg, Cg)
    out = y.transpose(1, 2)
    if D is not None:
        out = out + u32 * D.float()[:, None]
    if z is not None:
        out = out * F.silu(z.float())
    out = out.to(dtype_in)
    return (out, last) if return_last_state else out
