"""The SR output tail in fp32 under bf16 autocast, for training (:mod:`smt.train.engine`) and inference
(:mod:`smt.infer.precision`): the one home of the patch, in the lowest layer both may import.

Under bf16 autocast the last convolution would return bfloat16 and the mean add after it
(``SRHeads._head``) would round the SR image to bf16 (8 mantissa bits: about one grey level near white)
before the loss or the uint8 output. Outside autocast the patched convolution computes exactly what it did.
"""
from __future__ import annotations

import types

import torch

__all__ = ["output_convs", "fp32_output_convs"]


def output_convs(model: torch.nn.Module) -> list[torch.nn.Conv2d]:
    """The last convolution: one for every scale (the multi-scale upsamplers share the main head's ``conv_last``)."""
    return [model.conv_last]


def _fp32_forward(conv: torch.nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    with torch.autocast(x.device.type, enabled=False):
        return type(conv).forward(conv, x.float())


def fp32_output_convs(model: torch.nn.Module) -> int:
    """Run :func:`output_convs` in fp32 with autocast off, so the mean add after them is fp32 too. Patches the
    instances' ``forward`` (state-dict keys unchanged; a bound method, so a deep copy's patch runs the copy's
    weights); applying it again changes nothing. The convolutions' weights must be float32. Returns the count."""
    convs = output_convs(model)
    for conv in convs:
        conv.forward = types.MethodType(_fp32_forward, conv)
    return len(convs)
