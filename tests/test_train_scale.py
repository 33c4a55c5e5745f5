"""Memory and precision options of the training loop: activation checkpointing of the residual groups gives
the same loss and gradients; under bf16 autocast the SR output (last conv and mean add) stays fp32."""
import copy

import pytest
import torch
import torch.nn.functional as F

from smt.config import TrainConfig, parse_section
from smt.models import build_model
from smt.train.engine import checkpoint_residual_groups, run_dir, train_stage
from smt.train.losses import multiscale_loss
from smt.train.output_precision import fp32_output_convs

WEIGHTS = {4: 1.0, 3: 0.5, 2: 0.5}


def _loss_and_grads(net, x, hr):
    torch.manual_seed(1)  # MambaIRv2 draws Gumbel noise in its forward
    loss, _ = multiscale_loss(net.forward_multiscale(x), hr, 4, WEIGHTS, "l1")
    net.zero_grad(set_to_none=True)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("preset", ["hat_tiny", "mambairv2_tiny"])
def test_activation_checkpointing_gives_the_same_loss_and_gradients(preset):
    torch.manual_seed(0)
    ref = build_model(preset, aux_scales=(2, 3)).train()
    ck = copy.deepcopy(ref)
    assert checkpoint_residual_groups(ck) == len(ck.layers) == 2
    assert ck.state_dict().keys() == ref.state_dict().keys()  # checkpoints stay loadable both ways
    calls = []
    first_block = next(m for m in ck.layers[0].modules() if m is not ck.layers[0] and len(list(m.children())) > 0)
    first_block.register_forward_hook(lambda *a: calls.append(1))
    x, hr = torch.rand(2, 3, 16, 16), torch.rand(2, 3, 64, 64)
    loss_ref, grads_ref = _loss_and_grads(ref, x, hr)
    loss_ck, grads_ck = _loss_and_grads(ck, x, hr)
    assert len(calls) == 2  # forward, then the recompute in the backward: the activations were not kept
    assert torch.equal(loss_ck, loss_ref)
    assert grads_ck.keys() == grads_ref.keys() and len(grads_ref) > 10
    for n in grads_ref:
        torch.testing.assert_close(grads_ck[n], grads_ref[n], rtol=1e-5, atol=1e-7, msg=n)
    if preset == "hat_tiny":  # deterministic in eval mode: without gradients the groups run as before
        calls.clear()
        with torch.no_grad():
            assert torch.equal(ck.eval()(x), ref.eval()(x))
        assert len(calls) == 1


def test_activation_checkpointing_option_trains_to_the_same_weights(tmp_path, demo_root):
    raw = {"models": {"hat": {"preset": "hat_tiny"}},
           "stages": {"s1": {"patch_size": 8, "batch_size": 2, "loss": "l1", "lr": 1e-3, "iters": 2}},
           "stage_order": ["s1"], "device": "cpu", "val_every": 0, "ckpt_every": 0, "val_max_side": 16}
    runs = []
    for flag in (False, True):
        cfg = parse_section(TrainConfig, {**raw, "out_root": str(tmp_path / str(flag)),
                                          "activation_checkpointing": flag}, "train")
        messages = []
        train_stage(cfg, "hat", 1, "s1", demo_root, 4, log=messages.append)
        assert any("activation checkpointing: 2 residual groups" in m for m in messages) == flag
        runs.append(torch.load(run_dir(cfg, "hat", 1, "s1") / "state.pt", weights_only=True)["model"])
    for k in runs[0]:
        torch.testing.assert_close(runs[1][k], runs[0][k], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("preset", ["hat_tiny", "mambairv2_tiny"])
def test_fp32_output_convs_keep_the_sr_output_fp32_under_bf16_autocast(preset):
    torch.manual_seed(0)
    net = build_model(preset, aux_scales=(2, 3), **({"routing": "argmax"} if "mamba" in preset else {})).eval()
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        plain = net.forward_multiscale(x)
    assert all(o.dtype == torch.bfloat16 for o in plain.values())  # the fault: output rounded to bf16
    assert fp32_output_convs(net) == 1  # every scale ends in the main head's conv_last (shared, as the authors')
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = net.forward_multiscale(x)
        feat, h, w = net._body(x)
        pre = net.upsample(net.conv_before_upsample(feat))
    assert all(o.dtype == torch.float32 for o in out.values())
    # reference: the same bf16 features through the last conv and mean add computed in fp32 by hand
    with torch.no_grad():
        ref = F.conv2d(pre.float(), net.conv_last.weight, net.conv_last.bias, padding=1) / net.img_range + net.mean
    torch.testing.assert_close(out[4], ref[..., :4 * h, :4 * w], rtol=0, atol=1e-6)


def test_stage_result_measures_step_time_and_the_runner_moves_it_to_timings(tmp_path, demo_root):
    import json
    import math

    import yaml

    from smt.train.runner import run_training_stage

    params = {"data": {"root": demo_root, "train_images": ["camera", "coins"], "valid_images": ["astronaut"]},
              "train": {"models": {"hat": {"preset": "hat_tiny"}},
                        "stages": {"s1": {"patch_size": 8, "batch_size": 2, "loss": "l1", "lr": 1e-3, "iters": 3}},
                        "stage_order": ["s1"], "out_root": str(tmp_path / "models"), "device": "cpu",
                        "val_max_side": 16}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    metrics = run_training_stage(str(tmp_path / "params.yaml"), "hat", 1, "s1", tmp_path / "t" / "train.json")
    on_disk = json.loads((tmp_path / "models/hat/r1_s1/metrics.json").read_text())
    assert on_disk == metrics and set(metrics) == {"val_psnr_y", "bicubic_psnr_y", "steps"}  # results only
    assert math.isfinite(metrics["val_psnr_y"]) and metrics["steps"] == 3
    timings = json.loads((tmp_path / "t" / "train.json").read_text())  # wall clock: beside, not in, the run
    assert timings["train_seconds"] > 0 and 0 < timings["step_seconds"] < timings["train_seconds"]
    assert "peak_mb" not in timings  # CUDA only
    cfg = parse_section(TrainConfig, {**params["train"], "out_root": str(tmp_path / "m2")}, "train")
    one = train_stage(cfg, "hat", 1, "s1", demo_root, 4, max_steps=1, log=lambda m: None)
    assert math.isnan(one.step_seconds) and math.isnan(one.peak_mb)  # one step is only the warm-up
