"""bf16 inference keeps the SR output tail in fp32, as training does (issue 18, point 11): the last convolution
computes in fp32 from the bf16 features, the output equals that convolution and mean add computed by hand in fp32 from
the bf16 features (not rounded to bf16), and fp32 inference stays untouched to the bit."""
import copy

import pytest
import torch
import torch.nn.functional as F

from smt.infer.precision import with_precision
from smt.models import build_model

PRESETS = ["hat_tiny", "mambairv2_tiny"]


def _net(preset):
    torch.manual_seed(0)
    return build_model(preset, **({"routing": "argmax"} if "mamba" in preset else {})).eval()


def _x():
    return torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("precision", ["bf16", "bf16-weights"])
@pytest.mark.parametrize("preset", PRESETS)
def test_bf16_inference_runs_the_last_conv_in_fp32_on_the_bf16_features(preset, precision):
    net = _net(preset)
    seen = []
    # registered before with_precision: the bf16-weights copy carries the hook to its own conv
    net.conv_last.register_forward_hook(lambda m, args, out: seen.append((args[0].dtype, m.weight.dtype, out.dtype)))
    fwd = with_precision(net, precision)
    with torch.no_grad():
        fwd(_x())
    # features from the bf16 body; fp32 weights and fp32 result (under autocast a conv would return bf16)
    assert seen == [(torch.bfloat16, torch.float32, torch.float32)]


@pytest.mark.parametrize("preset", PRESETS)
def test_bf16_output_is_the_fp32_conv_and_mean_add_of_the_bf16_features_not_rounded_to_bf16(preset):
    net = _net(preset)
    plain = copy.deepcopy(net)  # without the fp32 tail: the fault
    x = _x()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        old = plain(x)
        feat, h, w = plain._body(x)
        pre = plain.upsample(plain.conv_before_upsample(feat))
    assert old.dtype == torch.bfloat16  # what the output was before: rounded to bf16
    with torch.no_grad():
        y = with_precision(net, "bf16")(x)
        ref = (F.conv2d(pre.float(), net.conv_last.weight, net.conv_last.bias, padding=1) / net.img_range
               + net.mean)[..., :4 * h, :4 * w]
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-6)
    assert not torch.equal(y, y.bfloat16().float())  # values bf16 cannot hold: the tail really ran in fp32
    assert (y - ref).abs().max() < (old.float() - ref).abs().max()


@pytest.mark.parametrize("preset", PRESETS)
def test_fp32_inference_is_untouched_by_the_bf16_tail_and_the_patch_is_idempotent(preset):
    net = _net(preset)
    untouched = copy.deepcopy(net)
    x = _x()
    assert with_precision(net, "fp32") is net  # the infer stage's default path: the model itself
    with torch.no_grad():
        first = with_precision(net, "bf16")(x)
        second = with_precision(net, "bf16")(x)  # the infer stage wraps the model again for every image
        assert torch.equal(first, second)
        assert torch.equal(net(x), untouched(x))  # the patched model in fp32: the same bits
    assert all(p.dtype == torch.float32 for p in net.parameters())


def test_bf16_weights_copy_keeps_the_tail_layernorms_and_mean_in_fp32_with_their_exact_values():
    net = _net("hat_tiny")
    seen = []
    net.register_forward_hook(lambda m, args, out: seen.append(m))  # the bf16 copy carries the hook
    with torch.no_grad():
        with_precision(net, "bf16-weights")(_x())
    (copy_,) = seen
    assert copy_ is not net and copy_.conv_first.weight.dtype == torch.bfloat16  # a bf16 copy really ran
    kept = {"conv_last.weight", "conv_last.bias"} | {k for k, v in net.state_dict().items() if ".norm" in k}
    for k, v in copy_.state_dict().items():
        if k in kept:  # the original float32 values, not bf16 ones cast back
            assert v.dtype == torch.float32 and torch.equal(v, net.state_dict()[k]), k
    assert copy_.mean.dtype == torch.float32 and torch.equal(copy_.mean, net.mean)
    assert all(p.dtype == torch.float32 for p in net.parameters())
