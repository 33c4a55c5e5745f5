"""``params.yaml`` -> frozen, validated dataclasses, one per pipeline stage.

``params.yaml`` is the only home of hyperparameters. Each stage reads its section with :func:`load_section`;
an unknown key, a missing required key or a value of the wrong type raises :class:`ConfigError` naming the
key (``data.scale: expected int, got str 'four'``). Sections are registered in the plain dict ``SECTIONS``.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

__all__ = ["ConfigError", "DataConfig", "ReportConfig", "SECTIONS", "load_params", "load_section", "parse_section"]


class ConfigError(ValueError):
    """A ``params.yaml`` problem, naming the offending key."""


@dataclass(frozen=True)
class DataConfig:
    """The ``data`` stage: build the image sets and their bicubic LR counterparts."""

    source: Literal["demo"] = "demo"
    root: str = "data/demo"
    scale: int = 4
    max_side: int = 512  # HR images are centre-cropped to at most this side (0 = keep whole)
    train_images: tuple[str, ...] = ()
    valid_images: tuple[str, ...] = ()
    test_images: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.scale not in (2, 3, 4):
            raise ConfigError(f"data.scale: must be 2, 3 or 4, got {self.scale}")
        if self.max_side < 0:
            raise ConfigError(f"data.max_side: must be >= 0, got {self.max_side}")
        if not self.train_images or not self.valid_images:
            raise ConfigError("data.train_images and data.valid_images: each needs at least one image")
        seen: dict[str, str] = {}
        for split in ("train_images", "valid_images", "test_images"):
            for name in getattr(self, split):
                if name in seen:
                    raise ConfigError(f"data.{split}: image {name!r} is already in data.{seen[name]}")
                seen[name] = split


@dataclass(frozen=True)
class ReportConfig:
    """The ``report`` stage: score every method on the validation images and write the reports."""

    protocol: Literal["NTIRE2025", "BasicSR"] = "NTIRE2025"
    crop_size: int = 96  # side (HR pixels) of the zoomed crops in the visual comparison
    num_crops: int = 3

    def __post_init__(self) -> None:
        if self.crop_size < 8:
            raise ConfigError(f"report.crop_size: must be >= 8, got {self.crop_size}")
        if self.num_crops < 1:
            raise ConfigError(f"report.num_crops: must be >= 1, got {self.num_crops}")


SECTIONS: dict[str, type] = {"data": DataConfig, "report": ReportConfig}


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; lists become tuples; ints are accepted for floats."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: must be one of {list(args)}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in args:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} matches none of {args}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise ConfigError(f"{key}: expected {len(args)} items, got {len(value)}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(args, value)))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        kt, vt = args
        return {_coerce(k, kt, f"{key}.<key>"): _coerce(v, vt, f"{key}.{k}") for k, v in value.items()}
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected float, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected int, got {type(value).__name__} {value!r}")
        return value
    if tp in (str, bool):
        if not isinstance(value, tp):
            raise ConfigError(f"{key}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return parse_section(tp, value, key)
    raise TypeError(f"{key}: unsupported annotation {_type_name(tp)}")


def parse_section(cls: type, raw: Any, name: str) -> Any:
    """Build the frozen dataclass ``cls`` from a mapping, validating every key."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{name}: expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(f"{name}.{unknown[0]}: unknown key (valid keys: {', '.join(sorted(fields))})")
    kwargs = {}
    for key, f in fields.items():
        if key in raw:
            kwargs[key] = _coerce(raw[key], hints[key], f"{name}.{key}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{name}.{key}: required key is missing")
    return cls(**kwargs)


def load_params(path: str | Path = "params.yaml") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found")
    with open(path) as fh:
        try:
            raw = yaml.safe_load(fh)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return raw


def load_section(name: str, path: str | Path = "params.yaml") -> Any:
    """Read section ``name`` of ``path`` into its validated dataclass."""
    if name not in SECTIONS:
        raise ConfigError(f"unknown section {name!r} (valid sections: {', '.join(sorted(SECTIONS))})")
    raw = load_params(path)
    if name not in raw:
        raise ConfigError(f"{path}: section {name!r} is missing")
    return parse_section(SECTIONS[name], raw[name], name)


def as_dict(cfg: Any) -> dict[str, Any]:
    """A plain dict of a config dataclass (for reports and checkpoints)."""
    return dataclasses.asdict(cfg)

