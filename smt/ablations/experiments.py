"""DVC experiments as a table: ``dvc exp show --json`` flattened to one row per workspace, commit and experiment.

Columns: ``rev``, ``name``, ``kind`` (``workspace`` | ``commit`` | ``experiment``), ``baseline`` (the commit an
experiment branches from), ``timestamp``, then every param as ``<dotted.key>`` (file prefix ``<file>:`` unless it
is ``params.yaml``) and every metric as ``<metrics file>:<dotted.key>``. Revisions whose params or metrics could
not be read keep NaN there (their error text is in ``error``).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pandas as pd

__all__ = ["flatten", "experiments_table", "collect_experiments", "ablation_experiment_tables"]


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> {"a.b.c": value}; lists stay values."""
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        out.update(flatten(v, key) if isinstance(v, dict) else {key: v})
    return out


def _row(entry: dict, kind: str, baseline: str | None) -> dict:
    data = entry.get("data") or {}
    row: dict[str, Any] = {"rev": entry.get("rev"), "name": entry.get("name"), "kind": kind, "baseline": baseline,
                           "timestamp": data.get("timestamp")}
    errors = [entry["error"]["msg"]] if entry.get("error") else []
    for fname, content in (data.get("params") or {}).items():
        if "data" in content:
            prefix = "" if fname == "params.yaml" else f"{fname}:"
            row.update({f"{prefix}{k}": v for k, v in flatten(content["data"]).items()})
        elif content.get("error"):
            errors.append(f"{fname}: {content['error'].get('msg')}")
    for fname, content in (data.get("metrics") or {}).items():
        if "data" in content:
            row.update({f"{fname}:{k}": v for k, v in flatten(content["data"]).items()})
        elif content.get("error"):
            errors.append(f"{fname}: {content['error'].get('msg')}")
    row["error"] = "; ".join(errors) or None
    return row


def _walk(entries: list[dict]) -> Iterator[dict]:
    for entry in entries:
        kind = "workspace" if entry.get("rev") == "workspace" else "commit"
        yield _row(entry, kind, None)
        for exp in entry.get("experiments") or []:
            for rev in exp.get("revs") or []:
                yield _row(rev, "experiment", entry.get("rev"))


def experiments_table(show_json: str | list) -> pd.DataFrame:
    """The table from ``dvc exp show --json`` output (text or parsed)."""
    entries = json.loads(show_json) if isinstance(show_json, str) else show_json
    return pd.DataFrame(list(_walk(entries)))


def collect_experiments(repo: str | Path = ".", all_commits: bool = False) -> pd.DataFrame:
    """Run ``dvc exp show --json`` in ``repo`` and return its table (empty if the repository has no DVC)."""
    cmd = [sys.executable, "-m", "dvc", "exp", "show", "--json"] + (["--all-commits"] if all_commits else [])
    res = subprocess.run(cmd, cwd=repo, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"dvc exp show failed in {repo}: {res.stderr.strip()[-500:]}")
    return experiments_table(res.stdout)


def ablation_experiment_tables(table: pd.DataFrame, reports_dir: str | Path = "reports/experiments",
                               ) -> dict[str, tuple[pd.DataFrame, Path | None]]:
    """Per ablation stage with results in some revision: one row per revision (workspace, commits, experiments)
    with the ``ablations.*`` params that vary and the per-variant means/std, plus a plot of the means (error
    bars: std over seeds) per revision."""
    from smt.figures import pyplot, save_figure

    plt = pyplot()

    out: dict[str, tuple[pd.DataFrame, Path | None]] = {}
    reports_dir = Path(reports_dir)
    for stage in ("ablation_loss", "ablation_subset", "ablation_ensemble", "ablation_fusion"):
        prefix = f"reports/metrics_{stage}.json:"
        cols = [c for c in table.columns if c.startswith(prefix)]
        if not cols:
            continue
        rows = table.dropna(subset=cols, how="all")
        params = [c for c in table.columns if c.startswith("ablations.") and rows[c].astype(str).nunique() > 1]
        df = rows[["name", "kind", *params, *cols]].rename(columns={c: c[len(prefix):] for c in cols})
        df["name"] = df["name"].fillna(df["kind"])
        means = [c for c in df.columns if c.startswith("variants.") and c.endswith(".mean")]
        figure = None
        if not means and "diff_psnr_y" in df:  # this layout: the treatment's difference, error bar its stderr
            fig, ax = plt.subplots(figsize=(7, 3.4))
            ax.errorbar(np.arange(len(df)), df["diff_psnr_y"], yerr=df.get("stderr"), fmt="o", capsize=3)
            ax.axhline(0, color="gray", lw=0.8)
            ax.set_xticks(range(len(df)), df["name"].astype(str), rotation=30, fontsize=7)
            ax.set_ylabel("treatment - reference, PSNR-Y (dB)"), ax.set_title(stage, fontsize=9)
            fig.tight_layout()
            figure = save_figure(fig, reports_dir / f"{stage}.png")
        if means:
            fig, ax = plt.subplots(figsize=(7, 3.4))
            for i, c in enumerate(means):
                std = df[c.replace(".mean", ".std")] if c.replace(".mean", ".std") in df else None
                ax.errorbar(np.arange(len(df)) + 0.1 * i, df[c], yerr=std, fmt="o", capsize=3,
                            label=c.split(".")[1])
            ax.set_xticks(range(len(df)), df["name"].astype(str), rotation=30, fontsize=7)
            ax.set_ylabel("validation PSNR-Y (dB)"), ax.legend(fontsize=7), ax.set_title(stage, fontsize=9)
            fig.tight_layout()
            figure = save_figure(fig, reports_dir / f"{stage}.png")
        out[stage] = (df, figure)
    return out
