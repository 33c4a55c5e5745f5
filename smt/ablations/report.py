"""Tables, figures, one-sentence conclusions and DVC metrics of the ablation notebooks.

The tracked metrics file of each ablation (``reports/metrics_ablation_*.json``) holds a few numbers whose keys the
report stage's headline files share (``valid.psnr_y``, ``test.psnr_y``, ``fusion_weight``), so ``dvc metrics show``
stays a narrow table; the full tables (every variant, names of configurations) go to ``summary.json`` beside the
ablation's page."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from smt.ablations.stats import Comparison, compare, conclusion, pareto_front, seed_summary
from smt.figures import pyplot, save_figure

__all__ = ["seed_ablation_report", "ensemble_report", "fusion_report", "write_json"]


def write_json(path: str | Path, obj: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, default=float) + "\n")
    return path


def _strip_plot(runs: pd.DataFrame, summary: pd.DataFrame, title: str, path: Path) -> Path:
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(summary), 3.2))
    for i, (variant, row) in enumerate(summary.iterrows()):
        ys = runs.loc[runs.variant == variant, "psnr_y"].to_numpy()
        ax.plot(np.full(len(ys), i) + np.linspace(-0.08, 0.08, len(ys)), ys, "o", alpha=0.7)
        ax.errorbar(i + 0.25, row["mean"], yerr=row["std"], fmt="s", color="k", capsize=4)
    bic = runs["bicubic_psnr_y"].iloc[0] if "bicubic_psnr_y" in runs else None
    if bic is not None and np.isfinite(bic):
        ax.axhline(bic, ls="--", color="gray", lw=1, label=f"bicubic {bic:.2f}")
        ax.legend(fontsize=7)
    ax.set_xticks(range(len(summary)), summary.index, fontsize=8)
    ax.set_ylabel("validation PSNR-Y (dB)"), ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)


def seed_ablation_report(runs: pd.DataFrame, treatment: str, reference: str, claim: str, out_dir: str | Path,
                         metrics_path: str | Path) -> tuple[pd.DataFrame, list[Comparison], str, Path]:
    """Seed summary per variant, every variant against ``reference``, the conclusion about ``treatment``,
    the strip plot and runs table in ``out_dir``, and the metrics (for ``dvc metrics``/``dvc exp show``)."""
    out_dir = Path(out_dir)
    summary = seed_summary(runs, "variant", "psnr_y")
    comps = [compare(summary, v, reference) for v in summary.index if v != reference]
    main = next(c for c in comps if c.a == treatment)
    text = conclusion(main, claim)
    fig = _strip_plot(runs, summary, f"{claim} ({len(set(runs.seed))} seeds)", out_dir / "runs.png")
    runs.to_csv(out_dir / "runs.csv", index=False)
    write_json(out_dir / "summary.json", {
        "variants": {v: {k: float(r[k]) for k in ("mean", "std", "n")} for v, r in summary.iterrows()},
        "diff_vs_reference": {c.a: {"diff": c.diff, "stderr": c.stderr, "within_noise": c.within_noise}
                              for c in comps}})
    # the tracked metrics: the treatment's mean and its difference from the reference, with its noise
    write_json(metrics_path, {"valid": {"psnr_y": float(summary.loc[treatment, "mean"])},
                              "diff_psnr_y": float(main.diff), "stderr": float(main.stderr)})
    return summary, comps, text, fig


def ensemble_report(summary: pd.DataFrame, out_dir: str | Path, metrics_path: str | Path,
                    ) -> tuple[pd.DataFrame, str, Path]:
    """Pareto front of validation PSNR-Y against forward work; the conclusion names the cheapest configuration
    within 0.01 dB of the best, and what the full ensemble adds over the best single model."""
    plt = pyplot()

    out_dir = Path(out_dir)
    s = summary.copy()
    s["pareto"] = pareto_front(s["work"], s["psnr_y"])
    best = s.loc[s.psnr_y.idxmax()]
    cheap = s[s.psnr_y >= best.psnr_y - 0.01].sort_values("work").iloc[0]
    singles = s[~s.config.str.contains(r"\+|fused")]
    base = singles.loc[singles.psnr_y.idxmax()]
    text = (f"The best configuration is {best.config} ({best.psnr_y:.3f} dB, {best.work:.0f}x the work of one plain "
            f"forward), {best.psnr_y - base.psnr_y:+.3f} dB over the best single model alone ({base.config}); "
            + (f"{cheap.config} comes within 0.01 dB of it at {cheap.work:.0f}x the work. "
               if cheap.config != best.config else "no cheaper configuration comes within 0.01 dB of it. ")
            + f"Inference is deterministic "
            f"(no seed spread); with few validation images, gaps of a few hundredths of a dB describe these "
            f"images only.")
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.scatter(s.work, s.psnr_y, c=np.where(s.pareto, "C3", "C0"), s=22)
    front = s[s.pareto].sort_values("work")
    ax.plot(front.work, front.psnr_y, "-", color="C3", lw=1, label="Pareto front")
    for r in s.itertuples():
        if r.pareto:
            ax.annotate(r.config, (r.work, r.psnr_y), fontsize=6, xytext=(3, 2), textcoords="offset points")
    ax.set_xscale("log"), ax.set_xlabel("forward work per image (x one plain forward, log)")
    ax.set_ylabel("validation PSNR-Y (dB)"), ax.legend(fontsize=7), ax.set_title("accuracy vs compute", fontsize=9)
    fig.tight_layout()
    path = save_figure(fig, out_dir / "pareto.png")
    s.to_csv(out_dir / "configs.csv", index=False)
    write_json(out_dir / "summary.json", {"best": {"config": best.config, "psnr_y": float(best.psnr_y)},
                                          "cheapest_within_0.01dB": {"config": cheap.config, "work": float(cheap.work)},
                                          "pareto": front.config.tolist()})
    # the tracked metrics: the best configuration's PSNR-Y and work (its name and the front: summary.json)
    write_json(metrics_path, {"valid": {"psnr_y": float(best.psnr_y)}, "work": float(best.work)})
    return s, text, path


def fusion_report(curves: pd.DataFrame, fitted_weight: float, out_dir: str | Path, metrics_path: str | Path,
                  ) -> tuple[pd.DataFrame, str, Path]:
    """Mean PSNR-Y against the fusion weight per split, the per-image optimum weights (their spread is the
    noise of the fitted weight), and the cost of using the validation weight on the test images."""
    plt = pyplot()

    out_dir = Path(out_dir)
    mean = curves.groupby(["split", "weight"])["psnr_y"].mean().unstack(0)
    per_image = curves.loc[curves.groupby(["split", "id"])["psnr_y"].idxmax()][["split", "id", "weight", "psnr_y"]]
    rows = []
    for split in mean.columns:
        col = mean[split]
        w_fit = col.index[np.argmin(np.abs(col.index.to_numpy() - fitted_weight))]
        rows.append({"split": split, "best_weight": float(col.idxmax()), "best_psnr_y": float(col.max()),
                     "psnr_y_at_fitted_weight": float(col.loc[w_fit]), "gain_over_0.5": float(col.max() - col.loc[
                         col.index[np.argmin(np.abs(col.index.to_numpy() - 0.5))]]),
                     "per_image_best_weight_min": float(per_image[per_image.split == split].weight.min()),
                     "per_image_best_weight_max": float(per_image[per_image.split == split].weight.max())})
    table = pd.DataFrame(rows).set_index("split")
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for split in mean.columns:
        ax.plot(mean.index, mean[split], label=split)
    ax.axvline(fitted_weight, ls="--", color="gray", lw=1, label=f"fitted on valid ({fitted_weight:.2f})")
    ax.set_xlabel("weight of the first model"), ax.set_ylabel("mean PSNR-Y (dB)"), ax.legend(fontsize=7)
    fig.tight_layout()
    path = save_figure(fig, out_dir / "fusion_curves.png")
    v = table.loc["valid"]
    text = (f"The validation optimum is w = {v.best_weight:.2f} ({v['gain_over_0.5']:+.3f} dB over the "
            f"submission's 0.5); per-image optima range from {v.per_image_best_weight_min:.2f} to "
            f"{v.per_image_best_weight_max:.2f}, so the fitted weight is uncertain at that scale")
    if "test" in table.index:
        t = table.loc["test"]
        text += (f"; on the test images the fitted weight gives {t.psnr_y_at_fitted_weight:.3f} dB against their own "
                 f"optimum {t.best_psnr_y:.3f} dB at w = {t.best_weight:.2f} "
                 f"(a {t.best_psnr_y - t.psnr_y_at_fitted_weight:.3f} dB transfer loss)")
    text += "."
    write_json(out_dir / "summary.json", {s: r.to_dict() for s, r in table.iterrows()})
    # the tracked metrics: PSNR-Y at the validation optimum, the test images' at the fitted weight, the optimum
    metrics = {"valid": {"psnr_y": float(v.best_psnr_y)}}
    if "test" in table.index:
        metrics["test"] = {"psnr_y": float(table.loc["test"].psnr_y_at_fitted_weight)}
    write_json(metrics_path, {**metrics, "fusion_weight": float(v.best_weight)})
    return table, text, path
