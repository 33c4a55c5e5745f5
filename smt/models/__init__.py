"""SR architectures (HAT, MambaIRv2), presets as plain data and one checkpoint loader.

``build_model("hat_l")`` or ``build_model("mambairv2_tiny", aux_scales=(2, 3))`` constructs a preset;
``ARCHITECTURES`` maps an architecture name to its class.
"""
from __future__ import annotations

from typing import Any

import torch.nn as nn

from smt.models.hat import HAT
from smt.models.loading import CheckpointError, LoadReport, load_weights, read_state_dict
from smt.models.mambairv2 import MambaIRv2
from smt.models.presets import PRESETS, preset

__all__ = ["HAT", "MambaIRv2", "ARCHITECTURES", "PRESETS", "build_model", "CheckpointError", "LoadReport",
           "load_weights", "read_state_dict", "count_parameters"]

ARCHITECTURES: dict[str, type[nn.Module]] = {"hat": HAT, "mambairv2": MambaIRv2}


def build_model(name: str, **overrides: Any) -> nn.Module:
    """Construct preset ``name``; ``overrides`` replace or add constructor arguments (unknown ones raise)."""
    arch, kwargs = preset(name)
    return ARCHITECTURES[arch](**{**kwargs, **overrides})


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
