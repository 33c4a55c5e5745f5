"""Reading and writing images for SR: every image enters the pipeline as uint8 ``HxWx3`` RGB, or is refused.

Conversions are explicit and lossless where possible: grayscale and palette images become RGB, 16-bit images
are rounded to 8 bits (``v / 257``), an alpha channel is dropped only when fully opaque. A transparent image,
an unreadable file or an image smaller than the scale factor raises :class:`ImageError` naming the file.

A user's own images (``upscale``) are read by :func:`read_as_given` instead, which keeps what the output must
keep (grey, 16-bit, alpha); see its docstring for the table of modes. :func:`pillow_suffixes` is the set of file
suffixes Pillow opens, the filter of ``upscale``'s folder scan.

This module is also the one home of the image <-> tensor conversion and of the float -> uint8 rule, used by
training validation, the infer stage, ``upscale``, the ablations and the bicubic degradation:
  - image -> tensor: uint8 ``HxWx3`` -> float32 ``(1, 3, H, W)`` in [0, 1] (``/ 255``; ``uint8_to_unit`` gives
    the same values as a NumPy array, for the bicubic degradation);
  - tensor -> image: clamp to [0, 1], scale by 255 in float32, then the rule below;
  - **the rule**: ``uint8 = clip(round_half_to_even(v), 0, 255)`` for ``v`` on the [0, 255] scale (NumPy's
    ``rint``/``round`` and ``torch.round`` both round half to even: 0.5 -> 0, 1.5 -> 2, 2.5 -> 2). It matches
    BasicSR's ``tensor2img`` (``(x * 255).round()``) and never truncates. A NaN is an error, not a black pixel.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, UnidentifiedImageError

from smt.files import atomic_path

__all__ = ["ImageError", "open_image", "read_image", "to_rgb_uint8", "modcrop", "write_png", "IMAGE_SUFFIXES",
           "image_to_tensor", "tensor_to_float255", "tensor_to_image", "float255_to_uint8", "unit_to_uint8",
           "uint8_to_unit", "UserImage", "read_as_given", "write_as_given", "pillow_suffixes"]

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


@contextmanager
def open_image(path: Path) -> Iterator[Image.Image]:
    """The PIL image of ``path``; a missing or unreadable file (also while it is decoded inside the block)
    raises :class:`ImageError` naming it."""
    try:
        with Image.open(path) as img:
            yield img
    except FileNotFoundError:
        raise ImageError(f"{path}: no such file") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise ImageError(f"{path}: not a readable image ({exc})") from None


_SIXTEEN_BIT_GREY = ("I;16", "I;16B", "I;16L", "I")


def _sixteen_bit(img: Image.Image, path: Path) -> np.ndarray:
    """A 16-bit grey image (Pillow's ``I;16*`` modes, or ``I`` holding 0..65535) as uint16 ``HxW``."""
    arr = np.array(img)
    if arr.dtype != np.uint16:
        if arr.min() < 0 or arr.max() > 65535:
            raise ImageError(f"{path}: 32-bit integer pixels outside 0..65535")
        arr = arr.astype(np.uint16)
    return arr


def read_image(path: str | os.PathLike, min_side: int = 1) -> np.ndarray:
    """Read ``path`` as uint8 ``HxWx3`` RGB; refuse images whose shorter side is below ``min_side``."""
    path = Path(path)
    with open_image(path) as img:
        img.load()
        mode = img.mode
        if mode in _SIXTEEN_BIT_GREY:
            arr = _sixteen_bit(img, path)
        elif mode == "F":
            raise ImageError(f"{path}: floating-point images are not supported; save it as 8- or 16-bit")
        elif mode in ("L", "LA", "RGB", "RGBA"):
            arr = np.array(img)
        elif mode == "1":
            arr = np.array(img.convert("L"))
        else:  # P, PA, CMYK, YCbCr, LAB, HSV ...
            arr = np.array(img.convert("RGBA" if "transparency" in img.info or mode == "PA" else "RGB"))
    rgb = to_rgb_uint8(arr, str(path))
    if min(rgb.shape[:2]) < min_side:
        raise ImageError(f"{path}: {rgb.shape[1]}x{rgb.shape[0]} is smaller than the required {min_side} px side")
    return rgb


@dataclass(frozen=True)
class UserImage:
    """A user's image as ``upscale`` reads it (:func:`read_as_given`): the colour image the model sees and what
    the output keeps of the input."""

    rgb: np.ndarray  # HxWx3: uint8, or uint16 for a 16-bit grey input (the grey channel repeated)
    alpha: np.ndarray | None  # uint8 HxW; None when the input has none or it is fully opaque
    grey: bool  # written back with one colour channel (L, LA or 16-bit grey)
    notes: tuple[str, ...] = ()  # what the user should know (first frame only, colour depth Pillow drops)

    @property
    def bits(self) -> int:
        return 16 if self.rgb.dtype == np.uint16 else 8

    def to_tensor(self, device=None):
        """float32 ``(1, 3, H, W)`` in [0, 1]: :func:`image_to_tensor` for 8 bits (``/ 255``), ``/ 65535`` for 16."""
        if self.bits == 8:
            return image_to_tensor(self.rgb, device)
        import torch

        x = torch.from_numpy(self.rgb.astype(np.float32) / np.float32(65535.0)).permute(2, 0, 1)[None]
        return x if device is None else x.to(device)


def pillow_suffixes() -> frozenset[str]:
    """Every file suffix (lower case, with its dot) of a format Pillow can open."""
    return frozenset(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)


def read_as_given(path: str | os.PathLike) -> UserImage:
    """Read a user's image keeping what its output must keep. The model always sees RGB; the output is:

    ==============================  =====================================  ==========================
    input (Pillow mode)             the model sees                         written as (PNG)
    ==============================  =====================================  ==========================
    RGB, CMYK, YCbCr, LAB, HSV      RGB, 8 bits                            RGB
    RGBA, PA, P with transparency   RGB, 8 bits; alpha upscaled bicubic    RGBA (RGB if fully opaque)
    P (palette)                     its colours as RGB                     RGB: not re-quantised to the
                                                                           palette (it would drop the
                                                                           new in-between tones)
    L, 1 (bilevel)                  grey repeated to RGB, 8 bits           L: the mean of the output's
                                                                           three channels
    LA                              as L; alpha upscaled bicubic           LA (L if fully opaque)
    I;16 / I (16-bit grey)          grey repeated, ``v / 65535`` in float  16-bit grey, the mean of the
                                    (full precision, no 8-bit rounding)    channels
    F (floating point)              refused (:class:`ImageError`)
    ==============================  =====================================  ==========================

    Pillow decodes 16-bit *colour* PNGs (and 16-bit grey with alpha) to 8 bits per channel; such images are
    processed and written as 8-bit RGB(A), with a note saying so. Of an animated or multi-page file (GIF,
    WebP, TIFF) the first frame is read, with a note."""
    path = Path(path)
    notes = []
    with open_image(path) as img:
        mode = img.mode
        # the decoder's raw mode, before load() clears the tile list (e.g. 'RGB;16B' for a 16-bit colour PNG)
        raw = " ".join(str(t.args) for t in (img.tile or []))
        frames = getattr(img, "n_frames", 1)
        img.load()
        if frames > 1:
            notes.append(f"{frames} frames: the first is upscaled")
        if mode not in _SIXTEEN_BIT_GREY and ";16" in raw:
            notes.append("16 bits per channel with colour or alpha: Pillow decodes 8 bits, written as 8-bit")
        alpha = None
        if mode in _SIXTEEN_BIT_GREY:
            grey, arr = True, _sixteen_bit(img, path)
        elif mode == "F":
            raise ImageError(f"{path}: floating-point images are not supported; save it as 8- or 16-bit")
        elif mode in ("L", "1"):
            grey, arr = True, np.array(img.convert("L"))
        elif mode in ("LA", "La"):
            grey, la = True, np.array(img.convert("LA"))
            arr, alpha = la[..., 0], la[..., 1]
        elif mode in ("RGBA", "RGBa", "PA") or (mode == "P" and "transparency" in img.info):
            grey, rgba = False, np.array(img.convert("RGBA"))
            arr, alpha = rgba[..., :3], rgba[..., 3]
        else:  # RGB, P, CMYK, YCbCr, LAB, HSV
            grey, arr = False, np.array(img.convert("RGB"))
    if alpha is not None and alpha.min() == 255:
        alpha = None  # an opaque alpha carries nothing: written without it, as before
    rgb = np.repeat(arr[:, :, None], 3, axis=2) if arr.ndim == 2 else arr
    return UserImage(np.ascontiguousarray(rgb), None if alpha is None else np.ascontiguousarray(alpha), grey,
                     tuple(notes))


def write_as_given(path: str | os.PathLike, sr_float255: np.ndarray, like: UserImage,
                   alpha: np.ndarray | None = None) -> None:
    """Write the model's float ``HxWx3`` output (on the [0, 255] scale, before rounding) as PNG in the form
    :func:`read_as_given` gave ``like``: grey as the mean of the three channels, 16 bits as
    ``rint(v * 257)`` (the [0, 255] scale onto [0, 65535]), 8 bits by the rule; ``alpha`` (uint8, the upscaled
    alpha) appended. Atomic, as :func:`write_png`."""
    values = np.asarray(sr_float255, dtype=np.float64)
    if values.ndim != 3 or values.shape[2] != 3:
        raise ValueError(f"write_as_given expects a float HxWx3 image, got {values.shape}")
    if like.grey:
        values = values.mean(axis=2)
    if like.bits == 16:
        if np.isnan(values).any():
            raise ValueError("write_as_given: the image has NaN values")
        pixels = np.clip(np.rint(values * 257.0), 0, 65535).astype(np.uint16)
        if alpha is not None:
            raise ValueError("write_as_given: 16-bit images with alpha are not supported")
        pil = Image.fromarray(pixels)  # uint16 HxW: Pillow's 16-bit grey, a 16-bit PNG
    else:
        pixels = float255_to_uint8(values)
        if alpha is not None:
            pixels = np.dstack([pixels, alpha])
        pil = Image.fromarray(pixels)  # uint8 HxW, HxWx2, HxWx3, HxWx4: L, LA, RGB, RGBA
    with atomic_path(Path(path)) as tmp:
        pil.save(tmp, format="PNG")


def modcrop(img: np.ndarray, scale: int, name: str = "image") -> np.ndarray:
    """Crop an image to a multiple of ``scale`` on both sides, keeping the top-left (MATLAB's ``modcrop``), so
    that ``HR = scale * LR`` exactly."""
    h, w = img.shape[:2]
    if min(h, w) < scale:
        raise ImageError(f"{name}: {w}x{h} is smaller than the scale factor {scale}")
    return np.ascontiguousarray(img[: h - h % scale, : w - w % scale])


def write_png(path: str | os.PathLike, img: np.ndarray) -> None:
    """Write a uint8 RGB image as PNG atomically (a temporary file renamed into place)."""
    path = Path(path)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"write_png expects uint8 HxWx3, got {img.dtype} {img.shape}")
    with atomic_path(path) as tmp:
        Image.fromarray(img).save(tmp, format="PNG")


def float255_to_uint8(values: np.ndarray) -> np.ndarray:
    """The float -> uint8 rule: values on the [0, 255] scale, rounded half to even, clipped to [0, 255]."""
    values = np.asarray(values)
    if np.isnan(values).any():
        raise ValueError("float255_to_uint8: the image has NaN values")
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def unit_to_uint8(values: np.ndarray) -> np.ndarray:
    """[0, 1] floats (NumPy) -> uint8: clip, scale by 255 in float32 (as the tensor path does), the rule."""
    scaled = np.clip(np.asarray(values, dtype=np.float32), 0, 1) * np.float32(255.0)
    return float255_to_uint8(scaled)


def uint8_to_unit(img: np.ndarray) -> np.ndarray:
    """uint8 image -> float32 array in [0, 1] (``/ 255``; the values :func:`image_to_tensor` gives)."""
    if img.dtype != np.uint8:
        raise TypeError(f"expected a uint8 image, got {img.dtype}")
    return img.astype(np.float32) / np.float32(255.0)


def image_to_tensor(img: np.ndarray, device=None):
    """uint8 ``HxWx3`` -> float32 ``(1, 3, H, W)`` in [0, 1] on ``device``."""
    import torch

    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"image_to_tensor expects uint8 HxWx3, got {img.dtype} {img.shape}")
    x = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)[None].float().div(255)
    return x if device is None else x.to(device)


def tensor_to_float255(x) -> np.ndarray:
    """``(3, H, W)`` or ``(1, 3, H, W)`` tensor in [0, 1] -> float64 ``HxWx3`` on the [0, 255] scale, before
    rounding (clamped, scaled by 255 in float32; float64 holds those values exactly). Fusion mixes these."""
    if x.dim() == 4:
        if x.shape[0] != 1:
            raise ValueError(f"tensor_to_float255 expects one image, got a batch of {x.shape[0]}")
        x = x[0]
    if x.dim() != 3 or x.shape[0] != 3:
        raise ValueError(f"tensor_to_float255 expects (3, H, W), got {tuple(x.shape)}")
    return (x.detach().float().clamp(0, 1) * 255.0).permute(1, 2, 0).cpu().double().numpy()


def tensor_to_image(x) -> np.ndarray:
    """``(3, H, W)`` or ``(1, 3, H, W)`` tensor in [0, 1] -> uint8 ``HxWx3`` by the rule."""
    return float255_to_uint8(tensor_to_float255(x))
