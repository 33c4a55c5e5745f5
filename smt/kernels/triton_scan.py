"""Selective scan on GPUs without mamba_ssm: Triton kernels for the forward and backward recurrence.

One program per (batch, block of ``BLOCK_D`` channels) walks the sequence, holding the state h (BLOCK_D x N) in
registers: ``h = exp(dt*A) * h + dt*u*B_t``, ``y_t = C_t . h``. When a gradient is needed the forward also
stores h at the start of every ``CHUNK`` steps (inference skips those stores). The backward walks the chunks in
reverse: it recomputes the chunk's states from its stored start (into a per-program scratch buffer), then runs
the adjoint recurrence ``g = g*exp(dt*A) + C_t*dy_t`` backwards, writing du and ddt per step and adding dB, dC
(summed over the channels of a group) and dA (summed over the batch) with relaxed atomics. Where a program's
channels all lie in one group (always for MambaIRv2's single group) dB and dC are summed over the program's
channels first: one atomic per state instead of one per (channel, state).

Three GPU facts the code relies on, none of which the interpreter can show:
- the scratch buffer is written and read back by *different* threads (a tile smaller than the block's thread
  count is replicated across threads, and the compiler may lay out a load differently from the store), so a
  barrier separates the writes from the reads, and the reads from the next chunk's writes;
- offsets are int64 (:func:`_seq_offset` and friends): B*L*D reaches 2**31 for one large untiled image, where
  int32 offsets wrap silently;
- Triton launches on the *current* CUDA device, so every launch runs under the input's device
  (:func:`_on_device`): on rank k of a multi-GPU job the kernel runs on GPU k, where its pointers live.

``delta_bias``/softplus, the ``D`` skip and the ``z`` gate are element-wise and stay in PyTorch
(:func:`smt.kernels.scan_common.step_sizes`, :func:`smt.kernels.scan_common.scan_epilogue`), so the Triton part
is exactly the reference's core recurrence and is compared with the reference in the tests. Runs wherever
Triton runs: CUDA, or on CPU tensors under ``TRITON_INTERPRET=1`` (how the CPU tests check it).
"""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from smt.kernels.scan_common import KernelScan, check_groups, core_shape, grouped_bc, scan_epilogue, step_sizes

__all__ = ["selective_scan_triton"]

_CHUNK = 64


@triton.jit
def _seq_offset(b, t, L, D):
    """int64 offset of element (b, t, 0) of a (batch, L, D) tensor."""
    return (b.to(tl.int64) * L + t) * D


@triton.jit
def _bc_offset(b, grp, t, G, L, N):
    """int64 offset of element (b, grp, t, 0) of a (batch, G, L, N) tensor."""
    return ((b.to(tl.int64) * G + grp) * L + t) * N


@triton.jit
def _state_offset(b, c, NCHUNK, D, N):
    """int64 offset of element (b, c, 0, 0) of the (batch, NCHUNK, D, N) chunk-start states."""
    return (b.to(tl.int64) * NCHUNK + c) * D * N


@triton.jit
def _program_block(a_ptr, D, N, G, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's batch index ``pid_b`` (int64, so every offset built from it is int64), its channel-block
    index ``pid_d``, its channels d, states n, their masks, each channel's group and its rows of A."""
    pid_b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    n = tl.arange(0, BLOCK_N)
    md = d < D
    m2 = md[:, None] & (n < N)[None, :]
    grp = d // (D // G)
    a = tl.load(a_ptr + d[:, None] * N + n[None, :], mask=m2, other=0.0)
    return pid_b, pid_d, d, n, md, m2, grp, a


@triton.jit
def _step_inputs(u_ptr, dt_ptr, b_ptr, pid_b, t, d, n, md, m2, grp, L, D, N, G):
    """Step ``t``'s inputs to this program's channels: the offsets ``row`` of (b, t, d), ``u`` and ``dt`` there,
    the offsets ``bc`` of each channel's group's B_t/C_t row (BLOCK_D x BLOCK_N), and B_t itself."""
    row = _seq_offset(pid_b, t, L, D) + d
    u = tl.load(u_ptr + row, mask=md, other=0.0)
    dt = tl.load(dt_ptr + row, mask=md, other=0.0)
    bc = _bc_offset(pid_b, grp[:, None], t, G, L, N) + n[None, :]
    bt = tl.load(b_ptr + bc, mask=m2, other=0.0)
    return row, u, dt, bc, bt


@triton.jit
def _scan_fwd(u_ptr, dt_ptr, a_ptr, b_ptr, c_ptr, y_ptr, last_ptr, hs_ptr,
              L, D, N, G, NCHUNK,
              CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, STORE_STATES: tl.constexpr):
    pid_b, pid_d, d, n, md, m2, grp, a = _program_block(a_ptr, D, N, G, BLOCK_D, BLOCK_N)
    dn = d[:, None] * N + n[None, :]
    h = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    for c in range(0, NCHUNK):
        if STORE_STATES:
            tl.store(hs_ptr + _state_offset(pid_b, c, NCHUNK, D, N) + dn, h, mask=m2)
        t_end = tl.minimum(c * CHUNK + CHUNK, L)
        for t in range(c * CHUNK, t_end):
            row, u, dt, bc, bt = _step_inputs(u_ptr, dt_ptr, b_ptr, pid_b, t, d, n, md, m2, grp, L, D, N, G)
            ct = tl.load(c_ptr + bc, mask=m2, other=0.0)
            h = tl.exp(dt[:, None] * a) * h + (dt * u)[:, None] * bt
            tl.store(y_ptr + row, tl.sum(ct * h, axis=1), mask=md)
    tl.store(last_ptr + pid_b * D * N + dn, h, mask=m2)


@triton.jit
def _scan_bwd(u_ptr, dt_ptr, a_ptr, b_ptr, c_ptr, dy_ptr, hs_ptr, work_ptr,
              du_ptr, ddt_ptr, da_ptr, db_ptr, dc_ptr,
              L, D, N, G, NCHUNK, NBLOCK_D,
              CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, ONE_GROUP: tl.constexpr):
    pid_b, pid_d, d, n, md, m2, grp, a = _program_block(a_ptr, D, N, G, BLOCK_D, BLOCK_N)
    mn = n < N
    grp0 = (pid_d * BLOCK_D) // (D // G)  # the group of every channel here when ONE_GROUP
    tile = tl.arange(0, BLOCK_D)[:, None] * BLOCK_N + n[None, :]  # this program's scratch layout
    slot = BLOCK_D * BLOCK_N
    work = work_ptr + (pid_b * NBLOCK_D + pid_d) * (CHUNK + 1) * slot
    g = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)  # dLoss/dh_t, carried backwards
    da = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    for ci in range(0, NCHUNK):
        c = NCHUNK - 1 - ci
        t0 = c * CHUNK
        t_end = tl.minimum(t0 + CHUNK, L)
        # slot k of the scratch holds h_{t0 + k - 1}; slot 0 the chunk's starting state
        h = tl.load(hs_ptr + _state_offset(pid_b, c, NCHUNK, D, N) + d[:, None] * N + n[None, :], mask=m2,
                    other=0.0)
        tl.store(work + tile, h)
        for t in range(t0, t_end):
            row, u, dt, bc, bt = _step_inputs(u_ptr, dt_ptr, b_ptr, pid_b, t, d, n, md, m2, grp, L, D, N, G)
            h = tl.exp(dt[:, None] * a) * h + (dt * u)[:, None] * bt
            tl.store(work + (t - t0 + 1) * slot + tile, h)
        tl.debug_barrier()  # the chunk's states are written before any thread reads them back
        for ti in range(0, t_end - t0):
            t = t_end - 1 - ti
            row, u, dt, bc, bt = _step_inputs(u_ptr, dt_ptr, b_ptr, pid_b, t, d, n, md, m2, grp, L, D, N, G)
            dy = tl.load(dy_ptr + row, mask=md, other=0.0)
            ct = tl.load(c_ptr + bc, mask=m2, other=0.0)
            h_t = tl.load(work + (t - t0 + 1) * slot + tile)
            h_prev = tl.load(work + (t - t0) * slot + tile)
            g += ct * dy[:, None]
            decay = tl.exp(dt[:, None] * a)
            # masked channels hold u = dt = dy = 0 (so g = 0 there): they add nothing to the sums
            if ONE_GROUP:
                bc0 = _bc_offset(pid_b, grp0, t, G, L, N) + n
                tl.atomic_add(dc_ptr + bc0, tl.sum(dy[:, None] * h_t, axis=0), mask=mn, sem="relaxed")
                tl.atomic_add(db_ptr + bc0, tl.sum(g * (dt * u)[:, None], axis=0), mask=mn, sem="relaxed")
            else:
                tl.atomic_add(dc_ptr + bc, dy[:, None] * h_t, mask=m2, sem="relaxed")
                tl.atomic_add(db_ptr + bc, g * (dt * u)[:, None], mask=m2, sem="relaxed")
            tl.store(du_ptr + row, tl.sum(g * bt, axis=1) * dt, mask=md)
            tl.store(ddt_ptr + row, tl.sum(g * (a * decay * h_prev + bt * u[:, None]), axis=1), mask=md)
            da += g * dt[:, None] * decay * h_prev
            g = g * decay
        tl.debug_barrier()  # every read of this chunk's states is done before the next chunk overwrites them
    tl.atomic_add(da_ptr + d[:, None] * N + n[None, :], da, mask=m2, sem="relaxed")


def _on_device(x: torch.Tensor) -> contextlib.AbstractContextManager:
    """Make ``x``'s GPU the current device for a kernel launch (a no-op for CPU tensors)."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def _launch_dims(batch: int, dim: int, nstate: int) -> tuple[int, int, int]:
    block_n = max(triton.next_power_of_2(nstate), 2)
    block_d = max(2, min(32, triton.next_power_of_2(dim), 2048 // block_n))
    return block_d, block_n, triton.cdiv(dim, block_d)


def _one_group_per_program(dim: int, groups: int, block_d: int) -> bool:
    """Whether every program's channel block lies inside one group of B/C (then dB/dC are reduced over the
    block before the atomic add)."""
    return groups == 1 or (dim // groups) % block_d == 0


def _forward(u, dt, A, B, C, store_states: bool = True):
    """``y, last, extra``: the scan's output and final state, and (with ``store_states``, the ``core_fwd`` of
    :class:`~smt.kernels.scan_common.KernelScan`) the chunk-start states the backward recomputes from."""
    batch, length, dim, groups, nstate = core_shape(u, B)
    block_d, block_n, nblock = _launch_dims(batch, dim, nstate)
    nchunk = triton.cdiv(length, _CHUNK)
    y = torch.empty_like(u)
    last = u.new_empty(batch, dim, nstate)
    hs = u.new_empty(batch, nchunk, dim, nstate) if store_states else last  # `last`: a pointer never written
    with _on_device(u):
        _scan_fwd[(batch, nblock)](u, dt, A, B, C, y, last, hs, length, dim, nstate, groups, nchunk,
                                   CHUNK=_CHUNK, BLOCK_D=block_d, BLOCK_N=block_n, STORE_STATES=store_states)
    return y, last, ((hs,) if store_states else ())


def _backward(dy, u, dt, A, B, C, hs):
    """``du, ddt, dA, dB, dC`` from the stored chunk-start states ``hs``: the ``core_bwd`` of
    :class:`~smt.kernels.scan_common.KernelScan` (u, dt, dy: (b, L, D) contiguous fp32, B/C: (b, G, L, N))."""
    batch, length, dim, groups, nstate = core_shape(u, B)
    block_d, block_n, nblock = _launch_dims(batch, dim, nstate)
    nchunk = hs.shape[1]
    du, ddt = torch.empty_like(u), torch.empty_like(dt)
    dA, dB, dC = torch.zeros_like(A), torch.zeros_like(B), torch.zeros_like(C)
    work = u.new_empty(batch * nblock * (_CHUNK + 1) * block_d * block_n)
    with _on_device(u):
        _scan_bwd[(batch, nblock)](u, dt, A, B, C, dy, hs, work, du, ddt, dA, dB, dC,
                                   length, dim, nstate, groups, nchunk, nblock,
                                   CHUNK=_CHUNK, BLOCK_D=block_d, BLOCK_N=block_n,
                                   ONE_GROUP=_one_group_per_program(dim, groups, block_d))
    return du, ddt, dA, dB, dC


def selective_scan_triton(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                          return_last_state=False):
    """Same semantics as :func:`smt.kernels.selective_scan.selective_scan_ref`; computes in float32."""
    dtype_in = u.dtype
    u32, delta = u.float(), step_sizes(delta, delta_bias, delta_softplus, torch.float32)
    batch, dim, length = u.shape
    Bg, Cg = grouped_bc(B, batch, dim, length, torch.float32), grouped_bc(C, batch, dim, length, torch.float32)
    check_groups(dim, Bg, Cg)
    args = (u32.transpose(1, 2).contiguous(), delta.transpose(1, 2).contiguous(), A.float().contiguous(), Bg, Cg)
    if torch.is_grad_enabled() and any(t.requires_grad for t in args):
        y, last = KernelScan.apply(_forward, _backward, *args)
    else:  # inference: no chunk states to keep
        y, last, _ = _forward(*args, store_states=False)
    out = scan_epilogue(y.transpose(1, 2), u32, D, z, torch.float32, dtype_in)
    return (out, last) if return_last_state else out
