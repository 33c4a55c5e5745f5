"""Ablation logic on synthetic results: seed statistics, noise-aware conclusions, Pareto fronts, and collecting a
real (tiny) DVC experiment sweep."""
import math
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from smt.ablations.experiments import experiments_table, flatten
from smt.ablations.stats import compare, conclusion, pareto_front, seed_summary


def _runs(means, spread, seeds=3):
    rows = []
    for variant, m in means.items():
        for s, eps in zip(range(seeds), (-spread, 0.0, spread)):
            rows.append({"variant": variant, "seed": s, "psnr_y": m + eps})
    return pd.DataFrame(rows)


def test_seed_summary_and_noise_aware_comparison():
    summary = seed_summary(_runs({"a": 27.0, "b": 26.9}, spread=0.2), "variant", "psnr_y")
    assert summary.loc["a", "n"] == 3 and summary.loc["a", "std"] == pytest.approx(0.2)
    assert summary.loc["a", "min"] == pytest.approx(26.8) and summary.loc["a", "max"] == pytest.approx(27.2)
    c = compare(summary, "a", "b")
    assert c.diff == pytest.approx(0.1) and c.stderr == pytest.approx(math.sqrt(2 * 0.04 / 3))
    assert c.within_noise and conclusion(c, "a helps").startswith("Not shown")
    clear = compare(seed_summary(_runs({"a": 27.0, "b": 26.0}, spread=0.05), "variant", "psnr_y"), "a", "b")
    assert not clear.within_noise and conclusion(clear, "a helps").startswith("Supported")
    worse = compare(seed_summary(_runs({"a": 26.0, "b": 27.0}, spread=0.05), "variant", "psnr_y"), "a", "b")
    assert conclusion(worse, "a helps").startswith("Contradicted")
    single = seed_summary(_runs({"a": 27.0, "b": 20.0}, spread=0.0, seeds=1), "variant", "psnr_y")
    assert compare(single, "a", "b").within_noise  # one seed: the spread is unknown, nothing is claimed


def test_pareto_front():
    cost = np.array([1.0, 2.0, 2.0, 3.0, 8.0, 8.0, 0.5])
    value = np.array([27.0, 27.1, 26.9, 27.1, 27.3, 27.3, 26.0])
    # (2, 26.9) is dominated by (1, 27.0); (3, 27.1) by (2, 27.1); equal points (8, 27.3) both stay
    assert pareto_front(cost, value).tolist() == [True, True, False, False, True, True, True]


def test_flatten_and_table_from_exp_show_shape():
    assert flatten({"a": {"b": 1, "c": {"d": [1, 2]}}}) == {"a.b": 1, "a.c.d": [1, 2]}
    show = [{"rev": "workspace", "name": None, "error": None, "experiments": None,
             "data": {"timestamp": None, "params": {"params.yaml": {"data": {"x": {"seed": 0}}},
                                                    "other.yaml": {"data": {"k": 1}}},
                      "metrics": {"m.json": {"data": {"psnr": 1.5}}}}},
            {"rev": "abc", "name": "main", "error": None,
             "data": {"timestamp": "t", "params": {"params.yaml": {"data": {"x": {"seed": 0}}}},
                      "metrics": {"m.json": {"error": {"msg": "missing"}}}},
             "experiments": [{"revs": [{"rev": "e1", "name": "exp-1", "error": None, "experiments": None,
                                        "data": {"timestamp": "t2", "params": {"params.yaml": {"data": {"x": {"seed": 2}}}},
                                                 "metrics": {"m.json": {"data": {"psnr": 2.5}}}}}]}]}]
    t = experiments_table(show)
    assert t["kind"].tolist() == ["workspace", "commit", "experiment"]
    assert t["x.seed"].tolist() == [0, 0, 2] and t["other.yaml:k"].iloc[0] == 1
    assert t["m.json:psnr"].iloc[2] == 2.5 and math.isnan(t["m.json:psnr"].iloc[1])
    assert t["baseline"].iloc[2] == "abc" and "missing" in t["error"].iloc[1]


def test_collect_a_real_dvc_experiment_sweep(tmp_path):
    """Three seeds x two variants queued as `dvc exp run -S`, collected and summarised."""
    from smt.ablations.experiments import collect_experiments

    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    dvc = [sys.executable, "-m", "dvc"]

    def run(*cmd):
        res = subprocess.run(list(cmd), cwd=tmp_path, env=env, capture_output=True, text=True)
        assert res.returncode == 0, res.stderr[-2000:]

    (tmp_path / "params.yaml").write_text("ab:\n  variant: a\n  seed: 0\n")
    (tmp_path / "run.py").write_text(
        "import json, yaml\np = yaml.safe_load(open('params.yaml'))['ab']\n"
        "base = {'a': 27.0, 'b': 26.0}[p['variant']]\n"
        "json.dump({'psnr_y': base + 0.01 * p['seed']}, open('m.json', 'w'))\n")
    (tmp_path / "dvc.yaml").write_text(
        f"stages:\n  ab:\n    cmd: {sys.executable} run.py\n    deps: [run.py]\n    params: [ab]\n"
        "    metrics:\n    - m.json:\n        cache: false\n")
    run("git", "init", "-q")
    run(*dvc, "init", "-q")
    run("git", "add", "-A")
    run("git", "commit", "-qm", "sweep")
    for variant in ("a", "b"):
        for seed in (0, 1, 2):
            run(*dvc, "exp", "run", "-q", "-S", f"ab.variant={variant}", "-S", f"ab.seed={seed}",
                "-n", f"{variant}-{seed}")
    table = collect_experiments(tmp_path)
    exps = table[table.kind == "experiment"]
    assert sorted(exps["name"]) == ["a-0", "a-1", "a-2", "b-0", "b-1", "b-2"]
    summary = seed_summary(exps, "ab.variant", "m.json:psnr_y")
    assert summary.loc["a", "mean"] == pytest.approx(27.01) and summary.loc["b", "n"] == 3
    assert not compare(summary, "a", "b").within_noise


def test_ensemble_ablation_measures_the_infer_stages_method(demo_root, tmp_path):
    """The ensemble ablation takes "+SE" and "+MW" from the infer stage's one definition (``model_outputs``):
    its row for each model's most complete configuration scores what the infer stage's method gives."""
    import dataclasses

    import torch

    from smt.ablations.runs import ensemble_ablation
    from smt.config import DataConfig, load_section
    from smt.data.images import float255_to_uint8, image_to_tensor, read_image, tensor_to_float255
    from smt.data.manifest import read_manifest
    from smt.infer.runner import image_seed, load_method_models, model_outputs
    from smt.metrics import NTIRE2025, evaluate_pair
    from smt.models import build_model
    from smt.train.checkpoint import save_safetensors
    from smt.train.engine import exported_weights
    from conftest import REPO

    train = dataclasses.replace(load_section("train", REPO / "params.yaml"), out_root=str(tmp_path / "models"))
    infer = dataclasses.replace(load_section("infer", REPO / "params.yaml"), device="cpu", window_tiles=(8, 12),
                                window_weights=(1.0, 1.0), tile_overlap=2)
    data = DataConfig(root=demo_root, max_side=48, train_images=("camera",), valid_images=("astronaut",))
    torch.manual_seed(0)
    for m in infer.models:
        save_safetensors(build_model(train.models[m].preset).state_dict(),
                         exported_weights(train, m, *train.schedule()[-1]), {})
    summary, per_image = ensemble_ablation(infer, train, data, log=lambda msg: None, results_dir=tmp_path)
    a, b = infer.models
    assert list(summary.config)[:8] == [a, f"{a}+SE", b, f"{b}+SE", f"{b}+MW[8]", f"{b}+MW[12]", f"{b}+MW",
                                        f"{b}+SE+MW"]
    row = read_manifest(demo_root, "valid").iloc[0]
    lr, hr = read_image(f"{demo_root}/{row.lr_path}"), read_image(f"{demo_root}/{row.hr_path}")
    nets = load_method_models(infer, train, "cpu")
    for m in infer.models:
        with torch.no_grad():
            outs = model_outputs(nets[m], image_to_tensor(lr), m, infer, data.scale, image_seed(infer, int(row.id)))
        best, y = list(outs.items())[-1]
        expected = evaluate_pair(float255_to_uint8(tensor_to_float255(y)), hr, NTIRE2025)["psnr_y"]
        got = per_image[(per_image.config == best) & (per_image.id == row.id)]["psnr_y"].item()
        assert got == expected, best
