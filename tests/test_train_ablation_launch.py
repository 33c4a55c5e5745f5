"""Ablation training runs launch like the pipeline's training stages: in-process for one process, else under
torchrun with the configured processes, nodes and micro-batches (not the whole global batch on one GPU)."""
import json

import pandas as pd
import pytest

from smt.config import AblationConfig, DataConfig, LossVariant, TrainConfig, load_section, parse_section


def _train_cfg(out_root, **over) -> TrainConfig:
    raw = {"models": {"hat": {"preset": "hat_tiny"}},
           "stages": {"s1": {"patch_size": 8, "batch_size": 8, "loss": "l1", "lr": 1e-3, "iters": 8,
                             "milestones": [4]}},
           "stage_order": ["s1"], "out_root": str(out_root), "device": "cpu", "val_max_side": 16}
    return parse_section(TrainConfig, {**raw, **over}, "train")


def test_loss_ablation_runs_under_torchrun_with_the_stage_processes_and_micro_batch(tmp_path, monkeypatch):
    import smt.ablations.runs as runs

    launched = []

    def fake_torchrun(nproc, args, nnodes=1):  # what `python -m smt train` would write, without training
        launched.append((nproc, args, nnodes))
        params = args[args.index("--params") + 1]
        cfg = load_section("train", params)
        run = runs.run_dir(cfg, args[args.index("--model") + 1], 1, args[args.index("--stage") + 1])
        run.mkdir(parents=True, exist_ok=True)
        (run / "metrics.json").write_text(json.dumps({"val_psnr_y": 30.0, "bicubic_psnr_y": 28.0, "steps": 2}))

    monkeypatch.setattr(runs, "torchrun", fake_torchrun)
    cfg = _train_cfg(tmp_path / "models", nproc=4, nnodes=2, micro_batch={"s1": 1}, activation_checkpointing=True)
    data = DataConfig(root=str(tmp_path / "data"), train_images=("camera",), valid_images=("astronaut",))
    ab = AblationConfig(model="hat", seeds=(0,), loss_iters=2, loss_variants={"x4_only": LossVariant()},
                        loss_reference="x4_only", out_root=str(tmp_path / "abl"))
    table = runs.loss_ablation(ab, cfg, data, log=lambda m: None)
    assert isinstance(table, pd.DataFrame) and table["psnr_y"].tolist() == [30.0]
    assert len(launched) == 1
    nproc, args, nnodes = launched[0]
    assert (nproc, nnodes) == (4, 2) and args[:1] == ["train"] and args[-2:] == ["--stage", "s1"]
    params = args[args.index("--params") + 1]
    run_cfg = load_section("train", params)
    assert (run_cfg.nproc, run_cfg.nnodes, run_cfg.micro_batch, run_cfg.activation_checkpointing) == \
        (4, 2, {"s1": 1}, True)
    assert run_cfg.stages["s1"].iters == 2 and run_cfg.stages["s1"].batch_size == 8  # the global batch stays
    assert run_cfg.aux_scales == () and run_cfg.seed == 0 and run_cfg.val_max_side == 0
    assert load_section("data", params) == data


def test_one_process_ablation_trains_in_process(tmp_path, monkeypatch, demo_root):
    import smt.ablations.runs as runs

    monkeypatch.setattr(runs, "torchrun", lambda *a, **k: pytest.fail("one process must not launch torchrun"))
    cfg = _train_cfg(tmp_path / "models", stages={"s1": {"patch_size": 8, "batch_size": 2, "loss": "l1", "lr": 1e-3,
                                                         "iters": 2}})
    ab = AblationConfig(model="hat", seeds=(0,), loss_iters=1, loss_variants={"x4_only": LossVariant()},
                        loss_reference="x4_only", out_root=str(tmp_path / "abl"))
    data = DataConfig(root=demo_root, train_images=("camera",), valid_images=("astronaut",))
    table = runs.loss_ablation(ab, cfg, data, log=lambda m: None)
    assert table["steps"].tolist() == [1]
