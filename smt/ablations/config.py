"""The ``ablations`` section of params.yaml (read by the notebooks in ``notebooks/ablations/``)."""
from __future__ import annotations

from dataclasses import dataclass, field

from smt.config import ConfigError

__all__ = ["AblationConfig", "LossVariant"]


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
