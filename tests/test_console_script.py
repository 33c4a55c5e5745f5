"""The ``smt`` console script: pyproject.toml declares it, the editable install the Makefile does
(``pip install --no-deps --no-build-isolation -e .``) generates it, and it runs the same command line as
``python -m smt``."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

from conftest import REPO

ENTRY_POINT = "smt.__main__:main"


def test_pyproject_declares_the_smt_script_pointing_at_the_cli_main():
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"smt": ENTRY_POINT}
    import smt.__main__

    module, _, attr = ENTRY_POINT.partition(":")
    assert getattr(sys.modules[module], attr) is smt.__main__.main


def test_the_editable_build_writes_the_console_script_entry_point(tmp_path):
    """setuptools' editable metadata (what pip's ``-e`` install writes into site-packages) names the script;
    built from a copy of this checkout so that no egg-info lands in the repository."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "smt", src / "smt", ignore=shutil.ignore_patterns("__pycache__", "*.so", "build"))
    (tmp_path / "meta").mkdir()
    code = ("import sys; from setuptools import build_meta as b; "
            "print(b.prepare_metadata_for_build_editable(sys.argv[1]))")
    res = subprocess.run([sys.executable, "-c", code, str(tmp_path / "meta")], cwd=src, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    dist_info = tmp_path / "meta" / res.stdout.strip().splitlines()[-1]
    entry_points = (dist_info / "entry_points.txt").read_text().split()
    assert entry_points == ["[console_scripts]", "smt", "=", ENTRY_POINT]


def test_the_installed_smt_script_runs_the_command_line():
    """The environment's own install (``make install``; it reruns when pyproject.toml changes) has the script
    beside its Python, and ``smt --help`` and ``python -m smt --help`` show the same commands."""
    scripts = [e for e in metadata.distribution("smt").entry_points if e.group == "console_scripts"]
    assert [(e.name, e.value) for e in scripts] == [("smt", ENTRY_POINT)], \
        "the installed smt package predates the console script: reinstall it (make install)"
    script = Path(sys.executable).parent / "smt"
    assert script.is_file(), f"{script}: missing; reinstall (make install)"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    by_script = subprocess.run([str(script), "--help"], cwd=REPO, capture_output=True, text=True, timeout=120,
                               env=env)
    by_module = subprocess.run([sys.executable, "-m", "smt", "--help"], cwd=REPO, capture_output=True, text=True,
                               timeout=120, env=env)
    assert by_script.returncode == 0 and by_module.returncode == 0, by_script.stderr + by_module.stderr
    assert by_script.stdout.startswith("usage: smt ")
    assert by_module.stdout.startswith("usage: python -m smt ")
    # the same words; argparse aligns wrapped usage lines under the program's name
    assert by_script.stdout.replace("usage: smt", "usage: python -m smt").split() == by_module.stdout.split()
