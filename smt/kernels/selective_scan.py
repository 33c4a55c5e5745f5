"""Selective scan (Mamba's S6 recurrence) with mamba_ssm's semantics, behind one function.

For channel ``d``, state ``n`` and position ``l``::

    dt[d,l] = softplus(delta[d,l] + delta_bias[d])          (softplus only if delta_softplus)
    h[d,n,l] = exp(dt[d,l] * A[d,n]) * h[d,n,l-1] + dt[d,l] * B[n,l] * u[d,l]
    y[d,l] = sum_n C[n,l] * h[d,n,l] + D[d] * u[d,l]        (then * silu(z[d,l]) if z is given)

``B``/``C`` are (D, N) (time-invariant), (batch, N, L), or grouped (batch, G, N, L) with D/G channels per group.
Computation is in float32 (float64 when the inputs are float64); the output has ``u``'s dtype.

Implementations, chosen by :func:`selective_scan` (``impl="auto"``):
- CUDA: mamba_ssm's kernel when its compiled extension (``selective_scan_cuda``) loads; otherwise ours in Triton
  (:mod:`smt.kernels.triton_scan`, forward and backward); the reference only where neither is available. The
  choice is made once per process and said by :func:`cuda_scan_backend` (``python -m smt check`` prints it); a
  backend that fails on its first call is dropped for the next one, with a warning.
- CPU: :func:`selective_scan_cpu`, a C kernel (``csrc/selective_scan.c``; SIMD over channels, threads over
  channel blocks: PyTorch's own OpenMP team where the kernel's OpenMP build can join it, else Python threads)
  with a hand-written backward, built at first use. Why C and not a chunked parallel scan
  in PyTorch: the recurrence is memory-bound, and
  a chunked scan materialises (L x N) or (L x T x N) intermediates per channel several times over, while the
  sequential loop keeps the N-vector state in registers and reads each input once. Measured in
  ``benchmarks/bench_kernels.py``.
- :func:`selective_scan_ref`: a loop over L in PyTorch, kept as the reference for tests.
"""
from __future__ import annotations

import importlib
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Literal

import torch

from smt.kernels.attention import fast_paths_enabled
from smt.kernels.cpu_build import build_error, load_library, openmp_library
from smt.kernels.scan_common import (KernelScan, check_groups, compute_dtype, core_shape, grouped_bc,
                                     scan_epilogue, step_sizes)

__all__ = ["selective_scan", "selective_scan_ref", "selective_scan_cpu", "selective_scan_rows", "scan_reads_rows",
           "ScanImpl", "cuda_scan_backend"]

ScanImpl = Literal["auto", "reference", "cpu", "triton"]


def _prepare(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    """Shared preamble: compute dtype, dt, and B/C expanded to (batch, D, N, L) or kept (D, N)."""
    dtype_in = u.dtype
    ct = compute_dtype(u, delta, A)
    u, A = u.to(ct), A.to(ct)
    delta = step_sizes(delta, delta_bias, delta_softplus, ct)
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
    out = scan_epilogue(torch.stack(ys, dim=-1), u, D, z, ct, dtype_in)
    return (out, h) if return_last_state else out


_POOL: ThreadPoolExecutor | None = None
# float32 scans (the inference forward, training's forward and backward) run their job ranges on PyTorch's
# OpenMP team where the library's OpenMP build loads (smt.kernels.cpu_build.openmp_status says whether and why
# not); False: always on Python threads (tests)
USE_OPENMP = True


def _run_jobs(fn, njobs: int, nthreads: int) -> list:
    """Run ``fn(begin, end)`` over ``[0, njobs)`` split into ``nthreads`` contiguous ranges, in parallel; returns
    the calls' results in range order.

    The C kernel releases the GIL (ctypes), so Python threads run it truly in parallel; the ranges are fixed
    by (njobs, nthreads), which keeps results bit-identical from run to run.
    """
    global _POOL
    bounds = [njobs * i // nthreads for i in range(nthreads + 1)]
    ranges = [(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    if len(ranges) == 1:
        return [fn(*ranges[0])]
    if _POOL is None or _POOL._max_workers < len(ranges):
        _POOL = ThreadPoolExecutor(max_workers=len(ranges), thread_name_prefix="smt-scan")
    return [f.result() for f in [_POOL.submit(fn, a, b) for a, b in ranges]]


def _openmp():
    """The kernel library's OpenMP build where it runs on PyTorch's own libgomp team (and ``USE_OPENMP``):
    the float32 entry points then run the same job ranges as :func:`_run_jobs` on that team, whose workers
    would otherwise spin-wait beside the Python threads for the same cores (see the C source)."""
    return openmp_library() if USE_OPENMP else None


def _cpu_jobs(lib, batch: int, dim: int) -> int:
    """Job count of a C-kernel call: one job per (batch, block of ``scan_block_width()`` channels)."""
    return batch * -(-dim // lib.scan_block_width())


def _cpu_core_fwd(u, dt, A, B, C):
    """The C kernel's forward, the ``core_fwd`` of :class:`~smt.kernels.scan_common.KernelScan`.

    ``u`` and ``dt`` are (b, L, D) with any strides as long as both have the same (a transposed view of a
    (b, D, L) tensor works; channel-last memory gives contiguous SIMD loads); ``y`` is contiguous (b, L, D);
    B and C are contiguous (b, G, L, N). The backward needs no extra tensors.
    """
    lib = load_library()
    fwd = lib.scan_fwd_f64 if u.dtype == torch.float64 else lib.scan_fwd_f32
    batch, length, dim, groups, nstate = core_shape(u, B)
    y = u.new_empty(batch, length, dim)
    last = u.new_empty(batch, dim, nstate)
    args = (u.data_ptr(), dt.data_ptr(), A.data_ptr(), B.data_ptr(), C.data_ptr(), y.data_ptr(),
            last.data_ptr(), batch, dim, nstate, length, groups, *u.stride())
    njobs, nthreads = _cpu_jobs(lib, batch, dim), max(1, torch.get_num_threads())
    omp = _openmp() if u.dtype == torch.float32 else None
    if omp is not None:
        omp.scan_fwd_f32_omp(*args, njobs, min(nthreads, njobs))
    else:
        _run_jobs(lambda a, b: fwd(*args, a, b), njobs, nthreads)
    return y, last, ()


def _cpu_core_bwd(dy, u, dt, A, B, C):
    """The C kernel's hand-written backward, the ``core_bwd`` of :class:`~smt.kernels.scan_common.KernelScan`."""
    lib = load_library()
    bwd = lib.scan_bwd_f64 if u.dtype == torch.float64 else lib.scan_bwd_f32
    batch, length, dim, groups, nstate = core_shape(u, B)
    njobs = _cpu_jobs(lib, batch, dim)
    threads = max(1, min(torch.get_num_threads(), njobs))
    du, ddt = u.new_empty(batch, length, dim), dt.new_empty(batch, length, dim)
    # one accumulation buffer per job range (index = range number): no two threads write one element
    dA = A.new_zeros(threads, dim, nstate)
    dB = B.new_zeros(threads, *B.shape)
    dC = C.new_zeros(threads, *C.shape)
    bounds = [njobs * i // threads for i in range(threads + 1)]
    common = (u.data_ptr(), dt.data_ptr(), A.data_ptr(), B.data_ptr(), C.data_ptr(), dy.data_ptr(), du.data_ptr(),
              ddt.data_ptr())
    shape = (batch, dim, nstate, length, groups, *u.stride())
    omp = _openmp() if u.dtype == torch.float32 else None
    if omp is not None:  # range i accumulates into dA[i], dB[i], dC[i], as below
        omp.scan_bwd_f32_omp(*common, dA.data_ptr(), dB.data_ptr(), dC.data_ptr(), *shape, njobs, threads)
    else:
        def run(a: int, b: int) -> None:
            i = bounds.index(a)
            bwd(*common, dA[i].data_ptr(), dB[i].data_ptr(), dC[i].data_ptr(), *shape, a, b)

        _run_jobs(run, njobs, threads)
    return du, ddt, dA.sum(0), dB.sum(0), dC.sum(0)


def _bc_view(M: torch.Tensor, batch: int, dim: int, length: int) -> torch.Tensor:
    """B or C as a float32 (batch, G, N, L) *view* (no copy for float32 inputs): (D, N) becomes G = D with
    zero batch and length strides, (batch, N, L) becomes G = 1."""
    M = M.float()
    if M.dim() == 2:
        return M[None, :, :, None].expand(batch, dim, M.shape[1], length)
    return M[:, None] if M.dim() == 3 else M


def _common_layout(*ts: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """(b, D, L) tensors copied to one dense layout: channel-last (b, L, D) memory if the first one's channels
    are its inner dimension (MambaIRv2's tokens: the kernel reads a block's channels with one vector load), else
    contiguous (b, D, L). Under bf16 autocast MambaIRv2's delta is a slice of a padded GEMM output while u is
    dense: a contiguous copy of both would turn them channel-first, read lane by lane (measured: MambaIRv2-L's
    bf16 autocast forward at 128 px 12% slower than with channel-last copies)."""
    channel_last = ts[0].stride(1) < ts[0].stride(2)
    return tuple(None if t is None else t.transpose(1, 2).contiguous().transpose(1, 2) if channel_last
                 else t.contiguous() for t in ts)


def _fused_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, rows=None):
    """Inference: one C pass does bias + softplus, the scan, the D skip and the z gate. Inputs in any (b, D, L)
    strides; ``y`` is returned as a (b, D, L) *view* of channel-last (b, L, D) memory: the kernel stores each
    SIMD block of channels contiguously, and a channel-last consumer (MambaIRv2's ``out_norm``) reads it
    without a copy (inside :func:`smt.kernels.attention.reference_paths`: contiguous (b, D, L), the same
    values). ``rows``: see :func:`selective_scan_rows`. bfloat16 ``u``, ``delta`` and ``z`` (all three, e.g.
    a bf16-weights model's tokens) are read as they are, widened in the kernel: the same values as
    ``.float()`` copies (widening is exact), without the copies."""
    lib = load_library()
    batch, dim, length = u.shape
    in_bf16 = all(t is None or t.dtype == torch.bfloat16 for t in (u, delta, z))
    if not in_bf16:
        u, delta, z = u.float(), delta.float(), (z.float() if z is not None else None)
    if delta.stride() != u.stride() or (z is not None and z.stride() != u.stride()):  # one set of strides
        u, delta, z = _common_layout(u, delta, z)
    A = A.float().contiguous()
    Bg, Cg = _bc_view(B, batch, dim, length), _bc_view(C, batch, dim, length)
    check_groups(dim, Bg, Cg)
    bias = delta_bias.float().contiguous() if delta_bias is not None else None
    Dv = D.float().contiguous() if D is not None else None
    # the channel-last layout is an inference fast path: reference_paths() keeps the (b, D, L) one
    y = torch.empty(batch, length, dim).transpose(1, 2) if fast_paths_enabled() else torch.empty(batch, dim, length)
    last = torch.empty(batch, dim, A.shape[1])
    ptr = lambda t: t.data_ptr() if t is not None else None  # noqa: E731
    args = (u.data_ptr(), delta.data_ptr(), ptr(bias), int(bool(delta_softplus)), int(in_bf16), A.data_ptr(),
            Bg.data_ptr(), Cg.data_ptr(), ptr(Dv), ptr(z), y.data_ptr(), last.data_ptr(), ptr(rows), batch, dim,
            A.shape[1], length, Bg.shape[1], u.stride(0), u.stride(2), u.stride(1), y.stride(0), y.stride(2),
            y.stride(1), *Bg.stride(), *Cg.stride())
    njobs, nthreads = _cpu_jobs(lib, batch, dim), max(1, torch.get_num_threads())
    omp = _openmp()
    if omp is not None:
        codes = [omp.scan_fwd_fused_f32_omp(*args, njobs, min(nthreads, njobs))]
    else:
        codes = _run_jobs(lambda a, b: lib.scan_fwd_fused_f32(*args, a, b), njobs, nthreads)
    if any(codes):
        raise MemoryError(f"selective scan: the C kernel could not allocate its per-block state "
                          f"(batch {batch}, {dim} channels, state size {A.shape[1]})")
    return y, last


def scan_reads_rows(u: torch.Tensor, impl: ScanImpl) -> bool:
    """Whether :func:`selective_scan_rows` serves a scan of ``u`` under ``impl`` here: CPU inference (no
    autograd, fast paths on; the scan runs in float32) with the C kernel chosen (``"auto"`` or ``"cpu"``) and
    available."""
    return (impl in ("auto", "cpu") and u.device.type == "cpu" and u.is_floating_point()
            and not torch.is_grad_enabled() and fast_paths_enabled() and load_library() is not None)


def _is_permutation(rows: torch.Tensor) -> bool:
    """Whether each row of the (batch, L) int64 ``rows`` holds every index of ``range(L)`` once: L values in
    range that hit all L positions (a scatter, not a sort: 0.03 vs 0.06 ms for MambaIRv2-L's 4096 rows)."""
    length = rows.shape[-1]
    if rows.numel() == 0:
        return True
    lo, hi = torch.aminmax(rows)
    if int(lo) < 0 or int(hi) >= length:
        return False
    return bool(torch.zeros(rows.shape, dtype=torch.bool).scatter_(-1, rows, True).all())


def selective_scan_rows(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=False, *, rows):
    """Inference (no autograd) of the scan over a permutation of the sequence, on the CPU kernel (float32).

    ``rows`` (batch, L) int64, a permutation of ``range(L)`` per batch: step l reads position ``rows[b, l]`` of
    ``u``, ``delta`` and ``B`` and writes its output to position ``rows[b, l]`` of ``y``, while ``C`` is taken
    in step order. Equals gathering ``u``, ``delta``, ``B`` along L by ``rows``, :func:`selective_scan_ref`,
    and scattering ``y`` back, with no permuted copies: MambaIRv2's semantic sort (whose prompt joins C in
    step order). Returns ``y`` (b, D, L), a view of channel-last memory (see :func:`_fused_forward`)."""
    batch, _, length = u.shape
    if not _cpu_kernel_ok(u, A) or torch.is_grad_enabled() and any(
            t.requires_grad for t in (u, delta, A, B, C, D, delta_bias) if t is not None):
        raise ValueError("selective_scan_rows: inference on the CPU kernel only (CPU tensors, no autograd, "
                         f"state size <= {_MAX_STATE}, a C compiler)")
    if B.dim() != 3 or C.dim() != 3:
        raise ValueError(f"selective_scan_rows: B and C must be (batch, N, L), got {tuple(B.shape)} and "
                         f"{tuple(C.shape)}")
    if rows.dtype != torch.int64 or rows.shape != (batch, length) or not _is_permutation(rows):
        raise ValueError(f"selective_scan_rows: rows must be int64 (batch, L) = ({batch}, {length}) holding a "
                         "permutation of range(L) per batch")
    y, _ = _fused_forward(u, delta, A, B, C, D, None, delta_bias, delta_softplus, rows.contiguous())
    return y


def selective_scan_cpu(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False):
    """The compiled CPU kernel (forward and backward); same semantics as :func:`selective_scan_ref`.

    Without autograd (inference) float32 inputs take a fully fused forward; with it, the element-wise parts
    run in PyTorch around the scan so autograd differentiates them."""
    dtype_in = u.dtype
    ct = compute_dtype(u, delta, A)
    tensors = [t for t in (u, delta, A, B, C, D, z, delta_bias) if t is not None]
    if ct == torch.float32 and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)):
        out, last = _fused_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
        out = out.to(dtype_in)
        return (out, last) if return_last_state else out
    u, A = u.to(ct), A.to(ct).contiguous()
    delta = step_sizes(delta, delta_bias, delta_softplus, ct)
    batch, dim, length = u.shape
    Bg, Cg = grouped_bc(B, batch, dim, length, ct), grouped_bc(C, batch, dim, length, ct)
    check_groups(dim, Bg, Cg)
    u_t, dt_t = u.transpose(1, 2), delta.transpose(1, 2)  # (b, L, D) views; no copy
    if u_t.stride() != dt_t.stride():
        u_t, dt_t = u_t.contiguous(), dt_t.contiguous()
    y, last = KernelScan.apply(_cpu_core_fwd, _cpu_core_bwd, u_t, dt_t, A, Bg, Cg)
    out = scan_epilogue(y.transpose(1, 2), u, D, z, ct, dtype_in)
    return (out, last) if return_last_state else out


_MAX_STATE = 64  # MAXN in csrc/selective_scan.c; checked against the library when it loads


def _cpu_kernel_ok(u: torch.Tensor, A: torch.Tensor) -> bool:
    return u.device.type == "cpu" and A.shape[1] <= _MAX_STATE and load_library() is not None


def _triton_fn():
    try:
        from smt.kernels.triton_scan import selective_scan_triton
    except Exception:  # Triton not installed (CPU-only PyTorch builds ship without it)
        return None
    return selective_scan_triton


def _mamba_ssm_fn() -> tuple[Callable | None, str]:
    """mamba_ssm's ``selective_scan_fn`` and why, or None and why not. Current mamba_ssm imports without its
    CUDA extension and fails only on the first call, so the extension is imported here on its own."""
    try:
        importlib.import_module("selective_scan_cuda")
    except Exception as exc:  # noqa: BLE001 (an ABI mismatch raises OSError or RuntimeError, not ImportError)
        return None, f"mamba_ssm's CUDA extension selective_scan_cuda does not load ({type(exc).__name__}: {exc})"
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception as exc:  # noqa: BLE001
        return None, f"mamba_ssm does not import ({type(exc).__name__}: {exc})"
    return selective_scan_fn, "mamba_ssm with its CUDA extension selective_scan_cuda"


@dataclass
class _Backend:
    name: Literal["mamba_ssm", "triton", "reference"]
    reason: str
    fn: Callable = field(repr=False)
    proven: bool = False  # has run once; from then on its errors are the caller's, not a reason to switch


_CUDA_BACKENDS: list[_Backend] | None = None  # the usable CUDA backends, preferred first; resolved once


def _resolve_cuda_backends() -> list[_Backend]:
    skipped = []
    backends = []
    mamba, why = _mamba_ssm_fn()
    if mamba is not None:
        backends.append(_Backend("mamba_ssm", why, mamba))
    else:
        skipped.append(why)
    triton_fn = _triton_fn()
    if triton_fn is not None:
        backends.append(_Backend("triton", _because(skipped, "our Triton kernel"), triton_fn))
    else:
        skipped.append("Triton is not installed")
    backends.append(_Backend("reference", _because(skipped, "the PyTorch reference loop (slow)"), selective_scan_ref))
    return backends


def _because(skipped: list[str], choice: str) -> str:
    return f"{'; '.join(skipped)}: using {choice}" if skipped else choice


def _cuda_backends(refresh: bool = False) -> list[_Backend]:
    global _CUDA_BACKENDS
    if _CUDA_BACKENDS is None or refresh:
        _CUDA_BACKENDS = _resolve_cuda_backends()
    return _CUDA_BACKENDS


def cuda_scan_backend(refresh: bool = False) -> tuple[str, str]:
    """(name, reason) of the selective scan that CUDA tensors use in this process: ``mamba_ssm``, ``triton``
    or ``reference``. Resolved at the first call and cached (``refresh`` resolves again)."""
    best = _cuda_backends(refresh)[0]
    return best.name, best.reason


def _scan_cuda(*args):
    """Run the preferred CUDA backend. One that fails before it has ever succeeded, where a later one succeeds,
    is dropped for good (with a warning); an error every backend gives is the input's and is raised as is."""
    backends = _cuda_backends()
    first = backends[0]
    try:
        out = first.fn(*args)
    except torch.OutOfMemoryError:
        raise
    except Exception as exc:
        if first.proven:
            raise
        for i, nxt in enumerate(backends[1:], start=1):
            try:
                out = nxt.fn(*args)
            except Exception:  # noqa: BLE001
                continue
            del backends[:i]
            nxt.proven = True
            nxt.reason = f"{first.name} failed on its first call ({type(exc).__name__}: {exc}): using {nxt.name}"
            warnings.warn(f"selective scan: {first.name} failed ({type(exc).__name__}: {exc}); "
                          f"using {nxt.name} instead", RuntimeWarning, stacklevel=3)
            return out
        raise
    first.proven = True
    return out


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False, impl: ScanImpl = "auto"):
    """Dispatch: ``"auto"`` = on CUDA :func:`cuda_scan_backend`'s choice (mamba_ssm when its CUDA extension
    loads, else our Triton kernel, else the reference); on CPU the C kernel, else the reference. ``"triton"``
    forces the Triton kernel (CPU tensors need ``TRITON_INTERPRET=1``); ``"cpu"`` the C kernel (CPU tensors)."""
    args = (u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    if impl == "reference":
        return selective_scan_ref(*args)
    if impl == "cpu":
        elsewhere = sorted({str(t.device) for t in args[:8] if isinstance(t, torch.Tensor) and t.device.type != "cpu"})
        if elsewhere:
            raise ValueError(f"selective scan impl 'cpu' runs a C kernel on CPU memory, but got tensors on "
                             f"{', '.join(elsewhere)}; use impl='auto' or move the tensors to the CPU")
        if A.shape[1] > _MAX_STATE:
            raise ValueError(f"the CPU selective-scan kernel supports d_state <= {_MAX_STATE}, got {A.shape[1]}")
        if load_library() is None:
            raise RuntimeError(f"the CPU selective-scan kernel is unavailable: {build_error()}")
        return selective_scan_cpu(*args)
    if impl == "triton":
        fn = _triton_fn()
        if fn is None:
            raise RuntimeError("selective scan impl 'triton': Triton is not installed")
        return fn(*args)
    if impl != "auto":
        raise ValueError(f"unknown selective scan impl {impl!r} (valid: 'auto', 'reference', 'cpu', 'triton')")
    if u.is_cuda:
        return _scan_cuda(*args)
    if _cpu_kernel_ok(u, A):
        return selective_scan_cpu(*args)
    return selective_scan_ref(*args)
