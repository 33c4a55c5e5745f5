"""SR architectures (HAT, MambaIRv2), presets as plain data and one checkpoint loader.

``build_model("hat_l")`` or ``build_model("mambairv2_tiny", aux_scales=(2, 3))`` constructs a preset;
``ARCHITECTURES`` maps an architecture name to its class; :func:`load_model` is the one loader of a trained
model for inference (training stages, ``python -m smt export``, the infer stage, the ablations and ``upscale``).
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from smt.models.common import AUX_PREFIX, LEGACY_AUX_PREFIX
from smt.models.hat import HAT
from smt.models.loading import CheckpointError, LoadReport, load_weights, read_metadata, read_state_dict
from smt.models.mambairv2 import MambaIRv2, MambaIRv2Light
from smt.models.presets import PRESETS, preset

__all__ = ["HAT", "MambaIRv2", "MambaIRv2Light", "ARCHITECTURES", "PRESETS", "build_model", "load_model",
           "CheckpointError", "LoadReport", "load_weights", "read_state_dict", "count_parameters"]

ARCHITECTURES: dict[str, type[nn.Module]] = {"hat": HAT, "mambairv2": MambaIRv2, "mambairv2light": MambaIRv2Light}


def build_model(name: str, **overrides: Any) -> nn.Module:
    """Construct preset ``name``; ``overrides`` replace or add constructor arguments (unknown ones raise)."""
    arch, kwargs = preset(name)
    return ARCHITECTURES[arch](**{**kwargs, **overrides})


def load_model(checkpoint: str | os.PathLike, preset_name: str | None = None, device: str | torch.device = "cpu",
               routing: str | None = None, **overrides: Any) -> nn.Module:
    """A trained model for inference, in eval mode on ``device``: the architecture is preset ``preset_name``
    (with constructor ``overrides``), else the one our exported ``.safetensors`` metadata names, else the one
    detected from the weights (:mod:`smt.models.detect`); the weights load strictly, in our layout or the
    authors' (:mod:`smt.models.layouts`), with the extra upsamplers of multi-scale training dropped and named
    once on stderr. ``routing`` sets MambaIRv2's prompt routing (ignored by architectures without one)."""
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise CheckpointError(f"{checkpoint}: checkpoint file not found")
    meta = read_metadata(checkpoint)
    if meta.get("format", "").startswith("smt-bundle"):
        raise CheckpointError(f"{checkpoint}: a bundle of several models; pass it with --bundle")
    if preset_name:
        net = build_model(preset_name, **overrides)
    elif "arch" in meta and "model_args" in meta:
        kwargs = json.loads(meta["model_args"])
        kwargs.pop("aux_scales", None)  # exported weights may carry auxiliary heads; inference uses the main one
        net = ARCHITECTURES[meta["arch"]](**{**kwargs, **overrides})
    else:
        from smt.models.detect import detect_architecture

        arch, kwargs = detect_architecture(read_state_dict(checkpoint)[0], str(checkpoint))
        net = ARCHITECTURES[arch](**{**kwargs, **overrides})
    if routing is not None and hasattr(net, "routing"):
        net.routing = routing
    report = load_weights(net, checkpoint, ignore_unexpected=(AUX_PREFIX, LEGACY_AUX_PREFIX))
    if report.unused or report.layout != "official":
        print(report.describe(), file=sys.stderr)
    return net.to(device).eval()


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
