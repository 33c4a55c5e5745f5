"""Decode-limited training-data throughput: batches per second one loader process assembles from 2K images,
decoding the PNGs (the dataset without a store) against reading the prepared store by memory map, measured in
the same process on the same patches. docs/data_loading.md records a run.

    PYTHONPATH=. python benchmarks/bench_data_loading.py [--images 16] [--repeats 2]

Synthesises ``--images`` DIV2K-sized pairs (HR 2040x1356, LR 510x339; smooth content plus grain, so the PNGs
compress like photographs, ~6 MB each) in a temporary folder, prepares their store, then times the batches of
the ntire2025 schedule: stage 1 (64 patches of 64 LR px) and stage 2 (16 of 128 px), flips and rotations on.
With ~88k training images the dataset's 32-image decode cache almost never hits; ``cache_images=1`` (and more
images than one) models that for both paths. The store's files sit in the page cache here: this measures the
CPU cost; the disk's share is discussed in the docs.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from smt.config import AugmentSpec
from smt.data.images import write_png
from smt.data.manifest import MANIFEST_COLUMNS
from smt.data.prepare import prepare_store
from smt.train.data import GlobalBatchSampler, PairedPatchDataset, collate

sys.path.insert(0, str(Path(__file__).parent))
from timing import median_time  # noqa: E402

HR_SIZE = (1356, 2040)  # (height, width) of a DIV2K image; a multiple of 4 on both sides
STAGES = {"stage 1 (64 x 64 px)": (64, 64), "stage 2 (16 x 128 px)": (128, 16)}  # patch size, batch


def _photo_like(rng: np.random.Generator) -> np.ndarray:
    """An HR image that compresses like a photograph: smooth low-frequency content plus sensor-like grain."""
    h, w = HR_SIZE
    base = Image.fromarray(rng.integers(0, 256, (h // 16, w // 16, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
    grain = rng.integers(-6, 7, (h, w, 3))
    return np.clip(np.asarray(base, dtype=np.int16) + grain, 0, 255).astype(np.uint8)


def _write_split(root: Path, n: int) -> None:
    import pandas as pd

    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        hr = _photo_like(rng)
        lr = np.asarray(Image.fromarray(hr).resize((HR_SIZE[1] // 4, HR_SIZE[0] // 4), Image.BICUBIC))
        hr_path, lr_path = f"train_HR/{i:04d}.png", f"train_LR_bicubic/X4/{i:04d}x4.png"
        write_png(root / hr_path, hr)
        write_png(root / lr_path, lr)
        rows.append({"id": f"{i:04d}", "source": "synthetic", "hr_path": hr_path, "lr_path": lr_path,
                     "hr_height": hr.shape[0], "hr_width": hr.shape[1], "lr_height": lr.shape[0],
                     "lr_width": lr.shape[1], "hr_sha256": "", "lr_sha256": ""})
    pd.DataFrame(rows, columns=MANIFEST_COLUMNS).to_csv(root / "manifest_train.csv", index=False)


def _batch_seconds(ds: PairedPatchDataset, sampler: GlobalBatchSampler, steps: int, repeats: int) -> float:
    """Median seconds per batch over ``repeats`` passes of ``steps`` batches (one warm-up pass first)."""
    def one_pass():
        for step in range(steps):
            collate([ds[s] for s in sampler.draw(step)])
    return median_time(one_pass, repeats) / steps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # what a DataLoader worker runs with (PyTorch gives each worker one thread)
    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        root, store = Path(tmp) / "root", Path(tmp) / "store"
        t = time.perf_counter()
        _write_split(root, args.images)
        png_mb = sum(p.stat().st_size for p in root.rglob("*.png")) / 1e6
        print(f"{args.images} synthetic 2040x1356 pairs: {png_mb / args.images:.1f} MB of PNG per pair "
              f"({time.perf_counter() - t:.0f} s to write)")
        summary = prepare_store(root, store, log=lambda _: None)
        print(f"prepared store: {summary.bytes / 1e6 / args.images:.1f} MB per pair, {summary.seconds:.1f} s "
              f"({summary.seconds / args.images:.2f} s per pair, {summary.bytes / 1e9 / summary.seconds:.2f} GB/s)")
        print(f"{'':24}{'PNG decode':>14}{'store (mmap)':>14}{'ratio':>8}   (batches/s of one loader process)")
        for label, (patch, batch) in STAGES.items():
            sampler = GlobalBatchSampler([(HR_SIZE[0] // 4, HR_SIZE[1] // 4)] * args.images, patch, batch, seed=0,
                                         augment=AugmentSpec(dihedral=True))
            png = PairedPatchDataset(root, "train", patch, 4, cache_images=1)
            mapped = PairedPatchDataset(root, "train", patch, 4, cache_images=1, store=store)
            slow = _batch_seconds(png, sampler, steps=2, repeats=args.repeats)
            fast = _batch_seconds(mapped, sampler, steps=20, repeats=args.repeats)
            print(f"{label:24}{1 / slow:14.3f}{1 / fast:14.2f}{slow / fast:7.0f}x   "
                  f"({1e3 * slow / batch:.0f} vs {1e3 * fast / batch:.1f} ms per patch)")
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (absolute figures scale with it; "
          "the ratios are measured in the same process on the same patches)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
