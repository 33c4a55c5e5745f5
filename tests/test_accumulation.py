"""Gradient accumulation: the global batch is independent of process count and micro-batch size (same weights,
same data order), micro-batch settings are validated, ``auto`` resolves as documented."""
import pytest
import torch

from smt.config import ConfigError, TrainConfig, parse_section
from smt.train.engine import TrainingError, resolve_micro_batch, run_dir, train_stage
from gloo_ranks import run_ranks, train_recording_inputs


def _cfg(out_root, **over) -> TrainConfig:
    raw = {"models": {"hat": {"preset": "hat_tiny"}, "mambairv2": {"preset": "mambairv2_tiny"}},
           # MSE, not L1: L1's gradient is sign(SR - target), so where SR meets a target to within float rounding (the
           # x2/x3 targets are plain bicubic resizes, easily met) a rounding difference flips a gradient element
           # by 2/N, which Adam then amplifies: the comparison would test that chaos, not the batch split
           "stages": {"s1": {"patch_size": 8, "batch_size": 4, "loss": "mse", "lr": 1e-3, "iters": 3}},
           "stage_order": ["s1"], "out_root": str(out_root), "device": "cpu", "val_every": 0, "ckpt_every": 0,
           "log_every": 1, "val_max_side": 16, "ema_decay": 0.9, "threads": 1}
    raw.update(over)
    return parse_section(TrainConfig, raw, "train")


def _weights(cfg, model="hat") -> dict:
    return torch.load(run_dir(cfg, model, 1, "s1") / "state.pt", weights_only=True)["model"]


@pytest.mark.slow
def test_accumulation_four_processes_and_full_batch_give_the_same_weights_and_data(tmp_path, demo_root):
    full = _cfg(tmp_path / "full")
    accum = _cfg(tmp_path / "accum", micro_batch=1)  # 4 micro-batches of 1 in one process
    ranks = _cfg(tmp_path / "ranks")  # 4 processes, 1 patch each
    mixed = _cfg(tmp_path / "mixed", micro_batch=1)  # 2 processes x 2 micro-batches (DDP's no_sync path)
    train_recording_inputs(full, "hat", demo_root, str(tmp_path / "full_inputs"))
    train_recording_inputs(accum, "hat", demo_root, str(tmp_path / "accum_inputs"))
    run_ranks(4, train_recording_inputs, ranks, "hat", demo_root, str(tmp_path / "rank_inputs"), tmp=tmp_path)
    run_ranks(2, train_recording_inputs, mixed, "hat", demo_root, str(tmp_path / "mixed_inputs"), tmp=tmp_path)

    w_full, w_accum, w_ranks, w_mixed = _weights(full), _weights(accum), _weights(ranks), _weights(mixed)
    assert w_full.keys() == w_accum.keys() == w_ranks.keys() == w_mixed.keys()
    moved = max((w_full[k] - _initial(k)).abs().max().item() for k in ("conv_first.weight",))
    assert moved > 1e-4  # the comparison is not between untrained models
    for k in w_full:
        torch.testing.assert_close(w_accum[k], w_full[k], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(w_ranks[k], w_full[k], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(w_mixed[k], w_full[k], rtol=1e-4, atol=1e-5)

    # data order: the micro-batches of a step, and the ranks' slices, are the full batch in order
    full_in = torch.load(tmp_path / "full_inputs.rank0")
    accum_in = torch.load(tmp_path / "accum_inputs.rank0")
    rank_in = [torch.load(tmp_path / f"rank_inputs.rank{r}") for r in range(4)]
    mixed_in = [torch.load(tmp_path / f"mixed_inputs.rank{r}") for r in range(2)]
    assert len(full_in) == 3 and len(accum_in) == 12 and all(len(r) == 3 for r in rank_in)
    for step, batch in enumerate(full_in):
        assert batch.shape[0] == 4
        assert torch.equal(torch.cat(accum_in[4 * step:4 * step + 4]), batch)
        assert torch.equal(torch.cat([r[step] for r in rank_in]), batch)
        assert torch.equal(torch.cat([m[2 * step + k] for m in mixed_in for k in (0, 1)]), batch)


def _initial(key: str) -> torch.Tensor:
    from smt.models import build_model

    torch.manual_seed(0 + 1000 * 1)  # the engine's seed for round 1, rank 0
    return build_model("hat_tiny", aux_scales=(2, 3)).state_dict()[key]


def test_accumulation_in_one_process_matches_the_full_batch_and_logs_the_batch_loss(tmp_path, demo_root):
    full, accum = _cfg(tmp_path / "f"), _cfg(tmp_path / "a", micro_batch={"s1": 2})
    messages = []
    for cfg in (full, accum):
        train_stage(cfg, "hat", 1, "s1", demo_root, 4, log=messages.append)
    assert any("2 micro-batches of 2 patches" in m for m in messages)
    wf, wa = _weights(full), _weights(accum)
    for k in wf:
        torch.testing.assert_close(wa[k], wf[k], rtol=1e-4, atol=1e-5)
    import pandas as pd

    lf, la = (pd.read_csv(run_dir(c, "hat", 1, "s1") / "train_log.csv") for c in (full, accum))
    assert list(lf.columns) == list(la.columns)
    assert (lf["loss"] - la["loss"]).abs().max() < 1e-5  # the logged loss is the global batch's mean


def test_micro_batch_settings_are_validated():
    with pytest.raises(ConfigError, match=r"train.micro_batch: stage 's9' is not defined"):
        _cfg("x", micro_batch={"s9": 2})
    with pytest.raises(ConfigError, match=r"train.micro_batch: must be >= 0"):
        _cfg("x", micro_batch=-2)
    with pytest.raises(ConfigError, match=r"train.micro_batch"):
        _cfg("x", micro_batch="half")
    with pytest.raises(ConfigError, match=r"train.ckpt_every: must be >= 0"):
        _cfg("x", ckpt_every=-1)
    cfg = _cfg("x", micro_batch=3)
    with pytest.raises(ConfigError, match=r"3 must divide the per-process batch 4 of stage s1"):
        cfg.accumulation("s1", 1, 3)
    with pytest.raises(ConfigError, match=r"global batch 4 is not divisible by 3 processes"):
        cfg.per_process_batch("s1", 3)
    assert cfg.accumulation("s1", 2, 1) == 2 and cfg.accumulation("s1", 1, 0) == 1
    assert _cfg("x", micro_batch={"s1": "auto"}).micro_batch_setting("s1") == "auto"
    assert _cfg("x").micro_batch_setting("s1") == 0  # default: no accumulation (today's behaviour)


def test_auto_micro_batch_is_the_largest_fitting_divisor_on_cuda_and_the_whole_batch_on_cpu():
    cuda = torch.device("cuda", 0)  # only a label: the probe is a stand-in, nothing runs on a GPU
    tried = []

    def probe(m):
        tried.append(m)
        return m <= 5

    assert resolve_micro_batch("auto", 16, probe, cuda, log=lambda m: None) == 4
    assert tried == [16, 8, 4]  # divisors, largest first, stopping at the first that fits
    assert resolve_micro_batch("auto", 16, probe, torch.device("cpu")) == 16
    assert resolve_micro_batch(0, 16) == 16 and resolve_micro_batch(2, 16) == 2
    with pytest.raises(TrainingError, match="not even one patch per micro-batch fits"):
        resolve_micro_batch("auto", 8, lambda m: False, cuda, log=lambda m: None)
