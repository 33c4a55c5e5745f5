"""Training under a process group (gloo, CPU): RNG states saved and restored on their own rank, resumes exact,
validation sharded across ranks equal to one process, every rank validating with the same EMA weights, the
bicubic figures cached, and the process group's explicit timeout."""
from datetime import timedelta

import pytest
import torch

from smt.config import TrainConfig, parse_section
from smt.distributed import DEFAULT_TIMEOUT_S, TIMEOUT_ENV, process_group_timeout
from smt.train.engine import run_dir, validate
from gloo_ranks import run_ranks, train_runs, validate_sharded


def _cfg(out_root, **over) -> TrainConfig:
    raw = {"models": {"mambairv2": {"preset": "mambairv2_tiny"}},
           "stages": {"s1": {"patch_size": 8, "batch_size": 4, "loss": "l1", "lr": 1e-3, "iters": 4}},
           "stage_order": ["s1"], "out_root": str(out_root), "device": "cpu", "val_every": 2, "ckpt_every": 0,
           "log_every": 1, "val_max_side": 16, "ema_decay": 0.9, "threads": 1}
    return parse_section(TrainConfig, {**raw, **over}, "train")


@pytest.mark.slow
def test_sharded_validation_equals_one_process(tmp_path, three_valid_root):
    import pickle

    from smt.models import build_model

    torch.manual_seed(0)
    net = build_model("mambairv2_tiny")  # Gumbel routing: random numbers in eval mode too
    one = validate(net, three_valid_root, 4, torch.device("cpu"), 16)
    run_ranks(2, validate_sharded, "mambairv2_tiny", three_valid_root, str(tmp_path / "v.pkl"), tmp=tmp_path)
    two = pickle.loads((tmp_path / "v.pkl").read_bytes())
    assert two == one  # exactly: per-image seeds, gathered in image order


def test_validation_caches_the_bicubic_figures(monkeypatch, three_valid_root):
    import smt.train.engine as engine
    from smt.models import build_model

    calls = []
    real = engine.bicubic_upscale
    monkeypatch.setattr(engine, "bicubic_upscale", lambda *a: calls.append(1) or real(*a))
    net, cache = build_model("hat_tiny"), {}
    first = validate(net, three_valid_root, 4, torch.device("cpu"), 16, baseline_cache=cache)
    assert len(calls) == 3
    second = validate(net, three_valid_root, 4, torch.device("cpu"), 16, baseline_cache=cache)
    assert len(calls) == 3 and second == first  # the second validation recomputed no bicubic image


@pytest.mark.slow
def test_two_ranks_resume_exactly_with_per_sample_noise(tmp_path, three_valid_root):
    straight, resumed = _cfg(tmp_path / "straight"), _cfg(tmp_path / "resumed")
    # one set of two processes runs the stage uninterrupted, then stopped after step 2, then resumed from there
    run_ranks(2, train_runs, [(straight, str(tmp_path / "ema_a"), None), (resumed, str(tmp_path / "ema_b"), 2),
                              (resumed, str(tmp_path / "ema_c"), None)], "mambairv2", three_valid_root,
              tmp=tmp_path)
    a, b = (torch.load(run_dir(c, "mambairv2", 1, "s1") / "state.pt", weights_only=True) for c in (straight, resumed))
    assert a["step"] == b["step"] == 4 and len(b["rng_ranks"]) == 2
    # the training noise is per sample (seeded per step, the same on every rank), not from a stream per rank
    assert torch.equal(b["rng_ranks"][0]["torch"], b["rng_ranks"][1]["torch"])
    assert torch.equal(b["rng"]["torch"], b["rng_ranks"][0]["torch"])  # rank 0's where one process reads it
    for part in ("model", "ema"):  # every sample's Gumbel noise after the resume is its own: identical updates
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), f"{part}.{k}"
    # every rank validates (its shard) with the same EMA weights: rank 0's broadcast initialisation
    seen = [torch.load(tmp_path / f"ema_a.rank{r}") for r in (0, 1)]
    assert len(seen[0]) == len(seen[1]) == 2  # at step 2 and at the end
    for e0, e1 in zip(*seen):
        assert all(torch.equal(e0[k], e1[k]) for k in e0)


def test_process_group_timeout_is_explicit_and_configurable(monkeypatch):
    monkeypatch.delenv(TIMEOUT_ENV, raising=False)
    assert process_group_timeout() == timedelta(seconds=DEFAULT_TIMEOUT_S) == timedelta(minutes=30)
    monkeypatch.setenv(TIMEOUT_ENV, "7200")
    assert process_group_timeout() == timedelta(hours=2)
    for bad in ("soon", "0"):
        monkeypatch.setenv(TIMEOUT_ENV, bad)
        with pytest.raises(ValueError, match=TIMEOUT_ENV):
            process_group_timeout()
