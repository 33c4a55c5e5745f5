"""Resumable training state, written atomically, and EMA of weights.

A state file (``state.pt``) holds everything to resume *and* to rebuild the model: architecture and
constructor arguments, step, model, EMA, optimizer and scheduler states, RNG states and the stage config. It
is written to a temporary file in the same folder and renamed into place, so a kill never leaves a torn file.
Exported weights (``model.safetensors``) are the EMA weights, loadable by :func:`smt.models.load_weights`.
"""
from __future__ import annotations

import copy
import os
import random
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from smt.files import atomic_path

__all__ = ["EMA", "atomic_save", "rng_state", "set_rng_state", "save_safetensors", "safetensors_bytes"]


class EMA:
    """Exponential moving average of a model's parameters (buffers are copied)."""

    def __init__(self, model: nn.Module, decay: float, warmup: bool = False) -> None:
        self.decay = decay
        self.warmup = warmup
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    def decay_at(self, step: int) -> float:
        """Decay used for the update after ``step`` optimizer steps (0-based). With warm-up the average
        forgets its starting weights quickly in short runs: min(decay, (1 + step) / (10 + step))."""
        return min(self.decay, (1 + step) / (10 + step)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module, step: int = 0) -> None:
        """``e.lerp_(p, 1 - decay)`` for every parameter and a copy of every buffer, each as one foreach call
        (one fused launch per group of tensors on a GPU instead of one per tensor; the values of
        :meth:`update_reference`)."""
        decay = self.decay_at(step)
        ema, live = list(self.model.parameters()), [p.detach() for p in model.parameters()]
        if ema:
            torch._foreach_lerp_(ema, live, 1.0 - decay)
        ema_buffers, buffers = list(self.model.buffers()), list(model.buffers())
        if ema_buffers:
            torch._foreach_copy_(ema_buffers, buffers)

    @torch.no_grad()
    def update_reference(self, model: nn.Module, step: int = 0) -> None:
        """:meth:`update` one tensor at a time (the reference the tests compare it with)."""
        decay = self.decay_at(step)
        for e, p in zip(self.model.parameters(), model.parameters()):
            e.lerp_(p.detach(), 1.0 - decay)
        for e, b in zip(self.model.buffers(), model.buffers()):
            e.copy_(b)


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def safetensors_bytes(state_dict: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """The ``.safetensors`` encoding of ``state_dict`` with a canonical header: the same tensors and metadata
    always give the same bytes. (``safetensors`` writes the metadata in hash-map order, which changes from one
    process to the next; the header is re-serialised here with sorted keys and padded as the format requires.
    Tensor data offsets are relative to the end of the header, so they stay valid.)"""
    import json
    import struct

    from safetensors.torch import save

    raw = save({k: v.detach().contiguous().cpu() for k, v in state_dict.items()}, metadata=dict(metadata))
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + raw[8 + n:]


def save_safetensors(state_dict: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str]) -> None:
    """Write :func:`safetensors_bytes` atomically (a temporary file renamed into place)."""
    data = safetensors_bytes(state_dict, metadata)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def rng_state() -> dict:
    """RNG states as tensors and plain values only, so the state file loads with ``weights_only=True``."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos),
                                                       int(has_gauss), float(gauss)],
             "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
