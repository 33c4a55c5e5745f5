"""Keep freed CPU memory in the process during inference, so large activations stop paying page faults.

PyTorch's CPU tensors come from plain ``malloc``. glibc serves a block above its mmap threshold (128 KiB at
start, raised as such blocks are freed, up to 32 MiB) with freshly mapped pages, and hands a heap top of more than
its trim threshold back to the kernel. An L model allocates and frees tensors of tens of MB in every layer
(MambaIRv2-L at 128 px: 348 channels x 16,384 tokens = 22.8 MB): each new one is page-faulted and zeroed by
the kernel again, which costs more than the arithmetic of the element-wise passes that fill it. Measured on this
project's 2-core CPU (separate processes, two forwards each): MambaIRv2-L 128 px 16.0 -> 12.8 s, 64 px
3.3 -> 3.1 s; HAT-L 64 px 3.2 -> 3.0 s, 128 px unchanged. The cost: the process keeps its peak heap (resident
memory stays near the peak instead of shrinking between images; the peak itself moved by under 10%).

:func:`keep_freed_memory` sets the mmap threshold to glibc's maximum (blocks up to 32 MiB come from the heap,
which is reused) and turns trimming off; larger blocks are still mapped per use. It changes no arithmetic (the
tensors' alignment is PyTorch's own). It is process-wide, applies to later allocations, and is called by the
CPU inference entry points (``python -m smt upscale``, the infer stage, the model benchmark); the environment
variable ``SMT_DEFAULT_MALLOC=1`` keeps malloc's defaults. Other C libraries (musl, macOS) are left alone.
"""
from __future__ import annotations

import ctypes
import os

__all__ = ["keep_freed_memory", "malloc_status", "MMAP_THRESHOLD"]

_M_TRIM_THRESHOLD = -1  # mallopt parameter numbers (malloc.h)
_M_MMAP_THRESHOLD = -3
# glibc refuses a threshold above half its heap size (HEAP_MAX_SIZE = 64 MiB on 64-bit)
MMAP_THRESHOLD = 32 * 2**20
_TRIM_OFF = 2**31 - 1  # mallopt takes an int: trim only past 2 GiB of free heap top
_status: str | None = None


def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        libc.gnu_get_libc_version()
        libc.mallopt  # noqa: B018 - raises AttributeError where malloc is not glibc's
    except (OSError, AttributeError):
        return None
    return libc


def keep_freed_memory() -> str:
    """Apply the setting once per process (see the module docstring); returns :func:`malloc_status`."""
    global _status
    if _status is not None:
        return _status
    if os.environ.get("SMT_DEFAULT_MALLOC", "") not in ("", "0"):
        _status = "malloc defaults (SMT_DEFAULT_MALLOC is set)"
        return _status
    libc = _glibc()
    if libc is None:
        _status = "malloc defaults (not glibc)"
        return _status
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_OFF) == 1
    version = libc.gnu_get_libc_version().decode()
    _status = (f"glibc {version} malloc keeps freed memory (blocks up to {MMAP_THRESHOLD >> 20} MiB from the "
               "reused heap, no trim)" if ok else f"malloc defaults (glibc {version} refused mallopt)")
    return _status


def malloc_status() -> str:
    """What :func:`keep_freed_memory` did in this process, or that it has not been called."""
    return _status if _status is not None else "malloc defaults (keep_freed_memory not called)"
