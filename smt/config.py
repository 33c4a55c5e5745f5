"""``params.yaml`` -> frozen, validated dataclasses, one per pipeline stage.

``params.yaml`` is the only home of hyperparameters. Each stage reads its section with :func:`load_section`;
an unknown key, a missing required key or a value of the wrong type raises :class:`ConfigError` naming the
key (``data.scale: expected int, got str 'four'``). Sections are listed in the plain dict of :func:`_sections`.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

__all__ = ["ConfigError", "DataConfig", "SelectConfig", "TrainConfig", "ModelSpec", "StageSpec", "AugmentSpec",
           "MicroBatch", "InferConfig", "ReportConfig", "BenchmarkConfig", "AblationConfig", "LossVariant",
           "load_params", "load_section", "parse_section", "as_dict"]


class ConfigError(ValueError):
    """A ``params.yaml`` problem, naming the offending key."""


@dataclass(frozen=True)
class DataConfig:
    """The ``data`` stage: build the image sets and their bicubic LR counterparts.

    ``source: demo`` uses the embedded scikit-image photographs named in ``*_images``; ``source: sources`` uses
    the downloadable data sets named in ``*_sources`` (see ``smt/data/sources.json``)."""

    source: Literal["demo", "sources"] = "demo"
    root: str = "data/demo"
    scale: int = 4
    max_side: int = 512  # HR images are centre-cropped to at most this side (0 = keep whole)
    train_images: tuple[str, ...] = ()
    valid_images: tuple[str, ...] = ()
    test_images: tuple[str, ...] = ()
    train_sources: tuple[str, ...] = ()
    valid_sources: tuple[str, ...] = ()
    test_sources: tuple[str, ...] = ()
    folders: dict[str, str] = dataclasses.field(default_factory=dict)  # source -> a local copy (no download)
    downloads: str = "~/.cache/smt/downloads"  # archives (resumable .part files live here too, not in data/)
    raw: str = "data/raw"  # extracted archives, one folder per archive
    lock: str = "data/sources.lock.json"  # SHA-256 pinned at first download; commit it
    subimage_size: int = 0  # HR training images cut once into tiles of this side (0 = keep whole)
    subimage_step: int = 0
    store: str = ""  # the prepare stage's uncompressed copy of the training images, read by memory map ("" = none)

    def __post_init__(self) -> None:
        if self.scale not in (2, 3, 4):
            raise ConfigError(f"data.scale: must be 2, 3 or 4, got {self.scale}")
        if self.max_side < 0:
            raise ConfigError(f"data.max_side: must be >= 0, got {self.max_side}")
        if self.source == "demo":
            if not self.train_images or not self.valid_images:
                raise ConfigError("data.train_images and data.valid_images: each needs at least one image")
        elif not self.train_sources or not self.valid_sources:
            raise ConfigError("data.train_sources and data.valid_sources: each needs at least one source")
        if self.subimage_size and not 0 < self.subimage_step <= self.subimage_size:
            raise ConfigError("data.subimage_step: must be in (0, data.subimage_size] when sub-images are on")
        if self.subimage_size % self.scale or self.subimage_step % self.scale:
            raise ConfigError(f"data.subimage_size and data.subimage_step: must be multiples of {self.scale}")
        for kind in ("images", "sources"):
            seen: dict[str, str] = {}
            for split in (f"train_{kind}", f"valid_{kind}", f"test_{kind}"):
                for name in getattr(self, split):
                    if name in seen:
                        raise ConfigError(f"data.{split}: {name!r} is already in data.{seen[name]}")
                    seen[name] = split


@dataclass(frozen=True)
class ReportConfig:
    """The ``report`` stage: score every method on the validation and test images and write the reports."""

    protocol: Literal["NTIRE2025", "BasicSR"] = "NTIRE2025"
    crop_size: int = 96  # side (HR pixels) of the zoomed crops in the visual comparison
    num_crops: int = 3

    def __post_init__(self) -> None:
        if self.crop_size < 8:
            raise ConfigError(f"report.crop_size: must be >= 8, got {self.crop_size}")
        if self.num_crops < 1:
            raise ConfigError(f"report.num_crops: must be >= 1, got {self.num_crops}")


@dataclass(frozen=True)
class SelectConfig:
    """The ``select`` stage: CLIP ranking of the training pool (see :mod:`smt.select.clip_select`)."""

    model: str = "ViT-B-32"  # an open_clip architecture, or "smt-tiny-vit" (ours, for the demo)
    pretrained: str = ""  # an open_clip tag (needs a download) or a local checkpoint path; "" = none
    allow_untrained: bool = False  # without usable weights: stop (False) or use untrained features (True)
    top_k: int = 2000
    dedup_threshold: float = 0.95  # cosine above which a candidate is a near-duplicate of a pick; 1.0 = off
    per_source_cap: int = 0  # most picks per source; 0 = no cap
    crops: int = 2  # views per image: the whole image plus a crops x crops grid
    pool_split: str = "train"
    target_splits: tuple[str, ...] = ("valid", "test")
    cache_dir: str = "data/clip_cache"
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"  # where CLIP embeds (execution only: auto = a GPU if any)

    def __post_init__(self) -> None:
        if self.top_k < 1:
            raise ConfigError(f"select.top_k: must be >= 1, got {self.top_k}")
        if not -1.0 <= self.dedup_threshold <= 1.0:
            raise ConfigError(f"select.dedup_threshold: must be a cosine in [-1, 1], got {self.dedup_threshold}")
        if self.crops < 1 or self.per_source_cap < 0:
            raise ConfigError("select.crops must be >= 1 and select.per_source_cap >= 0")
        if not self.target_splits:
            raise ConfigError("select.target_splits: at least one split is needed")


@dataclass(frozen=True)
class InferConfig:
    """The ``infer`` stage: ensembles of the final trained models on the validation and test images."""

    models: tuple[str, ...] = ("hat", "mambairv2")  # names in train.models; their last (round, stage) is used
    device: Literal["auto", "cpu", "cuda"] = "auto"
    self_ensemble: bool = True
    tile: int = 0  # LR tile for single-window inference (0 = whole image)
    tile_overlap: int = 8  # LR pixels
    tile_batch: int = 4
    multi_window_model: str = "mambairv2"  # the model run at several tile sizes ("" = none)
    window_tiles: tuple[int, ...] = (100, 200, 300, 400, 500)
    window_weights: tuple[float, ...] = (1.0, 1.0, 1.2, 0.8, 0.8)
    routing: Literal["gumbel", "argmax"] = "argmax"  # MambaIRv2 prompt routing at inference
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16 autocast: fast on GPUs / CPUs with native bf16
    seed: int = 0  # seeds the Gumbel noise when routing is "gumbel"
    # whose inference protocol makes the method's outputs: "smt" (ours) or "bbox" (the authors' code, exactly:
    # smt.infer.bbox_protocol, docs/bbox_protocol.md)
    protocol: Literal["smt", "bbox"] = "smt"
    # also run the other protocol's fused method on the test split: PSNR-Y side by side in results/protocols.json
    # (seconds per image in the timings file only); smt.infer.protocols
    compare_protocols: bool = False
    fusion_grid: int = 101
    nproc: int = 1  # processes per node; > 1 shards the images across processes under torchrun
    nnodes: int = 1

    def __post_init__(self) -> None:
        if self.nproc < 1 or self.nnodes < 1:
            raise ConfigError(f"infer.nproc and infer.nnodes: must be >= 1, got {self.nproc}, {self.nnodes}")
        if len(self.window_tiles) != len(self.window_weights):
            raise ConfigError("infer.window_weights: needs one weight per entry of infer.window_tiles")
        if any(t < 1 for t in self.window_tiles):
            raise ConfigError(f"infer.window_tiles: must be positive, got {list(self.window_tiles)}")
        if self.multi_window_model and self.multi_window_model not in self.models:
            raise ConfigError(f"infer.multi_window_model: {self.multi_window_model!r} is not in infer.models")
        if self.tile_overlap < 0 or self.tile_batch < 1 or self.fusion_grid < 2:
            raise ConfigError("infer.tile_overlap >= 0, infer.tile_batch >= 1 and infer.fusion_grid >= 2 needed")
        if (self.protocol == "bbox" or self.compare_protocols) and (self.nproc > 1 or self.nnodes > 1):
            raise ConfigError("infer.protocol bbox and infer.compare_protocols run in one process (their Gumbel "
                              "stream runs across the images in order): set infer.nproc and infer.nnodes to 1")


BENCHMARK_SETS = ("Set5", "Set14", "B100", "Urban100", "Manga109", "DIV2K_valid")  # names in sources.json


@dataclass(frozen=True)
class BenchmarkConfig:
    """The optional ``benchmark`` section (the ntire2025 profile's ``benchmark`` stage, :mod:`smt.benchmark`): the
    final models and the fused method on the SR literature's test sets. Not in :func:`_sections`: a params file
    without it (the demo profile) has no benchmark stage."""

    sets: tuple[str, ...] = ("Set5", "Set14", "B100", "Urban100")
    root: str = "data/benchmark"  # ROOT/<Set>/HR; missing sets are downloaded here
    downloads: str = "~/.cache/smt/downloads"  # verified archives (and resumable .part files)
    lock: str = "data/sources.lock.json"  # SHA-256 pinned at first download; commit it

    def __post_init__(self) -> None:
        if not self.sets:
            raise ConfigError("benchmark.sets: at least one set is needed")
        unknown = [s for s in self.sets if s not in BENCHMARK_SETS]
        if unknown:
            raise ConfigError(f"benchmark.sets: unknown set {unknown[0]!r} (known: {', '.join(BENCHMARK_SETS)})")


# ------------------------------------------------------------------------------------------------ train

# per-process micro-batch: a count, "auto" (from measured memory on CUDA; the whole per-process batch on CPU) or
# 0 (the whole per-process batch: no accumulation)
MicroBatch = Union[int, Literal["auto"]]


@dataclass(frozen=True)
class ModelSpec:
    preset: str
    pretrained: str = ""  # path of a checkpoint to start stage 1 of round 1 from ("" = from scratch)


@dataclass(frozen=True)
class StageSpec:
    patch_size: int  # LR side of a training patch
    batch_size: int  # global batch (split across processes)
    loss: Literal["l1", "mse"]
    lr: float
    iters: int
    milestones: tuple[int, ...] = ()  # multi-step decay points (iterations within the stage)
    gamma: float = 0.5
    subset: str = ""  # a selection manifest (CSV with an 'id' column) to train on; "" = all training images

    def __post_init__(self) -> None:
        for key in ("patch_size", "batch_size", "iters"):
            if getattr(self, key) < 1:
                raise ConfigError(f"train stage {key}: must be >= 1, got {getattr(self, key)}")
        if self.lr <= 0:
            raise ConfigError(f"train stage lr: must be > 0, got {self.lr}")
        if list(self.milestones) != sorted(self.milestones):
            raise ConfigError(f"train stage milestones: must be increasing, got {list(self.milestones)}")


@dataclass(frozen=True)
class AugmentSpec:
    """Random transforms of each training patch, drawn per step by the sampler (:mod:`smt.train.data`).

    ``dihedral`` is the paper's recipe. The colour transforms keep every pair exactly consistent with the
    bicubic degradation (:mod:`smt.data.augment`); they are a demo measure, off in the ntire2025 profile."""

    dihedral: bool = True  # flips and transposes: all 8 rotations/reflections
    channel_permute: bool = False  # a random order of R, G, B (exact on the stored pair)
    color_prob: float = 0.0  # probability of a random colour matrix (the LR is re-made from the new HR)
    hue_degrees: float = 180.0  # hue rotation drawn uniformly in [-hue_degrees, hue_degrees]
    saturation: tuple[float, float] = (1.0, 1.0)  # saturation scale drawn uniformly in [low, high]

    def __post_init__(self) -> None:
        if not 0.0 <= self.color_prob <= 1.0:
            raise ConfigError(f"train.augment.color_prob: must be in [0, 1], got {self.color_prob}")
        if not 0.0 <= self.hue_degrees <= 180.0:
            raise ConfigError(f"train.augment.hue_degrees: must be in [0, 180], got {self.hue_degrees}")
        low, high = self.saturation
        if not 0.0 <= low <= high:
            raise ConfigError(f"train.augment.saturation: needs 0 <= low <= high, got {list(self.saturation)}")


@dataclass(frozen=True)
class TrainConfig:
    models: dict[str, ModelSpec]
    stages: dict[str, StageSpec]
    rounds: int = 1
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    nproc: int = 1  # processes per node; > 1 launches the stage under torchrun
    nnodes: int = 1  # machines; > 1: launched from the one `dvc repro` with srun (docs/cluster.md)
    num_workers: int = 0
    threads: int = 0  # torch intra-op threads per process (0 = torch's default)
    betas: tuple[float, float] = (0.9, 0.99)
    ema_decay: float = 0.999
    ema_warmup: bool = False  # ramp the EMA decay up from 0.1 (short runs); off = BasicSR's constant decay
    grad_clip: float = 0.0  # max gradient norm; 0 = off
    bf16: bool = True  # autocast on CUDA only
    aux_scales: tuple[int, ...] = (2, 3)
    aux_weights: tuple[float, ...] = (0.5, 0.5)
    # HR -> the extra scales' targets: 'bicubic' (the authors' F.interpolate, no antialiasing) or 'matlab'
    aux_target_resize: str = "bicubic"
    augment: AugmentSpec = field(default_factory=AugmentSpec)
    log_every: int = 10
    val_every: int = 100
    ckpt_every: int = 100
    val_max_side: int = 0  # LR side cap for validation images (centre crop); 0 = whole images
    out_root: str = "models"
    stage_order: tuple[str, ...] = field(default=("s1", "s2", "s3"))
    # gradient accumulation: the per-process micro-batch, for every stage or per stage name ({s1: 8, s2: auto});
    # stages not named use 0 = the whole per-process batch. Execution only: the global batch stays batch_size.
    micro_batch: Union[MicroBatch, dict[str, MicroBatch]] = 0
    activation_checkpointing: bool = False  # recompute each residual group in the backward (memory for time)

    def __post_init__(self) -> None:
        if len(self.aux_scales) != len(self.aux_weights):
            raise ConfigError(f"train.aux_weights: needs one weight per aux scale {list(self.aux_scales)}")
        if self.aux_target_resize not in ("bicubic", "matlab"):
            raise ConfigError(f"train.aux_target_resize: got {self.aux_target_resize!r}; valid: bicubic (the "
                              "authors'), matlab")
        if not self.models:
            raise ConfigError("train.models: at least one model is needed")
        for name in self.stage_order:
            if name not in self.stages:
                raise ConfigError(f"train.stage_order: stage {name!r} is not defined in train.stages")
        if self.rounds < 1:
            raise ConfigError(f"train.rounds: must be >= 1, got {self.rounds}")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"train.ema_decay: must be in [0, 1), got {self.ema_decay}")
        if self.nproc < 1 or self.nnodes < 1:
            raise ConfigError(f"train.nproc and train.nnodes: must be >= 1, got {self.nproc}, {self.nnodes}")
        if self.log_every < 1:
            raise ConfigError(f"train.log_every: must be >= 1, got {self.log_every}")
        for key in ("val_every", "ckpt_every"):
            if getattr(self, key) < 0:
                raise ConfigError(f"train.{key}: must be >= 0 (0 = off), got {getattr(self, key)}")
        per_stage = self.micro_batch if isinstance(self.micro_batch, dict) else {}
        unknown = sorted(set(per_stage) - set(self.stages))
        if unknown:
            raise ConfigError(f"train.micro_batch: stage {unknown[0]!r} is not defined in train.stages "
                              f"(defined: {', '.join(self.stages)})")
        for name in self.stages:
            value = self.micro_batch_setting(name)
            if value != "auto" and value < 0:
                raise ConfigError(f"train.micro_batch{'.' + name if per_stage else ''}: must be >= 0 "
                                  f"(0 = the whole per-process batch) or 'auto', got {value}")

    def micro_batch_setting(self, stage: str) -> int | str:
        """This stage's ``micro_batch`` value as configured: a count, ``"auto"`` or 0 (whole per-process batch)."""
        if isinstance(self.micro_batch, dict):
            return self.micro_batch.get(stage, 0)
        return self.micro_batch

    def per_process_batch(self, stage: str, world: int) -> int:
        """The stage's global batch split over ``world`` processes (it must divide)."""
        batch = self.stages[stage].batch_size
        if batch % world:
            raise ConfigError(f"train.stages.{stage}.batch_size: the global batch {batch} is not divisible by "
                              f"{world} processes; choose a process count that divides it")
        return batch // world

    def accumulation(self, stage: str, world: int, micro_batch: int) -> int:
        """Micro-batches per optimizer step for a resolved per-process ``micro_batch`` (0 = the whole batch)."""
        per_process = self.per_process_batch(stage, world)
        if micro_batch == 0:
            return 1
        if micro_batch > per_process or per_process % micro_batch:
            raise ConfigError(f"train.micro_batch: {micro_batch} must divide the per-process batch {per_process} "
                              f"of stage {stage} (global batch {self.stages[stage].batch_size} over {world} "
                              f"processes)")
        return per_process // micro_batch

    def check_run(self, model_name: str, round_: int, stage: str) -> None:
        """Refuse a (model, round, stage) the config does not define, naming the value and the valid ones."""
        if model_name not in self.models:
            raise ConfigError(f"train: unknown model {model_name!r} (train.models: {', '.join(self.models)})")
        if stage not in self.stage_order:
            raise ConfigError(f"train: unknown stage {stage!r} (train.stage_order: {', '.join(self.stage_order)})")
        if not 1 <= round_ <= self.rounds:
            rounds = ", ".join(map(str, range(1, self.rounds + 1)))
            raise ConfigError(f"train: no round {round_} (train.rounds is {self.rounds}: rounds {rounds})")

    def schedule(self) -> list[tuple[int, str]]:
        """(round, stage) in training order."""
        return [(r, s) for r in range(1, self.rounds + 1) for s in self.stage_order]

    def run_name(self, round_: int, stage: str) -> str:
        return f"r{round_}_{stage}"

    def previous(self, round_: int, stage: str) -> tuple[int, str] | None:
        order = self.schedule()
        i = order.index((round_, stage))
        return order[i - 1] if i else None


# -------------------------------------------------------------------------------------------- ablations
# (read by the notebooks in ``notebooks/ablations/``)

@dataclass(frozen=True)
class LossVariant:
    aux_scales: tuple[int, ...] = ()
    aux_weights: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if len(self.aux_scales) != len(self.aux_weights):
            raise ConfigError("ablations.loss_variants: aux_weights needs one weight per aux scale")


@dataclass(frozen=True)
class AblationConfig:
    model: str = "hat"  # the train.models entry the training ablations train
    seeds: tuple[int, ...] = (0, 1, 2)
    # 1. multi-scale loss: stage `loss_stage` from scratch for `loss_iters` steps, once per variant and seed
    loss_stage: str = "s1"
    loss_iters: int = 300
    loss_variants: dict[str, LossVariant] = field(default_factory=lambda: {
        "x4_only": LossVariant(), "paper": LossVariant((2, 3), (0.5, 0.5))})
    loss_reference: str = "x4_only"  # the variant the others are compared with
    # 2. CLIP-selected vs random images for `subset_stage` (started from the model the pipeline fed it)
    subset_stage: str = "s3"
    subset_iters: int = 0  # 0 = the stage's own iters
    # 3./4. inference: every ensemble switch alone and together; the fusion weight curve
    out_root: str = "models/ablations"

    def __post_init__(self) -> None:
        if len(self.seeds) < 1 or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"ablations.seeds: distinct seeds needed, got {list(self.seeds)}")
        if self.loss_reference not in self.loss_variants:
            raise ConfigError(f"ablations.loss_reference: {self.loss_reference!r} is not in ablations.loss_variants")
        if self.loss_iters < 1 or self.subset_iters < 0:
            raise ConfigError("ablations.loss_iters >= 1 and ablations.subset_iters >= 0 needed")


def _sections() -> dict[str, type]:
    return {"data": DataConfig, "select": SelectConfig, "train": TrainConfig, "infer": InferConfig,
            "report": ReportConfig, "ablations": AblationConfig}




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
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
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
    sections = _sections()
    if name not in sections:
        raise ConfigError(f"unknown section {name!r} (valid sections: {', '.join(sorted(sections))})")
    raw = load_params(path)
    if name not in raw:
        raise ConfigError(f"{path}: section {name!r} is missing")
    return parse_section(sections[name], raw[name], name)


def as_dict(cfg: Any) -> dict[str, Any]:
    """A plain dict of a config dataclass (for reports and checkpoints)."""
    return dataclasses.asdict(cfg)

