"""Training: loss, data alignment and sampling, resume equals uninterrupted, DDP equals single process."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from smt.config import TrainConfig, load_section, parse_section
from smt.data.imresize import imresize, imresize_torch
from smt.train.data import GlobalBatchSampler, PairedPatchDataset, PatchSpec
from smt.train.engine import TrainingError, run_dir, train_stage
from smt.train.losses import multiscale_loss
from conftest import REPO, write_train_split


def test_imresize_torch_matches_numpy():
    x = torch.rand(2, 3, 20, 24, dtype=torch.float64)
    y = imresize_torch(x, 0.75)
    ref = imresize(x[1].permute(1, 2, 0).numpy(), 0.75)
    np.testing.assert_allclose(y[1].permute(1, 2, 0).numpy(), ref, atol=1e-12)


def test_multiscale_loss_weights_and_targets():
    hr = torch.rand(2, 3, 32, 32)
    targets = {4: hr, 3: imresize_torch(hr, 0.75), 2: imresize_torch(hr, 0.5)}
    exact = {s: t.clone() for s, t in targets.items()}
    loss, parts = multiscale_loss(exact, hr, 4, {4: 1.0, 3: 0.5, 2: 0.5}, "l1", "matlab")
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    # the authors' targets (sr_mutliscale_model.py): F.interpolate bicubic to h // 4 * s, no antialiasing
    theirs = {4: hr, 3: F.interpolate(hr, size=(24, 24), mode="bicubic", align_corners=False),
              2: F.interpolate(hr, size=(16, 16), mode="bicubic", align_corners=False)}
    assert multiscale_loss(theirs, hr, 4, {4: 1.0, 3: 0.5, 2: 0.5}, "l1")[0].item() == 0.0
    assert multiscale_loss(exact, hr, 4, {4: 1.0, 3: 0.5, 2: 0.5}, "l1", "bicubic")[0].item() > 1e-3
    with pytest.raises(ValueError, match=r"aux_target_resize: 'area' is not a resize \(valid: bicubic, matlab\)"):
        multiscale_loss(exact, hr, 4, {4: 1.0, 3: 0.5, 2: 0.5}, "l1", "area")
    shifted = {4: hr + 0.1, 3: targets[3] + 0.2, 2: targets[2] + 0.4}
    loss, parts = multiscale_loss(shifted, hr, 4, {4: 1.0, 3: 0.5, 2: 0.5}, "l1", "matlab")
    # (0.1 + 0.5 * 0.2 + 0.5 * 0.4) / 2
    assert loss.item() == pytest.approx(0.2, abs=1e-5)
    loss, _ = multiscale_loss(shifted, hr, 4, {4: 1.0, 3: 0.5, 2: 0.5}, "mse", "matlab")
    assert loss.item() == pytest.approx((0.01 + 0.5 * 0.04 + 0.5 * 0.16) / 2, abs=1e-5)
    with pytest.raises(ValueError, match="unknown loss"):
        multiscale_loss(shifted, hr, 4, {}, "l2")


@pytest.fixture(scope="module")
def blocky_root(tmp_path_factory):
    """A data root whose HR images are LR images repeated 4x4: LR and HR patches must match after any
    augmentation, which checks their alignment exactly."""
    root = tmp_path_factory.mktemp("blocky")
    rng = np.random.default_rng(0)
    lrs = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in [(12, 16), (20, 10)]]
    write_train_split(root, [(lr, lr.repeat(4, 0).repeat(4, 1)) for lr in lrs])
    return root


def test_patches_are_aligned_under_every_augmentation(blocky_root):
    ds = PairedPatchDataset(blocky_root, "train", patch_size=6, scale=4)
    for hf in (False, True):
        for vf in (False, True):
            for tr in (False, True):
                lr, hr = ds[PatchSpec(1, 3, 2, hf, vf, tr)]
                assert lr.shape == (3, 6, 6) and hr.shape == (3, 24, 24)
                assert torch.equal(hr[:, ::4, ::4], lr)
    with pytest.raises(ValueError, match="smaller than the patch size 11"):
        PairedPatchDataset(blocky_root, "train", patch_size=11, scale=4)
    with pytest.raises(ValueError, match="not in the train manifest"):
        PairedPatchDataset(blocky_root, "train", patch_size=4, scale=4, subset=["0000", "9999"])
    assert len(PairedPatchDataset(blocky_root, "train", 4, 4, subset=["0001"])) == 1


def test_sampler_is_a_function_of_the_step_and_ranks_partition_the_batch():
    sizes = [(12, 16), (20, 10)]
    a = GlobalBatchSampler(sizes, 6, 8, seed=3)
    b = GlobalBatchSampler(sizes, 6, 8, seed=3, start_step=5)
    assert a.draw(5) == next(iter(b)) and a.draw(5) != a.draw(6)
    ranks = [GlobalBatchSampler(sizes, 6, 8, seed=3, rank=r, world_size=2).draw(5) for r in (0, 1)]
    assert ranks[0] + ranks[1] == a.draw(5)
    for spec in a.draw(0):
        h, w = sizes[spec.image]
        assert 0 <= spec.top <= h - 6 and 0 <= spec.left <= w - 6
    with pytest.raises(ValueError, match="not divisible"):
        GlobalBatchSampler(sizes, 6, 7, seed=0, world_size=2)


def _train_cfg(out_root, **over) -> TrainConfig:
    raw = {"models": {"hat": {"preset": "hat_tiny"}, "mambairv2": {"preset": "mambairv2_tiny"}},
           "stages": {"s1": {"patch_size": 8, "batch_size": 4, "loss": "l1", "lr": 1e-3, "iters": 6,
                             "milestones": [4]},
                      "s2": {"patch_size": 8, "batch_size": 4, "loss": "mse", "lr": 1e-4, "iters": 2}},
           "stage_order": ["s1", "s2"], "out_root": str(out_root), "device": "cpu", "val_every": 3,
           "ckpt_every": 2, "log_every": 1, "val_max_side": 16, "ema_decay": 0.9}
    raw.update(over)
    return parse_section(TrainConfig, raw, "train")


@pytest.mark.parametrize("model", ["hat", "mambairv2"])
def test_resume_equals_uninterrupted(tmp_path, demo_root, model):
    straight = _train_cfg(tmp_path / "a")
    res = train_stage(straight, model, 1, "s1", demo_root, 4, log=lambda m: None)
    assert res.steps == 6 and np.isfinite(res.val_psnr_y)
    killed = _train_cfg(tmp_path / "b")
    part = train_stage(killed, model, 1, "s1", demo_root, 4, max_steps=3, log=lambda m: None)
    assert part.steps == 3 and not (run_dir(killed, model, 1, "s1") / "model.safetensors").exists()
    messages = []
    train_stage(killed, model, 1, "s1", demo_root, 4, log=messages.append)
    assert any("resuming" in m and "step 3" in m for m in messages)
    sa = torch.load(run_dir(straight, model, 1, "s1") / "state.pt", weights_only=True)
    sb = torch.load(run_dir(killed, model, 1, "s1") / "state.pt", weights_only=True)
    assert sa["step"] == sb["step"] == 6
    for k in sa["model"]:
        torch.testing.assert_close(sb["model"][k], sa["model"][k], rtol=0, atol=0)
        torch.testing.assert_close(sb["ema"][k], sa["ema"][k], rtol=0, atol=0)
    for name in ("train_log.csv", "val_log.csv"):
        logs = [(run_dir(c, model, 1, "s1") / name).read_text() for c in (straight, killed)]
        assert logs[0] == logs[1] and logs[0].startswith("step,")


def test_restart_from_scratch_rewrites_logs_with_header(tmp_path, demo_root):
    cfg = _train_cfg(tmp_path)
    train_stage(cfg, "hat", 1, "s1", demo_root, 4, max_steps=3, log=lambda m: None)
    changed = _train_cfg(tmp_path, seed=5)  # a different config: the saved state is not resumed
    messages = []
    train_stage(changed, "hat", 1, "s1", demo_root, 4, log=messages.append)
    assert any("config changed" in m for m in messages)
    for name in ("train_log.csv", "val_log.csv"):
        text = (run_dir(cfg, "hat", 1, "s1") / name).read_text()
        assert text.startswith("step,") and text.count("step,") == 1


def test_next_stage_starts_from_previous_and_pretrained_reports_heads(tmp_path, demo_root):
    cfg = _train_cfg(tmp_path)
    with pytest.raises(TrainingError, match="r1_s1/model.safetensors: the checkpoint this stage starts from"):
        train_stage(cfg, "hat", 1, "s2", demo_root, 4, log=lambda m: None)
    train_stage(cfg, "hat", 1, "s1", demo_root, 4, log=lambda m: None)
    messages = []
    train_stage(cfg, "hat", 1, "s2", demo_root, 4, log=messages.append)
    assert any("r1_s1/model.safetensors: loaded" in m and "aux_upsample" not in m for m in messages)
    # an official-style checkpoint (no auxiliary heads) as the pretrained start
    from smt.models import build_model

    official = tmp_path / "official.pth"
    torch.save({"params_ema": build_model("hat_tiny").state_dict()}, official)
    cfg2 = _train_cfg(tmp_path / "p", models={"hat": {"preset": "hat_tiny", "pretrained": str(official)}})
    messages = []
    train_stage(cfg2, "hat", 1, "s1", demo_root, 4, max_steps=1, log=messages.append)
    assert any("not in the checkpoint, left at init: aux_upsample.x2" in m for m in messages)


def test_non_finite_loss_stops_and_keeps_last_state(tmp_path, demo_root, monkeypatch):
    import smt.train.engine as engine

    cfg = _train_cfg(tmp_path)
    real = engine.multiscale_loss
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        loss, parts = real(*args, **kwargs)
        return (loss * float("nan"), parts) if calls["n"] == 5 else (loss, parts)

    monkeypatch.setattr(engine, "multiscale_loss", flaky)
    with pytest.raises(TrainingError, match="loss or the gradients were not finite at step 5"):
        train_stage(cfg, "hat", 1, "s1", demo_root, 4, log=lambda m: None)
    state = torch.load(run_dir(cfg, "hat", 1, "s1") / "state.pt", weights_only=True)
    assert state["step"] == 4 and all(torch.isfinite(v).all() for v in state["model"].values())


@pytest.mark.slow
def test_ddp_two_processes_equal_single_process(tmp_path, demo_root):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"].update(root=demo_root)
    cfg = {"models": {"hat": {"preset": "hat_tiny", "pretrained": ""}},
           "stages": {"s1": {"patch_size": 8, "batch_size": 4, "loss": "l1", "lr": 1e-3, "iters": 3}},
           "stage_order": ["s1"], "device": "cpu", "val_every": 100, "ckpt_every": 100, "val_max_side": 16,
           "threads": 1}
    paths = {}
    for world in (1, 2):
        params["train"] = {**cfg, "out_root": str(tmp_path / f"w{world}")}
        p = tmp_path / f"params{world}.yaml"
        p.write_text(yaml.safe_dump(params))
        cmd = [sys.executable, "-m", "smt", "train", "--params", str(p), "--model", "hat", "--stage", "s1"]
        if world == 2:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *cmd[1:]]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
        paths[world] = tmp_path / f"w{world}" / "hat" / "r1_s1" / "state.pt"
    one, two = (torch.load(paths[w], weights_only=True)["model"] for w in (1, 2))
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-5)


def test_repo_train_params_and_pipeline_are_consistent(tmp_path):
    from smt.pipeline import write_dvc_yaml

    cfg = load_section("train", REPO / "params.yaml")
    assert cfg.schedule()[0] == (1, "s1") and cfg.previous(1, "s2") == (1, "s1")
    out = write_dvc_yaml(REPO / "params.yaml", tmp_path / "dvc.yaml")
    assert out.read_text() == (REPO / "dvc.yaml").read_text(), "dvc.yaml is stale: run `python -m smt pipeline`"
    # DVC refuses a stage whose params are not all present in params.yaml
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for name, stage in yaml.safe_load(out.read_text())["stages"].items():
        for key in stage.get("params", []):
            node = params
            for part in key.split("."):
                assert isinstance(node, dict) and part in node, f"stage {name}: param {key} is not in params.yaml"
                node = node[part]
    json.dumps(cfg.__dict__, default=str)


def test_multistep_lr_and_ema_update():
    from smt.train.checkpoint import EMA
    from smt.train.engine import _lr_at

    assert [_lr_at(1e-3, (4, 6), 0.5, s) for s in (0, 3, 4, 5, 6, 9)] == [1e-3, 1e-3, 5e-4, 5e-4, 2.5e-4, 2.5e-4]
    net = torch.nn.Linear(2, 1)
    ema = EMA(net, decay=0.9)
    before = ema.model.weight.detach().clone()
    with torch.no_grad():
        net.weight.add_(1.0)
    ema.update(net)
    torch.testing.assert_close(ema.model.weight, 0.9 * before + 0.1 * net.weight.detach())
    assert not any(p.requires_grad for p in ema.model.parameters())
    warm = EMA(net, decay=0.99, warmup=True)
    assert [round(warm.decay_at(t), 6) for t in (0, 8, 1000)] == [0.1, 0.5, 0.99]
    target = net.weight.detach().clone()
    with torch.no_grad():
        net.weight.add_(1.0)
    warm.update(net, step=0)  # decay 0.1: the average moves 90% of the way
    torch.testing.assert_close(warm.model.weight, 0.1 * target + 0.9 * net.weight.detach())
