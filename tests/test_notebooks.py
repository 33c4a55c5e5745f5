"""Notebook hygiene: committed clean, parameterized, wired to DVC stages."""
import json

import pytest
import yaml

from smt.stages import STAGES
from conftest import REPO

NOTEBOOKS = sorted((REPO / "notebooks").rglob("*.ipynb"))


def test_there_are_notebooks():
    assert NOTEBOOKS and all(p.exists() for p in (REPO / s for s in STAGES.values()))


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
        assert stage["cmd"] == f"python -m smt stage {name}"
        assert STAGES[name] in stage["deps"]
        assert f"reports/{name}" in stage["outs"]
