"""Training on clusters, on CPU process groups (gloo): rank 0's resume decision shared by every rank, non-finite
losses and gradients stopping every rank before a save, per-sample noise that makes any world size train the same
model (HAT with stochastic depth, MambaIRv2 with Gumbel routing), the foreach EMA, the multi-node launch commands
and one DVC stage launched as two "nodes" on this machine."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from smt.config import TrainConfig, parse_section
from smt.models import build_model, sample_noise
from smt.train.engine import run_dir, train_stage
from conftest import REPO
from gloo_ranks import run_ranks, train_expecting_error, train_hiding_state_on_rank1, train_with_overrides


def _cfg(out_root, model="hat", preset="hat_tiny", iters=3, **over) -> TrainConfig:
    raw = {"models": {model: {"preset": preset}},
           "stages": {"s1": {"patch_size": 8, "batch_size": 4, "loss": "l1", "lr": 1e-3, "iters": iters}},
           "stage_order": ["s1"], "out_root": str(out_root), "device": "cpu", "val_every": 0, "ckpt_every": 0,
           "log_every": 1, "val_max_side": 16, "ema_decay": 0.9, "threads": 1}
    return parse_section(TrainConfig, {**raw, **over}, "train")


def _state(cfg, model="hat", stage="s1") -> dict:
    return torch.load(run_dir(cfg, model, 1, stage) / "state.pt", weights_only=True)


# ------------------------------------------------------------------------------------------ per-sample noise


def test_drop_path_mask_depends_on_the_sample_index_not_on_the_batch():
    from smt.models.common import DropPath

    dp = DropPath(0.5).train()
    x = torch.ones(6, 3, 2)

    def masks(indices, rows):
        torch.manual_seed(123)  # the step's seed: the same call keys
        with sample_noise.per_sample(indices):
            return dp(rows)[:, 0, 0] * 0.5  # the kept rows are 1 / keep

    whole = masks(range(6), x)
    assert set(whole.tolist()) == {0.0, 1.0}  # some dropped, some kept
    assert torch.equal(masks([2, 3], x[:2]), whole[2:4])  # the same samples in another batch: the same masks
    assert torch.equal(masks(range(6), x), whole)
    torch.manual_seed(124)
    with sample_noise.per_sample(range(6)):
        other = dp(x)[:, 0, 0] * 0.5
    assert not torch.equal(other, whole)  # another step: other masks
    with pytest.raises(RuntimeError, match="has 6 rows but per_sample"):
        with sample_noise.per_sample(range(5)):
            dp(x)


def test_gumbel_with_given_noise_equals_f_gumbel_softmax_values_and_gradients():
    from smt.models.mambairv2 import _gumbel_hard

    logits = torch.randn(2, 7, 5, requires_grad=True)
    w = torch.randn(2, 7, 5)
    torch.manual_seed(5)
    ref = F.gumbel_softmax(logits, hard=True, dim=-1)
    (ref * w).sum().backward()
    g_ref, logits.grad = logits.grad.clone(), None
    torch.manual_seed(5)
    ours = _gumbel_hard(logits, torch.empty_like(logits).exponential_())
    (ours * w).sum().backward()
    assert torch.equal(ours, ref) and torch.equal(logits.grad, g_ref)


def test_gumbel_noise_per_sample_is_the_same_in_any_batch():
    torch.manual_seed(9)
    with sample_noise.per_sample([4, 7, 9]):
        whole = sample_noise.exponential((3, 5, 4), torch.float32, torch.device("cpu"))
    torch.manual_seed(9)
    with sample_noise.per_sample([9]):
        alone = sample_noise.exponential((1, 5, 4), torch.float32, torch.device("cpu"))
    assert torch.equal(alone[0], whole[2]) and not torch.equal(whole[0], whole[1])
    assert sample_noise.exponential((3, 5, 4), torch.float32, torch.device("cpu")) is None  # outside: None


@pytest.mark.parametrize("preset", ["hat_tiny", "mambairv2_tiny"])
def test_eval_outputs_do_not_depend_on_the_per_sample_context(preset):
    net = build_model(preset).eval()
    x = torch.rand(2, 3, 16, 16)
    torch.manual_seed(3)
    with torch.no_grad():
        plain = net(x)
    torch.manual_seed(3)
    with torch.no_grad(), sample_noise.per_sample([0, 1]):
        inside = net(x)
    assert torch.equal(plain, inside)  # validation and inference never see the training noise


@pytest.mark.slow
@pytest.mark.parametrize("model,preset,overrides", [("hat", "hat_tiny", {"drop_path_rate": 0.1}),
                                                    ("mambairv2", "mambairv2_tiny", {})])
def test_two_processes_with_stochastic_depth_or_gumbel_routing_equal_one_process(tmp_path, demo_root, model,
                                                                                preset, overrides):
    one = _cfg(tmp_path / "one", model, preset)
    accum = _cfg(tmp_path / "accum", model, preset, micro_batch=1)  # 4 micro-batches of 1
    two = _cfg(tmp_path / "two", model, preset)
    old = _cfg(tmp_path / "old", model, preset)  # noise drawn per process, as before: must differ
    train_with_overrides(one, model, demo_root, overrides)
    train_with_overrides(accum, model, demo_root, overrides)
    train_with_overrides(old, model, demo_root, overrides, per_sample=False)
    run_ranks(2, train_with_overrides, two, model, demo_root, overrides, tmp=tmp_path)
    w1, wa, w2, wo = (_state(c, model)["model"] for c in (one, accum, two, old))
    # float rounding only (sums in another order, through Adam's normalisation): at most a few 1e-5 after 3 steps
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-3, atol=5e-5)
        torch.testing.assert_close(wa[k], w1[k], rtol=1e-3, atol=5e-5)
    # the noise matters at this tolerance: one process drawing from its own stream trains another model
    assert max((wo[k] - w1[k]).abs().max().item() for k in w1) > 1e-3


# --------------------------------------------------------------------------- rank 0 decides, all ranks fail


@pytest.mark.slow
def test_rank0_decides_the_resume_when_rank1_cannot_see_state_pt(tmp_path, demo_root):
    straight, resumed = _cfg(tmp_path / "straight", iters=4), _cfg(tmp_path / "resumed", iters=4)
    log = tmp_path / "log.txt"
    run_ranks(2, train_hiding_state_on_rank1, [(straight, None, False), (resumed, 2, False), (resumed, None, True)],
              "hat", demo_root, str(log), tmp=tmp_path)
    assert "resuming hat r1_s1 at step 2" in log.read_text()
    a, b = _state(straight), _state(resumed)
    assert a["step"] == b["step"] == 4 and b["world"] == 2
    for part in ("model", "ema"):  # rank 1 got the state (optimizer, EMA) from rank 0: the same updates
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), f"{part}.{k}"


@pytest.mark.slow
def test_a_missing_init_checkpoint_fails_every_rank_with_one_message(tmp_path, demo_root):
    cfg = _cfg(tmp_path / "m", stages={"s1": {"patch_size": 8, "batch_size": 4, "loss": "l1", "lr": 1e-3,
                                              "iters": 1},
                                       "s2": {"patch_size": 8, "batch_size": 4, "loss": "l1", "lr": 1e-3,
                                              "iters": 1}}, stage_order=["s1", "s2"])
    run_ranks(2, train_expecting_error, cfg, "hat", demo_root, "s2", str(tmp_path / "err"), tmp=tmp_path)
    m0, m1 = ((tmp_path / f"err.rank{r}").read_text() for r in (0, 1))
    assert m0 == m1 and "r1_s1/model.safetensors" in m0 and "does not exist" in m0 and "rank 0" in m0


# ------------------------------------------------------------------------------------- non-finite values


@pytest.mark.slow
@pytest.mark.parametrize("where", ["loss", "grad"])
def test_nan_on_rank1_stops_both_ranks_and_keeps_the_last_good_state(tmp_path, demo_root, where):
    cfg = _cfg(tmp_path / where, iters=5, ckpt_every=1)
    run_ranks(2, train_expecting_error, cfg, "hat", demo_root, "s1", str(tmp_path / "err"), 1, 3, where,
              tmp=tmp_path)
    m0, m1 = ((tmp_path / f"err.rank{r}").read_text() for r in (0, 1))
    assert m0 == m1 and "not finite at step 3" in m0
    state = _state(cfg)
    assert state["step"] == 2  # step 3 was never saved
    assert all(torch.isfinite(v).all() for part in ("model", "ema") for v in state[part].values())


def test_finite_loss_with_nan_gradients_stops_one_process_before_the_save(tmp_path, demo_root, monkeypatch):
    import smt.train.engine as engine

    cfg = _cfg(tmp_path / "g", iters=3, ckpt_every=1)
    real, calls = engine.multiscale_loss, {"n": 0}

    def poisoned(outputs, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            for out in outputs.values():
                out.register_hook(lambda g: torch.full_like(g, float("nan")))
        return real(outputs, *args, **kwargs)

    monkeypatch.setattr(engine, "multiscale_loss", poisoned)
    with pytest.raises(engine.TrainingError, match="not finite at step 2"):
        train_stage(cfg, "hat", 1, "s1", demo_root, 4, log=lambda m: None)
    assert _state(cfg)["step"] == 1


# ------------------------------------------------------------------------------------------------- EMA


def test_foreach_ema_update_equals_the_per_tensor_reference():
    from smt.train.checkpoint import EMA

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Linear(4, 2))
    fast, ref = EMA(net, 0.99, warmup=True), EMA(net, 0.99, warmup=True)
    for step in range(3):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
            net[1].running_mean.add_(1.0)
        fast.update(net, step)
        ref.update_reference(net, step)
    for (k, a), (_, b) in zip(fast.model.state_dict().items(), ref.model.state_dict().items()):
        assert torch.equal(a, b), k
    assert torch.equal(fast.model[1].running_mean, net[1].running_mean)


# --------------------------------------------------------------------------------------------- launching


def test_node_commands_for_srun_and_local():
    from smt.distributed import node_commands

    (srun,) = node_commands(8, 2, ["train", "--stage", "s1"], "srun", "node0:29500", "job7")
    assert srun[:5] == ["srun", "--nodes=2", "--ntasks=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    assert "--rdzv_backend=c10d" in srun and "--rdzv_endpoint=node0:29500" in srun and "--rdzv_id=job7" in srun
    assert "--nnodes=2" in srun and "--nproc_per_node=8" in srun and srun[-4:] == ["smt", "train", "--stage", "s1"]
    local = node_commands(1, 2, ["train"], "local", "127.0.0.1:1234", "x")
    assert [c for cmd in local for c in cmd if c.startswith("--node_rank")] == ["--node_rank=0", "--node_rank=1"]
    assert all("--master_port=1234" in cmd for cmd in local)
    with pytest.raises(ValueError, match="unknown launcher"):
        node_commands(1, 2, ["train"], "ssh", "h:1", "x")


def test_several_nodes_without_a_launcher_say_how(monkeypatch):
    from smt.distributed import LAUNCHER_ENV, torchrun

    monkeypatch.delenv(LAUNCHER_ENV, raising=False)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    with pytest.raises(RuntimeError, match="SLURM allocation"):
        torchrun(1, ["train"], nnodes=2)
    monkeypatch.setenv(LAUNCHER_ENV, "pdsh")
    with pytest.raises(RuntimeError, match="valid launchers are srun, local"):
        torchrun(1, ["train"], nnodes=2)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("dvc", path=str(Path(sys.executable).parent)) is None, reason="needs dvc")
def test_one_dvc_stage_launches_two_nodes_and_writes_each_output_once(tmp_path, demo_root):
    """Runs `dvc repro` once on a one-stage pipeline whose command trains hat_tiny with train.nnodes 2 (one process
    per "node", two torchruns on this machine with --node_rank 0 and 1, gloo); about a minute on 2 cores."""
    work = tmp_path / "repo"
    work.mkdir()
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"].update(root=demo_root)
    params["train"] = {"models": {"hat": {"preset": "hat_tiny"}},
                       "stages": {"s1": {"patch_size": 8, "batch_size": 4, "loss": "l1", "lr": 1e-3, "iters": 2}},
                       "stage_order": ["s1"], "device": "cpu", "val_every": 0, "ckpt_every": 0, "log_every": 1,
                       "val_max_side": 16, "ema_decay": 0.9, "threads": 1, "nproc": 1, "nnodes": 2,
                       "out_root": "models"}
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    cmd = ("python -c \"from smt.train.runner import run_training_stage; "
           "run_training_stage('params.yaml', 'hat', 1, 's1', 'timings/hat.json')\"")
    (work / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"train": {
        "cmd": cmd, "params": ["train.stages"], "outs": ["models/hat/r1_s1", "timings/hat.json"]}}}))
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PYTHONPATH": str(REPO), "SMT_LAUNCHER": "local", "OMP_NUM_THREADS": "1",
           "PATH": bin_dir + os.pathsep + os.environ["PATH"]}
    env.pop("MASTER_ADDR", None), env.pop("MASTER_PORT", None)
    subprocess.run([f"{bin_dir}/dvc", "init", "--no-scm", "-q"], cwd=work, env=env, check=True)
    res = subprocess.run([f"{bin_dir}/dvc", "repro", "-q"], cwd=work, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:] + res.stdout[-2000:]

    out = work / "models" / "hat" / "r1_s1"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 2 and "train_seconds" not in metrics  # rewritten once, by the runner
    assert json.loads((work / "timings" / "hat.json").read_text())["train_seconds"] > 0
    assert (out / "train_log.csv").read_text().splitlines()[1:] and \
        [r.split(",")[0] for r in (out / "train_log.csv").read_text().splitlines()[1:]] == ["1", "2"]
    assert len((out / "val_log.csv").read_text().splitlines()) == 2  # header and the final validation, once
    state = torch.load(out / "state.pt", weights_only=True)
    assert state["world"] == 2 and state["step"] == 2
    assert "train" in yaml.safe_load((work / "dvc.lock").read_text())["stages"]
    assert not list(work.rglob(".*.tmp"))  # no half-written files left
    # the right weights: those of one process training the same stage
    one = parse_section(TrainConfig, {**params["train"], "nnodes": 1, "out_root": str(tmp_path / "one")}, "train")
    train_stage(one, "hat", 1, "s1", demo_root, 4, log=lambda m: None)
    w1 = _state(one)["model"]
    for k, v in state["model"].items():
        torch.testing.assert_close(v, w1[k], rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------- stop signal in validation


def test_a_signal_during_validation_ends_it_saves_and_resumes_to_the_same_run(tmp_path, three_valid_root,
                                                                              monkeypatch):
    import signal

    import smt.train.engine as engine

    straight, stopped = _cfg(tmp_path / "a", iters=4, val_every=2), _cfg(tmp_path / "b", iters=4, val_every=2)
    train_stage(straight, "hat", 1, "s1", three_valid_root, 4, log=lambda m: None)
    real, seen = engine._validate_image, []

    def signalling(*args, **kwargs):  # SIGUSR1 during the first image of the step-2 validation
        seen.append(1)
        if len(seen) == 1:
            os.kill(os.getpid(), signal.SIGUSR1)
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "_validate_image", signalling)
    with pytest.raises(engine.Preempted, match="after step 2 of 4"):
        train_stage(stopped, "hat", 1, "s1", three_valid_root, 4, log=lambda m: None)
    assert len(seen) == 1  # the other two images were not scored
    state = _state(stopped)
    assert state["step"] == 2 and state["pending_validation"]
    assert not (run_dir(stopped, "hat", 1, "s1") / "val_log.csv").exists()
    monkeypatch.setattr(engine, "_validate_image", real)
    train_stage(stopped, "hat", 1, "s1", three_valid_root, 4, log=lambda m: None)
    a, b = _state(straight), _state(stopped)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    for name in ("train_log.csv", "val_log.csv"):
        assert (run_dir(straight, "hat", 1, "s1") / name).read_text() == \
            (run_dir(stopped, "hat", 1, "s1") / name).read_text()


@pytest.mark.parametrize("preset", ["hat_tiny", "mambairv2_tiny"])
def test_smoke_cluster_measurements_run_and_the_cpu_is_deterministic(preset):
    from smt.smoke import _cluster_rows

    rows = _cluster_rows(preset, torch.device("cpu"), 8, 2)
    assert [r.check for r in rows] == [f"{preset} train step, per-sample noise vs global stream",
                                       f"{preset} train step, deterministic mode vs not",
                                       f"{preset} EMA update, foreach vs per tensor"]
    assert all(r.ok for r in rows)
    assert "identical gradients in two runs: yes with the mode, yes without" in rows[1].value
    assert rows[2].value.endswith("equal: yes")
    assert not torch.are_deterministic_algorithms_enabled()  # the mode is switched off again


@pytest.mark.slow
def test_a_requeue_on_another_process_count_resumes_with_the_global_batch_and_says_so(tmp_path, demo_root):
    straight = _cfg(tmp_path / "straight", iters=4)
    moved = _cfg(tmp_path / "moved", iters=4)
    train_stage(straight, "hat", 1, "s1", demo_root, 4, log=lambda m: None)
    train_stage(moved, "hat", 1, "s1", demo_root, 4, max_steps=2, log=lambda m: None)  # one process, 2 steps
    log = tmp_path / "log.txt"
    run_ranks(2, train_hiding_state_on_rank1, [(moved, None, False)], "hat", demo_root, str(log), tmp=tmp_path)
    text = log.read_text()
    assert "WARNING:" in text and "saved by 1 process(es) and this job has 2" in text and "global batch kept" in text
    a, b = _state(straight), _state(moved)
    assert b["step"] == 4 and b["world"] == 2
    for k in a["model"]:
        torch.testing.assert_close(b["model"][k], a["model"][k], rtol=1e-3, atol=5e-5)


@pytest.mark.parametrize("preset,overrides", [("hat_tiny", {"drop_path_rate": 0.5}), ("mambairv2_tiny", {})])
def test_activation_checkpointing_replays_the_per_sample_noise(preset, overrides):
    from smt.train.engine import checkpoint_residual_groups

    x = torch.rand(3, 3, 16, 16)
    grads, losses = [], []
    for checkpointed in (False, True):
        torch.manual_seed(0)
        net = build_model(preset, **overrides).train()
        if checkpointed:
            checkpoint_residual_groups(net)
        torch.manual_seed(11)
        with sample_noise.per_sample([5, 6, 7]):
            loss = net(x).square().mean()
            loss.backward()
        losses.append(loss.detach())
        grads.append([p.grad.clone() for p in net.parameters() if p.grad is not None])
    assert torch.equal(losses[0], losses[1])
    assert all(torch.equal(a, b) for a, b in zip(*grads)) and len(grads[0]) == len(grads[1])


def test_the_node_launcher_stops_the_other_nodes_when_one_fails():
    import time

    from smt.distributed import _run_all

    t = time.perf_counter()
    with pytest.raises(subprocess.CalledProcessError) as info:
        _run_all([[sys.executable, "-c", "import time; time.sleep(60)"], [sys.executable, "-c", "raise SystemExit(3)"]])
    assert info.value.returncode == 3 and time.perf_counter() - t < 30  # the sleeping "node" was stopped
