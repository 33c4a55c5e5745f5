"""The embedded demo image set: real photographs that ship inside installed packages and load offline.

Every name maps to a loader of ``skimage.data`` or of matplotlib's sample data (``grace_hopper``); grayscale
photographs go through the same conversion as any user image (:func:`smt.data.images.to_rgb_uint8`).
``retina``, ``hubble_deep_field`` and the two ``stereo_motorcycle`` views are larger than the others and are
centre-cropped by ``data.max_side``.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from smt.data.images import to_rgb_uint8

__all__ = ["DEMO_IMAGES", "load_demo_image"]


def _skimage(name: str, index: int | None = None) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        import skimage.data

        img = getattr(skimage.data, name)()
        return img[index] if index is not None else img

    return load


def _matplotlib(filename: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        import matplotlib.cbook
        from PIL import Image

        with matplotlib.cbook.get_sample_data(filename) as fh, Image.open(fh) as img:
            return np.asarray(img.convert("RGB"))

    return load


DEMO_IMAGES: dict[str, Callable[[], np.ndarray]] = {
    "astronaut": _skimage("astronaut"),
    "chelsea": _skimage("chelsea"),
    "coffee": _skimage("coffee"),
    "rocket": _skimage("rocket"),
    "hubble_deep_field": _skimage("hubble_deep_field"),
    "immunohistochemistry": _skimage("immunohistochemistry"),
    "retina": _skimage("retina"),
    "motorcycle_left": _skimage("stereo_motorcycle", 0),
    "motorcycle_right": _skimage("stereo_motorcycle", 1),
    "camera": _skimage("camera"),  # grayscale, converted to RGB
    "brick": _skimage("brick"),  # grayscale texture
    "gravel": _skimage("gravel"),  # grayscale texture
    "coins": _skimage("coins"),  # grayscale
    "grass": _skimage("grass"),  # grayscale texture
    "moon": _skimage("moon"),  # grayscale
    "grace_hopper": _matplotlib("grace_hopper.jpg"),
}


def load_demo_image(name: str) -> np.ndarray:
    """Load demo image ``name`` as uint8 RGB."""
    if name not in DEMO_IMAGES:
        raise KeyError(f"unknown demo image {name!r} (valid names: {', '.join(sorted(DEMO_IMAGES))})")
    return to_rgb_uint8(DEMO_IMAGES[name](), name)
