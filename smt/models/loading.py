"""One checkpoint loader for every source: official ``.pth`` files and our ``.safetensors``.

:func:`read_state_dict` canonicalises what a file holds into a flat ``{name: tensor}``: it unwraps the usual
containers (``params_ema`` first, then ``params``, ``state_dict``, ``model``) and strips ``module.``
(DistributedDataParallel) and ``_orig_mod.`` (``torch.compile``) prefixes, and renames the authors' multi-scale
layouts (team BBox's released checkpoints) to ours (:func:`smt.models.layouts.to_ours`). ``.pth``/``.pt`` files
are read with ``torch.load(weights_only=True)``, so a checkpoint cannot run code.

:func:`load_weights` loads strictly: any missing or unexpected key or shape mismatch raises
:class:`CheckpointError` listing them by name, before anything is copied. Keys under ``allow_missing``
prefixes (a model's auxiliary heads when loading an official checkpoint) may be missing; they are reported in
the returned :class:`LoadReport` and keep their initial values. Keys under ``ignore_unexpected`` prefixes
may be present in the file but not in the model (they are dropped, and named in the report: the upsamplers
of multi-scale training, unused at inference).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import torch
import torch.nn as nn

from smt.models.errors import CheckpointError
from smt.models.layouts import to_ours

__all__ = ["CheckpointError", "LoadReport", "read_state_dict", "read_checkpoint", "read_metadata", "load_weights",
           "compare_state_dicts"]

_CONTAINER_KEYS = ("params_ema", "params", "state_dict", "model")
_PREFIXES = ("module.", "_orig_mod.")


@dataclass
class LoadReport:
    path: str
    container: str | None  # which container key held the weights, if any
    loaded: int
    missing_allowed: list[str] = field(default_factory=list)
    layout: str = "official"  # the layout the file came in (smt.models.layouts)
    unused: list[str] = field(default_factory=list)  # tensors of the file the model has no place for (dropped)

    def describe(self) -> str:
        where = f" (from '{self.container}')" if self.container else ""
        layout = f", the authors' {self.layout[5:]} layout" if self.layout.startswith("bbox-") else ""
        msg = f"{self.path}: loaded {self.loaded} tensors{where}{layout}"
        if self.missing_allowed:
            msg += f"; {len(self.missing_allowed)} not in the checkpoint, left at init: " + \
                _modules(self.missing_allowed)
        if self.unused:
            msg += f"; {len(self.unused)} not used by this model (heads of training): " + _modules(self.unused)
        return msg


def _modules(keys: list[str]) -> str:
    """The module paths of ``keys`` (``aux_upsample.x2.0.weight`` -> ``aux_upsample.x2``), in order."""
    mods = list(dict.fromkeys(k.rsplit(".", 2)[0] if k.count(".") >= 2 else k for k in keys))
    return ", ".join(mods[:8]) + (" ..." if len(mods) > 8 else "")


def _strip(name: str) -> str:
    changed = True
    while changed:
        changed = False
        for p in _PREFIXES:
            if name.startswith(p):
                name, changed = name[len(p):], True
    return name


def read_state_dict(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], str | None]:
    """``(state_dict, container_key)`` from a ``.pth``/``.pt``/``.ckpt`` or ``.safetensors`` file, in our
    layout."""
    state, container, _ = read_checkpoint(path)
    return state, container


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], str | None, str]:
    """``(state_dict in our layout, container_key, layout the file came in)``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: object = load_file(str(path))
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch/safetensors raise many types for corrupt files
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(exc).__name__}: {exc})") from None
    container = None
    if isinstance(obj, Mapping):
        for key in _CONTAINER_KEYS:
            if key in obj and isinstance(obj[key], Mapping):
                obj, container = obj[key], key
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: no state dict found (looked for a tensor mapping, or one under "
                              f"{', '.join(_CONTAINER_KEYS)})")
    try:
        state, layout = to_ours({_strip(k): v for k, v in obj.items()})
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    return state, container, layout


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The string metadata of a ``.safetensors`` header (``{}`` for other formats)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        return {}
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as fh:
            return fh.metadata() or {}
    except Exception as exc:  # corrupt header
        raise CheckpointError(f"{path}: not a readable checkpoint ({exc})") from None


def compare_state_dicts(expected: Mapping[str, torch.Tensor], found: Mapping[str, torch.Tensor],
                        allow_missing: Sequence[str] = (), ignore_unexpected: Sequence[str] = ()
                        ) -> tuple[list[str], list[str], list[str], list[str]]:
    """``(missing, missing_allowed, unexpected, shape_mismatches)`` between a model's and a file's tensors."""
    missing = [k for k in expected if k not in found]
    allowed = [k for k in missing if k.startswith(tuple(allow_missing))] if allow_missing else []
    missing = [k for k in missing if k not in allowed]
    unexpected = [k for k in found if k not in expected
                  and not (ignore_unexpected and k.startswith(tuple(ignore_unexpected)))]
    shapes = [f"{k}: checkpoint {tuple(found[k].shape)} vs model {tuple(v.shape)}"
              for k, v in expected.items() if k in found and tuple(found[k].shape) != tuple(v.shape)]
    return missing, allowed, unexpected, shapes


def _listing(title: str, items: list[str], limit: int = 10) -> str:
    more = f" ... and {len(items) - limit} more" if len(items) > limit else ""
    return f"\n  {title} ({len(items)}): " + ", ".join(items[:limit]) + more


def load_weights(model: nn.Module, path: str | os.PathLike, allow_missing: Sequence[str] = (),
                 ignore_unexpected: Sequence[str] = ()) -> LoadReport:
    """Load ``path`` into ``model`` strictly (see module docstring); returns what was loaded.

    ``ignore_unexpected``: prefixes of checkpoint keys the model may lack (our exported weights carry the
    auxiliary heads of training; an inference model without them drops those tensors).
    """
    state, container, layout = read_checkpoint(path)
    expected = model.state_dict()
    missing, allowed, unexpected, shapes = compare_state_dicts(expected, state, allow_missing, ignore_unexpected)
    unused = [k for k in state if k not in expected and k not in unexpected]
    state = {k: v for k, v in state.items() if k in expected}
    if missing or unexpected or shapes:
        msg = f"{path}: checkpoint does not fit {type(model).__name__}"
        if missing:
            msg += _listing("missing from the checkpoint", missing)
        if unexpected:
            msg += _listing("not in the model", unexpected)
        if shapes:
            msg += _listing("shape mismatches", shapes, 5)
        msg += "\n  (a different preset or architecture? check embed_dim, depths, window_size and upscale)"
        raise CheckpointError(msg)
    result = model.load_state_dict({**{k: expected[k] for k in allowed}, **state}, strict=True)
    del result
    return LoadReport(str(path), container, len(state), allowed, layout, unused)
