"""``python -m smt export NAME -o FILE``: the trained weights in the formats SR tools load, and the whole method.

``NAME`` is a model of the pipeline (a key of ``train.models``: its last round and stage) or ``bundle``;
``--checkpoint FILE`` converts any file :func:`smt.models.load_model` reads instead of the pipeline's weights.

- ``.pth``: ``{'params_ema': state_dict}``, the BasicSR / official release layout, with the official parameter
  names and no extra upsamplers (loads into the official class with ``strict=True``, and into spandrel).
- ``--layout bbox`` (``.pth`` only): ``{'params': state_dict}`` in the layout of the authors' released checkpoints
  (:func:`smt.models.layouts.to_bbox`: their MambaIRv2_Multiscale loads it ``strict=True``, their MSHAT with no
  key missing), the upsamplers of multi-scale training included.
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
from smt.models.common import AUX_PREFIX, LEGACY_AUX_PREFIX
from smt.models.layouts import LAYOUTS, aux_scales_of, to_bbox
from smt.models.loading import CheckpointError
from smt.models.presets import preset

__all__ = ["export_model", "export_checkpoint", "export_bundle", "model_state", "write_weights",
           "read_for_export", "BUNDLE_FORMAT", "METHOD_FIELDS"]

BUNDLE_FORMAT = "smt-bundle/1"
# the infer settings that define the method's output (the rest are execution settings or the table's contents)
METHOD_FIELDS = ("models", "self_ensemble", "tile", "tile_overlap", "tile_batch", "multi_window_model",
                 "window_tiles", "window_weights", "routing", "precision", "seed", "protocol")


def model_state(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The persistent tensors of ``net`` without the extra upsamplers of training (official names)."""
    return {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()
            if not k.startswith((AUX_PREFIX, LEGACY_AUX_PREFIX))}


def _arch_of(net: torch.nn.Module) -> str:
    for name, cls in ARCHITECTURES.items():
        if type(net) is cls:
            return name
    raise TypeError(f"no architecture name for {type(net).__name__}")


def write_weights(state: dict[str, torch.Tensor], arch: str, kwargs: dict[str, Any], out: str | Path,
                  layout: str = "official") -> Path:
    """Write one model's weights as ``.pth`` (``params_ema``) or ``.safetensors`` (with architecture metadata),
    without extra upsamplers; or, ``layout='bbox'``, as the authors' ``.pth`` (``params``, with them)."""
    from smt.train.checkpoint import atomic_save, save_safetensors

    out = Path(out)
    if layout not in LAYOUTS:
        raise ValueError(f"--layout {layout!r}: not a layout (valid: {', '.join(LAYOUTS)})")
    _check_parent(out)
    kwargs = {k: v for k, v in kwargs.items() if k != "aux_scales"}
    if layout == "bbox":
        if out.suffix != ".pth":
            raise ValueError(f"-o {out}: the authors' layout is a .pth file ({{'params': ...}})")
        atomic_save({"params": to_bbox(state, arch, kwargs.get("upscale", 4), kwargs.get("upsampler", ""))}, out)
        return out
    state = {k: v for k, v in state.items() if not k.startswith((AUX_PREFIX, LEGACY_AUX_PREFIX))}
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


def read_for_export(path: str | Path, preset_name: str | None = None) -> tuple[dict[str, torch.Tensor], str, dict]:
    """``(state, arch, kwargs)`` of any checkpoint :func:`smt.models.load_model` reads, the extra upsamplers of
    training kept: the architecture from ``preset_name``, our ``.safetensors`` metadata or the weights, and the
    tensors checked by a strict load into that architecture (a file that does not fit raises
    :class:`CheckpointError` naming the keys)."""
    from smt.models import load_weights
    from smt.models.detect import detect_architecture
    from smt.models.loading import read_metadata, read_state_dict

    state, _ = read_state_dict(path)
    meta = read_metadata(path)
    if meta.get("format", "").startswith("smt-bundle"):
        raise CheckpointError(f"{path}: a bundle of several models; export one model of the pipeline instead")
    if preset_name:
        arch, kwargs = preset(preset_name)
    elif "arch" in meta and "model_args" in meta:
        arch, kwargs = meta["arch"], json.loads(meta["model_args"])
    else:
        arch, kwargs = detect_architecture(state, str(path))
    kwargs = {k: v for k, v in kwargs.items() if k != "aux_scales"}
    aux = aux_scales_of(state)
    try:
        net = ARCHITECTURES[arch](**kwargs, **({"aux_scales": aux} if aux else {}))
    except ValueError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    load_weights(net, path, ignore_unexpected=(LEGACY_AUX_PREFIX,))
    legacy = {k: v for k, v in state.items() if k.startswith(LEGACY_AUX_PREFIX)}
    return {**{k: v.detach().contiguous() for k, v in net.state_dict().items()}, **legacy}, arch, kwargs


def _trained(train_cfg, name: str) -> tuple[torch.nn.Module, str, dict]:
    from smt.models import load_model

    net = load_model(_trained_path(train_cfg, name), train_cfg.models[name].preset, "cpu")
    arch, kwargs = preset(train_cfg.models[name].preset)
    return net, arch, kwargs


def _trained_path(train_cfg, name: str) -> Path:
    from smt.train.engine import exported_weights

    if name not in train_cfg.models:
        raise KeyError(f"export: {name!r} is not a model of the pipeline (train.models: "
                       f"{', '.join(train_cfg.models)}; or 'bundle')")
    round_, stage = train_cfg.schedule()[-1]
    return exported_weights(train_cfg, name, round_, stage)


def export_model(train_cfg, name: str, out: str | Path, layout: str = "official") -> Path:
    """Export model ``name`` of the pipeline (last round and stage) to ``out`` (.pth or .safetensors) in
    ``layout`` (``official`` or ``bbox``)."""
    if layout not in LAYOUTS:
        raise ValueError(f"--layout {layout!r}: not a layout (valid: {', '.join(LAYOUTS)})")
    state, arch, kwargs = read_for_export(_trained_path(train_cfg, name), train_cfg.models[name].preset)
    return write_weights(state, arch, kwargs, out, layout)


def export_checkpoint(path: str | Path, out: str | Path, layout: str = "official", preset_name: str | None = None,
                      expect_arch: str | None = None) -> Path:
    """Convert any checkpoint we can load (official, ours, the authors') to ``out`` in ``layout``;
    ``expect_arch`` (``hat``, ``mambairv2``): the family the file must hold."""
    if layout not in LAYOUTS:  # names before reading a large file
        raise ValueError(f"--layout {layout!r}: not a layout (valid: {', '.join(LAYOUTS)})")
    if expect_arch is not None and expect_arch not in ("hat", "mambairv2"):
        raise ValueError(f"export {expect_arch!r} --checkpoint: not a model family (valid: hat, mambairv2)")
    if preset_name:
        preset(preset_name)  # an unknown preset raises, listing the valid ones
    state, arch, kwargs = read_for_export(path, preset_name)
    if expect_arch is not None and arch.removesuffix("light") != expect_arch:
        raise CheckpointError(f"{path}: holds a {arch} model, not {expect_arch} (the NAME argument of export)")
    return write_weights(state, arch, kwargs, out, layout)


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
