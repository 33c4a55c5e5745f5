"""Exported method bundles as upscalers for other tools of this package (``python -m smt benchmark --bundle``).

A bundle (written by ``python -m smt export bundle``, read by :func:`smt.infer.upscale.method_from_bundle`) holds
both models, the fitted fusion weight and the infer settings; :func:`load_bundle` returns it as a function from a
uint8 LR image to its SR image on the [0, 255] scale (float64 holding the method's uint8 output), with ``.scale``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

__all__ = ["load_bundle"]


def load_bundle(path: str | Path, device: str = "cpu") -> Callable[[np.ndarray], np.ndarray]:
    from smt.infer.upscale import method_from_bundle

    method = method_from_bundle(path, device)

    def run(lr: np.ndarray) -> np.ndarray:
        return method(lr).astype(np.float64)

    run.scale = method.scale  # type: ignore[attr-defined]
    run.method = method  # type: ignore[attr-defined]
    return run
