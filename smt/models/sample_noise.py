"""Training noise per sample, a function of the sample's place in the global batch and not of the process that
holds it: DropPath's masks and MambaIRv2's Gumbel routing draw from here while :func:`per_sample` is active.

Each random call in a forward (one DropPath application, one Gumbel draw) first takes one 63-bit *call key* from
the global CPU generator; sample ``g``'s noise for that call is then drawn from a generator seeded with
``mix(call_key, g)``. The training loop seeds the global CPU generator with the step's seed before every
micro-batch and names the global indices of the micro-batch's rows (:func:`per_sample`), so every process, any
world size and any micro-batch split makes the same calls with the same call keys, and each sample gets the same
noise wherever it runs. Activation checkpointing replays the global generator's state in its recompute
(``preserve_rng_state``), so a recomputed layer takes the same call keys and draws the same masks.

Outside :func:`per_sample` (inference, validation, a model used on its own) nothing changes: DropPath and the
Gumbel routing draw from the global generators as before.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterable, Iterator

import torch

__all__ = ["per_sample", "active", "sample_seeds", "uniforms", "exponential", "mix"]

_MASK64 = (1 << 64) - 1
_state = threading.local()


def _splitmix64(z: int) -> int:
    """One step of SplitMix64 (Steele et al., 2014): a bijective 64-bit mixer."""
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def mix(a: int, b: int) -> int:
    """A 63-bit seed from two integers (a generator seed; different inputs give unrelated seeds)."""
    return _splitmix64((a & _MASK64) ^ _splitmix64(b & _MASK64)) >> 1


@contextmanager
def per_sample(indices: Iterable[int]) -> Iterator[None]:
    """While active, the rows of the batch the model is called with are the samples ``indices`` (their global
    indices in this step's batch), in row order."""
    previous = getattr(_state, "indices", None)
    _state.indices = tuple(int(i) for i in indices)
    try:
        yield
    finally:
        _state.indices = previous


def active() -> tuple[int, ...] | None:
    """The global indices of the current batch's rows, or None outside :func:`per_sample`."""
    return getattr(_state, "indices", None)


def sample_seeds(batch: int) -> list[int] | None:
    """For one random call: a seed per row of a ``batch``-row input (None outside :func:`per_sample`). Takes the
    call key from the global CPU generator."""
    indices = active()
    if indices is None:
        return None
    if batch != len(indices):
        raise RuntimeError(f"per-sample noise: the input has {batch} rows but per_sample() named "
                           f"{len(indices)} samples")
    call = int(torch.randint(0, 2**63 - 1, (1,), dtype=torch.int64))
    return [mix(call, g) for g in indices]


def uniforms(batch: int) -> list[float] | None:
    """One uniform draw in [0, 1) per row (53 bits of the row's seed, mixed once more), or None outside
    :func:`per_sample`."""
    seeds = sample_seeds(batch)
    if seeds is None:
        return None
    return [(_splitmix64(s) >> 11) * 2.0**-53 for s in seeds]


def exponential(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
    """Standard exponential draws of ``shape`` (rows first), each row from its own generator on ``device``
    seeded with the row's seed; None outside :func:`per_sample`."""
    seeds = sample_seeds(shape[0])
    if seeds is None:
        return None
    out = torch.empty(shape, dtype=dtype, device=device)
    for row, seed in zip(out, seeds):
        row.exponential_(generator=torch.Generator(device=device).manual_seed(seed))
    return out
