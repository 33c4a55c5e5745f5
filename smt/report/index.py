"""``reports/index.html``: the page a reviewer opens first.

Top to bottom: the verdict against bicubic, the headline (the final method against bicubic on both splits), the
per-image gain chart, a thumbnail of the validation and test images (each opens its comparison viewer), the cost
per method (filled in from the run's ``timings/infer.js`` where it exists: wall-clock stays out of every tracked
output), every method's mean scores (collapsed), the stage reports and the ablations (with the command that
produces each; never a link to a page ``make repro`` does not write).
"""
from __future__ import annotations

import html
from pathlib import Path
from typing import Mapping, Sequence

from smt.report.assets import COST_JS
from smt.report.viewer import INDEX_THUMBS, ImageEntry, page_head, thumbs_html

__all__ = ["write_index", "STAGE_TITLES", "ABLATIONS", "summary_table", "stage_title", "headline_table"]

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


def stage_title(stage: str) -> str:
    if stage.startswith("train_"):
        model, rnd, st = stage[len("train_"):].rsplit("_", 2)
        return f"Training: {model}, round {rnd[1:]}, stage {st}"
    return STAGE_TITLES.get(stage, stage)


def summary_table(summary: Mapping[str, Mapping[str, float]], sortable: bool = False) -> str:
    """Mean scores, one row per method: dB to 2 decimals (gain over bicubic beside), SSIM to 4, colour shift 2."""
    floor = summary.get("bicubic", {}).get("psnr_y")
    head = ("<thead><tr><th>method</th><th>PSNR-Y (dB)</th><th>gain over bicubic (dB)</th><th>SSIM-Y</th>"
            "<th>PSNR-RGB (dB)</th><th>SSIM-RGB</th><th>colour shift, mean</th><th>colour shift, worst image</th>"
            "</tr></thead>")
    opt = lambda v, k, f: format(v[k], f) if k in v else "&ndash;"  # noqa: E731
    gain = lambda m, v: (f"{v['psnr_y'] - floor:+.2f}" if floor is not None and m != "bicubic"  # noqa: E731
                         else "&ndash;")
    body = "".join(
        f"<tr><td>{html.escape(m)}</td><td>{v['psnr_y']:.2f}</td><td>{gain(m, v)}</td><td>{v['ssim_y']:.4f}</td>"
        f"<td>{v['psnr_rgb']:.2f}</td><td>{v['ssim_rgb']:.4f}</td><td>{opt(v, 'color_shift', '.2f')}</td>"
        f"<td>{opt(v, 'color_shift_max', '.2f')}</td></tr>"
        for m, v in summary.items()
    )
    return f'<table{" class=sortable" if sortable else ""}>{head}<tbody>{body}</tbody></table>'


def headline_table(metrics: Mapping) -> str:
    """Final method against bicubic, one row per split."""
    final = metrics.get("final_method")
    rows = []
    for split in ("valid", "test"):
        summary = metrics.get(split)
        if not summary or final not in summary or "bicubic" not in summary:
            continue
        b, f = summary["bicubic"], summary[final]
        n = metrics.get("num_images", {}).get(split, "?")
        rows.append(f"<tr><td>{split} ({n} image{'' if n == 1 else 's'})</td><td>{b['psnr_y']:.2f}</td>"
                    f"<td><b>{f['psnr_y']:.2f}</b></td>"
                    f"<td><b>{f['psnr_y'] - b['psnr_y']:+.2f}</b></td><td>{b['ssim_y']:.4f}</td>"
                    f"<td>{f['ssim_y']:.4f}</td><td>{f['color_shift']:.2f} / {f['color_shift_max']:.2f}</td></tr>")
    if not rows:
        return "<p>No split with HR images was scored.</p>"
    return (f"<table><thead><tr><th>images</th><th>bicubic PSNR-Y (dB)</th><th>{html.escape(final)} PSNR-Y (dB)</th>"
            f"<th>gain (dB)</th><th>bicubic SSIM-Y</th><th>{html.escape(final)} SSIM-Y</th>"
            f"<th>{html.escape(final)} colour shift<br>mean / worst</th></tr></thead><tbody>{''.join(rows)}</tbody>"
            "</table>")


PROTOCOL_LABELS = {"smt": "ours (infer.protocol: smt): blended tiles, fitted fusion weight, rounded",
                   "bbox": "the authors' (infer.protocol: bbox): their TTA and tiling, 0.5/0.5 fusion, truncated"}


def protocol_table(content: Mapping, metrics: Mapping) -> str:
    """A results file comparing protocols (``{"split", "method", "psnr_y": {protocol: dB}, ...}``) as one row per
    protocol with its gain over bicubic; any other content as a key/value table."""
    from smt.report.tables import kv_table

    scores = content.get("psnr_y")
    if not isinstance(scores, Mapping):
        return kv_table(content)
    split = str(content.get("split", "test"))
    bicubic = metrics.get(split, {}).get("bicubic", {}).get("psnr_y")
    rows = "".join(
        f"<tr><td>{html.escape(PROTOCOL_LABELS.get(p, p))}</td><td>{v:.3f}</td>"
        f"<td>{'' if bicubic is None else f'{v - bicubic:+.3f}'}</td></tr>" for p, v in scores.items())
    return (f"<p>The final method ({html.escape(str(content.get('method', '')))}) on the {html.escape(split)} "
            f"images ({content.get('images', '?')}):</p><table><thead><tr><th>protocol</th><th>PSNR-Y (dB)</th>"
            f"<th>gain over bicubic (dB)</th></tr></thead><tbody>{rows}</tbody></table>")


def write_index(reports_dir: str | Path, metrics: Mapping, protocol: str, data_note: str, stages: Sequence[str],
                entries: Sequence[ImageEntry] = (), galleries: Sequence[str] = (), report_rel: str = "report",
                gains_png: str | None = None, comparisons: Mapping[str, Mapping] | None = None) -> Path:
    """Write ``reports_dir/index.html`` from the summary dict (``metrics[split][method][metric]``).

    Links the report of every stage in ``stages`` (the pipeline's, in its order) except the ablations, which are
    listed with the command that writes them. The page depends on nothing but its arguments, so a rerun writes
    the same bytes. ``entries``: the images (thumbnails open ``report_rel/view/...``); ``galleries``: the pages
    listing all of them; ``gains_png``: the gain chart, relative to ``reports_dir``; ``comparisons``: name ->
    a results file's content (a protocol comparison), shown by :func:`protocol_table`.
    """

    reports_dir = Path(reports_dir)
    links = "".join(f'<li><a href="{html.escape(s)}/{html.escape(s)}.html">{html.escape(stage_title(s))}</a></li>'
                    for s in stages if s not in ABLATIONS)
    ablations = "".join(f"<li>{html.escape(stage_title(s))}: <code>dvc repro {s}</code> writes "
                        f"<code>reports/{s}/{s}.html</code></li>" for s in ABLATIONS if s in stages)
    tables = "".join(
        f"<h3>{html.escape(split)} images ({metrics.get('num_images', {}).get(split, '?')})</h3>"
        f"{summary_table(summary, sortable=True)}"
        for split, summary in metrics.items() if split in ("valid", "test"))
    verdict = ""
    if metrics.get("generalisation"):
        bad = " bad" if any(metrics.get("below_bicubic", {}).values()) else ""
        verdict = f'<p class="verdict{bad}"><b>Against bicubic.</b> {html.escape(metrics["generalisation"])}</p>'
    final = metrics.get("final_method")
    thumbs = ""
    for split in ("valid", "test"):
        shown = [e for e in entries if e.split == split]
        if not shown:
            continue
        more = (f' <a href="{report_rel}/{galleries[0]}">all {len(shown)} {split} images</a>'
                if len(shown) > INDEX_THUMBS and galleries else "")
        thumbs += (f"<h3>{split} images ({len(shown)}){more}</h3>"
                   + thumbs_html(shown[:INDEX_THUMBS], f"{report_rel}/", final))
    gallery_link = (f' All images, paginated: <a href="{report_rel}/{galleries[0]}">gallery</a>.' if galleries else "")
    gains = (f'<h2>Gain over bicubic, per image</h2><p><img src="{gains_png}" alt="PSNR-Y gain over bicubic per '
             f'image and method"></p><p class="note">PSNR-Y of each method minus bicubic\'s on the same image; a bar '
             "below zero is an image on which the method loses to plain interpolation.</p>") if gains_png else ""
    compare = "".join(protocol_table(content, metrics) for content in (comparisons or {}).values())
    compare = (f"<h2>Protocol comparison</h2><p>The authors' inference protocol against ours, on the same trained "
               f"weights.</p>{compare}"
               "<p class=\"note\">From <code>results/protocols.json</code> (the inference stage); seconds per image "
               "in the cost table below (<code>fused</code> and <code>fused [bbox]</code>). What each protocol does: "
               "docs/bbox_protocol.md.</p>") if compare else ""
    weight = (f" (weight {metrics['fusion_weight']:.2f})" if "fusion_weight" in metrics else "")
    page = (page_head("SMT reports", f"{report_rel}/assets")
            + f"""<h1>SMT: NTIRE 2025 x4 super-resolution, reproduced</h1>
{verdict}
<h2>Headline: {html.escape(str(final))} against bicubic</h2>
{headline_table(metrics)}
<p class="note">{html.escape(protocol)}. Mean over images. Colour shift: the largest over R, G, B of |mean(SR &minus;
HR)| on the scored region, in grey levels.</p>
{compare}
{gains}
<h2>Look at the images</h2>
<p>Each thumbnail opens a comparison viewer: the whole image at full resolution, a slider between any two of HR,
bicubic and every method, zoom and pan in step, each version's PSNR-Y and colour shift.{gallery_link}</p>
{thumbs}
<h2>Cost per method</h2>
<div id="cost"><p class="note">Seconds per image and peak memory are measurements of a run, not results, and stay
out of the tracked outputs. They appear here once this machine has run the inference stage
(<code>dvc repro infer</code>, which writes <code>timings/infer.js</code>).</p></div>
<details><summary>Every method's mean scores (click a column to sort)</summary>
<p><b>Methods.</b> bicubic: MATLAB-bicubic x4 upscaling (the floor). <i>model</i>: one forward of the final EMA
weights. +SE: x8 geometric self-ensemble. +MW: the tiled result at several window sizes, averaged with weights.
fused: the two models' most complete configurations mixed with the weight fit on the validation images{weight}.</p>
{tables}</details>
<p><b>Data.</b> {html.escape(data_note)}</p>
<h2>Stage reports</h2><ul>{links}</ul>
<h2>Ablations</h2><p>Not part of <code>make repro</code>; each writes its page when run:</p><ul>{ablations}</ul>
<p class="note">Headline numbers for <code>dvc metrics show</code>: <code>reports/metrics/</code>; every method's means:
<code>report/summary.json</code>; per-image scores: <code>report/per_image.csv</code>.</p>
<script src="../timings/infer.js"></script>
<script>{COST_JS}</script>
<script src="{report_rel}/assets/table.js"></script>
</body></html>
""")
    out = reports_dir / "index.html"
    out.write_text(page)
    return out
