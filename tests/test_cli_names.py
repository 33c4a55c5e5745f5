"""Every command-line argument that takes a name (model, preset, stage, round, profile, set, protocol, device,
model size) refuses a wrong one with a message naming what it got and listing the valid names, before any work.

The audit is complete by construction: every subcommand of ``python -m smt`` is either exercised here with a
wrong name or listed in ``TAKES_NO_NAMES``; a new subcommand fails :func:`test_every_subcommand_is_audited`
until it is added to one of them."""
from __future__ import annotations

import argparse

import pytest

from conftest import REPO

PARAMS = str(REPO / "params.yaml")


def _valid_train_models() -> list[str]:
    from smt.config import load_section

    return list(load_section("train", PARAMS).models)


def _valid_stage_order() -> list[str]:
    from smt.config import load_section

    return list(load_section("train", PARAMS).stage_order)


def _presets() -> list[str]:
    from smt.models.presets import PRESETS

    return list(PRESETS)


def _sets() -> list[str]:
    from smt.config import BENCHMARK_SETS

    return list(BENCHMARK_SETS)


def _profiles() -> list[str]:
    from smt.profile import list_profiles

    return list(list_profiles())


def _dvc_stages() -> list[str]:
    from smt.pipeline import stage_definitions

    return list(stage_definitions(REPO / "params.yaml"))


# (argv, the bad value as it must appear, the valid names it must list)
CASES = {
    "train --model": (["train", "--params", PARAMS, "--model", "nope", "--round", "1", "--stage", "s1"],
                      "'nope'", _valid_train_models),
    "train --stage": (["train", "--params", PARAMS, "--model", "hat", "--round", "1", "--stage", "s9"],
                      "'s9'", _valid_stage_order),
    "train --round": (["train", "--params", PARAMS, "--model", "hat", "--round", "7", "--stage", "s1"],
                      "round 7", lambda: ["rounds 1"]),
    "stage name": (["stage", "nope", "--params", "params.yaml"], "'nope'", _dvc_stages),
    "export name": (["export", "nope", "-o", "unused.pth", "--params", PARAMS], "'nope'", _valid_train_models),
    "export --layout": (["export", "hat", "--checkpoint", "c.pth", "--layout", "authors", "-o", "x.pth"],
                        "'authors'", lambda: ["official", "bbox"]),
    "export --model": (["export", "hat", "--checkpoint", "c.pth", "--model", "nope", "-o", "x.pth"], "'nope'",
                       _presets),
    "upscale --model": (["upscale", "missing.png", "-o", "out", "--checkpoint", "c.pth", "--model", "nope"],
                        "'nope'", _presets),
    "upscale --device": (["upscale", "missing.png", "-o", "out", "--device", "tpu"], "'tpu'",
                         lambda: ["auto", "cpu", "cuda"]),
    "benchmark --sets": (["benchmark", "--checkpoint", "c.pth", "--root", "r", "--sets", "Set5,Set6"], "'Set6'",
                         _sets),
    "benchmark --model": (["benchmark", "--checkpoint", "c.pth", "--root", "r", "--model", "nope"], "'nope'",
                          _presets),
    "benchmark --device": (["benchmark", "--checkpoint", "c.pth", "--root", "r", "--device", "tpu"], "'tpu'",
                           lambda: ["auto", "cpu", "cuda"]),
    "evaluate --protocol": (["evaluate", "sr", "hr", "--protocol", "nope"], "'nope'",
                            lambda: ["NTIRE2025", "BasicSR"]),
    "profile name": (["profile", "nope", "--dry-run"], "'nope'", _profiles),
    "rehearse profile": (["rehearse", "nope"], "'nope'", _profiles),
    "smoke --models": (["smoke", "--models", "huge"], "'huge'", lambda: ["large", "tiny"]),
    "smoke --device": (["smoke", "--device", "tpu"], "'tpu'", lambda: ["auto", "cpu", "cuda"]),
}
# subcommands whose arguments are all paths, numbers or switches
TAKES_NO_NAMES = {"infer", "pipeline", "check"}


def _subcommands() -> set[str]:
    from smt.__main__ import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return set(sub.choices)


# arguments that take a name (or a count naming a round): a new one must get a case above
NAME_DESTS = {"model", "models", "stage", "round", "name", "profile", "sets", "protocol", "layout", "device"}


def _name_arguments() -> set[str]:
    """``"<subcommand> <option or positional>"`` for every argument that takes a name or has fixed choices."""
    from smt.__main__ import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    found = set()
    for command, parser in sub.choices.items():
        for action in parser._actions:
            if action.dest in NAME_DESTS or action.choices is not None:
                found.add(f"{command} {action.option_strings[-1] if action.option_strings else action.dest}")
    return found


def test_every_subcommand_is_audited():
    audited = {case.split()[0] for case in CASES} | TAKES_NO_NAMES
    assert _subcommands() == audited


def test_every_argument_that_takes_a_name_has_a_case():
    """A new name-taking option (e.g. ``--protocol`` on upscale, ``--layout`` on export) fails here until a case
    feeding it a wrong value is added to CASES."""
    assert _name_arguments() == set(CASES)


@pytest.mark.parametrize("case", list(CASES))
def test_a_wrong_name_is_refused_naming_it_and_the_valid_names(case, capsys, monkeypatch, tmp_path):
    from smt.__main__ import main

    argv, bad, valid = CASES[case]
    monkeypatch.chdir(REPO)  # profiles/ and params.yaml of this checkout
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own check (choices=)
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2, err
    message = err.strip().splitlines()[-1]
    assert bad in message, message
    for name in valid():
        assert name in message, (name, message)
    assert not (tmp_path / "out").exists()


def test_the_message_of_a_key_error_is_printed_without_quotes(capsys, monkeypatch):
    """A KeyError's str() is the repr of its message; the CLI prints the message itself."""
    import smt.__main__ as cli

    def raise_key_error(args):
        raise KeyError("unknown thing 'x' (valid: a, b)")

    monkeypatch.setattr(cli, "_cmd_pipeline", raise_key_error)
    assert cli.main(["pipeline"]) == 2
    assert capsys.readouterr().err.strip() == "error: unknown thing 'x' (valid: a, b)"


def test_the_dvc_stage_runner_refuses_an_unknown_stage_without_a_traceback(capsys, monkeypatch):
    from smt.stages import main

    monkeypatch.chdir(REPO)
    assert main(["nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown stage 'nope' (valid stages: ")
    for name in _dvc_stages():
        assert name in err


def test_train_config_check_run_refuses_before_any_work():
    from smt.config import ConfigError, load_section

    cfg = load_section("train", PARAMS)
    cfg.check_run("hat", 1, "s1")  # a defined run passes
    with pytest.raises(ConfigError, match=r"unknown model 'HAT' \(train.models: hat, mambairv2\)"):
        cfg.check_run("HAT", 1, "s1")
    with pytest.raises(ConfigError, match=r"no round 0"):
        cfg.check_run("hat", 0, "s1")


def test_export_of_a_checkpoint_names_a_wrong_family_and_the_valid_ones(capsys, monkeypatch):
    from smt.__main__ import main

    monkeypatch.chdir(REPO)
    assert main(["export", "nope", "--checkpoint", "c.pth", "-o", "x.pth"]) == 2
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert "'nope'" in message and "hat, mambairv2" in message, message
