"""The prepare stage's wiring: present exactly when ``data.store`` is set (the ntire2025 profile), ahead of every
training stage, its output persisted and uncached, and run end to end by DVC on a tiny data set, after which a
training stage trains from the store."""
import json
import shutil

import pytest
import yaml

from conftest import REPO


def _stages(tmp_path, edit) -> dict:
    from smt.pipeline import build_stages

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    edit(params)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    return build_stages(tmp_path / "params.yaml")


def test_prepare_stage_only_with_a_store_and_ahead_of_training(tmp_path):
    from smt.data.prepare import STORE_INDEX
    from smt.pipeline import STORE_INDEX as PIPELINE_INDEX, stage_definitions

    assert PIPELINE_INDEX == STORE_INDEX  # the dep the training stages list is the file the stage writes last
    plain = _stages(tmp_path, lambda p: None)
    assert "prepare" not in plain and "prepare" not in yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    stored = _stages(tmp_path, lambda p: p["data"].update(store="data/demo_store"))
    assert list(stored)[:2] == ["data", "prepare"]
    prep = stored["prepare"]
    assert prep["outs"][0] == {"${data.store}": {"persist": True, "cache": False}}
    assert "${data.root}" in prep["deps"] and "smt/data/prepare.py" in prep["deps"]
    for name, stage in stored.items():
        if name.startswith(("train_", "ablation_loss", "ablation_subset")):  # every stage that trains
            assert "${data.store}/index.csv" in stage["deps"], name
            assert set(stage["deps"]) - set(plain[name]["deps"]) == {"${data.store}/index.csv"}
            assert set(plain[name]["deps"]) <= set(stage["deps"])
            assert stage["params"] == plain[name]["params"]  # where the store lives changes no result
    # moving the store changes no other stage: the data stage does not read data.store
    others = [n for n in plain if not n.startswith(("train_", "ablation_loss", "ablation_subset"))]
    assert {n: stored[n] for n in others} == {n: plain[n] for n in others}
    # the full profile has the stage
    assert "prepare" in stage_definitions(REPO / "profiles/ntire2025.yaml")


def test_rehearsal_keeps_the_store_inside_its_scratch_folder():
    """`python -m smt rehearse` runs the prepare stage too: an absolute data.store is redirected like data.root."""
    from pathlib import Path

    from smt.rehearse import DEFAULT, reduced_params

    full = yaml.safe_load((REPO / "profiles/ntire2025.yaml").read_text())
    full["data"]["store"] = "/scratch/ntire_store"
    p, _ = reduced_params(full, DEFAULT)
    assert p["data"]["store"] and not Path(p["data"]["store"]).is_absolute()
    assert p["data"]["store"] != p["data"]["root"]
    full["data"]["store"] = ""
    assert reduced_params(full, DEFAULT)[0]["data"]["store"] == ""


@pytest.mark.slow
def test_dvc_runs_the_prepare_stage_and_training_reads_the_store(tmp_path):
    """`dvc repro prepare` on two tiny demo images; the store equals the PNGs; a rerun does nothing; a training
    stage from the store gives the weights of one from the PNGs."""
    from test_pipeline import _run
    import sys

    work = tmp_path / "repo"
    work.mkdir()
    for folder in ("smt", "notebooks"):
        shutil.copytree(REPO / folder, work / folder, ignore=shutil.ignore_patterns("__pycache__"))
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"].update(max_side=64, train_images=["camera", "coins"], valid_images=["astronaut"], test_images=[],
                          store="data/demo_store")
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    _run([sys.executable, "-m", "smt", "pipeline"], work)
    _run(["git", "init", "-q"], work)
    _run([sys.executable, "-m", "dvc", "init", "-q"], work)
    shutil.copy(REPO / ".dvcignore", work / ".dvcignore")
    _run([sys.executable, "-m", "dvc", "repro", "prepare"], work)
    from smt.data.prepare import spot_check

    assert len(spot_check(work / "data/demo", work / "data/demo_store", count=2)) == 2
    assert (work / "reports/prepare/prepare.html").is_file()
    assert "2</strong> training images" in (work / "reports/prepare/prepare.html").read_text()
    assert json.loads((work / "timings/prepare.json").read_text())["files_written"] == 4
    lock = yaml.safe_load((work / "dvc.lock").read_text())["stages"]["prepare"]
    digest = next(o["md5"] for o in lock["outs"] if o["path"] == "data/demo_store")
    cached = {p.parent.name + p.name for p in (work / ".dvc/cache").rglob("*") if p.is_file()}
    assert digest.endswith(".dir") and digest not in cached, "the store went into DVC's cache"
    an_array = next((work / "data/demo_store").rglob("*.npy"))
    from smt.files import file_digest
    assert file_digest(an_array, "md5") not in cached
    out = _run([sys.executable, "-m", "dvc", "repro", "prepare"], work)
    assert "didn't change, skipping" in out and "Running stage 'prepare'" not in out

    # one training stage from the store, one from the PNGs: the same weights
    from smt.config import load_section
    from smt.train.engine import train_stage

    import dataclasses

    cfg = load_section("train", work / "params.yaml")
    results = {}
    for name, store in (("png", ""), ("store", str(work / "data/demo_store"))):
        run_cfg = dataclasses.replace(cfg, out_root=str(tmp_path / name), val_every=1000, ckpt_every=1000,
                                      log_every=1000)
        train_stage(run_cfg, "hat", 1, "s1", str(work / "data/demo"), 4, max_steps=3, log=lambda _: None, store=store)
        results[name] = (tmp_path / name / "hat" / run_cfg.run_name(1, "s1") / "state.pt").read_bytes()
    import io
    import torch

    png, mapped = (torch.load(io.BytesIO(results[k]), weights_only=True)["model"] for k in ("png", "store"))
    assert png.keys() == mapped.keys() and all(torch.equal(png[k], mapped[k]) for k in png)
