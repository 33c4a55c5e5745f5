"""Reading and writing images for SR: every image enters the pipeline as uint8 ``HxWx3`` RGB, or is refused.

Conversions are explicit and lossless where possible: grayscale and palette images become RGB, 16-bit images
are rounded to 8 bits (``v / 257``), an alpha channel is dropped only when fully opaque. A transparent image,
an unreadable file or an image smaller than the scale factor raises :class:`ImageError` naming the file.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

__all__ = ["ImageError", "read_image", "to_rgb_uint8", "write_png", "sha256_file", "IMAGE_SUFFIXES"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


class ImageError(ValueError):
    """An image that cannot enter the pipeline, with the reason and the file."""


def to_rgb_uint8(arr: np.ndarray, name: str = "image") -> np.ndarray:
    """Convert an ``HxW``, ``HxWx1``, ``HxWx3`` or ``HxWx4`` uint8/uint16 array to uint8 RGB."""
    arr = np.asarray(arr)
    if arr.dtype == np.uint16:
        arr = np.round(arr.astype(np.float64) / 257.0).astype(np.uint8)
    elif arr.dtype == np.bool_:
        arr = arr.astype(np.uint8) * 255
    elif arr.dtype != np.uint8:
        raise ImageError(f"{name}: unsupported pixel type {arr.dtype} (expected 8- or 16-bit integers)")
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3:
        raise ImageError(f"{name}: expected a 2-D image, got an array of shape {arr.shape}")
    channels = arr.shape[2]
    if channels == 4 or channels == 2:
        alpha = arr[:, :, -1]
        if alpha.min() < 255:
            raise ImageError(f"{name}: has transparent pixels (alpha < 255); flatten it onto a background first")
        arr = arr[:, :, :-1]
        channels -= 1
    if channels == 1:
        arr = np.repeat(arr, 3, axis=2)
    elif channels != 3:
        raise ImageError(f"{name}: unsupported number of channels {channels}")
    return np.ascontiguousarray(arr)


def read_image(path: str | os.PathLike, min_side: int = 1) -> np.ndarray:
    """Read ``path`` as uint8 ``HxWx3`` RGB; refuse images whose shorter side is below ``min_side``."""
    path = Path(path)
    try:
        with Image.open(path) as img:
            img.load()
            mode = img.mode
            if mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.array(img)
                if arr.dtype != np.uint16:
                    if arr.min() < 0 or arr.max() > 65535:
                        raise ImageError(f"{path}: 32-bit integer pixels outside 0..65535")
                    arr = arr.astype(np.uint16)
            elif mode == "F":
                raise ImageError(f"{path}: floating-point images are not supported; save it as 8- or 16-bit")
            elif mode in ("L", "LA", "RGB", "RGBA"):
                arr = np.array(img)
            elif mode == "1":
                arr = np.array(img.convert("L"))
            else:  # P, PA, CMYK, YCbCr, LAB, HSV ...
                arr = np.array(img.convert("RGBA" if "transparency" in img.info or mode == "PA" else "RGB"))
    except FileNotFoundError:
        raise ImageError(f"{path}: no such file") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise ImageError(f"{path}: not a readable image ({exc})") from None
    rgb = to_rgb_uint8(arr, str(path))
    if min(rgb.shape[:2]) < min_side:
        raise ImageError(f"{path}: {rgb.shape[1]}x{rgb.shape[0]} is smaller than the required {min_side} px side")
    return rgb


def write_png(path: str | os.PathLike, img: np.ndarray) -> None:
    """Write a uint8 RGB image as PNG atomically (a temporary file renamed into place)."""
    path = Path(path)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"write_png expects uint8 HxWx3, got {img.dtype} {img.shape}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            Image.fromarray(img).save(fh, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
