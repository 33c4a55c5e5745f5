"""Run a pipeline stage: execute its notebook with papermill and export the result to HTML.

Each stage ``S`` runs its notebook (:func:`smt.pipeline.stage_notebooks`) with an explicit kernel
(``python3``) and the parameters ``params_path`` plus the stage's own (model, round, stage for training); the
executed notebook and a self-contained HTML export (no code cells, no stderr, no CDN scripts) are written to
``reports/S/``. A failing cell raises, and ``python -m smt stage S`` exits non-zero, so DVC stops.
"""
from __future__ import annotations

import os
from pathlib import Path

__all__ = ["stage_table", "run_stage", "export_html"]

KERNEL = "python3"


def stage_table(params_path: str = "params.yaml") -> dict[str, tuple[str, dict]]:
    """Stage name -> (notebook, extra notebook parameters) for the params file's pipeline."""
    from smt.config import load_params, load_section
    from smt.pipeline import stage_notebooks

    cfg = load_section("train", params_path) if "train" in load_params(params_path) else None
    return stage_notebooks(cfg)


def tool_table() -> dict[str, tuple[str, dict]]:
    """Notebooks run like stages but outside DVC (``python -m smt stage experiments``)."""
    from smt.pipeline import TOOL_NOTEBOOKS

    return {name: (nb, {}) for name, nb in TOOL_NOTEBOOKS.items()}


def export_html(notebook: Path, html_path: Path) -> None:
    import nbformat
    from nbconvert import HTMLExporter

    exporter = HTMLExporter(exclude_input=True, exclude_input_prompt=True, exclude_output_prompt=True)
    exporter.mathjax_url = ""
    exporter.require_js_url = ""
    nb = nbformat.read(notebook, as_version=4)
    # stderr (progress bars, warnings) stays in the executed notebook beside the page, out of the report
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = [o for o in cell.outputs if not (o.output_type == "stream" and o.name == "stderr")]
    body, _ = exporter.from_notebook_node(nb)
    html_path.write_text(body)


def run_stage(name: str, params_path: str = "params.yaml", root: str | Path = ".",
              reports_dir: str = "reports") -> Path:
    """Execute stage ``name``'s notebook from ``root``; returns the HTML report's path."""
    import papermill

    root = Path(root).resolve()
    table = {**stage_table(str(root / params_path)), **tool_table()}
    if name not in table:
        raise KeyError(f"unknown stage {name!r} (valid stages: {', '.join(table)})")
    notebook_rel, extra = table[name]
    notebook = root / notebook_rel
    out_dir = root / reports_dir / name
    out_dir.mkdir(parents=True, exist_ok=True)
    executed = out_dir / notebook.name
    os.environ.setdefault("MPLBACKEND", "Agg")
    papermill.execute_notebook(
        str(notebook), str(executed), parameters={"params_path": params_path, **extra}, kernel_name=KERNEL,
        cwd=str(root), progress_bar=False, log_output=True, report_mode=False,
    )
    html_path = out_dir / f"{name}.html"
    export_html(executed, html_path)
    return html_path
