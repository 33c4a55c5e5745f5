"""End to end: `dvc repro` on a minimal parameter set in a temporary copy of the repository."""
import json
import re
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest
import yaml

from smt.data.images import read_image
from smt.evaluate import bicubic_upscale
from smt.metrics import NTIRE2025, evaluate_pair
from conftest import REPO

pytestmark = pytest.mark.slow


def _run(cmd, cwd):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert res.returncode == 0, f"{cmd} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res.stdout + res.stderr


def _pipeline_copy(tmp_path_factory, name: str, edit: Callable[[dict], None]) -> Path:
    """A temporary repository: the package, the notebooks, and the repository's params.yaml with the demo data cut
    to one training and two validation images of at most 64 pixels, then changed by ``edit(params)``; its
    dvc.yaml written by ``smt pipeline``; git and DVC initialised."""
    work = tmp_path_factory.mktemp(name)
    for folder in ("smt", "notebooks"):
        shutil.copytree(REPO / folder, work / folder, ignore=shutil.ignore_patterns("__pycache__"))
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"].update(max_side=64, train_images=["camera"], valid_images=["astronaut", "coins"],
                          test_images=[])
    edit(params)
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    _run([sys.executable, "-m", "smt", "pipeline"], work)
    _run(["git", "init", "-q"], work)
    _run([sys.executable, "-m", "dvc", "init", "-q"], work)
    shutil.copy(REPO / ".dvcignore", work / ".dvcignore")
    return work


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """Every model, round, stage and ablation of the repository's pipeline, each a few steps on tiny data."""
    def edit(params: dict) -> None:
        for stage in params["train"]["stages"].values():
            stage.update(patch_size=8, batch_size=2, iters=3, milestones=[])
        params["train"].update(val_every=2, ckpt_every=2, log_every=1, val_max_side=16)
        params["infer"].update(window_tiles=[8, 16], window_weights=[1.0, 1.0], tile_overlap=2)
        params["ablations"].update(loss_iters=2, seeds=[0, 1])

    return _pipeline_copy(tmp_path_factory, "pipeline", edit)


def test_repro_writes_reports_and_metrics(workdir):
    _run([sys.executable, "-m", "dvc", "repro"], workdir)
    metrics = json.loads((workdir / "reports/report/summary.json").read_text())
    assert metrics["protocol"] == "NTIRE2025" and metrics["num_images"] == {"valid": 2}
    methods = ["hat", "hat+SE", "mambairv2", "mambairv2+SE", "mambairv2+SE+MW", "fused"]
    assert list(metrics["valid"]) == ["bicubic", *methods]  # the report keeps the inference stage's order
    assert json.loads((workdir / "results/methods.json").read_text())["methods"] == methods
    assert 0 <= metrics["fusion_weight"] <= 1
    # colour fidelity and generalisation are reported per method, with the final method's verdict
    for v in metrics["valid"].values():
        assert 0 <= v["color_shift"] <= v["color_shift_max"]
    assert metrics["final_method"] == "fused" and set(metrics["below_bicubic"]) == {"valid"}
    assert metrics["generalisation"].startswith("The final method (fused) is ")
    assert "Against bicubic." in (workdir / "reports" / "index.html").read_text()
    # wall-clock is a measurement of the run: in timings/ (not a DVC output), never in results/ or the reports
    assert not (workdir / "results/timings.json").exists() and "seconds_per_image" not in metrics["valid"]["hat"]
    timings = json.loads((workdir / "timings/infer.json").read_text())
    assert timings["hat"]["seconds_per_image"] > 0 and timings["stage_seconds"] > 0
    assert json.loads((workdir / "timings/train_hat_r1_s1.json").read_text())["train_seconds"] > 0
    assert "train_seconds" not in json.loads((workdir / "models/hat/r1_s1/metrics.json").read_text())
    # recompute the bicubic score independently of the stage
    scores = []
    for i in ("0101", "0102"):
        hr = read_image(workdir / "data/demo/valid_HR" / f"{i}.png")
        lr = read_image(workdir / "data/demo/valid_LR_bicubic/X4" / f"{i}x4.png")
        scores.append(evaluate_pair(bicubic_upscale(lr, 4), hr, NTIRE2025)["psnr_y"])
    assert metrics["valid"]["bicubic"]["psnr_y"] == pytest.approx(sum(scores) / 2, abs=1e-9)
    assert 15 < metrics["valid"]["bicubic"]["psnr_y"] < 40
    for stage in ("data", "train_hat_r1_s1", "train_mambairv2_r1_s3", "infer", "report"):
        html = (workdir / "reports" / stage / f"{stage}.html").read_text()
        assert not re.search(r'(src|href)="https?://', html), "report loads resources from the network"
        assert "Traceback" not in html
    index = (workdir / "reports" / "index.html").read_text()
    assert 'href="data/data.html"' in index and 'href="report/report.html"' in index and "NTIRE2025" in index
    assert "Training: mambairv2, round 1, stage s3" in index
    assert (workdir / "models/hat/r1_s3/model.safetensors").exists()
    # the ablation stages (plain `dvc repro` runs them too; `make repro` targets `report` only)
    for stage in ("ablation_loss", "ablation_subset", "ablation_ensemble", "ablation_fusion"):
        html = (workdir / "reports" / stage / f"{stage}.html").read_text()
        assert "Conclusion." in html and "Traceback" not in html, stage
        assert json.loads((workdir / "reports" / f"metrics_{stage}.json").read_text())
    loss = json.loads((workdir / "reports/ablation_loss/summary.json").read_text())
    assert set(loss["variants"]) == {"x4_only", "paper", "equal"} and loss["variants"]["paper"]["n"] == 2
    runs = (workdir / "reports/ablation_subset/runs.csv").read_text()
    assert runs.count("clip") == 2 and runs.count("random") == 2
    assert "<code>dvc repro ablation_loss</code>" in index  # the index never links a page make repro does not write
    # the tracked metrics: the headline only, keys shared between files (dvc metrics show stays narrow)
    final = json.loads((workdir / "reports/metrics/final.json").read_text())
    assert final == {"valid": {k: metrics["valid"]["fused"][k] for k in ("psnr_y", "ssim_y", "color_shift")},
                     "fusion_weight": metrics["fusion_weight"]}
    assert set(json.loads((workdir / "reports/metrics_ablation_loss.json").read_text())) == {
        "valid", "diff_psnr_y", "stderr"}


def test_every_report_page_works_in_a_browser(workdir):
    """Headless Chromium over the real pages: no console error, every link and image resolves (the ablation
    pages, which the index names without linking, crawled from their own start)."""
    from browser import HOW_TO_GET_ONE, Browser, crawl, find_chromium

    if find_chromium() is None:
        pytest.skip(HOW_TO_GET_ONE)
    browser = Browser(find_chromium())
    try:
        report = crawl(browser, workdir / "reports/index.html", workdir / "reports")
        for stage in ("ablation_loss", "ablation_subset", "ablation_ensemble", "ablation_fusion"):
            report.update(crawl(browser, workdir / "reports" / stage / f"{stage}.html", workdir / "reports"))
    finally:
        browser.close()
    assert {page: problems for page, problems in report.items() if problems} == {}
    assert len(report) >= 18  # index, 11 stage pages, 2 viewers, gallery, 4 ablations
    assert any("/view/valid/" in page for page in report)


def test_metrics_show_fits_a_terminal_and_diff_shows_what_moved(workdir):
    """`dvc metrics show` fits 200 columns with no strings in it; after a params change `dvc metrics diff` names
    the headline numbers that moved."""
    shown = _run([sys.executable, "-m", "dvc", "metrics", "show"], workdir)
    assert max(len(line) for line in shown.splitlines()) <= 200, shown
    assert "reports/metrics/final.json" in shown and "NTIRE2025" not in shown and "failed" not in shown
    _run(["git", "add", "-A"], workdir)
    _run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "run"], workdir)
    params = yaml.safe_load((workdir / "params.yaml").read_text())
    params["infer"]["window_weights"] = [1.0, 0.25]  # the multi-window average, so the final method, moves
    (workdir / "params.yaml").write_text(yaml.safe_dump(params))
    try:
        _run([sys.executable, "-m", "dvc", "repro", "report"], workdir)  # infer and report
        diff = _run([sys.executable, "-m", "dvc", "metrics", "diff"], workdir)
        assert max(len(line) for line in diff.splitlines()) <= 200, diff
        assert "reports/metrics/final.json" in diff and "valid.psnr_y" in diff, diff
    finally:
        _run(["git", "checkout", "params.yaml"], workdir)
        _run([sys.executable, "-m", "dvc", "repro", "report"], workdir)


def test_second_repro_does_nothing_and_param_change_reruns_dependents(workdir):
    out = _run([sys.executable, "-m", "dvc", "repro"], workdir)
    assert "Running stage" not in out
    params = yaml.safe_load((workdir / "params.yaml").read_text())
    params["report"]["crop_size"] = 32
    (workdir / "params.yaml").write_text(yaml.safe_dump(params))
    out = _run([sys.executable, "-m", "dvc", "repro"], workdir)
    assert "Running stage 'report'" in out and "Running stage 'data'" not in out


def test_failing_cell_fails_the_stage(workdir):
    params = yaml.safe_load((workdir / "params.yaml").read_text())
    params["data"]["train_images"] = ["no_such_image"]
    (workdir / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    res = subprocess.run([sys.executable, "-m", "smt", "stage", "data"], cwd=workdir, env=env,
                         capture_output=True, text=True)
    assert res.returncode != 0
    assert "unknown demo image 'no_such_image'" in res.stdout + res.stderr
    # the previous data set is untouched: a failed stage loses no data
    assert (workdir / "data/demo/valid_HR/0101.png").exists()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The smallest pipeline with every kind of stage: data, one training stage, infer (one model), report."""
    def edit(params: dict) -> None:
        params["train"]["models"] = {"hat": params["train"]["models"]["hat"]}
        params["train"]["stages"] = {"s1": {**params["train"]["stages"]["s1"], "patch_size": 8, "batch_size": 2,
                                            "iters": 3, "milestones": []}}
        params["train"].update(stage_order=["s1"], val_every=2, ckpt_every=2, log_every=1, val_max_side=16)
        params["infer"].update(models=["hat"], multi_window_model="", window_tiles=[8], window_weights=[1.0],
                               tile_overlap=2)
        params["ablations"].update(subset_stage="s1")

    return _pipeline_copy(tmp_path_factory, "tiny", edit)


def _out_hashes(lock_path: Path) -> dict:
    stages = yaml.safe_load(lock_path.read_text())["stages"]
    return {(name, o["path"]): o["md5"] for name, st in stages.items() for o in st.get("outs", [])}


def test_forced_rerun_gives_identical_hashes(tiny):
    """Same machine, same inputs -> the same bytes: `dvc repro -f report` recomputes every stage (the training run
    from scratch, not resumed) and changes no hash in dvc.lock; then nothing is stale."""
    out = _run([sys.executable, "-m", "dvc", "repro", "report"], tiny)
    assert out.count("Running stage") == 4
    first = _out_hashes(tiny / "dvc.lock")
    assert {s for s, _ in first} == {"data", "train_hat_r1_s1", "infer", "report"}
    out = _run([sys.executable, "-m", "dvc", "repro", "-f", "report"], tiny)
    assert out.count("Running stage") == 4 and "models/hat/r1_s1: finished run; starting afresh" in out
    second = _out_hashes(tiny / "dvc.lock")
    changed = sorted(f"{stage}: {path}" for (stage, path), h in first.items() if second.get((stage, path)) != h)
    assert not changed, f"outputs whose bytes changed on a forced rerun: {changed}"
    out = _run([sys.executable, "-m", "dvc", "repro", "report"], tiny)
    assert "Running stage" not in out
    assert "up to date" in _run([sys.executable, "-m", "dvc", "status", "report"], tiny)
    executed = json.loads((tiny / "reports/infer/80_infer.ipynb").read_text())
    assert "start_time" not in json.dumps(executed) and '"name": "stderr"' not in json.dumps(executed)
