"""Inference precision: ``fp32`` (the reference) or ``bf16`` autocast (matrix products and convolutions in
bfloat16, accumulation and the selective scan in float32; outputs returned as float32), or ``bf16-weights``:
the same autocast over a bfloat16 copy of the model, so the weights are not re-cast on every call (the copy is
made once per model and reused until the model's parameters or buffers change). In both bf16 modes the model's
last convolution and the mean add after it run in fp32, as in training
(:func:`smt.train.output_precision.fp32_output_convs`), so the SR image is not rounded to bf16 before it is
rounded to uint8; fp32 runs the model untouched.

bf16 pays off where the hardware has it natively (CUDA GPUs; CPUs with AVX-512 BF16 or AMX). On CPUs without it
PyTorch emulates bf16 and it is much slower than fp32 — ``benchmarks/bench_kernels.py --bf16`` measures both.
"""
from __future__ import annotations

import copy
import weakref
from typing import Callable, Literal

import torch

from smt.train.output_precision import fp32_output_convs, output_convs

__all__ = ["Precision", "with_precision", "cpu_flags", "cpu_has_native_bf16", "choose_precision"]

Precision = Literal["fp32", "bf16", "bf16-weights"]


def with_precision(net: Callable[[torch.Tensor], torch.Tensor], precision: Precision,
                   ) -> Callable[[torch.Tensor], torch.Tensor]:
    """``net`` as a forward function in ``precision`` (inputs and outputs float32). bf16: an SR model's
    (``conv_last``) output tail is patched in place to run in fp32 (:func:`fp32_output_convs`: once is enough,
    again changes nothing, and the model's fp32 outputs stay the same bits)."""
    if precision == "fp32":
        return net
    if precision not in ("bf16", "bf16-weights"):
        raise ValueError(f"unknown precision {precision!r} (valid: 'fp32', 'bf16', 'bf16-weights')")
    if precision == "bf16-weights":
        if not isinstance(net, torch.nn.Module):
            raise ValueError("precision 'bf16-weights' needs an nn.Module (its weights are copied to bfloat16)")
        net = _bf16_copy(net)
    if isinstance(net, torch.nn.Module) and hasattr(net, "conv_last"):
        fp32_output_convs(net)

    def forward(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            return net(x).float()

    return forward


# model -> (its state when copied, its bf16 copy): the infer stage and ``upscale`` call with_precision once per
# image, and a fresh deep copy each time cost a copy of every weight per image. Weak keys: the copy goes with
# its model.
_BF16_COPIES: "weakref.WeakKeyDictionary[torch.nn.Module, tuple[tuple, torch.nn.Module]]" = \
    weakref.WeakKeyDictionary()


def _state_key(net: torch.nn.Module) -> tuple:
    """What the bf16 copy depends on: every parameter and buffer (the tensor itself, held by a weak reference so
    that the cache keeps no replaced tensor alive; its in-place version counter, dtype and device) and the
    training flag. Reassigning a parameter, ``load_state_dict``, an optimiser step or ``.to()`` changes it."""
    tensors = [t for _, t in net.named_parameters()] + [t for _, t in net.named_buffers()]
    return (net.training, tuple((weakref.ref(t), t._version, t.dtype, t.device) for t in tensors))


def _same_state(a: tuple, b: tuple) -> bool:
    """Whether two :func:`_state_key` keys name the same live tensors in the same state (a tensor freed since
    is never the same)."""
    return a[0] == b[0] and len(a[1]) == len(b[1]) and all(
        x[0]() is not None and x[0]() is y[0]() and x[1:] == y[1:] for x, y in zip(a[1], b[1]))


def _bf16_copy(source: torch.nn.Module) -> torch.nn.Module:
    """The bfloat16 copy of ``source`` for ``bf16-weights``, made once per model and reused while the model's
    parameters and buffers are the same tensors with the same values (forward hooks are those ``source`` had
    when the copy was made)."""
    key = _state_key(source)
    cached = _BF16_COPIES.get(source)
    if cached is not None and _same_state(cached[0], key):
        return cached[1]
    # autocast stays on for ops with mixed inputs; LayerNorms keep float32 parameters, which PyTorch's CPU
    # kernel accepts with bfloat16 or float32 inputs (the scan's outputs are float32). The fp32 output tail
    # keeps its float32 weights and mean. Kept parts get the original values, not bf16 ones cast back.
    _BF16_COPIES.pop(source, None)  # the stale copy's memory goes before the new copy is made
    net = copy.deepcopy(source).to(torch.bfloat16)
    keep = {id(m) for m in net.modules() if isinstance(m, torch.nn.LayerNorm)}
    if hasattr(net, "conv_last"):
        keep |= {id(conv) for conv in output_convs(net)}
        if isinstance(getattr(net, "mean", None), torch.Tensor):
            net.mean = source.mean.detach().clone()
    originals = dict(source.named_modules())
    for name, m in net.named_modules():
        if id(m) in keep:
            m.float().load_state_dict(originals[name].state_dict())
    _BF16_COPIES[source] = (key, net)
    return net


def cpu_flags(cpuinfo: str | None = None) -> frozenset[str]:
    """The CPU feature flags of ``/proc/cpuinfo`` (or of the given text); empty when unknown (not Linux)."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            return frozenset()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):  # x86 / ARM
            return frozenset(value.split())
    return frozenset()


NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # x86: AVX-512 BF16 dot products, AMX tiles


def cpu_has_native_bf16(flags: frozenset[str] | None = None) -> bool:
    """Whether this CPU (or one with ``flags``) computes bf16 natively: AVX-512 BF16 or AMX-BF16 on x86,
    ``bf16`` (ARMv8.6) on ARM. Detected at run time, never assumed: False when the flags are unknown."""
    flags = cpu_flags() if flags is None else flags
    return any(f in flags for f in NATIVE_BF16_FLAGS) or "bf16" in flags


def choose_precision(want_bf16: bool, device: str | torch.device = "cpu",
                     flags: frozenset[str] | None = None) -> tuple[Precision, str]:
    """The precision for ``python -m smt upscale`` and the sentence that says why.

    fp32 stays the default: it is the reference, and its outputs are byte-identical to the infer stage's.
    ``want_bf16`` (``--bf16``) gives bf16: on a CPU with native bf16 units the model's bf16 copy
    (``bf16-weights``, faster than autocast alone), on an accelerator autocast, and on a CPU without them
    autocast with a warning (PyTorch then emulates bf16 and it is slower than fp32)."""
    on_cpu = torch.device(device).type == "cpu"
    native = (not on_cpu) or cpu_has_native_bf16(flags)
    if not want_bf16:
        hint = " (bf16 is available here: --bf16)" if native else ""
        return "fp32", "precision fp32 (the reference path)" + hint
    if native and on_cpu:
        return "bf16-weights", "precision bf16 weights + autocast (this CPU has native bf16 units)"
    if native:
        return "bf16", "precision bf16 autocast (accelerator)"
    return "bf16", ("precision bf16 autocast -- warning: this CPU has no native bf16 units (no avx512_bf16 or "
                    "amx_bf16 flag), so PyTorch emulates bf16 and it will be SLOWER than fp32")
