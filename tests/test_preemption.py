"""Graceful preemption: a stop signal during a training stage finishes the step, saves the state at that step
(periodic checkpoints off), exits non-zero with a message, and rerunning resumes to the uninterrupted weights."""
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import load_file

from smt.config import TrainConfig, parse_section
from smt.train.engine import PREEMPTED_EXIT_CODE, Preempted, run_dir, train_stage
from conftest import REPO

TRAIN = {"models": {"hat": {"preset": "hat_tiny"}, "mambairv2": {"preset": "mambairv2_tiny"}},
         "stages": {"s1": {"patch_size": 8, "batch_size": 4, "loss": "l1", "lr": 1e-3, "iters": 8,
                           "milestones": [5]}},
         "stage_order": ["s1"], "device": "cpu", "val_every": 3, "ckpt_every": 0, "log_every": 1,
         "val_max_side": 16, "ema_decay": 0.9, "ema_warmup": True, "threads": 1}


def _cfg(out_root, **over) -> TrainConfig:
    return parse_section(TrainConfig, {**TRAIN, "out_root": str(out_root), **over}, "train")


def _assert_same_run(a: TrainConfig, b: TrainConfig, model: str) -> None:
    sa, sb = (torch.load(run_dir(c, model, 1, "s1") / "state.pt", weights_only=True) for c in (a, b))
    assert sa["step"] == sb["step"]
    for part in ("model", "ema"):
        for k in sa[part]:
            assert torch.equal(sa[part][k], sb[part][k]), f"{part}.{k} differs"
    ma, mb = (load_file(run_dir(c, model, 1, "s1") / "model.safetensors") for c in (a, b))
    assert ma.keys() == mb.keys() and all(torch.equal(ma[k], mb[k]) for k in ma)
    for name in ("train_log.csv", "val_log.csv"):
        assert (run_dir(a, model, 1, "s1") / name).read_text() == (run_dir(b, model, 1, "s1") / name).read_text()


@pytest.mark.parametrize("sig", ["SIGUSR1", "SIGTERM", "SIGINT"])
def test_signal_mid_stage_saves_that_step_and_resumes_exactly(tmp_path, demo_root, monkeypatch, sig):
    import smt.train.engine as engine

    straight = _cfg(tmp_path / "straight")
    train_stage(straight, "mambairv2", 1, "s1", demo_root, 4, log=lambda m: None)

    stopped = _cfg(tmp_path / "stopped")
    real, calls = engine.multiscale_loss, {"n": 0}

    def signalling(*args, **kwargs):  # the signal arrives in the middle of step 3 (a validation step)
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), getattr(signal, sig))
            os.kill(os.getpid(), getattr(signal, sig))  # sent again (torchrun forwards it): still one clean stop
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "multiscale_loss", signalling)
    before = signal.getsignal(getattr(signal, sig))
    messages = []
    with pytest.raises(Preempted, match=f"stopped by {sig} after step 3 of 8") as info:
        train_stage(stopped, "mambairv2", 1, "s1", demo_root, 4, log=messages.append)
    assert info.value.step == 3 and any(f"received {sig}" in m for m in messages)
    state = torch.load(run_dir(stopped, "mambairv2", 1, "s1") / "state.pt", weights_only=True)
    assert state["step"] == 3 and state["pending_validation"]  # saved at the step, though ckpt_every is 0
    assert not (run_dir(stopped, "mambairv2", 1, "s1") / "model.safetensors").exists()
    assert signal.getsignal(getattr(signal, sig)) == before  # the stage restored the handlers it replaced

    monkeypatch.setattr(engine, "multiscale_loss", real)
    messages = []
    train_stage(stopped, "mambairv2", 1, "s1", demo_root, 4, log=messages.append)
    assert any("resuming" in m and "step 3" in m for m in messages)
    _assert_same_run(straight, stopped, "mambairv2")


@pytest.mark.slow
def test_sigterm_to_a_running_train_command_exits_nonzero_and_resumes_to_identical_weights(tmp_path, demo_root):
    iters = 60
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"].update(root=demo_root)
    stage = {**TRAIN["stages"]["s1"], "iters": iters, "milestones": [30]}
    params["train"] = {**TRAIN, "stages": {"s1": stage}, "val_every": 25, "out_root": str(tmp_path / "killed")}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    killed = parse_section(TrainConfig, params["train"], "train")
    log = run_dir(killed, "mambairv2", 1, "s1") / "train_log.csv"

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "smt", "train", "--params", str(path), "--model", "mambairv2",
                             "--stage", "s1"], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if log.exists() and len(log.read_text().splitlines()) >= 4:  # header + 3 steps
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the stage ended before it could be signalled"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == PREEMPTED_EXIT_CODE, err[-2000:]
    assert "preempted:" in err and "stopped by SIGTERM after step" in err and "rerun the stage" in err
    state = torch.load(run_dir(killed, "mambairv2", 1, "s1") / "state.pt", weights_only=True)
    logged = pd.read_csv(log)["step"].tolist()
    assert 3 <= state["step"] < iters and logged[-1] == state["step"]  # the step that was running when signalled
    assert f"after step {state['step']} of {iters}" in err

    train_stage(killed, "mambairv2", 1, "s1", demo_root, 4, log=lambda m: None)
    straight = parse_section(TrainConfig, {**params["train"], "out_root": str(tmp_path / "straight")}, "train")
    train_stage(straight, "mambairv2", 1, "s1", demo_root, 4, log=lambda m: None)
    _assert_same_run(straight, killed, "mambairv2")
