"""The prepared store: a split's LR and HR images decoded once into uncompressed ``.npy`` files that training
reads by memory map, so a patch costs a slice of a file instead of decoding a whole PNG (docs/data_loading.md).

Layout of a store folder (``data.store``; written by the ``prepare`` stage, :func:`prepare_store`):

* ``<hr_path>.npy`` and ``<lr_path>.npy`` for every image of the split: the manifest's relative paths with the
  suffix ``.npy``; each holds exactly the uint8 ``HxWx3`` array :func:`smt.data.images.read_image` gives for the
  PNG (the same pixels the PNG path decodes);
* ``index.csv``, written last (its presence means the store is complete): per image the id, the ``.npy`` paths,
  the sizes and the SHA-256 of the source PNGs as the data manifest records them, so a store made from other
  images is refused by the reader (:func:`open_store`) with a message instead of training on them.

An interrupted preparation resumes: a ``.npy`` file is written atomically and kept on a rerun when its shape is
right and it is newer than its PNG (a data stage that rebuilt the images makes newer PNGs, so they are redone).
Images are decoded by a pool of threads (Pillow's decoder and file writes release the GIL).
"""
from __future__ import annotations

import json
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from smt.data.images import read_image
from smt.data.manifest import read_manifest
from smt.files import atomic_path

__all__ = ["STORE_INDEX", "StoreSummary", "store_bytes", "prepare_store", "open_store", "load_array", "spot_check",
           "run_prepare_stage"]

STORE_INDEX = "index.csv"
_INDEX_COLUMNS = ["id", "hr_npy", "lr_npy", "hr_height", "hr_width", "lr_height", "lr_width", "hr_sha256",
                  "lr_sha256"]
_HEADER_BYTES = 128  # a .npy header of a 3-D uint8 array (format 1.0 pads it to a multiple of 64)


@dataclass(frozen=True)
class StoreSummary:
    images: int
    bytes: int  # the arrays' size on disk (headers included)
    written: int  # .npy files written by this call (the others were kept from an interrupted run)
    seconds: float


def _npy(rel: str) -> str:
    return Path(rel).with_suffix(".npy").as_posix()


def store_bytes(manifest: pd.DataFrame) -> int:
    """Disk space of the store of a split's ``manifest`` (uint8 HxWx3 arrays plus their headers)."""
    pixels = (manifest["hr_height"].astype(np.int64) * manifest["hr_width"]
              + manifest["lr_height"].astype(np.int64) * manifest["lr_width"]).sum()
    return int(3 * pixels + 2 * _HEADER_BYTES * len(manifest))


def _is_current(dst: Path, src: Path, shape: tuple[int, int, int]) -> bool:
    """Whether ``dst`` is a complete array of ``shape`` written after ``src`` was (kept on a rerun)."""
    try:
        if dst.stat().st_mtime_ns < src.stat().st_mtime_ns:
            return False
        return load_array(dst).shape == shape
    except (OSError, ValueError):
        return False


def _prepare_one(root: Path, store: Path, row: dict) -> int:
    """Write the image pair of manifest ``row`` (the missing or stale files of it); returns files written."""
    written = 0
    for kind in ("lr", "hr"):
        src, dst = root / row[f"{kind}_path"], store / _npy(row[f"{kind}_path"])
        shape = (int(row[f"{kind}_height"]), int(row[f"{kind}_width"]), 3)
        if _is_current(dst, src, shape):
            continue
        img = read_image(src)
        if img.shape != shape:
            raise ValueError(f"{src}: image is {img.shape[1]}x{img.shape[0]} but the manifest says "
                             f"{shape[1]}x{shape[0]}; rerun the data stage")
        with atomic_path(dst) as tmp, open(tmp, "wb") as fh:
            np.save(fh, img, allow_pickle=False)
        written += 1
    return written


def prepare_store(root: str | Path, store: str | Path, split: str = "train", workers: int | None = None,
                  log=print) -> StoreSummary:
    """Decode every image of ``root``'s ``split`` into the store folder ``store`` (see the module docstring).
    Refuses to start when the free disk space cannot hold what is left to write."""
    root, store = Path(root), Path(store)
    if store.resolve() == root.resolve() or root.resolve() in store.resolve().parents:
        raise ValueError(f"data.store {store} must be outside data.root {root} (the data stage replaces that folder)")
    manifest = read_manifest(root, split)
    if manifest.empty:
        raise ValueError(f"no {split} images in {root}")
    sizes = manifest[["hr_height", "hr_width", "lr_height", "lr_width"]].apply(pd.to_numeric, errors="coerce")
    if sizes.isna().any().any():
        raise ValueError(f"{root} split {split!r}: the manifest lacks image sizes; rerun the data stage")
    if (manifest["hr_path"] == "").any():
        raise ValueError(f"{root} split {split!r}: some images have no HR; a store holds training pairs")
    total = store_bytes(manifest)
    store.mkdir(parents=True, exist_ok=True)
    (store / STORE_INDEX).unlink(missing_ok=True)  # the store is incomplete until the index is written again
    present = sum(p.stat().st_size for p in store.rglob("*.npy"))
    free = shutil.disk_usage(store).free
    if total - present > free:
        raise OSError(f"{store}: the store needs {total / 1e9:.1f} GB ({total - present:,} bytes still to write) but "
                      f"the disk has {free / 1e9:.1f} GB free; set data.store to a folder on a larger disk")
    log(f"prepare: {len(manifest)} {split} images of {root} -> {store} ({total / 1e9:.2f} GB)")
    rows = manifest.to_dict("records")
    workers = workers or min(16, os.cpu_count() or 1)
    start = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        written = sum(tqdm(pool.map(lambda r: _prepare_one(root, store, r), rows), total=len(rows),
                           desc=f"prepare {split}", unit="img", mininterval=5))
    index = pd.DataFrame({"id": manifest["id"], "hr_npy": manifest["hr_path"].map(_npy),
                          "lr_npy": manifest["lr_path"].map(_npy),
                          **{c: manifest[c] for c in _INDEX_COLUMNS[3:]}}, columns=_INDEX_COLUMNS)
    with atomic_path(store / STORE_INDEX) as tmp:
        index.to_csv(tmp, index=False)
    return StoreSummary(len(rows), sum(p.stat().st_size for p in store.rglob("*.npy")), written,
                        time.perf_counter() - start)


def open_store(store: str | Path, manifest: pd.DataFrame) -> tuple[list[Path], list[Path]]:
    """The (LR, HR) ``.npy`` paths of ``manifest``'s rows in the store folder ``store``, checked against the
    store's index: every image there, made from the same PNGs (their SHA-256). The arrays' shapes are checked
    where they are opened (the reader knows the sizes it expects)."""
    store = Path(store)
    path = store / STORE_INDEX
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no complete prepared store here; run the prepare stage "
                                f"(dvc repro prepare) or set data.store to \"\" to read the PNGs")
    index = pd.read_csv(path, dtype={"id": str, "hr_sha256": str, "lr_sha256": str}, keep_default_na=False)
    missing = [c for c in _INDEX_COLUMNS if c not in index.columns]
    if missing:
        raise ValueError(f"{path}: index lacks columns {missing}; rerun the prepare stage")
    index = index.set_index("id")
    absent = [i for i in manifest["id"] if i not in index.index]
    if absent:
        raise ValueError(f"{store}: {len(absent)} training images are not in the prepared store, e.g. {absent[:3]}; "
                         "rerun the prepare stage")
    rows = index.loc[manifest["id"].tolist()]
    for col in ("hr_sha256", "lr_sha256"):
        stale = [i for i, a, b in zip(manifest["id"], rows[col].tolist(), manifest[col].astype(str).tolist()) if a != b]
        if stale:
            raise ValueError(f"{store}: the prepared store was made from other images ({col} differs for "
                             f"{len(stale)}, e.g. {stale[0]!r}); rerun the prepare stage")
    return [store / p for p in rows["lr_npy"]], [store / p for p in rows["hr_npy"]]


def load_array(path: str | Path) -> np.ndarray:
    """A store's uint8 HxWx3 array, memory-mapped read-only (pages are read when a slice touches them)."""
    arr = np.load(path, mmap_mode="r", allow_pickle=False)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"{path}: expected a uint8 HxWx3 array, got {arr.dtype} {arr.shape}")
    return arr


def spot_check(root: str | Path, store: str | Path, count: int = 8, seed: int = 0) -> list[str]:
    """Ids of ``count`` training images (drawn with ``seed``) whose stored arrays were compared with their
    decoded PNGs and found equal; raises naming the first that differs."""
    root, store = Path(root), Path(store)
    manifest = read_manifest(root, "train")
    picks = sorted(np.random.default_rng(seed).choice(len(manifest), min(count, len(manifest)), replace=False))
    lr_paths, hr_paths = open_store(store, manifest.iloc[picks])
    for (i, row), lr_npy, hr_npy in zip(manifest.iloc[picks].iterrows(), lr_paths, hr_paths):
        for npy, png in ((lr_npy, row["lr_path"]), (hr_npy, row["hr_path"])):
            if not np.array_equal(load_array(npy), read_image(root / png)):
                raise ValueError(f"{npy}: differs from {root / png}; rerun the prepare stage (dvc repro -f prepare)")
    return manifest.iloc[picks]["id"].tolist()


def run_prepare_stage(root: str | Path, store: str | Path, timings_path: str | Path | None = None) -> str:
    """What the ``prepare`` stage does: :func:`prepare_store` for the training split, a :func:`spot_check`,
    seconds to ``timings_path`` (not a DVC output). Returns the report's summary (Markdown)."""
    if not str(store):
        raise ValueError("data.store is empty: set it to the folder the prepared store goes in (see "
                         "docs/data_loading.md for its size), or train from the PNGs without this stage")
    summary = prepare_store(root, store)
    checked = spot_check(root, store)
    if timings_path is not None:
        Path(timings_path).parent.mkdir(parents=True, exist_ok=True)
        Path(timings_path).write_text(json.dumps({"prepare_seconds": round(summary.seconds, 3),
                                                  "files_written": summary.written}, indent=2) + "\n")
    return (f"**{summary.images}** training images of `{root}` stored uncompressed in `{store}`: "
            f"**{summary.bytes / 1e9:.2f} GB** (uint8 HxWx3 `.npy` arrays, LR and HR; {summary.bytes:,} bytes). "
            f"Training reads its patches from them by memory map instead of decoding the PNGs; the patches are "
            f"the same. Spot check: the arrays of {len(checked)} images equal their decoded PNGs.")
