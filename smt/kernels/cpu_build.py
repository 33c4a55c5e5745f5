"""Build and load the C kernels (``csrc/selective_scan.c``; ``csrc/window_attention.c``: bf16 window attention;
``csrc/mt19937.c``: PyTorch's CPU generator stepped in bulk) at first use, as one library.

The sources are compiled with the system C compiler (``$CC``, default ``cc``) into a shared library
cached under ``$SMT_CACHE_DIR`` (default ``~/.cache/smt``), keyed by the source, the flags and this CPU's
feature flags (``-march=native``, which also sets the kernel's vector width: 16 floats where the compiler
reports AVX-512F, else 8), so a cache shared across different CPUs never runs a foreign binary. A
missing compiler is not an error: :func:`load_library` returns ``None`` and the dispatcher falls back.
Building takes about a second; it is a plain C file with no PyTorch headers, loaded with ``ctypes``.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import threading
import warnings
from pathlib import Path

from smt.files import atomic_path

__all__ = ["load_library", "SOURCES", "HEADERS", "build_error", "openmp_library", "openmp_status"]

SOURCES = tuple(Path(__file__).parent / "csrc" / name
                for name in ("selective_scan.c", "window_attention.c", "mt19937.c"))
HEADERS = tuple(Path(__file__).parent / "csrc" / name for name in ("exp2_taylor.h",))  # included by SOURCES
FLAGS = ["-O3", "-march=native", "-ffp-contract=fast", "-fno-math-errno", "-fPIC", "-shared", "-std=c11"]
# attn_bf16_omp's arguments up to its task count: q, k, v, bias, o; heads, n, m, D; scale; 15 strides
_ATTN_ARGS = [ctypes.c_void_p] * 5 + [ctypes.c_long] * 4 + [ctypes.c_float] + [ctypes.c_long] * 15
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_error: str | None = None
_tried = False
_omp_lib: ctypes.CDLL | None = None
_omp_status = "not tried (the kernel library is not loaded)"


def _cpu_key() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cache_dir() -> Path:
    return Path(os.environ.get("SMT_CACHE_DIR", Path.home() / ".cache" / "smt"))


def _build(target: Path, cc: str, flags: list[str]) -> None:
    with atomic_path(target) as tmp:  # atomic: concurrent builders never load a torn file
        res = subprocess.run([cc, *flags, *map(str, SOURCES), "-o", str(tmp), "-lm"], capture_output=True,
                             text=True)
        if res.returncode != 0:
            raise RuntimeError(f"{cc} failed to build {', '.join(p.name for p in SOURCES)}:\n{res.stderr[-2000:]}")


def load_library() -> ctypes.CDLL | None:
    """The compiled kernel library, building it if needed; ``None`` (with :func:`build_error`) if impossible."""
    global _lib, _error, _tried
    with _lock:
        if _tried:
            return _lib
        _tried = True
        if os.environ.get("SMT_DISABLE_CPU_KERNEL"):
            _error = "disabled by SMT_DISABLE_CPU_KERNEL"
            return None
        cc = os.environ.get("CC", "cc")
        if shutil.which(cc) is None:
            _error = f"no C compiler ({cc!r} not found)"
            return None
        try:
            lib = ctypes.CDLL(str(_built(cc, FLAGS)))
        except (OSError, RuntimeError) as exc:
            _error = str(exc)
            warnings.warn(f"smt: CPU selective-scan kernel unavailable, using the PyTorch fallback ({exc})")
            return None
        for suffix in ("f32", "f64"):
            getattr(lib, f"scan_fwd_{suffix}").argtypes = [ctypes.c_void_p] * 7 + [ctypes.c_long] * 10
            getattr(lib, f"scan_bwd_{suffix}").argtypes = [ctypes.c_void_p] * 11 + [ctypes.c_long] * 10
        lib.scan_fwd_fused_f32.argtypes = ([ctypes.c_void_p] * 3 + [ctypes.c_int] * 2 + [ctypes.c_void_p] * 8
                                           + [ctypes.c_long] * 21)
        lib.scan_fwd_fused_f32.restype = ctypes.c_int
        lib.scan_max_state.restype = ctypes.c_int
        lib.scan_block_width.restype = ctypes.c_int
        lib.mt_neg_uniform53.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_long, ctypes.c_void_p]
        lib.mt_neg_uniform53.restype = ctypes.c_int
        _lib = lib
        _load_openmp(cc)
        return lib


def _built(cc: str, flags: list[str]) -> Path:
    """The library built from SOURCES (and the HEADERS they include) with ``flags`` for this CPU (cached)."""
    sources = b"".join(p.read_bytes() for p in SOURCES + HEADERS)
    key = hashlib.sha256(sources + " ".join(flags).encode() + _cpu_key().encode()).hexdigest()[:16]
    target = _cache_dir() / f"kernels_{key}.so"
    if not target.exists():
        _build(target, cc, flags)
    return target


def _libgomp_paths() -> set[str]:
    """The libgomp files mapped into this process (Linux; empty elsewhere or when none is loaded)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return set()
    return {line.split()[-1] for line in maps.splitlines() if "/libgomp" in line}


def _load_openmp(cc: str) -> None:
    """Loads the OpenMP build (``-fopenmp -DSMT_OPENMP``: the ``*_omp`` entry points) where PyTorch runs on
    libgomp, so that the scan's threads are PyTorch's own team (see the C source). Only when exactly one
    libgomp is in the process before and after loading: the build's ``libgomp.so.1`` must resolve to PyTorch's
    copy, never a second OpenMP runtime. Otherwise (no libgomp, another runtime, a failed build) the scan
    keeps its Python threads and :func:`openmp_status` says why."""
    global _omp_lib, _omp_status
    if os.environ.get("SMT_DISABLE_OPENMP_SCAN"):
        _omp_status = "disabled by SMT_DISABLE_OPENMP_SCAN"
        return
    before = _libgomp_paths()
    if len(before) != 1:
        _omp_status = ("PyTorch does not run on libgomp here" if not before
                       else f"several libgomp copies are loaded ({', '.join(sorted(before))})")
        return
    try:
        lib = ctypes.CDLL(str(_built(cc, [*FLAGS, "-fopenmp", "-DSMT_OPENMP"])))
    except (OSError, RuntimeError) as exc:
        _omp_status = f"the OpenMP build failed ({str(exc)[:200]})"
        return
    after = _libgomp_paths()
    if after != before:
        _omp_status = f"the OpenMP build loaded another libgomp ({', '.join(sorted(after - before))}): not used"
        return
    lib.scan_fwd_fused_f32_omp.argtypes = ([ctypes.c_void_p] * 3 + [ctypes.c_int] * 2 + [ctypes.c_void_p] * 8
                                           + [ctypes.c_long] * 19 + [ctypes.c_long, ctypes.c_int])
    lib.scan_fwd_fused_f32_omp.restype = ctypes.c_int
    lib.scan_fwd_f32_omp.argtypes = [ctypes.c_void_p] * 7 + [ctypes.c_long] * 9 + [ctypes.c_int]
    lib.scan_bwd_f32_omp.argtypes = [ctypes.c_void_p] * 11 + [ctypes.c_long] * 9 + [ctypes.c_int]
    lib.attn_bf16_omp.argtypes = _ATTN_ARGS + [ctypes.c_long, ctypes.c_int]
    lib.attn_bf16_omp.restype = ctypes.c_int
    _omp_lib, _omp_status = lib, f"OpenMP on PyTorch's libgomp ({next(iter(before))})"


def openmp_library() -> ctypes.CDLL | None:
    """The OpenMP build (its ``*_omp`` float32 entry points take the job count and thread count in place of a
    job range) when it is usable here (after :func:`load_library`), else ``None``."""
    return _omp_lib


def openmp_status() -> str:
    """Whether float32 scans run on PyTorch's OpenMP team, and if not why (after :func:`load_library`)."""
    return _omp_status


def build_error() -> str | None:
    """Why the library could not be loaded (``None`` if it loaded or was not tried)."""
    return _error
