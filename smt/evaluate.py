"""Scoring folders of SR outputs against HR images the way the challenge does, and the bicubic baseline.

SR files are matched to HR files by id: ``0801x4.png`` (the challenge's output naming) or ``0801.png`` both match
``0801.png``. Every score carries the protocol that produced it.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

from smt.data.images import IMAGE_SUFFIXES, read_image, uint8_to_unit
from smt.data.imresize import imresize, to_uint8
from smt.metrics import BASICSR, NTIRE2025, Protocol, evaluate_pair

__all__ = ["PROTOCOLS", "get_protocol", "bicubic_upscale", "image_id", "evaluate_folder", "summarize"]

PROTOCOLS: dict[str, Protocol] = {p.name: p for p in (NTIRE2025, BASICSR)}
METRIC_COLUMNS = ["psnr_y", "ssim_y", "psnr_rgb", "ssim_rgb", "color_shift"]


def get_protocol(name: str) -> Protocol:
    if name not in PROTOCOLS:
        raise ValueError(f"unknown protocol {name!r} (valid: {', '.join(PROTOCOLS)})")
    return PROTOCOLS[name]


def bicubic_upscale(lr: np.ndarray, scale: int) -> np.ndarray:
    """MATLAB-bicubic upscale of a uint8 LR image, rounded to uint8 (the floor every SR method must beat)."""
    return to_uint8(imresize(uint8_to_unit(lr), scale))


def image_id(path: str | Path) -> str:
    """``0801x4.png`` -> ``0801``; ``0801.png`` -> ``0801``."""
    return re.sub(r"x\d+$", "", Path(path).stem)


def _list_images(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: not a folder")
    found: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.suffix.lower() in IMAGE_SUFFIXES:
            key = image_id(p)
            if key in found:
                raise ValueError(f"{folder}: two files map to image id {key!r}: {found[key].name}, {p.name}")
            found[key] = p
    return found


def evaluate_folder(sr_dir: str | Path, hr_dir: str | Path, protocol: Protocol = NTIRE2025) -> pd.DataFrame:
    """One row per image found in both folders: id and the four metrics. Raises if none match."""
    sr_files, hr_files = _list_images(Path(sr_dir)), _list_images(Path(hr_dir))
    common = sorted(set(sr_files) & set(hr_files))
    if not common:
        raise ValueError(f"no image ids in common between {sr_dir} ({len(sr_files)} images) and {hr_dir} "
                         f"({len(hr_files)} images)")
    missing = sorted(set(hr_files) - set(sr_files))
    if missing:
        raise ValueError(f"{sr_dir}: no output for {len(missing)} HR images, e.g. {missing[:3]}")
    rows = []
    for key in common:
        sr, hr = read_image(sr_files[key]), read_image(hr_files[key])
        if sr.shape != hr.shape:
            raise ValueError(f"{sr_files[key]}: size {sr.shape[1]}x{sr.shape[0]} differs from HR "
                             f"{hr.shape[1]}x{hr.shape[0]}")
        rows.append({"id": key, **evaluate_pair(sr, hr, protocol)})
    return pd.DataFrame(rows, columns=["id", *METRIC_COLUMNS])


def summarize(per_image: pd.DataFrame) -> dict[str, float]:
    """The challenge's aggregate: the mean over images of each metric; and the worst image's colour shift."""
    return {**{c: float(per_image[c].mean()) for c in METRIC_COLUMNS},
            "color_shift_max": float(per_image["color_shift"].max())}
