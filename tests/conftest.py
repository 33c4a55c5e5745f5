"""Shared test helpers: fixture paths, offline settings, CUDA marker handling."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

FIXTURES = Path(__file__).parent / "fixtures"
REPO = Path(__file__).resolve().parents[1]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def fixtures_dir() -> Path:
    return FIXTURES


def write_train_split(root: Path, pairs: list[tuple[np.ndarray, np.ndarray]]) -> None:
    """Write (LR, HR) uint8 pairs as a ``train`` split under ``root``: PNGs and ``manifest_train.csv``."""
    import pandas as pd

    from smt.data.images import write_png
    from smt.data.manifest import MANIFEST_COLUMNS

    rows = []
    for i, (lr, hr) in enumerate(pairs):
        hr_path, lr_path = f"train_HR/{i:04d}.png", f"train_LR_bicubic/X4/{i:04d}x4.png"
        write_png(root / hr_path, hr)
        write_png(root / lr_path, lr)
        rows.append({"id": f"{i:04d}", "source": "synthetic", "hr_path": hr_path, "lr_path": lr_path,
                     "hr_height": hr.shape[0], "hr_width": hr.shape[1], "lr_height": lr.shape[0],
                     "lr_width": lr.shape[1], "hr_sha256": "", "lr_sha256": ""})
    pd.DataFrame(rows, columns=MANIFEST_COLUMNS).to_csv(root / "manifest_train.csv", index=False)


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory) -> str:
    """A tiny demo data set (48 px photographs): two training images, one validation image."""
    from smt.config import DataConfig
    from smt.data.dataset_builder import build_dataset

    root = tmp_path_factory.mktemp("demo") / "d"
    build_dataset(DataConfig(root=str(root), max_side=48, train_images=("camera", "coins"),
                             valid_images=("astronaut",)))
    return str(root)


@pytest.fixture(scope="session")
def three_valid_root(tmp_path_factory) -> str:
    """Two training and three validation images (48 px): enough to shard validation over two ranks, or to stop
    in the middle of a validation."""
    from smt.config import DataConfig
    from smt.data.dataset_builder import build_dataset

    root = tmp_path_factory.mktemp("val3") / "d"
    build_dataset(DataConfig(root=str(root), max_side=48, train_images=("camera", "coins"),
                             valid_images=("astronaut", "coffee", "grace_hopper")))
    return str(root)
