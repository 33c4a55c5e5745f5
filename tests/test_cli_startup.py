"""``python -m smt`` builds its parser without importing torch (``--device`` defaults to ``auto``, resolved after
parsing), so ``--help`` and ``python -m smt pipeline`` start without torch's import time."""
import subprocess
import sys

import pytest

from conftest import REPO

CHECK = """
import sys
from smt.__main__ import build_parser, main
build_parser()
try:
    main(["pipeline", "--help"])
except SystemExit as exc:
    assert exc.code == 0, exc.code
print("torch" in sys.modules)
"""


def test_building_the_parser_and_pipeline_help_import_no_torch():
    res = subprocess.run([sys.executable, "-c", CHECK], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().splitlines()[-1] == "False"


@pytest.mark.parametrize("command", [["smoke"], ["benchmark", "--checkpoint", "c.pth", "--root", "r"],
                                     ["upscale", "in.png", "-o", "out"]])
def test_device_auto_is_the_default_and_resolves_to_cuda_only_when_available(command, monkeypatch):
    import smt.__main__ as cli

    args = cli.build_parser().parse_args(command)
    assert args.device == "auto"
    monkeypatch.setattr(cli, "_cuda", lambda: False)
    assert cli._resolve_device(args).device == "cpu"
    monkeypatch.setattr(cli, "_cuda", lambda: True)
    assert cli._resolve_device(cli.build_parser().parse_args(command)).device == "cuda"
    explicit = cli.build_parser().parse_args([*command, "--device", "cpu"])
    assert cli._resolve_device(explicit).device == "cpu"  # an explicit choice stays
