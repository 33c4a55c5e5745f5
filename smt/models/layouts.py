"""State-dict layouts of the method's checkpoints: ours (the official HAT / MambaIRv2 names) and the authors'.

Team BBox (NTIRE 2025, x4, 2nd place) released two checkpoints, ``team15_SMT_HAT.pth`` and
``team15_SMT_Mamba.pth`` (``{'params': state_dict}``), saved from their multi-scale classes:

- MambaIRv2_Multiscale (``models/team15_SMT/archs/mambairv2_multiscale_arch.py``): the official MambaIRv2 keys,
  except that the x4 upsampler is ``upsample4.*`` instead of ``upsample.*``, plus ``upsample2.*`` and
  ``upsample3.*``; all three share ``conv_before_upsample`` and ``conv_last``.
- MSHAT (``models/team15_SMT_HAT/MSHAT_model.py``): the official HAT keys plus ``upsample_2x.*``; its
  ``upsample_1x`` is an empty module (``Upsample(1)``: no tensors).

Our models name the extra upsamplers ``aux_upsample.x<s>.*`` (:data:`smt.models.common.AUX_PREFIX`).
:func:`to_ours` renames the authors' keys to ours (every loader calls it through
:func:`smt.models.loading.read_state_dict`), :func:`to_bbox` writes ours in the authors' layout (``python -m smt
export --layout bbox``). Both are pure renames: tensors are neither changed nor copied.
"""
from __future__ import annotations

import re
from typing import Mapping

import torch

from smt.models.common import AUX_PREFIX, LEGACY_AUX_PREFIX
from smt.models.errors import CheckpointError

__all__ = ["LAYOUTS", "BBOX_HAT", "BBOX_MAMBAIRV2", "detect_layout", "to_ours", "to_bbox", "aux_scales_of"]

LAYOUTS = ("official", "bbox")
BBOX_HAT = "bbox-hat"  # MSHAT: upsample (x4), upsample_1x (empty), upsample_2x
BBOX_MAMBAIRV2 = "bbox-mambairv2"  # MambaIRv2_Multiscale: upsample2, upsample3, upsample4

# the authors' module name of each scale's upsampler, per layout (the main x4 one included)
_BBOX_MAMBA_NAMES = {4: "upsample4", 3: "upsample3", 2: "upsample2"}
_BBOX_HAT_NAMES = {4: "upsample", 2: "upsample_2x", 1: "upsample_1x"}


def _has(state: Mapping[str, torch.Tensor], module: str) -> bool:
    return any(k.startswith(module + ".") for k in state)


def detect_layout(state: Mapping[str, torch.Tensor]) -> str:
    """``'bbox-mambairv2'``, ``'bbox-hat'`` or ``'official'`` (ours, with or without ``aux_upsample``)."""
    if not _has(state, "upsample") and any(_has(state, n) for n in _BBOX_MAMBA_NAMES.values()):
        return BBOX_MAMBAIRV2
    if any(_has(state, n) for n in ("upsample_2x", "upsample_1x")):
        return BBOX_HAT
    return "official"


def _rename(state: Mapping[str, torch.Tensor], names: Mapping[str, str]) -> dict[str, torch.Tensor]:
    """``state`` with every key under a module path of ``names`` (``'upsample4'``, ``'aux_upsample.x2'``) moved
    to its new path; other keys and the order unchanged."""
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        old = next((m for m in names if k.startswith(m + ".")), None)
        out[names[old] + k[len(old):] if old is not None else k] = v
    return out


def _aux_scale(key: str) -> int | None:
    m = re.match(rf"^{re.escape(AUX_PREFIX)}x(\d+)\.", key)
    return int(m.group(1)) if m else None


def to_ours(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str]:
    """``(state in our names, layout it came in)``: the authors' per-scale upsamplers become ``upsample.*``
    (the x4 one) and ``aux_upsample.x<s>.*``; a state dict already in our layout comes back unchanged."""
    layout = detect_layout(state)
    if layout == BBOX_MAMBAIRV2:
        if not _has(state, _BBOX_MAMBA_NAMES[4]):
            raise CheckpointError("the authors' MambaIRv2_Multiscale layout ('upsample2'/'upsample3' keys) "
                                  "without its x4 upsampler 'upsample4.*'")
        names = {n: ("upsample" if s == 4 else f"{AUX_PREFIX}x{s}") for s, n in _BBOX_MAMBA_NAMES.items()}
        return _rename(state, names), layout
    if layout == BBOX_HAT:
        names = {n: f"{AUX_PREFIX}x{s}" for s, n in _BBOX_HAT_NAMES.items() if s != 4}
        return _rename(state, names), layout
    return dict(state), layout


def aux_scales_of(state: Mapping[str, torch.Tensor]) -> tuple[int, ...]:
    """The scales of the extra upsamplers a state dict (our layout) carries, sorted."""
    return tuple(sorted({s for k in state if (s := _aux_scale(k)) is not None}))


def to_bbox(state: Mapping[str, torch.Tensor], arch: str, upscale: int, upsampler: str) -> dict[str, torch.Tensor]:
    """Our state dict (with the extra upsamplers of training) in the authors' layout for ``arch``.

    Their classes hard-code the heads: MambaIRv2_Multiscale loads ``strict=True`` and needs the x2 and x3
    upsamplers; MSHAT loads ``strict=False`` but every key of theirs must be present, so it needs x2 (its x1
    upsampler has no tensors). Scales their class has no slot for (HAT's x3) are left out. Raises
    :class:`CheckpointError` naming what is missing."""
    if any(k.startswith(LEGACY_AUX_PREFIX) for k in state):
        raise CheckpointError(f"auxiliary heads of a previous release ('{LEGACY_AUX_PREFIX}*', each with its own "
                              "convolutions) have no place in the authors' layout, whose scales share "
                              "conv_before_upsample and conv_last; retrain with this release")
    if upsampler != "pixelshuffle" or upscale != 4:
        raise CheckpointError(f"the authors' layout is an x4 'pixelshuffle' model; this one has upscale {upscale}, "
                              f"upsampler {upsampler!r}")
    have = set(aux_scales_of(state))
    if arch == "mambairv2":
        names, need = _BBOX_MAMBA_NAMES, {2, 3}
    elif arch == "hat":
        names, need = _BBOX_HAT_NAMES, {2}
    else:
        raise CheckpointError(f"the authors released HAT and MambaIRv2 models only; no layout for {arch!r}")
    if not need <= have:
        missing = ", ".join(f"x{s} ({names[s]})" for s in sorted(need - have))
        raise CheckpointError(f"the authors' {arch} layout needs upsamplers this model was not trained with: "
                              f"{missing}; it has {', '.join(f'x{s}' for s in sorted(have)) or 'none'} "
                              f"(train.aux_scales)")
    kept = {k: v for k, v in state.items() if _aux_scale(k) is None or _aux_scale(k) in names}
    return _rename(kept, {"upsample": names[4], **{f"{AUX_PREFIX}x{s}": names[s] for s in have if s in names}})
