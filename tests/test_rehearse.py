"""The dress rehearsal (``python -m smt rehearse``): the reduced config keeps the profile's architectures, tiles and
CLIP model; stand-in data and checkpoints go through the real loaders; the extrapolation's pixel counts; the user's
files are never touched; and a reduced end-to-end rehearsal of the demo profile."""
from __future__ import annotations

import hashlib
import shutil
from dataclasses import fields
from pathlib import Path

import pytest
import torch
import yaml

from smt.config import ConfigError, load_params, load_section
from smt.rehearse import (DEFAULT, SMALLEST, USER_PATHS, RehearsalError, format_rehearsal, make_standin_sources,
                          processed_pixels, reduced_params, rehearse, user_fingerprint, write_pretrained_standin)

REPO = Path(__file__).resolve().parents[1]


def _ntire() -> dict:
    return load_params(REPO / "profiles" / "ntire2025.yaml")


def test_reduced_params_keep_models_tiles_windows_and_clip_model_and_reduce_the_counts():
    from smt.config import TrainConfig

    full = _ntire()
    p, notes = reduced_params(full, DEFAULT)
    for name, m in full["train"]["models"].items():
        assert p["train"]["models"][name] == m  # presets and the pretrained path (relative) unchanged
    for key in ("tile", "tile_overlap", "window_tiles", "window_weights", "multi_window_model", "models",
                "self_ensemble", "routing"):
        assert p["infer"][key] == full["infer"][key]
    for key in ("model", "pretrained", "crops", "dedup_threshold", "target_splits"):
        assert p["select"][key] == full["select"][key]
    assert p["train"]["aux_scales"] == full["train"]["aux_scales"]
    assert p["train"]["stage_order"] == full["train"]["stage_order"]
    s1, s2, s3 = (p["train"]["stages"][s] for s in ("s1", "s2", "s3"))
    assert (s1["patch_size"], s1["batch_size"], s2["patch_size"], s2["batch_size"]) == (16, 2, 32, 1)
    assert all(s["iters"] == DEFAULT.steps and s["loss"] == full["train"]["stages"][n]["loss"]
               for n, s in p["train"]["stages"].items())
    assert s1["milestones"] == [1, 1, 1, 1]  # 125k..240k of 250k, scaled into 2 steps
    assert s3["subset"] == full["train"]["stages"]["s3"]["subset"]
    assert (p["train"]["rounds"], p["train"]["nproc"], p["infer"]["nproc"], p["select"]["top_k"]) == (1, 1, 1, 2)
    assert p["select"]["allow_untrained"] is True and any("untrained" in n for n in notes)
    if any(f.name == "micro_batch" for f in fields(TrainConfig)):
        assert p["train"]["micro_batch"] == 1
    assert full["train"]["stages"]["s1"]["iters"] == 250000  # the profile's dict is not modified


def test_reduced_params_redirect_every_outside_path_into_the_scratch_folder():
    full = _ntire()
    full["data"].update(root="/abs/ntire", downloads="~/.cache/smt/downloads", raw="../raw")
    full["select"]["cache_dir"] = "/var/clip"
    full["train"]["models"]["hat"]["pretrained"] = "/weights/HAT-L.pth"
    full["train"]["out_root"] = "/models"
    full["train"]["stages"]["s3"]["subset"] = "../sel.csv"
    p, _ = reduced_params(full, DEFAULT)
    paths = [p["data"][k] for k in ("root", "downloads", "raw", "lock")] + [
        p["select"]["cache_dir"], p["train"]["models"]["hat"]["pretrained"], p["train"]["out_root"],
        p["train"]["stages"]["s3"]["subset"], p["ablations"]["out_root"]]
    for path in paths:
        assert not Path(path).is_absolute() and ".." not in Path(path).parts and not path.startswith("~"), path
    assert p["train"]["models"]["hat"]["pretrained"] == "external/train.models.hat/HAT-L.pth"


def test_standin_sources_are_built_by_the_real_data_stage(tmp_path, monkeypatch):
    """Stand-ins in each data set's own layout: globs, HR/LR pairing and the LR-only test set of sources.json."""
    from smt.data.dataset_builder import build_dataset
    from smt.data.images import read_image

    p, _ = reduced_params(_ntire(), DEFAULT)
    monkeypatch.chdir(tmp_path)
    folders = make_standin_sources(p, tmp_path / "standin", DEFAULT)
    assert set(folders) == {"DIV2K_train", "Flickr2K", "LSDIR_train", "Unsplash", "DIV2K_valid", "DIV2K_test_LR"}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(p))
    manifests = build_dataset(load_section("data", tmp_path / "params.yaml"))
    assert len(manifests["train"]) == 4 and len(manifests["valid"]) == 1 and len(manifests["test"]) == 1
    assert sorted(manifests["train"]["source"].str.split(":").str[0]) == sorted(
        ["DIV2K_train", "Flickr2K", "LSDIR_train", "Unsplash"])
    assert manifests["test"]["hr_path"].tolist() == [""]  # DIV2K_test_LR has no HR
    row = manifests["valid"].iloc[0]
    root = tmp_path / p["data"]["root"]
    assert read_image(root / row.hr_path).shape == (128, 128, 3) and read_image(root / row.lr_path).shape == (32, 32, 3)


def test_pretrained_standin_has_the_basicsr_layout_and_loads_from_params_ema(tmp_path):
    from smt.models import build_model, load_weights

    path = tmp_path / "w" / "HAT_SRx4.pth"
    info = write_pretrained_standin("hat_tiny", path)
    raw = torch.load(path, weights_only=True)
    assert sorted(raw) == ["params", "params_ema"] == info["container"]
    assert not any(k.startswith("aux_upsample.") for k in raw["params_ema"])
    net = build_model("hat_tiny", aux_scales=(2, 3))
    report = load_weights(net, path, allow_missing=("aux_upsample.",))
    assert report.container == "params_ema" and report.missing_allowed
    assert all(k.startswith("aux_upsample.") for k in report.missing_allowed)
    name = next(k for k, v in raw["params_ema"].items() if v.is_floating_point() and v.abs().sum() > 0)
    assert torch.equal(net.state_dict()[name], raw["params_ema"][name])
    assert not torch.equal(net.state_dict()[name], raw["params"][name])


def test_processed_pixels_count_each_tile_and_each_distinct_window_once():
    assert processed_pixels(32, 32, [256], 16) == 32 * 32  # one tile covering the image
    assert processed_pixels(32, 32, [100, 200, 300, 400, 500], 16) == 32 * 32  # every window: the whole image
    assert processed_pixels(120, 120, [100], 10) == 4 * 100 * 100  # starts 0 and 20 on both axes
    assert processed_pixels(120, 120, [100, 200], 10) == 4 * 100 * 100 + 120 * 120
    # a DIV2K-sized LR image at the profile's tile 256, overlap 16: rows start 0, 83; columns 0, 240, 254
    assert processed_pixels(339, 510, [256], 16) == 6 * 256 * 256
    assert processed_pixels(339, 510, [0], 16) == 339 * 510


def test_user_fingerprint_sees_a_changed_file(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.png").write_bytes(b"x")
    (tmp_path / "params.yaml").write_text("a: 1\n")
    (tmp_path / "other.txt").write_text("not the user's pipeline")
    before = user_fingerprint(tmp_path)
    assert sorted(before) == ["data/a.png", "params.yaml"]
    (tmp_path / "data" / "a.png").write_bytes(b"xy")
    assert user_fingerprint(tmp_path) != before


def _user_repo(tmp_path: Path) -> Path:
    """A project folder with the demo profile and a file under every path the rehearsal must not touch."""
    repo = tmp_path / "project"
    (repo / "profiles").mkdir(parents=True)
    shutil.copyfile(REPO / "profiles" / "demo.yaml", repo / "profiles" / "demo.yaml")
    shutil.copyfile(REPO / "profiles" / "demo.yaml", repo / "params.yaml")
    for rel in USER_PATHS[1:]:
        target = repo / rel / "user.bin" if "." not in rel else repo / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(f"the user's {rel}".encode())
    return repo


def _content_hashes(repo: Path) -> dict[str, str]:
    return {p.relative_to(repo).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for rel in USER_PATHS for p in ([repo / rel] if (repo / rel).is_file() else (repo / rel).rglob("*"))
            if p.is_file()}


def test_rehearse_refuses_an_unknown_profile_and_a_workdir_holding_other_files(tmp_path):
    repo = _user_repo(tmp_path)
    with pytest.raises(ConfigError, match="unknown profile 'nope'"):
        rehearse("nope", repo=repo)
    with pytest.raises(ValueError, match="must not be the project folder"):
        rehearse("demo", repo=repo, workdir=repo)
    with pytest.raises(ValueError, match="must not be the project folder"):
        rehearse("demo", repo=repo, workdir=repo / "results" / "x")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "thesis.tex").write_text("keep me")
    with pytest.raises(ValueError, match="not made by an earlier rehearsal"):
        rehearse("demo", repo=repo, workdir=busy)
    assert (busy / "thesis.tex").read_text() == "keep me"


def test_cli_rehearse_reports_an_unknown_profile(capsys):
    from smt.__main__ import main

    assert main(["rehearse", "no_such_profile"]) == 2
    assert "unknown profile 'no_such_profile'" in capsys.readouterr().err


@pytest.mark.slow
def test_reduced_rehearsal_runs_every_stage_in_order_measures_extrapolates_and_leaves_user_files(tmp_path):
    """The demo profile at the smallest counts (tiny models keep it to minutes; the ntire2025 rehearsal is the
    same code with the L models): every pipeline stage but the ablations, in the pipeline's order."""
    from smt.pipeline import ABLATION_NOTEBOOKS, stage_definitions

    repo = _user_repo(tmp_path)
    before = _content_hashes(repo)
    scratch = tmp_path / "scratch"
    lines: list[str] = []
    result = rehearse("demo", repo=repo, workdir=scratch, red=SMALLEST, log=lines.append)
    assert _content_hashes(repo) == before and len(before) == len(USER_PATHS)
    expected = [n for n in stage_definitions(scratch / "params.yaml") if n not in ABLATION_NOTEBOOKS]
    assert [r.stage for r in result.rows] == expected
    assert expected[:2] == ["data", "select"] and expected[-2:] == ["infer", "report"]
    assert expected[2:-2] == [f"train_{m}_r1_{s}" for m in ("hat", "mambairv2") for s in ("s1", "s2", "s3")]
    assert [ln.split(":")[0] for ln in lines if ln.startswith("stage ") and not ln.endswith("...")] == \
        [f"stage {n}" for n in expected]
    for row in result.rows:
        assert row.wall_seconds > 0 and row.cpu_seconds > 0 and row.peak_rss_mb > 50 and row.units >= 1
        assert row.seconds_per_unit > 0
        assert row.full_seconds is not None and row.full_seconds > 0 and row.work_ratio > 0 and row.formula
    train = [r for r in result.rows if r.stage.startswith("train_")]
    assert all(r.unit == "step" and r.units == 1 and r.per_round for r in train)
    assert train[0].full_units == 1600 and train[0].work_ratio == pytest.approx(8 * 16 ** 2 / (1 * 16 ** 2))
    infer = next(r for r in result.rows if r.stage == "infer")
    assert [m["method"] for m in infer.detail] == ["hat", "hat+SE", "mambairv2", "mambairv2+SE", "mambairv2+SE+MW"]
    assert result.clip_untrained is True and result.untouched
    text = format_rehearsal(result)
    for needle in ("EXTRAPOLATION (not a measurement)", "CLIP features: UNTRAINED", "peak RSS MB", "s/unit",
                   "full units x s/unit measured x work ratio", "untouched", "load average", "CPU s"):
        assert needle in text
    scratch_params = load_params(scratch / "params.yaml")
    assert scratch_params["train"]["rounds"] == 1 and scratch_params["train"]["stages"]["s1"]["iters"] == 1
    assert (scratch / "results" / "fusion.json").is_file() and (scratch / "reports" / "index.html").is_file()


def test_rehearse_fails_when_a_user_file_changes_during_the_run(tmp_path, monkeypatch):
    """The guard itself (no stages run here: the pipeline is patched to be empty)."""
    import smt.pipeline

    repo = _user_repo(tmp_path)
    monkeypatch.setattr(smt.pipeline, "stage_definitions", lambda *a, **k: {})

    def log(msg: str) -> None:
        if msg.startswith("scratch params.yaml"):
            (repo / "results" / "user.bin").write_bytes(b"changed by someone")

    with pytest.raises(RehearsalError, match="results/user.bin"):
        rehearse("demo", repo=repo, workdir=tmp_path / "scratch", red=SMALLEST, log=log)


def test_a_failing_stage_stops_the_rehearsal_naming_it_and_keeps_the_folder_with_its_log(tmp_path, monkeypatch):
    import re

    import smt.rehearse

    def failing(name, scratch, env, log_dir):
        log_dir.mkdir(parents=True, exist_ok=True)
        (log_dir / f"{name}.log").write_text("Traceback ...\nValueError: boom\n")
        return 1.0, 0.5, 100.0, 1

    monkeypatch.setattr(smt.rehearse, "_run_stage", failing)
    with pytest.raises(RehearsalError, match=r"stage data failed \(exit code 1\)") as err:
        rehearse("demo", repo=_user_repo(tmp_path), red=SMALLEST)  # a temporary scratch folder
    assert "ValueError: boom" in str(err.value) and "kept" in str(err.value)
    log = Path(re.search(r"its log is (\S+)", str(err.value)).group(1))
    assert log.is_file()
    shutil.rmtree(log.parents[1])
