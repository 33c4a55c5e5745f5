"""Selective scan on GPUs without mamba_ssm: Triton kernels for the forward and backward recurrence.

Two implementations (``selective_scan_triton(..., kernel=...)``). ``"chunked"``, the default, is parallel over the
sequence: chunk sums, a scan over the chunks, and a per-chunk ``tl.associative_scan`` (the comment above
:func:`_affine`, and docs/gpu_scan.md for the derivation, the tile choice and the work model); its backward is
deterministic. ``"serial"``, the first version, is kept beside it and compared with it in the tests:

One program per (batch, block of ``BLOCK_D`` channels) walks the sequence, holding the state h (BLOCK_D x N) in
registers: ``h = exp(dt*A) * h + dt*u*B_t``, ``y_t = C_t . h``. When a gradient is needed the forward also
stores h at the start of every ``CHUNK`` steps (inference skips those stores). The backward walks the chunks in
reverse: it recomputes the chunk's states from its stored start (into a per-program scratch buffer), then runs
the adjoint recurrence ``g = g*exp(dt*A) + C_t*dy_t`` backwards, writing du and ddt per step and adding dB, dC
(summed over the channels of a group) and dA (summed over the batch) with relaxed atomics. Where a program's
channels all lie in one group (always for MambaIRv2's single group) dB and dC are summed over the program's
channels first: one atomic per state instead of one per (channel, state).

Three GPU facts the serial code relies on, none of which the interpreter can show (the second and third hold
for the chunked kernels too; they need no barrier: nothing is written and read back within a program):
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

__all__ = ["selective_scan_triton", "chunked_grids"]

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


# ---------------------------------------------------------------------------------------------------------------
# The chunked scan (the default): parallel over the sequence. See docs/gpu_scan.md for the derivation and the work
# model. Per state n of channel d the recurrence h_t = a_t h_{t-1} + x_t (a_t = exp(dt_t A_dn), x_t = dt_t u_t
# B_tn) is an affine map per step; affine maps compose associatively, so the sequence is cut into chunks of
# CHUNK steps and
#   1. _chunk_sums: per chunk, the chunk's map as one pair (P, S): P = prod a_t = exp(A sum dt), S = the state
#      the chunk leaves from h = 0 (a plain weighted sum, no scan: S = sum_t exp(A * sum of the later dt) x_t);
#   2. _chunk_pass: a scan over the chunks' pairs gives the state entering every chunk (a few programs' work);
#   3. _chunk_scan_fwd: per chunk, a parallel scan (tl.associative_scan over the chunk's steps) from the entering
#      state gives every h_t and y_t = C_t . h_t.
# The backward runs the same three passes on the adjoint g_t = C_t dy_t + a_{t+1} g_{t+1} (a reverse scan), and
# its last pass recomputes the chunk's states and reverse-scans the adjoint in registers: nothing per step is
# stored. dA, dB, dC are written as per-program partial sums and reduced by PyTorch in a fixed order, so the
# backward is deterministic (no atomics).


@triton.jit
def _affine(a1, x1, a2, x2):
    """Compose two steps of ``h -> a*h + x``: (a1, x1) first, then (a2, x2)."""
    return a1 * a2, a2 * x1 + x2


@triton.jit
def _chunk_tile(c, L, D, N, G, T: tl.constexpr, BD: tl.constexpr):
    """This program's chunk c of T steps and block of BD channels (program axes: batch, channel block): the
    batch index (int64), the steps t, the channels d and their mask, the (T, BD) mask and offsets into a
    (batch, L, D) tensor, and the offsets of each channel's group's B/C row at each step (add n)."""
    pid_b = tl.program_id(0).to(tl.int64)
    t = c * T + tl.arange(0, T)
    d = tl.program_id(1) * BD + tl.arange(0, BD)
    md = d < D
    m = (t < L)[:, None] & md[None, :]
    off = _seq_offset(pid_b, t, L, D)[:, None] + d[None, :]
    bc = _bc_offset(pid_b, (d // (D // G))[None, :], t[:, None], G, L, N)
    return pid_b, t, d, md, m, off, bc


@triton.jit
def _chunk_sums(dt_ptr, v_ptr, a_ptr, m_ptr, p_ptr, s_ptr, L, D, N, G, NCHUNK,
                T: tl.constexpr, BD: tl.constexpr, REVERSE: tl.constexpr):
    """Each chunk's map as one pair per (channel, state): ``P = exp(A sum dt)`` and ``S``. Forward (``v`` = u,
    ``m`` = B): ``S = sum_t exp(A * sum_{s>t} dt_s) dt_t u_t B_t``, the state the chunk leaves from zero.
    Reverse (``v`` = dy, ``m`` = C): ``S = sum_t exp(A * sum_{s<=t} dt_s) C_t dy_t``, the adjoint the chunk
    sends into the previous chunk's last state from a zero adjoint after it. Grid (batch, channel blocks,
    chunks); rows past L hold dt = 0 and v = 0."""
    c = tl.program_id(2)
    pid_b, t, d, md, m, off, bc = _chunk_tile(c, L, D, N, G, T, BD)
    dt = tl.load(dt_ptr + off, mask=m, other=0.0)
    v = tl.load(v_ptr + off, mask=m, other=0.0)
    total = tl.sum(dt, axis=0)
    if REVERSE:
        expo = tl.cumsum(dt, axis=0)
    else:
        v = v * dt
        expo = total[None, :] - tl.cumsum(dt, axis=0)
    so = _state_offset(pid_b, c, NCHUNK, D, N) + d * N
    for n in range(0, N):
        an = tl.load(a_ptr + d * N + n, mask=md, other=0.0)
        mn = tl.load(m_ptr + bc + n, mask=m, other=0.0)
        tl.store(s_ptr + so + n, tl.sum(tl.exp(expo * an[None, :]) * v * mn, axis=0), mask=md)
        tl.store(p_ptr + so + n, tl.exp(total * an), mask=md)


@triton.jit
def _chunk_pass(p_ptr, s_ptr, out_ptr, NCHUNK, E, REVERSE: tl.constexpr, CB: tl.constexpr, BE: tl.constexpr):
    """The scan over chunks of the pairs (P_c, S_c) of :func:`_chunk_sums` ((batch, NCHUNK, E) each, E = D*N).
    Forward: ``H_{c+1} = P_c H_c + S_c`` from H_0 = 0, stored at ``out[:, c+1]`` (``out[:, 0]`` is the caller's
    zero; ``out[:, NCHUNK]`` the final state). Reverse: ``K_{c-1} = P_c K_c + S_c`` from K_{NCHUNK-1} = 0,
    stored at ``out[:, c]`` (``out[:, NCHUNK]`` the caller's zero), so chunk c reads its carry at ``out[:, c+1]``.
    Grid (batch, cdiv(E, BE)); blocks of CB chunks in order, the carry between them in registers."""
    pid_b = tl.program_id(0).to(tl.int64)
    e = tl.program_id(1) * BE + tl.arange(0, BE)
    me = e < E
    rows = tl.arange(0, CB)
    nblk = tl.cdiv(NCHUNK, CB)
    carry = tl.zeros((BE,), dtype=tl.float32)
    for k in range(0, nblk):
        if REVERSE:
            c = (nblk - 1 - k) * CB + rows
            enter = CB - 1  # the row the carry enters at, in scan order first
            leave = 0
            shift = 0
        else:
            c = k * CB + rows
            enter = 0
            leave = CB - 1
            shift = 1
        m2 = (c < NCHUNK)[:, None] & me[None, :]
        off = (pid_b * NCHUNK + c[:, None]) * E + e[None, :]
        p = tl.load(p_ptr + off, mask=m2, other=1.0)  # rows past NCHUNK: the identity map
        s = tl.load(s_ptr + off, mask=m2, other=0.0)
        s = tl.where(rows[:, None] == enter, s + p * carry[None, :], s)
        _, s = tl.associative_scan((p, s), 0, _affine, reverse=REVERSE)
        tl.store(out_ptr + (pid_b * (NCHUNK + 1) + c[:, None] + shift) * E + e[None, :], s, mask=m2)
        carry = tl.sum(tl.where(rows[:, None] == leave, s, 0.0), axis=0)


@triton.jit
def _chunk_scan_fwd(u_ptr, dt_ptr, a_ptr, b_ptr, c_ptr, h_ptr, y_ptr, L, D, N, G, NCHUNK,
                    T: tl.constexpr, BD: tl.constexpr):
    """``y`` of one chunk: per state, the chunk's states by a parallel scan from its entering state
    ``h[:, c]`` ((batch, NCHUNK+1, D, N), from :func:`_chunk_pass`), folded into the first step."""
    c = tl.program_id(2)
    pid_b, t, d, md, m, off, bc = _chunk_tile(c, L, D, N, G, T, BD)
    dt = tl.load(dt_ptr + off, mask=m, other=0.0)
    dtu = dt * tl.load(u_ptr + off, mask=m, other=0.0)
    first = (tl.arange(0, T) == 0)[:, None]
    ho = _state_offset(pid_b, c, NCHUNK + 1, D, N) + d * N
    y = tl.zeros((T, BD), dtype=tl.float32)
    for n in range(0, N):
        an = tl.load(a_ptr + d * N + n, mask=md, other=0.0)
        a = tl.exp(dt * an[None, :])
        x = dtu * tl.load(b_ptr + bc + n, mask=m, other=0.0)
        h0 = tl.load(h_ptr + ho + n, mask=md, other=0.0)
        _, h = tl.associative_scan((a, tl.where(first, x + a * h0[None, :], x)), 0, _affine)
        y += h * tl.load(c_ptr + bc + n, mask=m, other=0.0)
    tl.store(y_ptr + off, y, mask=m)


@triton.jit
def _chunk_scan_bwd(u_ptr, dt_ptr, a_ptr, b_ptr, c_ptr, dy_ptr, h_ptr, k_ptr, du_ptr, ddt_ptr,
                    da_ptr, db_ptr, dc_ptr, L, D, N, G, NCHUNK, NBLOCK_D,
                    T: tl.constexpr, BD: tl.constexpr, ONE_GROUP: tl.constexpr):
    """Gradients of one chunk. Per state: the chunk's states h_t by a forward scan from ``h[:, c]``, the
    adjoint ``g_t = C_t dy_t + a_{t+1} g_{t+1}`` by a reverse scan from the carry ``k[:, c+1]`` (the adjoint
    the later chunks send into this chunk's last state, from the reverse :func:`_chunk_pass`). ``a_t h_{t-1}``
    is ``h_t - x_t`` (no shifted tile needed); ``a_{t+1}`` comes from dt read one row down. du, ddt are
    complete per program; dA is written per (batch, chunk) and dB, dC per (batch, channel block) when the
    block lies in one group (ONE_GROUP), else per channel: the caller sums them."""
    c = tl.program_id(2)
    pid_d = tl.program_id(1)
    pid_b, t, d, md, m, off, bc = _chunk_tile(c, L, D, N, G, T, BD)
    dt = tl.load(dt_ptr + off, mask=m, other=0.0)
    u = tl.load(u_ptr + off, mask=m, other=0.0)
    dy = tl.load(dy_ptr + off, mask=m, other=0.0)
    dt_next = tl.load(dt_ptr + off + D, mask=m & (t + 1 < L)[:, None], other=0.0)
    dtu = dt * u
    rows = tl.arange(0, T)
    first, last = (rows == 0)[:, None], (rows == T - 1)[:, None]
    so = _state_offset(pid_b, c, NCHUNK + 1, D, N) + d * N
    ko = so + D * N  # k[:, c+1]
    dao = _state_offset(pid_b, c, NCHUNK, D, N) + d * N
    mt = t < L
    if ONE_GROUP:
        part = ((pid_b * NBLOCK_D + pid_d) * L + t) * N  # (batch, NBLOCK_D, L, N) partial sums
    else:
        part = ((pid_b * D + d[None, :]) * L + t[:, None]) * N  # (batch, D, L, N): per channel
    gb_sum = tl.zeros((T, BD), dtype=tl.float32)
    ddt = tl.zeros((T, BD), dtype=tl.float32)
    for n in range(0, N):
        an = tl.load(a_ptr + d * N + n, mask=md, other=0.0)
        bn = tl.load(b_ptr + bc + n, mask=m, other=0.0)
        cn = tl.load(c_ptr + bc + n, mask=m, other=0.0)
        a = tl.exp(dt * an[None, :])
        x = dtu * bn
        h0 = tl.load(h_ptr + so + n, mask=md, other=0.0)
        _, h = tl.associative_scan((a, tl.where(first, x + a * h0[None, :], x)), 0, _affine)
        w = cn * dy
        k = tl.load(k_ptr + ko + n, mask=md, other=0.0)
        _, g = tl.associative_scan((tl.exp(dt_next * an[None, :]), tl.where(last, w + k[None, :], w)), 0,
                                   _affine, reverse=True)
        ah = h - x  # a_t h_{t-1}
        gb = g * bn
        gb_sum += gb
        ddt += gb * u + g * ah * an[None, :]
        tl.store(da_ptr + dao + n, tl.sum(g * ah * dt, axis=0), mask=md)
        if ONE_GROUP:
            tl.store(db_ptr + part + n, tl.sum(g * dtu, axis=1), mask=mt)
            tl.store(dc_ptr + part + n, tl.sum(dy * h, axis=1), mask=mt)
        else:
            tl.store(db_ptr + part + n, g * dtu, mask=m)
            tl.store(dc_ptr + part + n, dy * h, mask=m)
    tl.store(du_ptr + off, gb_sum * dt, mask=m)
    tl.store(ddt_ptr + off, ddt, mask=m)


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


# The per-chunk kernels' shape, chosen from their sm_90 machine code (ptxas and nvdisasm, no GPU needed; the
# figures are in docs/gpu_scan.md): one warp per (16 steps x 32 channels) tile keeps both scans inside the warp
# (no shared-memory rounds between warps, no barriers), 120 instructions per state update over the four kernels
# against 237 for (64 x 32) tiles on 8 warps, with no register spills (the backward uses 255 registers).
_SCAN_CHUNK = 16  # steps per chunk of the chunked scan (a power of two)
_SCAN_BLOCK_D = 32  # channels per chunked-scan program: rows of 128 bytes of the channel-last u, dt, dy
_SCAN_WARPS = 1
_PASS_CB, _PASS_BE = 64, 32  # chunk-pass tile: chunks x (channel, state) elements


def chunked_grids(batch: int, length: int, dim: int, nstate: int, chunk: int | None = None) -> dict[str, tuple]:
    """The launch grid of each chunked-scan kernel for a scan of this shape (what the profile's grid test and
    docs/gpu_scan.md count); ``chunk``: steps per chunk, ``_SCAN_CHUNK`` by default."""
    chunk = chunk or _SCAN_CHUNK
    block_d = max(2, min(_SCAN_BLOCK_D, triton.next_power_of_2(dim)))
    nchunk = triton.cdiv(length, chunk)
    per_chunk = (batch, triton.cdiv(dim, block_d), nchunk)
    return {"chunk_sums": per_chunk, "chunk_pass": (batch, triton.cdiv(dim * nstate, _PASS_BE)),
            "chunk_scan_fwd": per_chunk, "chunk_scan_bwd": per_chunk}


def _chunked_dims(u, B, chunk):
    batch, length, dim, groups, nstate = core_shape(u, B)
    chunk = chunk or _SCAN_CHUNK
    if chunk < 2 or chunk & (chunk - 1):
        raise ValueError(f"chunked selective scan: chunk must be a power of two >= 2, got {chunk}")
    grids = chunked_grids(batch, length, dim, nstate, chunk)
    block_d = max(2, min(_SCAN_BLOCK_D, triton.next_power_of_2(dim)))
    return batch, length, dim, groups, nstate, grids, block_d, chunk, grids["chunk_sums"][2]


def _carries(p, s, reverse: bool):
    """:func:`_chunk_pass` over the pairs ``p``, ``s`` (batch, nchunk, D, N): the carries (batch, nchunk+1, D, N)."""
    batch, nchunk, dim, nstate = p.shape
    out = p.new_empty(batch, nchunk + 1, dim, nstate)
    out[:, nchunk if reverse else 0].zero_()
    cb = min(_PASS_CB, max(2, triton.next_power_of_2(nchunk)))
    _chunk_pass[(batch, triton.cdiv(dim * nstate, _PASS_BE))](p, s, out, nchunk, dim * nstate, REVERSE=reverse,
                                                                CB=cb, BE=_PASS_BE)
    return out


def _forward_chunked(u, dt, A, B, C, store_states: bool = True, chunk: int | None = None):
    """``y, last, extra`` like :func:`_forward`, by the chunked scan; ``extra``: the states entering each chunk
    (batch, nchunk+1, D, N) when ``store_states``."""
    batch, length, dim, groups, nstate, grids, block_d, chunk, nchunk = _chunked_dims(u, B, chunk)
    grid = grids["chunk_sums"]
    p, s = u.new_empty(batch, nchunk, dim, nstate), u.new_empty(batch, nchunk, dim, nstate)
    y = torch.empty_like(u)
    with _on_device(u):
        _chunk_sums[grid](dt, u, A, B, p, s, length, dim, nstate, groups, nchunk, T=chunk, BD=block_d, REVERSE=False,
                                num_warps=_SCAN_WARPS)
        hs = _carries(p, s, reverse=False)
        _chunk_scan_fwd[grid](u, dt, A, B, C, hs, y, length, dim, nstate, groups, nchunk, T=chunk, BD=block_d,
                                   num_warps=_SCAN_WARPS)
    return y, hs[:, nchunk].clone(), ((hs,) if store_states else ())


def _backward_chunked(dy, u, dt, A, B, C, hs, chunk: int | None = None):
    """``du, ddt, dA, dB, dC`` like :func:`_backward`, by the chunked scan from the entering states ``hs``.
    Deterministic: the partial sums of dA, dB, dC are reduced in a fixed order (``torch.sum``), no atomics."""
    batch, length, dim, groups, nstate, grids, block_d, chunk, nchunk = _chunked_dims(u, B, chunk)
    grid = grids["chunk_scan_bwd"]
    nblock = grid[1]
    one_group = _one_group_per_program(dim, groups, block_d)
    p, q = u.new_empty(batch, nchunk, dim, nstate), u.new_empty(batch, nchunk, dim, nstate)
    du, ddt = torch.empty_like(u), torch.empty_like(dt)
    da = u.new_empty(batch, nchunk, dim, nstate)
    parts = (batch, nblock if one_group else dim, length, nstate)
    db, dc = u.new_empty(parts), u.new_empty(parts)
    with _on_device(u):
        _chunk_sums[grid](dt, dy, A, C, p, q, length, dim, nstate, groups, nchunk, T=chunk, BD=block_d, REVERSE=True,
                                num_warps=_SCAN_WARPS)
        ks = _carries(p, q, reverse=True)
        _chunk_scan_bwd[grid](u, dt, A, B, C, dy, hs, ks, du, ddt, da, db, dc, length, dim, nstate, groups, nchunk,
                              nblock, T=chunk, BD=block_d, ONE_GROUP=one_group, num_warps=_SCAN_WARPS)
    # channel blocks (or channels) in group order, each group's in a row: sum them per group
    db, dc = (x.view(batch, groups, -1, length, nstate).sum(2) for x in (db, dc))
    return du, ddt, da.sum((0, 1)), db, dc


_KERNELS = {"chunked": (_forward_chunked, _backward_chunked), "serial": (_forward, _backward)}


def selective_scan_triton(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                          return_last_state=False, kernel: str = "chunked"):
    """Same semantics as :func:`smt.kernels.selective_scan.selective_scan_ref`; computes in float32. ``kernel``:
    ``"chunked"`` (parallel over the sequence, the default) or ``"serial"`` (one program walks the whole
    sequence per batch x 32 channels: the first version, kept as a second implementation to compare with)."""
    if kernel not in _KERNELS:
        raise ValueError(f"selective_scan_triton: unknown kernel {kernel!r} (valid: {', '.join(_KERNELS)})")
    fwd, bwd = _KERNELS[kernel]
    dtype_in = u.dtype
    u32, delta = u.float(), step_sizes(delta, delta_bias, delta_softplus, torch.float32)
    batch, dim, length = u.shape
    Bg, Cg = grouped_bc(B, batch, dim, length, torch.float32), grouped_bc(C, batch, dim, length, torch.float32)
    check_groups(dim, Bg, Cg)
    args = (u32.transpose(1, 2).contiguous(), delta.transpose(1, 2).contiguous(), A.float().contiguous(), Bg, Cg)
    if torch.is_grad_enabled() and any(t.requires_grad for t in args):
        y, last = KernelScan.apply(fwd, bwd, *args)
    else:  # inference: no chunk states to keep
        y, last, _ = fwd(*args, store_states=False)
    out = scan_epilogue(y.transpose(1, 2), u32, D, z, torch.float32, dtype_in)
    return (out, last) if return_last_state else out
