"""Notebook hygiene: committed clean, parameterized, wired to DVC stages."""
import json

import pytest
import yaml

from smt.stages import stage_table, tool_table
from conftest import REPO

NOTEBOOKS = sorted((REPO / "notebooks").rglob("*.ipynb"))
STAGES = stage_table(str(REPO / "params.yaml"))
TOOLS = tool_table()


def test_there_are_notebooks():
    assert NOTEBOOKS and all((REPO / nb).exists() for nb, _ in [*STAGES.values(), *TOOLS.values()])
    assert {REPO / nb for nb, _ in [*STAGES.values(), *TOOLS.values()]} == set(NOTEBOOKS)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_committed_without_outputs(path):
    nb = json.loads(path.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in code), path
    tagged = [c for c in code if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, f"{path}: needs exactly one cell tagged 'parameters'"
    assert "params_path" in "".join(tagged[0]["source"])
    assert nb["metadata"]["kernelspec"]["name"] == "python3"
    # logic lives in smt: no function or class definitions in notebooks
    assert not any(line.lstrip().startswith(("def ", "class ")) for c in code for line in
                   "".join(c["source"]).splitlines())


def test_dvc_stages_run_their_notebooks():
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert set(dvc) == set(STAGES)
    for name, stage in dvc.items():
        assert stage["cmd"] == f"python -m smt.stages {name}"
        assert STAGES[name][0] in stage["deps"]
        assert f"reports/{name}" in stage["outs"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_stage_parameters_exist_in_the_notebook(path):
    """Every parameter papermill injects is declared in the notebook's parameters cell."""
    nb = json.loads(path.read_text())
    cell = next(c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", []))
    declared = {line.split("=")[0].strip() for line in "".join(cell["source"]).splitlines() if "=" in line}
    for nb_path, extra in STAGES.values():
        if REPO / nb_path == path:
            assert {"params_path", *extra} <= declared


def test_html_export_keeps_results_and_drops_stderr(tmp_path):
    import nbformat

    from smt.stages import export_html

    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("print('x')")
    cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text="RESULT-LINE\n"),
                    nbformat.v4.new_output("stream", name="stderr", text="train 40%|####  | 4/10 [00:01<00:01]\n")]
    nb.cells = [nbformat.v4.new_markdown_cell("# Title"), cell]
    nbformat.write(nb, tmp_path / "n.ipynb")
    export_html(tmp_path / "n.ipynb", tmp_path / "n.html")
    page = (tmp_path / "n.html").read_text()
    assert "RESULT-LINE" in page and "Title" in page and "4/10" not in page and "print(" not in page
