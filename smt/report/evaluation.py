"""The ``report`` stage's logic: score every method on the validation (and test) images, write the outputs.

Methods are bicubic (computed here, the floor) and every folder ``results/<split>/<method>/`` that the inference
stage wrote. Outputs: ``per_image.csv`` (one row per split, method and image), ``summary.json`` (every method's
means, the protocol, the verdict), ``reports/metrics/*.json`` (the headline numbers, one row each of ``dvc metrics
show``), ``crops.png`` (zoomed crops, HR first), ``fusion.png`` (PSNR-Y against the fusion weight), ``gains.png``
(per-image gain over bicubic), the comparison viewers, thumbnails and galleries (:mod:`smt.report.viewer`) and
``reports/index.html``; method order from ``results/methods.json``. Wall-clock figures stay out of these outputs
(``timings/``), so a rerun is byte-identical.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from smt.config import DataConfig, ReportConfig
from smt.data.images import read_image, write_png
from smt.data.manifest import has_hr, read_manifest
from smt.evaluate import METRIC_COLUMNS, bicubic_upscale, evaluate_folder, get_protocol, image_id, summarize
from smt.figures import pyplot, save_crop_grid, save_figure
from smt.metrics import evaluate_pair
from smt.report.index import write_index
from smt.report.viewer import ImageEntry, rel, write_image_pages

REPORTS_DIR = "reports"
HEADLINE_KEYS = ("psnr_y", "ssim_y", "color_shift")

__all__ = ["EvaluationResult", "run_evaluation", "final_method", "gains_over_bicubic", "below_bicubic",
           "generalisation_note", "headline_metrics", "HEADLINE_KEYS"]


@dataclass
class EvaluationResult:
    per_image: pd.DataFrame  # columns: split, method, id, source, psnr_y, ssim_y, psnr_rgb, ssim_rgb, color_shift
    metrics: dict  # {"protocol": str, "num_images": {split: n}, split: {method: {metric: mean}}, ...}
    protocol: str  # the full description of the protocol that produced every number
    crops_png: Path
    index_html: Path
    fusion_png: Path | None = None
    gains_png: Path | None = None
    generalisation: str = ""  # one plain sentence: is the final method above bicubic on every image?
    images: list = field(default_factory=list)  # ImageEntry per image: the comparison viewers
    comparisons: dict = field(default_factory=dict)  # results/*protocol*.json (the inference stage's, if any)


def final_method(methods: list[str]) -> str:
    """The pipeline's final method among ``methods``: the fused ensemble when present, else the last one."""
    candidates = [m for m in methods if m != "bicubic"]
    if not candidates:
        raise ValueError("no method besides bicubic was scored")
    return "fused" if "fused" in candidates else candidates[-1]


def gains_over_bicubic(per_image: pd.DataFrame) -> pd.DataFrame:
    """Per split, method and image: PSNR-Y and PSNR-RGB minus bicubic's on the same image, and colour shift."""
    keys = ["split", "id"]
    bic = per_image[per_image.method == "bicubic"].set_index(keys)[["psnr_y", "psnr_rgb"]]
    rows = per_image[per_image.method != "bicubic"].join(bic, on=keys, rsuffix="_bicubic")
    rows["gain_psnr_y"] = rows["psnr_y"] - rows["psnr_y_bicubic"]
    rows["gain_psnr_rgb"] = rows["psnr_rgb"] - rows["psnr_rgb_bicubic"]
    cols = [c for c in ("split", "method", "id", "source") if c in rows]
    return rows[cols + ["gain_psnr_y", "gain_psnr_rgb", "color_shift"]].reset_index(drop=True)


def below_bicubic(gains: pd.DataFrame, method: str) -> dict[str, list[str]]:
    """Per split, the images on which ``method`` is below bicubic in PSNR-Y or PSNR-RGB."""
    g = gains[gains.method == method]
    bad = g[(g.gain_psnr_y < 0) | (g.gain_psnr_rgb < 0)]
    return {split: bad[bad.split == split]["id"].tolist() for split in g["split"].unique()}


def generalisation_note(gains: pd.DataFrame, method: str) -> str:
    """One sentence a reviewer reads first: does ``method`` beat bicubic on every scored image, and which not."""
    g = gains[gains.method == method]
    label = lambda r: f"{r.split}/{r.id}" + (f" ({r.source})" if "source" in g and r.source else "")  # noqa: E731
    bad = g[(g.gain_psnr_y < 0) | (g.gain_psnr_rgb < 0)]
    worst = g.loc[g.color_shift.idxmax()]
    shift = f"largest colour shift {worst.color_shift:.2f} grey levels ({label(worst)})"
    if bad.empty:
        return (f"The final method ({method}) is above bicubic in PSNR-Y and PSNR-RGB on every one of the "
                f"{len(g)} scored images (smallest PSNR-Y gain {g.gain_psnr_y.min():+.2f} dB); {shift}.")
    items = "; ".join(f"{label(r)}: PSNR-Y {r.gain_psnr_y:+.2f} dB, PSNR-RGB {r.gain_psnr_rgb:+.2f} dB"
                      for r in bad.itertuples())
    return (f"The final method ({method}) is BELOW bicubic on {len(bad)} of {len(g)} scored images: {items}. "
            f"{shift[0].upper() + shift[1:]}.")


def _gain_chart(gains: pd.DataFrame, path: Path) -> Path | None:
    """Per-image PSNR-Y gain over bicubic of every method, one panel per split."""
    plt = pyplot()

    if gains.empty:
        return None
    splits = list(gains["split"].unique())
    methods = list(gains["method"].unique())
    fig, axes = plt.subplots(1, len(splits), figsize=(4.8 * len(splits), 3.2), squeeze=False, sharey=True,
                             gridspec_kw={"width_ratios": [gains[gains.split == s]["id"].nunique() + 1
                                                           for s in splits]})
    width = 0.8 / len(methods)
    for ax, split in zip(axes[0], splits):
        g = gains[gains.split == split]
        ids = list(g["id"].unique())
        names = [f"{i}\n{g[g.id == i]['source'].iloc[0]}" if "source" in g else i for i in ids]
        for k, method in enumerate(methods):
            vals = g[g.method == method].set_index("id").reindex(ids)["gain_psnr_y"]
            ax.bar([i + (k - (len(methods) - 1) / 2) * width for i in range(len(ids))], vals, width, label=method)
        ax.axhline(0, c="k", lw=0.8)
        ax.set_xticks(range(len(ids)), names, fontsize=7)
        ax.set_title(f"{split}: PSNR-Y gain over bicubic (dB)", fontsize=9)
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    return save_figure(fig, path)


def _method_folders(results_dir: Path, split: str, order: list[str]) -> dict[str, Path]:
    base = results_dir / split
    found = {p.name: p for p in base.iterdir() if p.is_dir()} if base.is_dir() else {}
    return {m: found[m] for m in sorted(found, key=lambda m: (order.index(m) if m in order else len(order), m))}


def _fusion_plot(fusion: dict, path: Path) -> Path | None:
    plt = pyplot()

    if not fusion:
        return None
    fig, ax = plt.subplots(figsize=(4.5, 3))
    for split, curve in fusion["curves"].items():
        if curve:
            ax.plot(fusion["grid"], curve, label=split)
    ax.axvline(fusion["weight_a"], ls="--", c="gray", lw=1, label=f"fit on valid: {fusion['weight_a']:.2f}")
    ax.set_xlabel(f"weight of {fusion['model_a']} (1 - weight: {fusion['model_b']})")
    ax.set_ylabel("mean PSNR-Y (dB)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path)


def headline_metrics(metrics: dict, models: list[str]) -> dict[str, dict]:
    """The tracked metrics files' content (``dvc metrics show``: one row each, few columns): per name in
    :func:`smt.pipeline.headline_names`, per scored split, PSNR-Y, SSIM-Y and the mean colour shift; the final
    method's row also carries the fusion weight. Strings and long tables stay in ``summary.json``."""
    from smt.pipeline import headline_names

    out = {}
    for name in headline_names(models):
        method = metrics.get("final_method") if name == "final" else name
        row = {split: {k: metrics[split][method][k] for k in HEADLINE_KEYS}
               for split in ("valid", "test") if method in metrics.get(split, {})}
        if name == "final" and "fusion_weight" in metrics:
            row["fusion_weight"] = metrics["fusion_weight"]
        out[name] = row
    return out


def _bicubic_png(out_dir: Path, split: str, img_id: str) -> Path:
    return out_dir / "bicubic" / split / f"{img_id}.png"


def _image_entries(root: Path, manifests: dict[str, pd.DataFrame], results_dir: Path, out_dir: Path,
                   order: list[str], per_image: pd.DataFrame, scale: int, written: set) -> list[ImageEntry]:
    """Every image of every split with its versions (HR, bicubic, each method's output) and scores; writes the
    bicubic PNGs (no other stage keeps them) under ``out_dir/bicubic`` but those in ``written`` ((split, id) pairs
    the scoring already wrote)."""
    scores = {(r.split, r.id, r.method): (r.psnr_y, r.color_shift) for r in per_image.itertuples()}
    entries = []
    for split, manifest in manifests.items():
        folders = {m: {image_id(p): p for p in sorted(f.glob("*.png"))}
                   for m, f in _method_folders(results_dir, split, order).items()}
        hr = has_hr(manifest)
        for row in tqdm(manifest.itertuples(), total=len(manifest), desc=f"viewer {split}", unit="img"):
            bic_png = _bicubic_png(out_dir, split, row.id)
            if hr:
                width, height = row.hr_width, row.hr_height
            else:
                width, height = row.lr_width * scale, row.lr_height * scale
            if (split, row.id) not in written:
                bic = bicubic_upscale(read_image(root / row.lr_path), scale)[:height, :width]
                write_png(bic_png, bic)
            versions = {"HR": root / row.hr_path} if hr else {}
            versions["bicubic"] = bic_png
            versions.update({m: files[row.id] for m, files in folders.items() if row.id in files})
            scored = {n: scores[(split, row.id, n)] for n in versions if (split, row.id, n) in scores}
            entries.append(ImageEntry(split, str(row.id), str(getattr(row, "source", "") or ""), int(width),
                                      int(height), versions, scored))
    return entries


def run_evaluation(data_cfg: DataConfig, report_cfg: ReportConfig, results_dir: str | Path = "results",
                   out_dir: str | Path = "reports/report", reports_dir: str | Path = "reports",
                   params_path: str | Path = "params.yaml") -> EvaluationResult:
    from smt.config import load_section
    from smt.pipeline import HEADLINE_DIR, TIMINGS_DIR, stage_definitions

    protocol = get_protocol(report_cfg.protocol)
    root, results_dir, out_dir = Path(data_cfg.root), Path(results_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    frames, crop_rows, psnr_of = [], [], {}
    num_images, sources, manifests, written = {}, {}, {}, set()
    methods_path = results_dir / "methods.json"  # the inference stage's methods in table order
    order = json.loads(methods_path.read_text())["methods"] if methods_path.exists() else []
    for split in ("valid", "test"):
        manifest = read_manifest(root, split)
        if manifest.empty:
            continue
        manifests[split] = manifest
        num_images[split] = len(manifest)
        if "source" in manifest:
            sources.update({(split, i): str(src) for i, src in zip(manifest["id"], manifest["source"])})
        if not has_hr(manifest):  # the challenge's test set: outputs are written, nothing can be scored
            continue
        rows = []
        for row in tqdm(manifest.itertuples(), total=len(manifest), desc=f"bicubic {split}", unit="img"):
            hr, lr = read_image(root / row.hr_path), read_image(root / row.lr_path)
            sr = bicubic_upscale(lr, data_cfg.scale)[: hr.shape[0], : hr.shape[1]]
            rows.append({"id": row.id, **evaluate_pair(sr, hr, protocol)})
            write_png(_bicubic_png(out_dir, split, row.id), sr)  # the viewers' bicubic version
            written.add((split, row.id))
            if split == "valid" and len(crop_rows) < report_cfg.num_crops:
                crop_rows.append((row.id, {"HR": hr, "bicubic": sr}))
        frames.append(pd.DataFrame(rows).assign(split=split, method="bicubic"))
        hr_dir = root / f"{split}_HR"
        for method, folder in _method_folders(results_dir, split, order).items():
            df = evaluate_folder(folder, hr_dir, protocol)
            frames.append(df.assign(split=split, method=method))
            if split == "valid":
                for img_id, images in crop_rows:
                    images[method] = read_image(next(folder.glob(f"{img_id}*.png")))
    per_image = pd.concat(frames, ignore_index=True)
    per_image["source"] = [sources.get((sp, i), "") for sp, i in zip(per_image["split"], per_image["id"])]
    per_image = per_image[["split", "method", "id", "source", *METRIC_COLUMNS]]
    per_image.to_csv(out_dir / "per_image.csv", index=False)
    for r in per_image[per_image.split == "valid"].itertuples():
        psnr_of[(r.id, r.method)] = r.psnr_y
    metrics: dict = {"protocol": protocol.name, "num_images": num_images}
    for split, df in per_image.groupby("split", sort=False):
        metrics[split] = {m: summarize(g) for m, g in df.groupby("method", sort=False)}
    fusion_path = results_dir / "fusion.json"
    fusion = json.loads(fusion_path.read_text()) if fusion_path.exists() else {}
    if fusion:
        metrics["fusion_weight"] = fusion["weight_a"]
    fusion_png = _fusion_plot(fusion, out_dir / "fusion.png")
    gains = gains_over_bicubic(per_image)
    gains_png, note = None, ""
    if not gains.empty:
        method = final_method(list(per_image["method"].unique()))
        gains_png = _gain_chart(gains, out_dir / "gains.png")
        note = generalisation_note(gains, method)
        metrics["final_method"] = method
        metrics["below_bicubic"] = below_bicubic(gains, method)
        metrics["generalisation"] = note
    (out_dir / "summary.json").write_text(json.dumps(metrics, indent=2) + "\n")  # keeps the tables' order
    models = list(load_section("train", params_path).models)
    headline_dir = Path(reports_dir) / Path(HEADLINE_DIR).relative_to(REPORTS_DIR)
    headline_dir.mkdir(parents=True, exist_ok=True)
    for name, row in headline_metrics(metrics, models).items():
        (headline_dir / f"{name}.json").write_text(json.dumps(row, indent=2) + "\n")
    crops_png = out_dir / "crops.png"
    save_crop_grid(crops_png, crop_rows, report_cfg.crop_size, psnr_of)
    entries = _image_entries(root, manifests, results_dir, out_dir, order, per_image, data_cfg.scale, written)
    galleries = write_image_pages(entries, out_dir, metrics.get("final_method"))
    data_note = (f"{data_cfg.source} profile, x{data_cfg.scale}; LR = MATLAB-bicubic (antialiased) downscale of "
                 f"the HR images, rounded to uint8; " +
                 ", ".join(f"{n} {s} images" for s, n in num_images.items()) + f" under {data_cfg.root}")
    # the pages load the run's measurements from timings/infer.js (not a DVC output); where this machine has not
    # run the inference stage, an empty one keeps them free of a failed load (they then say how to measure)
    timings_js = Path(reports_dir).parent / TIMINGS_DIR / "infer.js"
    if not timings_js.exists():
        timings_js.parent.mkdir(parents=True, exist_ok=True)
        timings_js.write_text("window.SMT_TIMINGS = window.SMT_TIMINGS || {};\n")
    # a protocol comparison the inference stage may write (e.g. the authors' protocol beside ours): shown as is
    comparisons = {p.stem: json.loads(p.read_text()) for p in sorted(results_dir.glob("*protocol*.json"))}
    report_rel = rel(out_dir, reports_dir)
    index_html = write_index(reports_dir, metrics, protocol.describe(), data_note,
                             list(stage_definitions(params_path)), entries, galleries, report_rel,
                             rel(gains_png, reports_dir) if gains_png else None, comparisons)
    return EvaluationResult(per_image, metrics, protocol.describe(), crops_png, index_html, fusion_png, gains_png,
                            note, entries, comparisons)
