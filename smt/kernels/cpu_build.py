"""Build and load the C selective-scan kernel (``csrc/selective_scan.c``) at first use.

The source is compiled with the system C compiler (``$CC``, default ``cc``) into a shared library
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

__all__ = ["load_library", "SOURCE", "build_error"]

SOURCE = Path(__file__).parent / "csrc" / "selective_scan.c"
FLAGS = ["-O3", "-march=native", "-ffp-contract=fast", "-fno-math-errno", "-fPIC", "-shared", "-std=c11"]
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_error: str | None = None
_tried = False


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


def _build(target: Path, cc: str) -> None:
    with atomic_path(target) as tmp:  # atomic: concurrent builders never load a torn file
        res = subprocess.run([cc, *FLAGS, str(SOURCE), "-o", str(tmp), "-lm"], capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"{cc} failed to build {SOURCE.name}:\n{res.stderr[-2000:]}")


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
        key = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS).encode() + _cpu_key().encode()).hexdigest()[:16]
        target = _cache_dir() / f"selective_scan_{key}.so"
        try:
            if not target.exists():
                _build(target, cc)
            lib = ctypes.CDLL(str(target))
        except (OSError, RuntimeError) as exc:
            _error = str(exc)
            warnings.warn(f"smt: CPU selective-scan kernel unavailable, using the PyTorch fallback ({exc})")
            return None
        for suffix in ("f32", "f64"):
            getattr(lib, f"scan_fwd_{suffix}").argtypes = [ctypes.c_void_p] * 7 + [ctypes.c_long] * 10
            getattr(lib, f"scan_bwd_{suffix}").argtypes = [ctypes.c_void_p] * 11 + [ctypes.c_long] * 10
        lib.scan_fwd_fused_f32.argtypes = ([ctypes.c_void_p] * 3 + [ctypes.c_int] + [ctypes.c_void_p] * 7
                                           + [ctypes.c_long] * 21)
        lib.scan_fwd_fused_f32.restype = ctypes.c_int
        lib.scan_max_state.restype = ctypes.c_int
        lib.scan_block_width.restype = ctypes.c_int
        _lib = lib
        return lib


def build_error() -> str | None:
    """Why the library could not be loaded (``None`` if it loaded or was not tried)."""
    return _error
