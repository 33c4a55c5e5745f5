"""Stage deps are the code each stage can run, and stage params exactly the result-affecting keys it reads.

The coverage test checks the committed ``dvc.yaml`` against an import walk of its own (``modulefinder``, which
follows imports in nested functions through the compiled code), not against ``smt.pipeline``'s walker."""
import ast
import dataclasses
import json
import modulefinder
import re
import textwrap

import pytest
import yaml

from conftest import REPO

DVC = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


# --------------------------------------------------------------------------- an independent walk of the imports


def _finder_modules(script: str) -> set[str]:
    """``smt`` modules reachable from Python source ``script`` (module level and inside functions)."""
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as fh:
        fh.write(script)
    finder = modulefinder.ModuleFinder(path=[str(REPO)])
    finder.run_script(fh.name)
    return {m for m in finder.modules if m == "smt" or m.startswith("smt.")}


def _notebook_source(path) -> str:
    cells = json.loads(path.read_text())["cells"]
    return "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")


def _function_source(module_path, name: str) -> str:
    tree = ast.parse(module_path.read_text())
    node = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name)
    return textwrap.dedent(ast.get_source_segment(module_path.read_text(), node)) + f"\n{name}(None)\n"


def _module_path(module: str):
    base = REPO.joinpath(*module.split("."))
    return base / "__init__.py" if base.is_dir() else base.with_suffix(".py")


def _reachable(notebook: str, command: str) -> set[str]:
    """What a stage running ``notebook`` can import: the notebook, the stage's command (``python -m smt.stages``,
    or ``python -m smt stage``, then ``_cmd_stage``), and every ``python -m smt CMD`` relaunched under torchrun by
    reachable code (smt/__main__.py's module level, ``main`` and ``_cmd_CMD``)."""
    main = REPO / "smt/__main__.py"
    modules = {"smt"} | _finder_modules(_notebook_source(REPO / notebook))
    if command.startswith("python -m smt.stages "):
        modules |= _finder_modules("import smt.stages\n")
    else:
        assert command.startswith("python -m smt stage "), command
        modules |= {"smt.__main__"} | _finder_modules(_function_source(main, "_cmd_stage"))
    done: set[str] = set()
    while True:
        commands = set()
        for m in modules:
            for node in ast.walk(ast.parse(_module_path(m).read_text())):
                if isinstance(node, ast.Call) and "torchrun" in ast.unparse(node.func) and len(node.args) > 1:
                    commands.add(ast.literal_eval(node.args[1].elts[0]))
        if commands <= done:
            return modules
        for cmd in commands - done:
            modules |= {"smt.__main__"} | _finder_modules(_function_source(main, f"_cmd_{cmd}"))
        done |= commands


def _data_files_loaded_by(modules: set[str]) -> set[str]:
    """Non-Python files under smt/ whose name (or first folder below their package) a reachable module's
    source text names."""
    out = set()
    for f in (REPO / "smt").rglob("*"):
        if not f.is_file() or f.suffix in (".py", ".pyc") or "__pycache__" in f.parts:
            continue
        pkg = f.parent
        while not (pkg / "__init__.py").exists():
            pkg = pkg.parent
        names = {f.name, f.relative_to(pkg).parts[0]}
        for m in modules:
            path = _module_path(m)
            if path.parent == pkg and any(f'"{n}"' in path.read_text() for n in names):
                out.add(f.relative_to(REPO).as_posix())
    return out


@pytest.mark.parametrize("name", list(DVC))
def test_stage_deps_cover_every_smt_module_it_can_import(name):
    """A stage whose deps miss a module it can import would not rerun when that module changes."""
    stage = DVC[name]
    notebook = stage["deps"][0]
    assert notebook.endswith(".ipynb")
    modules = _reachable(notebook, stage["cmd"])
    needed = {_module_path(m).relative_to(REPO).as_posix() for m in modules} | _data_files_loaded_by(modules)
    covered = set()
    for dep in stage["deps"]:
        covered |= {n for n in needed if n == dep or n.startswith(dep.rstrip("/") + "/")}
    missing = sorted(needed - covered)
    assert not missing, f"stage {name} can run these files, which its deps do not list: {missing}"
    # and nothing beyond: every smt dep is a file the stage can run (folders would rerun stages needlessly)
    extra = sorted(d for d in stage["deps"] if d.startswith("smt/") and d not in needed)
    assert not extra, f"stage {name} lists code it cannot run: {extra}"


def test_training_stages_list_the_degradation_and_image_code():
    """The issue's examples: the x2/x3 targets come from smt/data/imresize.py; infer runs smt/train/engine.py."""
    train = next(s for n, s in DVC.items() if n.startswith("train_"))
    assert {"smt/data/imresize.py", "smt/data/images.py", "smt/data/manifest.py",
            "smt/kernels/csrc/selective_scan.c", "smt/config.py", "smt/seeds.py"} <= set(train["deps"])
    assert {"smt/train/engine.py", "smt/data/images.py"} <= set(DVC["infer"]["deps"])
    assert "smt/data/manifest.py" in DVC["select"]["deps"] and "smt/select/smt-tiny-vit.json" in DVC["select"]["deps"]
    assert "smt/select/clip_select.py" not in train["deps"]  # precise: select code does not retrain models


def test_package_data_is_shipped():
    """Every non-Python file in smt/ is package data in pyproject.toml (so an install carries what stages load)."""
    import fnmatch
    import tomllib

    spec = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["smt"]
    for f in (REPO / "smt").rglob("*"):
        if f.is_file() and f.suffix not in (".py", ".pyc") and "__pycache__" not in f.parts:
            rel = f.relative_to(REPO / "smt").as_posix()
            assert any(fnmatch.fnmatch(rel, p) for p in spec), f"{rel} is not in [tool.setuptools.package-data]"


# ------------------------------------------------------------------------------ the walker in smt.pipeline


def _write(root, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))


@pytest.fixture
def toy(tmp_path):
    """A package `smt` with every import form the walker must resolve."""
    _write(tmp_path, {
        "smt/__init__.py": "",
        "smt/__main__.py": """
            import sys
            def _cmd_stage(a):
                from smt.stages import run
            def _cmd_train(a):
                from smt.trainer import go
            def _cmd_other(a):
                from smt.never import x
            def main():
                pass
        """,
        "smt/stages.py": "import smt.runner.core\n",
        "smt/runner/__init__.py": "from .core import f\n",
        "smt/runner/core.py": """
            from . import helper
            from ..util import tool
            def f():
                from smt.lazy import g  # function-level
                from smt.pkg import sub, CONST  # sub is a module, CONST a name in pkg/__init__
                return torchrun(2, ["train", "--x"])
        """,
        "smt/runner/helper.py": "",
        "smt/runner/model.json": "{}",
        "smt/runner/loader.py": "NAME = 'model.json'\n",
        "smt/util.py": "tool = 1\n",
        "smt/lazy.py": "g = 1\n",
        "smt/pkg/__init__.py": "CONST = 1\n",
        "smt/pkg/sub.py": "",
        "smt/pkg/unused.py": "",
        "smt/trainer.py": "from smt.kernel import k\n",
        "smt/kernel/__init__.py": "import pathlib\nSRC = pathlib.Path(__file__).parent / 'csrc'\nk = 1\n",
        "smt/kernel/csrc/scan.c": "",
        "smt/never.py": "",
        "notebooks/nb.ipynb": json.dumps({"cells": [
            {"cell_type": "code", "source": ["%matplotlib inline\n", "from smt.runner import loader\n"]},
            {"cell_type": "markdown", "source": ["from smt.never import x"]}]}),
    })
    return tmp_path


def test_import_walker_resolves_every_form(toy):
    from smt.pipeline import code_deps

    deps = code_deps("notebooks/nb.ipynb", toy)
    assert deps == sorted([
        "smt/__init__.py", "smt/stages.py", "smt/__main__.py",  # __main__: reached through torchrun only
        "smt/runner/__init__.py", "smt/runner/core.py", "smt/runner/helper.py",  # package, relative imports
        "smt/util.py",  # from ..util import tool
        "smt/lazy.py",  # function-level import
        "smt/pkg/__init__.py", "smt/pkg/sub.py",  # from smt.pkg import sub (a module), CONST (a name)
        "smt/runner/loader.py", "smt/runner/model.json",  # from the notebook; the file it names
        "smt/trainer.py", "smt/kernel/__init__.py", "smt/kernel/csrc/scan.c",  # torchrun(["train"]) -> _cmd_train
    ])
    assert "smt/never.py" not in deps and "smt/pkg/unused.py" not in deps  # other commands; unimported modules


def test_import_walker_names_a_missing_module(toy):
    from smt.pipeline import code_deps

    (toy / "smt/util.py").write_text("import smt.gone\n")
    with pytest.raises(ImportError, match="smt.gone: no such module"):
        code_deps("notebooks/nb.ipynb", toy)


# ------------------------------------------------------------------------------------------------ params


def test_execution_settings_are_not_stage_params():
    from smt.pipeline import EXECUTION_ONLY

    assert {"device", "nproc", "nnodes", "num_workers", "threads", "log_every", "val_every", "ckpt_every"} <= \
        EXECUTION_ONLY["train"]
    assert {"device", "nproc", "nnodes", "tile_batch"} <= EXECUTION_ONLY["infer"]
    for name, stage in DVC.items():
        for section, keys in EXECUTION_ONLY.items():
            leaked = [p for p in stage.get("params", []) if p in {f"{section}.{k}" for k in keys} or p == section]
            assert not leaked, f"stage {name}: execution-only params {leaked}"
    train = next(s for n, s in DVC.items() if n.startswith("train_"))
    # result-affecting keys are all there, including ones added after the generator was written
    assert {"train.seed", "train.betas", "train.ema_decay", "train.aux_weights", "train.augment",
            "train.stage_order", "train.rounds"} <= set(train["params"])
    assert {"infer.self_ensemble", "infer.window_tiles", "infer.precision", "infer.routing"} <= \
        set(DVC["infer"]["params"])


def test_new_dataclass_fields_become_stage_params(tmp_path, monkeypatch):
    """A field added to a section's dataclass (and set in params.yaml) is a param of the stages reading the
    section, with no edit to smt/pipeline.py; an execution-only key is not."""
    import smt.config
    import smt.pipeline
    from smt.config import TrainConfig

    @dataclasses.dataclass(frozen=True)
    class TrainPlus(TrainConfig):
        jitter_strength: float = 0.0

    sections = {**smt.config._sections(), "train": TrainPlus}
    monkeypatch.setattr(smt.config, "_sections", lambda: sections)
    monkeypatch.setattr(smt.pipeline, "_sections", lambda: sections)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["train"]["jitter_strength"] = 0.3
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    stages = smt.pipeline.build_stages(tmp_path / "params.yaml")
    for name in ("train_hat_r1_s1", "ablation_loss"):
        assert "train.jitter_strength" in stages[name]["params"]
        assert "train.nproc" not in stages[name]["params"] and "train.val_every" not in stages[name]["params"]


def test_changing_an_execution_setting_changes_no_stage(tmp_path):
    """nproc 1 -> 16, logging 10x more often: the same dvc.yaml and the same stage input digests."""
    from smt.config import load_params
    from smt.pipeline import build_stages
    from smt.stages import inputs_digest

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(params))
    params["train"].update(nproc=16, nnodes=2, log_every=1, val_every=7, ckpt_every=3, num_workers=4, threads=2,
                           device="cuda")
    params["infer"].update(nproc=8, tile_batch=64, device="cpu")
    (tmp_path / "b.yaml").write_text(yaml.safe_dump(params))
    a, b = build_stages(tmp_path / "a.yaml"), build_stages(tmp_path / "b.yaml")
    assert a == b
    for name in ("train_hat_r1_s1", "infer"):
        assert inputs_digest(a[name], load_params(tmp_path / "a.yaml"), REPO) == \
            inputs_digest(b[name], load_params(tmp_path / "b.yaml"), REPO)
    params["train"]["seed"] = 1  # a result-affecting key does change the digest
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(params))
    assert inputs_digest(a["train_hat_r1_s1"], load_params(tmp_path / "c.yaml"), REPO) != \
        inputs_digest(a["train_hat_r1_s1"], load_params(tmp_path / "a.yaml"), REPO)


def test_notebooks_take_pipeline_paths_as_parameters():
    """No path a stage reads or writes is written in a notebook as well as in the pipeline definition."""
    from smt.pipeline import RESULTS_DIR, REPORTS_DIR, SELECTION_DIR, stage_notebooks

    for name, (notebook, parameters) in stage_notebooks(REPO / "params.yaml").items():
        cells = [c for c in json.loads((REPO / notebook).read_text())["cells"] if c["cell_type"] == "code"]
        body = "".join("".join(c["source"]) for c in cells if "parameters" not in c["metadata"].get("tags", []))
        for literal in re.findall(r"[\"']([^\"'{}]*)[\"']", body):
            assert not literal.startswith((f"{REPORTS_DIR}/", f"{RESULTS_DIR}/", SELECTION_DIR)) and \
                literal != RESULTS_DIR, f"{notebook}: path {literal!r} belongs in the parameters (stage {name})"
        for key in parameters:
            assert re.search(rf"\b{key}\b", body), f"{notebook}: parameter {key} is never used"
