"""The manifest of a data split (``manifest_<split>.csv`` under ``data.root``): its columns, path and reader.

Written by the data stage (:mod:`smt.data.dataset_builder` for the demo images, :mod:`smt.data.sources` for
downloaded sets); read by every later stage. Each row records id, source, the HR and LR paths (relative to the
root; ``hr_path`` is empty where a split has no HR), their sizes and SHA-256.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from smt.files import sha256_file

__all__ = ["MANIFEST_COLUMNS", "manifest_path", "read_manifest", "has_hr"]

MANIFEST_COLUMNS = ["id", "source", "hr_path", "lr_path", "hr_height", "hr_width", "lr_height", "lr_width",
                    "hr_sha256", "lr_sha256"]


def manifest_path(root: str | Path, split: str) -> Path:
    return Path(root) / f"manifest_{split}.csv"


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
