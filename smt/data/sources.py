"""Real data sets for the full profile: the source registry (``sources.json``), fetching a source (download +
extract, or a local folder), and building the DIV2K-layout data root with manifests from the sources.

Layout under ``data.root`` is the demo's (``train_HR/``, ``train_LR_bicubic/X4/``, ``manifest_train.csv``, ...).
Training images may be cut once into sub-images (``data.subimage_size``/``subimage_step``, as is usual for DF2K):
the LR tile is cut from the full LR image at the matching position, so it equals the official LR pixels.
Sources without LR get it from their HR (MATLAB bicubic); a source without HR (the challenge's test set) gives
manifest rows with an empty ``hr_path``. The ``source`` column records provenance: ``<source>:<file>[@y,x]``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pandas as pd
from tqdm import tqdm

from smt.config import DataConfig
from smt.data.download import Archive, DownloadError, HashLock, download, extract
from smt.data.images import IMAGE_SUFFIXES, ImageError, modcrop, read_image, write_png
from smt.data.imresize import bicubic_degrade
from smt.data.manifest import MANIFEST_COLUMNS, manifest_path
from smt.files import build_aside, sha256_file

__all__ = ["Source", "load_sources", "fetch_source", "source_pairs", "build_from_sources", "subimage_starts",
           "missing_inputs"]



@dataclass(frozen=True)
class Source:
    name: str
    description: str
    license: str
    archives: tuple[Archive, ...]
    hr: str | None  # glob for HR images; None = LR only
    lr: str | None  # glob for LR images; None = made from HR
    images: int | None  # expected number of images, when known


def load_sources(path: str | Path | None = None) -> dict[str, Source]:
    raw = json.loads(Path(path).read_text() if path else
                     resources.files("smt.data").joinpath("sources.json").read_text())
    out = {}
    for name, e in raw.items():
        if name.startswith("_"):
            continue
        out[name] = Source(name, e["description"], e["license"], tuple(Archive(**a) for a in e["archives"]),
                           e["hr"], e["lr"], e["images"])
    return out


def _lookup(name: str, sources: dict[str, Source]) -> Source:
    if name not in sources:
        raise ValueError(f"data source {name!r} is unknown (known: {', '.join(sources)})")
    return sources[name]


def fetch_source(cfg: DataConfig, name: str, sources: dict[str, Source] | None = None,
                 log: Callable[[str], None] = print) -> list[Path]:
    """The folders holding ``name``'s files: the user's folder when ``data.folders`` names one, else its
    archives downloaded (verified, resumed) and extracted under ``data.raw/<name>/<archive>/``."""
    src = _lookup(name, sources or load_sources())
    if name in cfg.folders:
        folder = Path(cfg.folders[name]).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(f"data.folders.{name}: {folder} is not a folder")
        return [folder]
    if not src.archives:
        raise FileNotFoundError(f"data source {name!r} cannot be downloaded ({src.description}); set "
                                f"data.folders.{name} to a local folder")
    lock = HashLock(cfg.lock)
    folders = []
    for archive in src.archives:
        path = download(archive, Path(cfg.downloads).expanduser(), lock, log=log)
        stem = archive.filename.split(".")[0]
        folders.append(extract(path, Path(cfg.raw) / name / stem, lock.expected(archive)[1]))
    return folders


def _glob(folders: list[Path], pattern: str) -> list[Path]:
    files = [p for f in folders for p in f.glob(pattern) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    return sorted(files, key=lambda p: p.name)


def source_pairs(cfg: DataConfig, src: Source, folders: list[Path]) -> list[tuple[Path | None, Path | None]]:
    """(HR, LR) files of a source, paired by name (``0001.png`` with ``0001x4.png``); a None side is made
    (LR) or absent (HR)."""
    hrs = _glob(folders, src.hr) if src.hr else []
    lrs = _glob(folders, src.lr) if src.lr else []
    where = ", ".join(str(f) for f in folders)
    if src.hr and not hrs:
        raise FileNotFoundError(f"data source {src.name}: no HR images match {src.hr!r} in {where}")
    if src.lr and not lrs:
        raise FileNotFoundError(f"data source {src.name}: no LR images match {src.lr!r} in {where}")
    if not src.hr:
        return [(None, p) for p in lrs]
    if not src.lr:
        return [(p, None) for p in hrs]
    by_stem = {p.stem: p for p in lrs}
    pairs = []
    for hr in hrs:
        lr = by_stem.get(f"{hr.stem}x{cfg.scale}") or by_stem.get(hr.stem)
        if lr is None:
            raise FileNotFoundError(f"data source {src.name}: {hr.name} has no LR image "
                                    f"({hr.stem}x{cfg.scale}.png) in {where}")
        pairs.append((hr, lr))
    return pairs


def subimage_starts(length: int, size: int, step: int) -> list[int]:
    """Tile origins along one axis: every ``step``, plus a last tile flush with the end (BasicSR's rule)."""
    if length <= size:
        return [0]
    starts = list(range(0, length - size + 1, step))
    if starts[-1] != length - size:
        starts.append(length - size)
    return starts


def _items(cfg: DataConfig, split: str, pairs: list[tuple[Path | None, Path | None]], name: str,
           ) -> Iterator[tuple[str, str, np.ndarray | None, np.ndarray]]:
    """(id, provenance, HR, LR) for the files of one source, cut into sub-images for training if asked."""
    s = cfg.scale
    for hr_path, lr_path in pairs:
        ref = hr_path or lr_path
        hr = read_image(hr_path) if hr_path else None
        if hr is not None:
            hr = modcrop(hr, s, str(hr_path))
        lr = read_image(lr_path) if lr_path else bicubic_degrade(hr, s)
        if hr is not None and (lr.shape[0] * s, lr.shape[1] * s) != hr.shape[:2]:
            raise ImageError(f"{lr_path}: LR {lr.shape[1]}x{lr.shape[0]} is not 1/{s} of HR "
                             f"{hr.shape[1]}x{hr.shape[0]} ({hr_path})")
        stem = ref.stem[: -len(f"x{s}")] if hr_path is None and ref.stem.endswith(f"x{s}") else ref.stem
        base_id = stem if split != "train" else f"{name}-{stem}"
        if split != "train" or not cfg.subimage_size or hr is None:
            yield base_id, f"{name}:{ref.name}", hr, lr
            continue
        size, step = cfg.subimage_size, cfg.subimage_step
        k = 0
        for y in subimage_starts(hr.shape[0], size, step):
            for x in subimage_starts(hr.shape[1], size, step):
                k += 1
                yield (f"{base_id}-s{k:03d}", f"{name}:{ref.name}@{y},{x}", hr[y:y + size, x:x + size],
                       lr[y // s:(y + size) // s, x // s:(x + size) // s])


def build_from_sources(cfg: DataConfig, log: Callable[[str], None] = print,
                       sources: dict[str, Source] | None = None) -> dict[str, pd.DataFrame]:
    """Fetch every source of every split and write ``cfg.root`` (built aside, then swapped in)."""
    sources = sources or load_sources()
    root = Path(cfg.root)
    manifests = {}
    with build_aside(root) as staging:
        for split in ("train", "valid", "test"):
            rows = []
            for name in getattr(cfg, f"{split}_sources"):
                src = _lookup(name, sources)
                pairs = source_pairs(cfg, src, fetch_source(cfg, name, sources, log))
                if src.images is not None and len(pairs) != src.images and name not in cfg.folders:
                    raise DownloadError(f"data source {name}: found {len(pairs)} images, expected {src.images}")
                for img_id, prov, hr, lr in tqdm(_items(cfg, split, pairs, name), desc=f"data {split} {name}",
                                                 unit="img"):
                    lr_rel = Path(f"{split}_LR_bicubic") / f"X{cfg.scale}" / f"{img_id}x{cfg.scale}.png"
                    write_png(staging / lr_rel, lr)
                    hr_rel = ""
                    if hr is not None:
                        hr_rel = (Path(f"{split}_HR") / f"{img_id}.png").as_posix()
                        write_png(staging / hr_rel, hr)
                    rows.append({"id": img_id, "source": prov, "hr_path": hr_rel, "lr_path": lr_rel.as_posix(),
                                 "hr_height": hr.shape[0] if hr is not None else 0,
                                 "hr_width": hr.shape[1] if hr is not None else 0,
                                 "lr_height": lr.shape[0], "lr_width": lr.shape[1],
                                 "hr_sha256": sha256_file(staging / hr_rel) if hr_rel else "",
                                 "lr_sha256": sha256_file(staging / lr_rel)})
            df = pd.DataFrame(rows, columns=MANIFEST_COLUMNS)
            if df["id"].duplicated().any():
                dup = df["id"][df["id"].duplicated()].iloc[0]
                raise ValueError(f"data {split}: image id {dup!r} occurs twice "
                                 "(two sources with the same file names?)")
            df.to_csv(manifest_path(staging, split), index=False)
            manifests[split] = df
    return manifests


def missing_inputs(cfg: DataConfig, sources: dict[str, Source] | None = None) -> list[str]:
    """What the data stage would still need (for the dry run): user folders that are absent, archives that
    are neither downloaded nor extracted (those will be downloaded: listed as 'to download')."""
    sources = sources or load_sources()
    lines = []
    for split in ("train", "valid", "test"):
        for name in getattr(cfg, f"{split}_sources"):
            if name not in sources:
                lines.append(f"MISSING data source {name!r}: unknown (known: {', '.join(sources)})")
                continue
            src = sources[name]
            if name in cfg.folders:
                if not Path(cfg.folders[name]).expanduser().is_dir():
                    lines.append(f"MISSING data.folders.{name}: {cfg.folders[name]} does not exist")
                continue
            if not src.archives:
                lines.append(f"MISSING data source {name}: needs a local folder in data.folders.{name} "
                             f"({src.description})")
                continue
            todo = [a for a in src.archives
                    if not (Path(cfg.raw) / name / a.filename.split(".")[0] / ".extracted").exists()
                    and not (Path(cfg.downloads).expanduser() / a.filename).exists()]
            if todo:
                more = f" and {len(todo) - 1} more" if len(todo) > 1 else ""
                lines.append(f"to download: {name}, {todo[0].url}{more} ({src.license})")
    return lines
