"""HTML tables for the stage reports: no Python reprs, numbers at the precision that means something.

:func:`kv_table` renders a config or a result dict as a key/value table; :func:`frame_table` a DataFrame, each
column formatted by its name (dB to 2 decimals, SSIM to 4), sortable by a click on its header and, when long,
collapsed under a summary line; :func:`start_point` says in words where a training stage starts.
"""
from __future__ import annotations

import dataclasses
import html
import math
from typing import Any, Mapping

from smt.report.assets import TABLE_JS

__all__ = ["kv_table", "frame_table", "format_value", "start_point", "column_format", "SORT_SCRIPT"]

SORT_SCRIPT = f"<script>{TABLE_JS}</script>"  # include once per page, after the tables


def column_format(name: str) -> str:
    """The format of a column by its name: SSIM 4 decimals, dB/PSNR/gains 2, colour shift 2, else 3."""
    n = name.lower()
    if "ssim" in n:
        return ".4f"
    if "psnr" in n or "gain" in n or "db" in n or "color_shift" in n or "colour" in n:
        return ".2f"
    return ".3f"


def format_value(value: Any, fmt: str = ".4g") -> str:
    """One cell's text: words for empty strings and None, lists joined, floats formatted, never a repr."""
    if value is None or (isinstance(value, str) and value == ""):
        return "&ndash;"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return "&ndash;" if math.isnan(value) else format(value, fmt)
    if isinstance(value, (list, tuple)):
        return ", ".join(format_value(v, fmt) for v in value) if value else "none"
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, Mapping):
        return kv_table(value) if value else "none"
    return html.escape(str(value))


def kv_table(mapping: Mapping[str, Any], labels: Mapping[str, str] | None = None) -> str:
    """A two-column table, one row per key (``labels`` renames keys); nested dicts become nested tables."""
    labels = labels or {}
    rows = "".join(f"<tr><th>{html.escape(labels.get(k, str(k)))}</th><td>{format_value(v)}</td></tr>"
                   for k, v in mapping.items())
    return f'<table class="kv">{rows}</table>'


def frame_table(df, summary: str | None = None, collapse_over: int = 12, sortable: bool = True) -> str:
    """A DataFrame (its index ignored) as an HTML table, every column formatted by :func:`column_format`;
    collapsed under ``summary`` when it has more than ``collapse_over`` rows."""
    cols = list(df.columns)
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in cols)
    fmts = [column_format(str(c)) for c in cols]
    body = "".join(
        "<tr>" + "".join(f'<td data-v="{v}">{format_value(v, f)}</td>' if isinstance(v, float)
                         else f"<td>{format_value(v, f)}</td>" for v, f in zip(row, fmts)) + "</tr>"
        for row in df.itertuples(index=False))
    table = f'<table{" class=sortable" if sortable else ""}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'
    if summary is None or len(df) <= collapse_over:
        return table
    return f"<details><summary>{html.escape(summary)} ({len(df)} rows; click to open)</summary>{table}</details>"


def start_point(cfg, model: str, round_: int, stage: str) -> str:
    """Where (model, round, stage) starts, in words: the previous stage's weights, a pretrained file, or scratch."""
    prev = cfg.previous(round_, stage)
    if prev is not None:
        return f"the final weights of round {prev[0]}, stage {prev[1]} ({cfg.out_root}/{model}/{cfg.run_name(*prev)})"
    if cfg.models[model].pretrained:
        return f"the pretrained checkpoint {cfg.models[model].pretrained}"
    return "scratch (random initialisation)"
