"""``reports/index.html``: the page a reviewer opens first (headline table, protocol, links to every report)."""
from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Mapping, Sequence

__all__ = ["write_index", "write_metrics", "STAGE_TITLES"]

# display order and titles of the stage reports; a report not listed here is appended by name
STAGE_TITLES = {
    "data": "Data: demo image set, bicubic LR, manifests",
    "select": "CLIP selection of the fine-tuning images",
    "infer": "Inference: ensembles, fusion weight, cost per image",
    "report": "Evaluation: PSNR/SSIM of every method on the validation and test images",
    "benchmark": "Benchmark: the final models on Set5, Set14, B100, Urban100, Manga109 (published numbers beside)",
    "ablation_loss": "Ablation 1: multi-scale loss vs x4-only loss (seeds)",
    "ablation_subset": "Ablation 2: fine-tuning on CLIP-selected vs random images (seeds)",
    "ablation_ensemble": "Ablation 3: each inference switch, accuracy vs compute (Pareto front)",
    "ablation_fusion": "Ablation 4: PSNR-Y against the fusion weight, validation vs test",
    "experiments": "DVC experiments of the ablation stages",
}
ABLATIONS = ("ablation_loss", "ablation_subset", "ablation_ensemble", "ablation_fusion")


def _title(stage: str) -> str:
    if stage.startswith("train_"):
        model, rnd, st = stage[len("train_"):].rsplit("_", 2)
        return f"Training: {model}, round {rnd[1:]}, stage {st}"
    return STAGE_TITLES.get(stage, stage)


def _table(summary: Mapping[str, Mapping[str, float]]) -> str:
    head = ("<tr><th>method</th><th>PSNR-Y (dB)<br>(gain over bicubic)</th><th>SSIM-Y</th><th>PSNR-RGB (dB)</th>"
            "<th>SSIM-RGB</th><th>colour shift<br>mean / max</th></tr>")
    opt = lambda v, k, f: format(v[k], f) if k in v else "&ndash;"  # noqa: E731
    floor = summary.get("bicubic", {}).get("psnr_y")
    gain = lambda m, v: f" ({v['psnr_y'] - floor:+.2f})" if floor is not None and m != "bicubic" else ""  # noqa: E731
    body = "".join(
        f"<tr><td>{html.escape(m)}</td><td>{v['psnr_y']:.3f}{gain(m, v)}</td><td>{v['ssim_y']:.4f}</td>"
        f"<td>{v['psnr_rgb']:.3f}</td><td>{v['ssim_rgb']:.4f}</td>"
        f"<td>{opt(v, 'color_shift', '.2f')} / {opt(v, 'color_shift_max', '.2f')}</td></tr>"
        for m, v in summary.items()
    )
    return f"<table>{head}{body}</table>"


def write_index(reports_dir: str | Path, metrics: Mapping, protocol: str, data_note: str,
                stages: Sequence[str]) -> Path:
    """Write ``reports_dir/index.html`` from the metrics dict (``metrics['valid'][method][metric]``).

    Links the report of every stage in ``stages`` (the pipeline's, in its order) and of every ablation. The page
    depends on nothing but its arguments (not on which reports happen to exist yet), so a rerun writes the
    same bytes; ablation links work once their stages have run (``dvc repro ablation_...``).
    """
    reports_dir = Path(reports_dir)
    links = "".join(
        f'<li><a href="{html.escape(s)}/{html.escape(s)}.html">{html.escape(_title(s))}</a></li>'
        for s in stages if s not in ABLATIONS
    )
    ablation_links = "".join(f'<li><a href="{s}/{s}.html">{html.escape(_title(s))}</a> <small>(<code>dvc repro {s}'
                             f'</code>)</small></li>' for s in ABLATIONS)
    tables = "".join(
        f"<h2>{html.escape(split)} images ({metrics.get('num_images', {}).get(split, '?')})</h2>{_table(summary)}"
        for split, summary in metrics.items()
        if split in ("valid", "test")
    )
    verdict = ""  # the generalisation verdict, red where a method falls below bicubic
    if metrics.get("generalisation"):
        colour = "#c00" if any(metrics.get("below_bicubic", {}).values()) else "#080"
        verdict = (f'<p style="font-size:1.1em;padding:.5em;border-left:4px solid {colour}"><b>Against bicubic.</b> '
                   f'{html.escape(metrics["generalisation"])}</p>')
    page = f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>SMT reports</title>
<style>body{{font-family:sans-serif;max-width:60em;margin:2em auto}}table{{border-collapse:collapse}}
td,th{{border:1px solid #bbb;padding:.3em .7em;text-align:right}}td:first-child{{text-align:left}}</style>
</head><body>
<h1>SMT: NTIRE 2025 x4 super-resolution, reproduced</h1>
{verdict}
<p><b>Protocol.</b> {html.escape(protocol)}. Mean over images. Colour shift: the largest over R, G, B of
|mean(SR &minus; HR)| on the scored region, in grey levels (mean over images / worst image).</p>
<p><b>Data.</b> {html.escape(data_note)}</p>
<p><b>Methods.</b> bicubic: MATLAB-bicubic x4 upscaling (the floor). <i>model</i>: one forward of the final EMA
weights. +SE: x8 geometric self-ensemble. +MW: the tiled result at several window sizes, averaged with weights.
fused: the two models' most complete configurations mixed with the weight fit on the validation images
{('(weight ' + format(metrics['fusion_weight'], '.2f') + ')') if 'fusion_weight' in metrics else ''}.
Time per image and peak memory are measured per run and kept out of these pages (they differ between runs):
see <code>timings/infer.json</code> beside <code>reports/</code>.</p>
{tables}
<h2>Stage reports</h2><ul>{links}</ul>
<h2>Ablations</h2><ul>{ablation_links}</ul>
<p><small>Raw numbers: <code>metrics.json</code>; per-image scores: <code>report/per_image.csv</code>.</small></p>
</body></html>
"""
    out = reports_dir / "index.html"
    out.write_text(page)
    return out


def write_metrics(path: str | Path, metrics: Mapping) -> None:
    Path(path).write_text(json.dumps(metrics, indent=2) + "\n")  # keeps the table order
