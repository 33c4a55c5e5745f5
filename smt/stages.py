"""Run a pipeline stage: execute its notebook with papermill and export the result to HTML.

Each stage ``S`` runs its notebook (:func:`smt.pipeline.stage_definitions`) with an explicit kernel (``python3``)
and the parameters ``params_path`` plus the stage's own (paths from the pipeline definition; model, round, stage
for training). The executed notebook and a self-contained HTML export (no code cells, no stderr, no CDN scripts)
are written to ``reports/S/``. A failing cell raises, and ``python -m smt.stages S`` (what DVC runs; ``python -m
smt stage S`` is the same) exits non-zero, so DVC stops.

**Same inputs, same bytes.** The executed notebook keeps what the stage computed and drops what only describes
the run: papermill's start/end times and durations, per-cell execution timestamps, stderr (progress bars,
warnings, timings: shown on the console while the stage runs), the random id papermill gives the cell it adds,
memory addresses in object reprs and pandas Styler's random table ids (renumbered).
Wall-clock time goes to ``timings/S.json`` (``stage_seconds``, plus what the stage itself measured, e.g. seconds
per image) and, for the report pages to show, ``timings/S.js``; neither is a DVC output: timings never change a
hash in ``dvc.lock``.

**Persisted outputs resume only an interrupted run of the same inputs.** DVC keeps ``persist: true`` outputs
(training runs) when it reruns a stage, so that a killed stage resumes. Before running, the runner compares a
digest of the stage's inputs (every dep's content, its params' values, its command) with the one recorded in
``<out>/.smt_inputs.json`` when the interrupted run started; unless they match and that run did not finish, the
output is removed and the stage starts afresh. So a code, data or param change — or ``dvc repro -f`` — recomputes
from scratch instead of resuming a finished run. ``state.pt`` and ``.smt_inputs.json`` are working state, not
results: ``.dvcignore`` keeps them out of DVC's hashes and cache.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

from smt.files import file_digest

__all__ = ["stage_table", "tool_table", "run_stage", "export_html", "scrub_notebook", "inputs_digest",
           "prepare_persisted_outputs", "INPUTS_MARKER"]

KERNEL = "python3"
INPUTS_MARKER = ".smt_inputs.json"


def stage_table(params_path: str = "params.yaml") -> dict[str, tuple[str, dict]]:
    """Stage name -> (notebook, extra notebook parameters) for the params file's pipeline."""
    from smt.pipeline import stage_notebooks

    return stage_notebooks(params_path)


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


_STYLER_ID = re.compile(r"\bT_([0-9a-f]{5})(?=[_\"' ])")
_ADDRESS = re.compile(r"\bat 0x[0-9a-f]{4,16}>")


def scrub_notebook(nb) -> None:
    """Drop what describes the run rather than the result (in place; see the module docstring)."""
    pm = nb.metadata.get("papermill")
    if pm is not None:
        nb.metadata["papermill"] = {k: pm[k] for k in ("parameters",) if k in pm}
    ids: dict[str, str] = {}

    def renumber(text: str) -> str:
        return _STYLER_ID.sub(lambda m: "T_" + ids.setdefault(m.group(1), f"{len(ids):05d}"), text)

    for i, cell in enumerate(nb.cells):
        for key in ("papermill", "execution"):
            cell.metadata.pop(key, None)
        if "injected-parameters" in cell.metadata.get("tags", []):
            cell["id"] = f"injected-parameters-{i}"  # papermill draws a random id for the cell it adds
        if cell.cell_type != "code":
            continue
        cell.outputs = [o for o in cell.outputs if not (o.output_type == "stream" and o.name == "stderr")]
        for out in cell.outputs:
            if out.get("output_type") == "stream":
                out["text"] = _ADDRESS.sub("at 0x?>", out["text"])
            data = out.get("data", {})
            if "text/html" in data:
                data["text/html"] = renumber(data["text/html"])
            if "text/plain" in data:  # reprs such as <Styler at 0x7f...>
                data["text/plain"] = _ADDRESS.sub("at 0x?>", data["text/plain"])


def _resolve(path: str, params: dict) -> str:
    """``${data.root}/x`` -> ``data/demo/x`` (DVC's templating, for the keys params.yaml has)."""
    def value(match: re.Match) -> str:
        node = params
        for part in match.group(1).split("."):
            node = node[part]
        return str(node)

    return re.sub(r"\$\{([^}]+)\}", value, path)


def _param_value(params: dict, key: str):
    node = params
    for part in key.split("."):
        node = node[part]
    return node


def inputs_digest(stage: dict, params: dict, root: Path) -> str:
    """MD5 over a ``dvc.yaml`` stage's command, the content of every dep (folders: every file, by relative path)
    and the values of its params: equal digests mean DVC would see equal inputs."""
    h = hashlib.md5(stage["cmd"].encode())
    for dep in sorted(_resolve(d, params) for d in stage["deps"]):
        path = root / dep
        h.update(f"\0dep {dep}\0".encode())
        if path.is_dir():
            for f in sorted(p for p in path.rglob("*") if p.is_file()):
                h.update(f"{f.relative_to(path).as_posix()}:{file_digest(f, 'md5')}\n".encode())
        elif path.is_file():
            h.update(file_digest(path, "md5").encode())
        else:
            h.update(b"<missing>")
    for key in stage.get("params", []):
        h.update(f"\0param {key}={json.dumps(_param_value(params, key), sort_keys=True)}".encode())
    return h.hexdigest()


def prepare_persisted_outputs(stage: dict, params: dict, root: Path) -> list[Path]:
    """Remove each ``persist: true`` output unless it holds an unfinished run of the same inputs; mark the
    (kept or new) output with the inputs' digest. Returns the outputs' paths (for :func:`_mark_finished`)."""
    persisted = [_resolve(next(iter(o)), params) for o in stage.get("outs", [])
                 if isinstance(o, dict) and next(iter(o.values())).get("persist")]
    if not persisted:
        return []
    digest = inputs_digest(stage, params, root)
    paths = []
    for rel in persisted:
        out = root / rel
        marker = out / INPUTS_MARKER
        previous = json.loads(marker.read_text()) if marker.is_file() else {}
        if out.exists() and not (previous.get("inputs") == digest and not previous.get("finished")):
            print(f"{rel}: {'finished run' if previous.get('inputs') == digest else 'inputs changed'}; starting afresh")
            if out.is_dir():
                shutil.rmtree(out)
            else:
                out.unlink()
        out.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps({"inputs": digest, "finished": False}) + "\n")
        paths.append(out)
    return paths


def _mark_finished(outs: list[Path]) -> None:
    for out in outs:
        marker = out / INPUTS_MARKER
        marker.write_text(json.dumps({**json.loads(marker.read_text()), "finished": True}) + "\n")


class UnknownStage(ValueError):
    """A stage name that neither dvc.yaml's definitions nor the tool stages have."""


def run_stage(name: str, params_path: str = "params.yaml", root: str | Path = ".",
              reports_dir: str = "reports") -> Path:
    """Execute stage ``name``'s notebook from ``root``; returns the HTML report's path."""
    import nbformat
    import papermill

    from smt.config import load_params
    from smt.pipeline import TIMINGS_DIR, dvc_stage, stage_definitions

    root = Path(root).resolve()
    definitions = stage_definitions(root / params_path)
    table = {**{n: (d.notebook, dict(d.parameters)) for n, d in definitions.items()}, **tool_table()}
    if name not in table:
        raise UnknownStage(f"unknown stage {name!r} (valid stages: {', '.join(table)})")
    notebook_rel, extra = table[name]
    notebook = root / notebook_rel
    out_dir = root / reports_dir / name
    out_dir.mkdir(parents=True, exist_ok=True)
    executed = out_dir / notebook.name
    timings = root / TIMINGS_DIR / f"{name}.json"
    timings.unlink(missing_ok=True)
    persisted = []
    if name in definitions and definitions[name].persisted_outs():
        persisted = prepare_persisted_outputs(dvc_stage(definitions[name], root), load_params(root / params_path),
                                              root)
    os.environ.setdefault("MPLBACKEND", "Agg")
    start = time.perf_counter()
    papermill.execute_notebook(
        str(notebook), str(executed), parameters={"params_path": params_path, **extra}, kernel_name=KERNEL,
        cwd=str(root), progress_bar=False, log_output=True, report_mode=False,
    )
    seconds = time.perf_counter() - start
    _mark_finished(persisted)
    nb = nbformat.read(executed, as_version=4)
    scrub_notebook(nb)
    nbformat.write(nb, executed)
    html_path = out_dir / f"{name}.html"
    export_html(executed, html_path)
    measured = json.loads(timings.read_text()) if timings.is_file() else {}
    timings.parent.mkdir(parents=True, exist_ok=True)
    record = {"stage": name, "stage_seconds": round(seconds, 3), **measured}
    timings.write_text(json.dumps(record, indent=2) + "\n")
    # the same record as a script the report pages load from file:// (a browser will not fetch JSON there)
    timings.with_suffix(".js").write_text(f"window.SMT_TIMINGS = window.SMT_TIMINGS || {{}};\n"
                                          f"window.SMT_TIMINGS[{json.dumps(name)}] = {json.dumps(record)};\n")
    return html_path


def main(argv: list[str] | None = None) -> int:
    """``python -m smt.stages NAME [--params FILE]``: the command of every DVC stage (it imports nothing else)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m smt.stages", description=main.__doc__)
    parser.add_argument("name")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    try:
        html = run_stage(args.name, params_path=args.params)
    except UnknownStage as exc:  # its message names the stage and the valid ones: no traceback needed
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"stage {args.name}: report at {html}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
