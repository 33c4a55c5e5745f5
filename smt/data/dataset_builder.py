"""The ``data`` stage: write HR images, their bicubic LR images and manifests in the DIV2K/NTIRE layout.

Layout under ``data.root`` (DIV2K's naming; ``X4`` follows ``data.scale``)::

    train_HR/0001.png   train_LR_bicubic/X4/0001x4.png   manifest_train.csv
    valid_HR/0101.png   valid_LR_bicubic/X4/0101x4.png   manifest_valid.csv
    test_HR/0201.png    test_LR_bicubic/X4/0201x4.png    manifest_test.csv

Splits are numbered from 1, 101 and 201 like DIV2K's train/valid ranges. HR images are centre-cropped to
``max_side`` and then to a multiple of the scale ("modcrop"), so ``HR = scale * LR`` exactly. Each manifest row
records id, source, paths (relative to the root), sizes and SHA-256 of both files.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from smt.config import DataConfig
from smt.data.demo import load_demo_image
from smt.data.images import modcrop, write_png
from smt.data.imresize import bicubic_degrade
from smt.data.manifest import MANIFEST_COLUMNS, manifest_path
from smt.files import build_aside, sha256_file

__all__ = ["SPLITS", "prepare_hr", "build_dataset"]

SPLITS = {"train": 1, "valid": 101, "test": 201}


def prepare_hr(img: np.ndarray, scale: int, max_side: int = 0, name: str = "image") -> np.ndarray:
    """Centre-crop to ``max_side`` (0 = no limit), then crop to a multiple of ``scale``."""
    h, w = img.shape[:2]
    if max_side and max(h, w) > max_side:
        th, tw = min(h, max_side), min(w, max_side)
        top, left = (h - th) // 2, (w - tw) // 2
        img = img[top:top + th, left:left + tw]
    return modcrop(img, scale, name)


@dataclass(frozen=True)
class _Item:
    split: str
    index: int
    source: str


def build_dataset(cfg: DataConfig) -> dict[str, pd.DataFrame]:
    """Build every split of ``cfg`` under ``cfg.root`` (replacing what was there) and return the manifests."""
    if cfg.source == "sources":
        from smt.data.sources import build_from_sources

        return build_from_sources(cfg)
    root = Path(cfg.root)
    items = [
        _Item(split, start + i, name)
        for split, start in SPLITS.items()
        for i, name in enumerate(getattr(cfg, f"{split}_images"))
    ]
    rows: dict[str, list[dict]] = {split: [] for split in SPLITS}
    manifests = {}
    # built aside, then swapped in: a failure never leaves a half-written data set
    with build_aside(root) as staging:
        for item in tqdm(items, desc="data", unit="img"):
            hr = prepare_hr(load_demo_image(item.source), cfg.scale, cfg.max_side, item.source)
            lr = bicubic_degrade(hr, cfg.scale)
            stem = f"{item.index:04d}"
            hr_rel = Path(f"{item.split}_HR") / f"{stem}.png"
            lr_rel = Path(f"{item.split}_LR_bicubic") / f"X{cfg.scale}" / f"{stem}x{cfg.scale}.png"
            write_png(staging / hr_rel, hr)
            write_png(staging / lr_rel, lr)
            rows[item.split].append({
                "id": stem, "source": item.source, "hr_path": hr_rel.as_posix(), "lr_path": lr_rel.as_posix(),
                "hr_height": hr.shape[0], "hr_width": hr.shape[1], "lr_height": lr.shape[0], "lr_width": lr.shape[1],
                "hr_sha256": sha256_file(staging / hr_rel), "lr_sha256": sha256_file(staging / lr_rel),
            })
        for split, split_rows in rows.items():
            df = pd.DataFrame(split_rows, columns=MANIFEST_COLUMNS)
            df.to_csv(manifest_path(staging, split), index=False)
            manifests[split] = df
    return manifests
