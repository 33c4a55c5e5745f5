"""Image-quality metrics under a named evaluation protocol (the NTIRE 2025 SR challenge's, by default).

The challenge protocol (``NTIRE2025``), as in the challenge's ``eval.py``/``utils_image.py`` and BasicSR:
both uint8 images are cropped to a multiple of the scale ("modcrop"), ``crop_border`` pixels are shaved from
each side, the Y channel of BT.601 YCbCr (studio range 16-235, float, not rounded) is computed from RGB, and
PSNR and SSIM (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5, K1=0.01, K2=0.03, valid region only) are
computed on it in float64. ``BASICSR`` is the same without the modcrop (what BasicSR's validation reports).
RGB PSNR/SSIM are the mean over the three channels' values (SSIM) or the MSE over all channels (PSNR).
The colour shift is the largest over R, G and B of ``|mean(SR - HR)|`` in grey levels, on the same region: a
global tint that PSNR-Y alone hides.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["Protocol", "NTIRE2025", "BASICSR", "rgb_to_y", "psnr", "ssim", "evaluate_pair", "prepare_pair",
           "color_shift"]


@dataclass(frozen=True)
class Protocol:
    """How a pair of uint8 images is prepared before scoring."""

    name: str
    modcrop: int  # crop both images to a multiple of this (1 = no modcrop)
    crop_border: int  # pixels shaved from every side

    def describe(self) -> str:
        mc = f"modcrop {self.modcrop}, " if self.modcrop > 1 else ""
        return (f"{self.name}: uint8 outputs, {mc}shave {self.crop_border} px per side; "
                "PSNR/SSIM on the BT.601 Y channel (16-235, float); SSIM 11x11 Gaussian window, sigma 1.5")


NTIRE2025 = Protocol(name="NTIRE2025", modcrop=4, crop_border=4)
BASICSR = Protocol(name="BasicSR", modcrop=1, crop_border=4)

# BT.601 luma for RGB in [0, 255] -> Y in [16, 235]
_Y_WEIGHTS = np.array([65.481, 128.553, 24.966], dtype=np.float64) / 255.0


def rgb_to_y(img: np.ndarray) -> np.ndarray:
    """``HxWx3`` RGB in [0, 255] -> ``HxW`` float64 Y in [16, 235] (BT.601, not rounded)."""
    arr = np.asarray(img, dtype=np.float64)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 RGB image, got shape {arr.shape}")
    return arr @ _Y_WEIGHTS + 16.0


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2
    g = np.exp(-(x * x) / (2 * sigma * sigma))
    return g / g.sum()


def _filter_valid(img: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Separable correlation with ``outer(g, g)``, keeping only the fully covered ('valid') region."""
    k = g.size
    win = np.lib.stride_tricks.sliding_window_view(img, k, axis=0)  # (H-k+1, W, k)
    rows = win @ g
    win = np.lib.stride_tricks.sliding_window_view(rows, k, axis=1)  # (H-k+1, W-k+1, k)
    return win @ g


def _ssim_channel(a: np.ndarray, b: np.ndarray) -> float:
    c1 = (0.01 * 255) ** 2
    c2 = (0.03 * 255) ** 2
    g = _gaussian_window()
    mu_a, mu_b = _filter_valid(a, g), _filter_valid(b, g)
    var_a = _filter_valid(a * a, g) - mu_a * mu_a
    var_b = _filter_valid(b * b, g) - mu_b * mu_b
    cov = _filter_valid(a * b, g) - mu_a * mu_b
    num = (2 * mu_a * mu_b + c1) * (2 * cov + c2)
    den = (mu_a * mu_a + mu_b * mu_b + c1) * (var_a + var_b + c2)
    return float(np.mean(num / den))


def psnr(a: np.ndarray, b: np.ndarray, peak: float = 255.0) -> float:
    """PSNR in dB between two same-shaped arrays (float64 MSE); ``inf`` when they are equal."""
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(peak * peak / mse)


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM of ``HxW`` or ``HxWxC`` images in [0, 255]; the mean over channels for ``C > 1``."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"SSIM needs equal shapes, got {a.shape} and {b.shape}")
    if min(a.shape[:2]) < 11:
        raise ValueError(f"SSIM needs at least 11x11 pixels after cropping, got {a.shape[:2]}")
    if a.ndim == 2:
        return _ssim_channel(a, b)
    return float(np.mean([_ssim_channel(a[..., c], b[..., c]) for c in range(a.shape[2])]))


def prepare_pair(sr: np.ndarray, hr: np.ndarray, protocol: Protocol = NTIRE2025) -> tuple[np.ndarray, np.ndarray]:
    """Check, modcrop and shave a (SR, HR) pair of uint8 ``HxWx3`` RGB images."""
    for name, img in (("SR", sr), ("HR", hr)):
        if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
            raise ValueError(f"{name} image must be uint8 HxWx3 RGB, got {img.dtype} {img.shape}")
    if sr.shape != hr.shape:
        raise ValueError(f"SR and HR sizes differ: {sr.shape[:2]} vs {hr.shape[:2]}")
    if protocol.modcrop > 1:
        h = sr.shape[0] - sr.shape[0] % protocol.modcrop
        w = sr.shape[1] - sr.shape[1] % protocol.modcrop
        sr, hr = sr[:h, :w], hr[:h, :w]
    b = protocol.crop_border
    if b:
        sr, hr = sr[b:-b, b:-b], hr[b:-b, b:-b]
    return sr, hr


def color_shift(a: np.ndarray, b: np.ndarray) -> float:
    """The largest over channels of ``|mean(a - b)|`` for two ``HxWxC`` images (grey levels of their scale)."""
    if a.shape != b.shape or a.ndim != 3:
        raise ValueError(f"color_shift needs two HxWxC images of one size, got {a.shape} and {b.shape}")
    diff = a.astype(np.float64).mean(axis=(0, 1)) - b.astype(np.float64).mean(axis=(0, 1))
    return float(np.abs(diff).max())


def evaluate_pair(sr: np.ndarray, hr: np.ndarray, protocol: Protocol = NTIRE2025) -> dict[str, float]:
    """PSNR-Y, SSIM-Y, PSNR-RGB, SSIM-RGB and colour shift of one pair under ``protocol``."""
    sr_c, hr_c = prepare_pair(sr, hr, protocol)
    sr_y, hr_y = rgb_to_y(sr_c), rgb_to_y(hr_c)
    return {
        "psnr_y": psnr(sr_y, hr_y),
        "ssim_y": ssim(sr_y, hr_y),
        "psnr_rgb": psnr(sr_c, hr_c),
        "ssim_rgb": ssim(sr_c, hr_c),
        "color_shift": color_shift(sr_c, hr_c),
    }
