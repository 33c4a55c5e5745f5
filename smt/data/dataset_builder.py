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

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from smt.config import DataConfig
from smt.data.demo import load_demo_image
from smt.data.images import ImageError, sha256_file, write_png
from smt.data.imresize import bicubic_degrade

__all__ = ["SPLITS", "MANIFEST_COLUMNS", "prepare_hr", "build_dataset", "read_manifest", "manifest_path", "has_hr"]

SPLITS = {"train": 1, "valid": 101, "test": 201}
MANIFEST_COLUMNS = ["id", "source", "hr_path", "lr_path", "hr_height", "hr_width", "lr_height", "lr_width",
                    "hr_sha256", "lr_sha256"]


def prepare_hr(img: np.ndarray, scale: int, max_side: int = 0, name: str = "image") -> np.ndarray:
    """Centre-crop to ``max_side`` (0 = no limit), then crop to a multiple of ``scale``."""
    h, w = img.shape[:2]
    if min(h, w) < scale:
        raise ImageError(f"{name}: {w}x{h} is smaller than the scale factor {scale}")
    if max_side and max(h, w) > max_side:
        th, tw = min(h, max_side), min(w, max_side)
        top, left = (h - th) // 2, (w - tw) // 2
        img = img[top:top + th, left:left + tw]
        h, w = th, tw
    return np.ascontiguousarray(img[: h - h % scale, : w - w % scale])


def manifest_path(root: str | Path, split: str) -> Path:
    return Path(root) / f"manifest_{split}.csv"


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
    # build into a sibling folder, then swap it in: a failure never leaves a half-written data set
    staging = root.with_name(root.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    rows: dict[str, list[dict]] = {split: [] for split in SPLITS}
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
    manifests = {}
    for split, split_rows in rows.items():
        df = pd.DataFrame(split_rows, columns=MANIFEST_COLUMNS)
        df.to_csv(manifest_path(staging, split), index=False)
        manifests[split] = df
    shutil.rmtree(root, ignore_errors=True)
    staging.rename(root)
    return manifests


def read_manifest(root: str | Path, split: str, verify: bool = False) -> pd.DataFrame:
    """Read a split's manifest; with ``verify``, check every file's SHA-256 against it."""
    path = manifest_path(root, split)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: manifest not found; run the data stage first (dvc repro data)")
    df = pd.read_csv(path, dtype={"id": str, "hr_path": str, "hr_sha256": str}, keep_default_na=False)
    missing = [c for c in MANIFEST_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: manifest lacks columns {missing}")
    if verify:
        for row in df.itertuples():
            for kind in ("hr", "lr") if row.hr_path else ("lr",):
                f = Path(root) / getattr(row, f"{kind}_path")
                if sha256_file(f) != getattr(row, f"{kind}_sha256"):
                    raise ValueError(f"{f}: content does not match its manifest hash")
    return df


def has_hr(manifest: pd.DataFrame) -> bool:
    """Whether every image of a split has its HR (the challenge's test set has none)."""
    return not manifest.empty and bool((manifest["hr_path"] != "").all())
