"""Rank the training pool by CLIP similarity to the images to be restored; keep the top K.

The BBox solution fine-tunes stage 3 on 2,000 images chosen with CLIP features but never published the rule.
Ours, documented and tested:

1. **Embedding.** Each image is embedded by an open_clip image encoder as the normalised mean of the
   normalised embeddings of several views: the whole image (resized and centre-cropped by the model's own
   preprocessing) and a ``crops x crops`` grid of tiles, so a large photograph's local content counts, not
   only its thumbnail. Embeddings are cached on disk, keyed by the file's SHA-256 and the model and view
   settings, so a rerun embeds only new images.
2. **Score.** A pool image's score is its mean cosine similarity to the target images (the validation and test
   LR images by default): ``score_i = p_i . mean_j(t_j)``. The mean (rather than the max) favours images like
   the target set as a whole over near-copies of one target.
3. **Selection.** Greedy, in score order: an image is skipped if its source already has ``per_source_cap``
   picks, or if its cosine similarity to an already-picked image exceeds ``dedup_threshold`` (near-duplicate);
   stop at ``top_k``.

Weights: ``select.pretrained`` is an open_clip tag (downloads, so not offline) or a local checkpoint path. When
they cannot be loaded, the stage stops with a message saying so, unless ``select.allow_untrained`` is set: then
it uses randomly initialised weights and every output is marked ``features untrained``.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from PIL import Image
from tqdm import tqdm

from smt.config import SelectConfig
from smt.files import atomic_path

__all__ = ["SelectionError", "ClipEncoder", "load_encoder", "embed_images", "rank_pool", "run_selection",
           "SelectionResult", "selection_figure"]

TINY_CONFIG = Path(__file__).with_name("smt-tiny-vit.json")


class SelectionError(RuntimeError):
    """The selection cannot run as configured (e.g. CLIP weights unavailable offline)."""


@dataclass
class ClipEncoder:
    model: torch.nn.Module
    preprocess: object
    key: str  # identifies model + weights for the cache
    untrained: bool
    device: torch.device = torch.device("cpu")  # where the model is; images are sent there


def load_encoder(cfg: SelectConfig, device: str | torch.device | None = None) -> ClipEncoder:
    """The CLIP image encoder of ``cfg``, on ``device`` (default: ``cfg.device``, where ``auto`` means this
    process's GPU when there is one, see :func:`smt.distributed.device_for`)."""
    import open_clip

    from smt.distributed import device_for

    device = torch.device(device) if device is not None else device_for(cfg.device)

    if cfg.model == "smt-tiny-vit":
        open_clip.add_model_config(TINY_CONFIG)
    source = cfg.pretrained or None
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(cfg.model, pretrained=source, device=device)
        untrained = source is None
    except Exception as exc:
        if not cfg.allow_untrained:
            raise SelectionError(
                f"CLIP weights {cfg.model!r}/{cfg.pretrained!r} could not be loaded ({type(exc).__name__}: "
                f"{str(exc)[:300]}). Offline machines cannot download them: set select.pretrained to a local "
                f"checkpoint file, or set select.allow_untrained: true to run with untrained features (the "
                f"selection is then marked 'features untrained')") from None
        model, _, preprocess = open_clip.create_model_and_transforms(cfg.model, pretrained=None, device=device)
        untrained = True
    if untrained and not cfg.allow_untrained:
        raise SelectionError(f"select.pretrained is empty: {cfg.model!r} would have untrained features; set "
                             f"select.pretrained, or select.allow_untrained: true")
    model.eval()
    weights = "untrained" if untrained else (cfg.pretrained if not Path(cfg.pretrained).is_file()
                                             else hashlib.sha256(Path(cfg.pretrained).read_bytes()).hexdigest()[:16])
    key = f"{cfg.model}-{weights}-seed{cfg.seed}-crops{cfg.crops}"
    return ClipEncoder(model, preprocess, key, untrained, device)


def _views(img: Image.Image, crops: int) -> list[Image.Image]:
    views = [img]
    if crops > 1:
        w, h = img.size
        for i in range(crops):
            for j in range(crops):
                views.append(img.crop((j * w // crops, i * h // crops, (j + 1) * w // crops, (i + 1) * h // crops)))
    return views


@torch.no_grad()
def embed_images(paths: Sequence[Path], encoder: ClipEncoder, cache_dir: Path, crops: int,
                 batch_size: int = 16) -> tuple[np.ndarray, int]:
    """(N, D) unit-norm embeddings of ``paths`` and how many were computed (the rest came from the cache)."""
    cache = cache_dir / encoder.key
    cache.mkdir(parents=True, exist_ok=True)
    out: list[np.ndarray | None] = []
    todo = []
    for i, p in enumerate(paths):
        digest = hashlib.sha256(Path(p).read_bytes()).hexdigest()
        f = cache / f"{digest}.npy"
        if f.exists():
            out.append(np.load(f))
        else:
            out.append(None)
            todo.append((i, p, f))
    for i, p, f in tqdm(todo, desc="clip embed", unit="img", disable=not todo):
        with Image.open(p) as im:
            views = _views(im.convert("RGB"), crops)
        feats = []
        for k in range(0, len(views), batch_size):
            batch = torch.stack([encoder.preprocess(v) for v in views[k:k + batch_size]]).to(encoder.device)
            feats.append(torch.nn.functional.normalize(encoder.model.encode_image(batch).float(), dim=-1))
        emb = torch.nn.functional.normalize(torch.cat(feats).mean(0), dim=0).cpu().numpy()
        with atomic_path(f) as tmp, open(tmp, "wb") as fh:
            np.save(fh, emb)
        out[i] = emb
    return np.stack(out) if out else np.zeros((0, 0)), len(todo)


def rank_pool(pool: np.ndarray, targets: np.ndarray, sources: Sequence[str], top_k: int,
              dedup_threshold: float = 1.0, per_source_cap: int = 0) -> pd.DataFrame:
    """Scores and the greedy selection (see module docstring). Rows in score order: index, source, score,
    rank (1-based among selected, 0 if not), selected, reason (why an image was skipped)."""
    if len(pool) != len(sources):
        raise ValueError(f"{len(pool)} embeddings but {len(sources)} sources")
    if len(targets) == 0:
        raise ValueError("the target set is empty")
    centre = targets.mean(0)
    scores = pool @ centre
    order = np.argsort(-scores, kind="stable")
    picked: list[int] = []
    counts: dict[str, int] = {}
    rows = []
    for i in order:
        src = sources[i]
        reason = ""
        if len(picked) >= top_k:
            reason = "beyond top_k"
        elif per_source_cap and counts.get(src, 0) >= per_source_cap:
            reason = f"source cap ({per_source_cap})"
        elif picked and dedup_threshold < 1.0:
            sim = float(np.max(pool[picked] @ pool[i]))
            if sim > dedup_threshold:
                reason = f"near-duplicate (cos {sim:.3f})"
        if not reason:
            picked.append(int(i))
            counts[src] = counts.get(src, 0) + 1
        rows.append({"index": int(i), "source": src, "score": float(scores[i]),
                     "rank": len(picked) if not reason else 0, "selected": not reason, "reason": reason})
    return pd.DataFrame(rows)


@dataclass
class SelectionResult:
    table: pd.DataFrame  # every pool image: id, source, score, rank, selected, reason
    manifest_path: Path
    untrained: bool
    embedded: dict = field(default_factory=dict)  # split -> images embedded this run (not from cache)
    seconds: float = 0.0


def run_selection(cfg: SelectConfig, data_root: str | Path, out_dir: str | Path) -> SelectionResult:
    """Embed, rank and write ``selection.csv`` (id, source, score, rank) + ``selection.json`` (settings, flags)."""
    import time

    from smt.data.manifest import read_manifest

    start = time.perf_counter()
    torch.manual_seed(cfg.seed)  # untrained weights are seeded, so their "features" are reproducible
    encoder = load_encoder(cfg)
    root, out_dir = Path(data_root), Path(out_dir)
    pool = read_manifest(root, cfg.pool_split)
    if pool.empty:
        raise SelectionError(f"the {cfg.pool_split} split of {root} is empty")
    # the pool is judged by what training sees (HR); targets are what is restored (LR)
    pool_emb, n_pool = embed_images([root / p for p in pool["hr_path"]], encoder, Path(cfg.cache_dir), cfg.crops)
    target_paths = [root / p for s in cfg.target_splits for p in read_manifest(root, s)["lr_path"]]
    target_emb, n_target = embed_images(target_paths, encoder, Path(cfg.cache_dir), cfg.crops)
    # the per-source cap counts data sets: provenance "LSDIR_train:0000001.png@0,0" belongs to "LSDIR_train"
    datasets = [s.split(":")[0] for s in pool["source"]]
    table = rank_pool(pool_emb, target_emb, datasets, cfg.top_k, cfg.dedup_threshold, cfg.per_source_cap)
    table.insert(0, "id", pool["id"].to_numpy()[table["index"].to_numpy()])
    table = table.drop(columns="index")
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = out_dir / "selection.csv"
    chosen = table[table.selected].sort_values("rank")
    chosen[["id", "source", "score", "rank"]].assign(features="untrained" if encoder.untrained else "trained") \
        .to_csv(manifest, index=False)
    table.to_csv(out_dir / "scores.csv", index=False)
    (out_dir / "selection.json").write_text(json.dumps({
        "model": cfg.model, "pretrained": cfg.pretrained, "features_untrained": encoder.untrained,
        "pool_images": len(pool), "target_images": len(target_paths), "selected": len(chosen),
        "settings": {k: v for k, v in cfg.__dict__.items() if k != "device"}},  # device: how, not what
        indent=2, default=list) + "\n")
    return SelectionResult(table, manifest, encoder.untrained, {"pool": n_pool, "targets": n_target},
                           time.perf_counter() - start)


def selection_figure(result: SelectionResult, data_root: str | Path, target_splits: Sequence[str], path: str | Path,
                     n_show: int = 4) -> Path:
    """Score histogram, counts per source, and thumbnails: targets, top picks, bottom of the pool."""
    from smt.data.manifest import read_manifest
    from smt.figures import pyplot, save_figure, show_thumbnail

    plt = pyplot()

    root = Path(data_root)
    table = result.table
    pool = read_manifest(root, "train").set_index("id")
    targets = [root / p for s in target_splits for p in read_manifest(root, s)["lr_path"]][:n_show]
    top = table[table.selected].sort_values("rank").head(n_show)
    bottom = table.sort_values("score").head(n_show)
    fig = plt.figure(figsize=(2 * n_show, 8.4))
    grid = fig.add_gridspec(4, n_show)
    ax = fig.add_subplot(grid[0, : n_show // 2])
    bins = np.histogram_bin_edges(table.score, bins=min(30, max(5, len(table) // 2)))
    ax.hist(table.score, bins=bins, color="#888", label="pool")
    ax.hist(table[table.selected].score, bins=bins, color="C0", label="selected")
    ax.set_xlabel("score (mean cosine to targets)"), ax.legend(fontsize=7)
    ax = fig.add_subplot(grid[0, n_show // 2:])
    counts = table.groupby("source").selected.agg(["sum", "count"])
    ax.barh(counts.index, counts["count"], color="#ccc", label="pool")
    ax.barh(counts.index, counts["sum"], color="C0", label="selected")
    ax.tick_params(labelsize=6), ax.legend(fontsize=7)
    rows = [("target", [(p, p.stem) for p in targets]),
            ("top picks", [(root / pool.loc[r.id, "hr_path"], f"#{r.rank} {r.source} {r.score:.3f}")
                           for r in top.itertuples()]),
            ("lowest", [(root / pool.loc[r.id, "hr_path"], f"{r.source} {r.score:.3f}") for r in bottom.itertuples()])]
    for r, (label, items) in enumerate(rows, start=1):
        for c in range(n_show):
            ax = fig.add_subplot(grid[r, c])
            ax.axis("off")
            if c < len(items):
                show_thumbnail(ax, items[c][0], f"{label}: {items[c][1]}" if c == 0 else items[c][1])
    flag = " (FEATURES UNTRAINED: the ranking is not meaningful)" if result.untrained else ""
    fig.suptitle(f"CLIP selection{flag}", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)
