"""``python -m smt export NAME -o FILE``: the trained weights in the formats SR tools load, and the whole method.

``NAME`` is a model of the pipeline (a key of ``train.models``: its last round and stage) or ``bundle``.

- ``.pth``: ``{'params_ema': state_dict}``, the BasicSR / official release layout, with the official parameter
  names and no auxiliary heads (loads into the official class with ``strict=True``, and into spandrel).
- ``.safetensors``: the same flat state dict, with metadata ``arch`` (a key of :data:`smt.models.ARCHITECTURES`),
  ``model_args`` (JSON constructor arguments, without ``aux_scales``), ``scale`` and ``upsampler``.
- ``bundle`` (a ``.safetensors`` file): every model of ``infer.models`` with its tensors under ``<model>.``,
  plus metadata ``format: smt-bundle``, the models' architectures, the fusion weight the pipeline fitted
  (``results/fusion.json``) and the ``infer`` settings of the method (self-ensemble, multi-window, tiling,
  routing, precision, seed): :func:`smt.infer.upscale.method_from_bundle` runs it on another machine.

Files are written atomically (a temporary file renamed into place).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from smt.models import ARCHITECTURES
from smt.models.presets import preset

__all__ = ["export_model", "export_bundle", "model_state", "write_weights", "BUNDLE_FORMAT", "METHOD_FIELDS"]

BUNDLE_FORMAT = "smt-bundle/1"
# the infer settings that define the method's output (the rest are execution settings or the table's contents)
METHOD_FIELDS = ("models", "self_ensemble", "tile", "tile_overlap", "tile_batch", "multi_window_model",
                 "window_tiles", "window_weights", "routing", "precision", "seed")


def model_state(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The persistent tensors of ``net`` without auxiliary heads (official names)."""
    return {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items() if not k.startswith("aux_heads.")}


def _arch_of(net: torch.nn.Module) -> str:
    for name, cls in ARCHITECTURES.items():
        if type(net) is cls:
            return name
    raise TypeError(f"no architecture name for {type(net).__name__}")


def write_weights(state: dict[str, torch.Tensor], arch: str, kwargs: dict[str, Any], out: str | Path) -> Path:
    """Write one model's weights as ``.pth`` (``params_ema``) or ``.safetensors`` (with architecture metadata)."""
    from smt.train.checkpoint import atomic_save, save_safetensors

    out = Path(out)
    _check_parent(out)
    kwargs = {k: v for k, v in kwargs.items() if k != "aux_scales"}
    if out.suffix == ".pth":
        atomic_save({"params_ema": state}, out)
    elif out.suffix == ".safetensors":
        save_safetensors(state, out, {"arch": arch, "model_args": json.dumps(_jsonable(kwargs), sort_keys=True),
                                      "scale": str(kwargs.get("upscale", 4)),
                                      "upsampler": str(kwargs.get("upsampler", ""))})
    else:
        raise ValueError(f"-o {out}: the file name must end in .pth or .safetensors")
    return out


def _check_parent(out: Path) -> None:
    if not out.parent.is_dir():
        raise FileNotFoundError(f"-o {out}: the folder {out.parent} does not exist")


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def _trained(train_cfg, name: str) -> tuple[torch.nn.Module, str, dict]:
    from smt.models import load_model
    from smt.train.engine import exported_weights

    if name not in train_cfg.models:
        raise KeyError(f"export: {name!r} is not a model of the pipeline (train.models: "
                       f"{', '.join(train_cfg.models)}; or 'bundle')")
    round_, stage = train_cfg.schedule()[-1]
    net = load_model(exported_weights(train_cfg, name, round_, stage), train_cfg.models[name].preset, "cpu")
    arch, kwargs = preset(train_cfg.models[name].preset)
    return net, arch, kwargs


def export_model(train_cfg, name: str, out: str | Path) -> Path:
    """Export model ``name`` of the pipeline (last round and stage) to ``out`` (.pth or .safetensors)."""
    net, arch, kwargs = _trained(train_cfg, name)
    return write_weights(model_state(net), arch, kwargs, out)


def export_bundle(train_cfg, infer_cfg, scale: int, fusion_path: str | Path, out: str | Path) -> Path:
    """Both models of the method, the fitted fusion weight and the infer settings, in one ``.safetensors``."""
    from smt.train.checkpoint import save_safetensors

    out = Path(out)
    if out.suffix != ".safetensors":
        raise ValueError(f"-o {out}: a bundle is a .safetensors file")
    _check_parent(out)
    fusion: dict[str, Any] = {}
    if len(infer_cfg.models) == 2:
        from smt.infer.runner import read_fusion_fit

        fit = read_fusion_fit(fusion_path, infer_cfg.models, "run the infer stage first (dvc repro infer)")
        fusion = {"model_a": fit["model_a"], "model_b": fit["model_b"], "weight_a": fit["weight_a"]}
    state: dict[str, torch.Tensor] = {}
    models = []
    for name in infer_cfg.models:
        net, arch, kwargs = _trained(train_cfg, name)
        state.update({f"{name}.{k}": v for k, v in model_state(net).items()})
        models.append({"name": name, "arch": arch,
                       "model_args": _jsonable({k: v for k, v in kwargs.items() if k != "aux_scales"})})
    settings = {k: _jsonable(v) for k, v in dataclasses.asdict(infer_cfg).items() if k in METHOD_FIELDS}
    meta = {"format": BUNDLE_FORMAT, "scale": str(scale), "models": json.dumps(models, sort_keys=True),
            "fusion": json.dumps(fusion, sort_keys=True), "infer": json.dumps(settings, sort_keys=True)}
    save_safetensors(state, out, meta)
    return out
