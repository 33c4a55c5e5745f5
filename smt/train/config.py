"""The ``train`` section of ``params.yaml`` as validated dataclasses (see :mod:`smt.config`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from smt.config import ConfigError

__all__ = ["AugmentSpec", "ModelSpec", "StageSpec", "TrainConfig"]


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
    nnodes: int = 1  # machines; > 1 needs MASTER_ADDR/MASTER_PORT/NODE_RANK set on each (README runbook)
    num_workers: int = 0
    threads: int = 0  # torch intra-op threads per process (0 = torch's default)
    betas: tuple[float, float] = (0.9, 0.99)
    ema_decay: float = 0.999
    ema_warmup: bool = False  # ramp the EMA decay up from 0.1 (short runs); off = BasicSR's constant decay
    grad_clip: float = 0.0  # max gradient norm; 0 = off
    bf16: bool = True  # autocast on CUDA only
    aux_scales: tuple[int, ...] = (2, 3)
    aux_weights: tuple[float, ...] = (0.5, 0.5)
    augment: AugmentSpec = field(default_factory=AugmentSpec)
    log_every: int = 10
    val_every: int = 100
    ckpt_every: int = 100
    val_max_side: int = 0  # LR side cap for validation images (centre crop); 0 = whole images
    out_root: str = "models"
    stage_order: tuple[str, ...] = field(default=("s1", "s2", "s3"))

    def __post_init__(self) -> None:
        if len(self.aux_scales) != len(self.aux_weights):
            raise ConfigError(f"train.aux_weights: needs one weight per aux scale {list(self.aux_scales)}")
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

    def schedule(self) -> list[tuple[int, str]]:
        """(round, stage) in training order."""
        return [(r, s) for r in range(1, self.rounds + 1) for s in self.stage_order]

    def run_name(self, round_: int, stage: str) -> str:
        return f"r{round_}_{stage}"

    def previous(self, round_: int, stage: str) -> tuple[int, str] | None:
        order = self.schedule()
        i = order.index((round_, stage))
        return order[i - 1] if i else None
