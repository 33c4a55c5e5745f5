"""PyTorch's CPU generator stepped in bulk by the C library (``csrc/mt19937.c``): the uniform draws behind
``exponential_()``, for MambaIRv2's Gumbel routing at inference.

PyTorch's CPU ``exponential_`` (and ``random_`` on int64) draws serially, one ``random64()`` per element
(two MT19937 words) in a per-element loop: at inference MambaIRv2-L spent about 5% of its bf16 forward there.
:func:`neg_uniform53` returns the same draws' ``-u`` (``u = (random64() & (2**53 - 1)) * 2**-53``, the value
``exponential_`` takes ``-log1p(-u)`` of) and leaves the generator exactly where ``n`` draws leave it: it reads
the generator's state (``get_state``), runs MT19937 in C, and writes the state back (``set_state``).

The state's byte layout is PyTorch's (``CPUGeneratorImplState``: seed, ``left``, ``seeded``, ``next``, then the
624 words as 64-bit integers). It is checked once per process against PyTorch itself (the same draws and the
same state after them, across a regeneration of the state); where the check fails or the library is missing,
:func:`neg_uniform53` returns ``None`` and the caller draws with PyTorch. Like any read-modify-write of the
global generator's state, a draw is not atomic against another thread drawing from that generator at the same
moment (PyTorch's own draws lock it per operation); inference draws from one thread.
"""
from __future__ import annotations

import ctypes
import threading

import torch

from smt.kernels.cpu_build import load_library

__all__ = ["neg_uniform53", "bulk_draws_available", "neg_uniform53_reference"]

_STATE_BYTES = 5056  # sizeof(CPUGeneratorImplState)
_LEFT, _NEXT, _WORDS = 8, 16, 24  # byte offsets: int32 left, uint64 next, 624 uint64 words
_MANTISSA_53 = (1 << 53) - 1
_lock = threading.Lock()
_checked: bool | None = None


def neg_uniform53_reference(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``-u`` for ``n`` draws through PyTorch's own serial ``random_()`` (the values and state
    :func:`neg_uniform53` must reproduce): float64 (n,)."""
    bits = torch.empty(n, dtype=torch.int64).random_(generator=generator)  # the low 63 bits of random64()
    return (bits & _MANTISSA_53).double().mul_(-(2.0 ** -53))


def _draw(generator: torch.Generator, n: int) -> torch.Tensor | None:
    lib = load_library()
    if lib is None:
        return None
    state = generator.get_state()
    if state.numel() != _STATE_BYTES:
        return None
    raw = state.numpy()
    left = ctypes.c_int64(int(raw[_LEFT:_LEFT + 4].view("<i4")[0]))
    nxt = ctypes.c_int64(int(raw[_NEXT:_NEXT + 8].view("<u8")[0]))
    words = torch.from_numpy(raw[_WORDS:_WORDS + 624 * 8].view("<u8").astype("<u4"))
    out = torch.empty(n, dtype=torch.float64)
    if lib.mt_neg_uniform53(words.data_ptr(), ctypes.byref(left), ctypes.byref(nxt), n, out.data_ptr()) != 0:
        return None
    raw[_LEFT:_LEFT + 4].view("<i4")[0] = left.value
    raw[_NEXT:_NEXT + 8].view("<u8")[0] = nxt.value
    raw[_WORDS:_WORDS + 624 * 8].view("<u8")[:] = words.numpy()
    generator.set_state(state)
    return out


def bulk_draws_available() -> bool:
    """Whether :func:`neg_uniform53` runs here: the library loads and, checked once, its draws and the state
    they leave equal PyTorch's for 700 draws from a seeded generator (1400 words: two regenerations)."""
    global _checked
    with _lock:
        if _checked is None:
            ours, theirs = torch.Generator().manual_seed(20250), torch.Generator().manual_seed(20250)
            theirs.set_state(ours.get_state())
            ok = True
            for n in (3, 700):  # a short draw first: the check also covers a state caught mid-block
                got = _draw(ours, n)
                ok = ok and got is not None and torch.equal(got, neg_uniform53_reference(n, theirs))
            _checked = ok and torch.equal(ours.get_state(), theirs.get_state())
        return _checked


def neg_uniform53(n: int) -> torch.Tensor | None:
    """``-u`` for ``n`` draws from the global CPU generator, equal to :func:`neg_uniform53_reference` (values
    and the generator's state after them), or ``None`` where the C draw does not run
    (:func:`bulk_draws_available`)."""
    if not bulk_draws_available():
        return None
    return _draw(torch.default_generator, n)
