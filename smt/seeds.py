"""Every seed the method derives from a configured one (``train.seed``, ``infer.seed``), in one place.

Each function keeps the streams it feeds apart: different rounds, processes, sampler steps and images get
different seeds, and the same inputs always get the same seed (reruns are bit-identical). The multipliers are
odd constants (primes) larger than any count they are multiplied past, so two different inputs never collide in
practice; they are part of the results (changing one changes every trained model or every Gumbel routing).
"""
from __future__ import annotations

__all__ = ["model_init_seed", "sampler_seed", "sampler_step_seed", "image_seed", "step_noise_seed"]


def model_init_seed(seed: int, round_: int, rank: int) -> int:
    """The global generator before a training stage builds its model: one stream per round (a new round's
    fresh heads start differently) and per process (``+ rank``; DDP then broadcasts rank 0's weights)."""
    return seed + 1000 * round_ + rank  # 1000: more ranks than any run has, so rounds never overlap


def sampler_seed(seed: int, round_: int) -> int:
    """The patch sampler of a training stage: which images, corners and augmentations each step draws; the same
    on every rank (each takes its slice of the global batch), a new draw every round."""
    return seed + 7919 * round_  # 7919 (a prime): apart from the model-init seeds of the same round


def sampler_step_seed(sampler: int, step: int) -> int:
    """The sampler's own generator at ``step``: a function of the step alone, so a resumed run draws exactly
    the batches the uninterrupted run would have drawn."""
    return sampler * 1_000_003 + step  # 1_000_003 (a prime): more steps than any stage has


def image_seed(seed: int, image_id: int) -> int:
    """The Gumbel routing of one image at inference (irrelevant with argmax routing): independent of which
    images share a process or a batch."""
    return seed * 100_003 + int(image_id)  # 100_003 (a prime): more images than any split has


def step_noise_seed(seed: int, round_: int, stage_index: int, step: int) -> int:
    """The global CPU generator before each micro-batch of training step ``step`` (0-based) of the stage at
    ``stage_index`` in the schedule: the call keys of the per-sample noise (DropPath, Gumbel routing;
    :mod:`smt.models.sample_noise`), the same on every process and for every micro-batch of the step."""
    return (((seed * 7919 + round_) * 101 + stage_index) * 1_000_003 + step + 1) % (1 << 63)  # primes, as above
