"""MambaIRv2 and HAT inference fast paths (issue 17) against their reference paths, layer by layer and whole
models, in eval mode without autograd; training (autograd) keeps the reference path."""
from __future__ import annotations

import contextlib
import math
import struct

import numpy as np
import pytest
import torch

from smt.kernels.attention import reference_paths
from smt.models import HAT, MambaIRv2
from smt.models.common import (CPU_HEAD_MULTIPLE, FastLinear, depthwise_tokens, fast_linear, gemm_row_multiple,
                               head_padded_qkv, onednn_conv_available, onednn_linear_available)
from smt.models.mambairv2 import ASSM, _exponential_from_neg_uniform, _standard_exponential_like


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _tiny_mamba(routing: str) -> MambaIRv2:
    torch.manual_seed(0)
    # widths not multiples of the SIMD width, so the padded GEMMs (FastLinear) pad
    return MambaIRv2(img_size=16, embed_dim=18, d_state=4, depths=(2, 2), num_heads=(2, 2), window_size=4,
                     inner_rank=8, num_tokens=8, convffn_kernel_size=5, mlp_ratio=2.0, upscale=2,
                     upsampler="pixelshuffle", routing=routing).eval()


@pytest.mark.parametrize("routing", ["gumbel", "argmax"])
@pytest.mark.parametrize("batch", [1, 2])
def test_assm_fast_path_equals_reference_for_both_routings(routing, batch):
    torch.manual_seed(1)
    assm = ASSM(dim=12, d_state=4, num_tokens=8, inner_rank=6, mlp_ratio=2.0).eval()
    token = torch.nn.Embedding(6, 4)
    x = torch.randn(batch, 8 * 10, 12)
    with torch.no_grad():
        torch.manual_seed(7)  # gumbel routing draws noise: the same seed gives both paths the same draws
        with reference_paths():
            ref = assm(x, (8, 10), token, routing, "auto")
        torch.manual_seed(7)
        fast = assm(x, (8, 10), token, routing, "auto")
    assert _rel_err(fast, ref) <= 1e-5


def test_assm_gumbel_fast_path_consumes_the_generator_like_the_reference():
    assm = ASSM(dim=12, d_state=4, num_tokens=8, inner_rank=6, mlp_ratio=2.0).eval()
    token = torch.nn.Embedding(6, 4)
    x = torch.randn(1, 64, 12)
    with torch.no_grad():
        torch.manual_seed(3)
        with reference_paths():
            assm(x, (8, 8), token, "gumbel", "auto")
        after_ref = torch.rand(4)
        torch.manual_seed(3)
        assm(x, (8, 8), token, "gumbel", "auto")
        assert torch.equal(torch.rand(4), after_ref)


@pytest.mark.parametrize("bulk", [True, False], ids=["bulk-draws", "random_-draws"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_standard_exponential_equals_exponential_and_leaves_the_same_generator_state(dtype, bulk, monkeypatch):
    """float32, and the bf16 autocast's bfloat16 logits (drawn in float32 and rounded, as PyTorch's serial
    kernel does): the same bits, the same generator state after; with the C library's bulk draws and with
    PyTorch's ``random_`` (where the library does not run)."""
    import smt.models.mambairv2 as m

    if bulk:
        assert m.neg_uniform53(1) is not None  # the C draws run here
    else:
        monkeypatch.setattr(m, "neg_uniform53", lambda n: None)
    x = torch.empty(16, 4096, 32, dtype=dtype)
    torch.manual_seed(11)
    ref = torch.empty_like(x).exponential_()
    after_ref = torch.rand(4)
    torch.manual_seed(11)
    got = _standard_exponential_like(x)
    assert torch.equal(got, ref) and got.dtype == dtype
    assert torch.equal(torch.rand(4), after_ref)


def test_exponential_from_neg_uniform_rounds_like_the_scalar_log1p_next_to_float_half_way_points():
    # bits whose -log1p(-u) lies next to the half way between two floats, where a vectorised log1p an ulp off
    # would round the other way: the result must be the scalar C library's value, rounded once to float
    bits, near = [], 0
    for f in (0.01, 0.3, 1.0, 2.5, 7.0, 20.0):
        f32 = np.float32(f)
        half = (float(f32) + float(np.nextafter(f32, np.float32(np.inf)))) / 2
        b0 = round(-math.expm1(-half) * 2.0 ** 53)
        for b in range(b0 - 4, b0 + 5):
            bits.append(b)
            e = -math.log1p(-b * 2.0 ** -53)
            low = struct.unpack("<q", struct.pack("<d", e))[0] & ((1 << 29) - 1)
            near += abs(low - (1 << 28)) <= 16
    assert near > 0  # the recomputed branch is exercised
    got = _exponential_from_neg_uniform(torch.tensor([-b * 2.0 ** -53 for b in bits], dtype=torch.float64))
    ref = torch.tensor([np.float32(-math.log1p(-b * 2.0 ** -53)) for b in bits])
    assert torch.equal(got, ref)


def test_cpu_scan_inference_output_is_channel_last_with_the_reference_layout_s_values():
    from smt.kernels.selective_scan import selective_scan_cpu

    torch.manual_seed(0)
    b, d, n, length = 2, 20, 4, 33  # d not a multiple of the SIMD width: a partial last block
    x = torch.randn(b, length, d)  # channel-last, as MambaIRv2 passes it (a transposed view)
    dt = torch.randn(b, length, d)
    A, B, C = -torch.rand(d, n), torch.randn(b, n, length), torch.randn(b, n, length)
    args = (x.transpose(1, 2), dt.transpose(1, 2), A, B, C, torch.randn(d))
    bias = torch.randn(d)
    with torch.no_grad():
        fast = selective_scan_cpu(*args, delta_bias=bias, delta_softplus=True)
        with reference_paths():
            ref = selective_scan_cpu(*args, delta_bias=bias, delta_softplus=True)
    assert fast.shape == ref.shape == (b, d, length)
    assert fast.transpose(1, 2).is_contiguous() and ref.is_contiguous()
    assert torch.equal(fast, ref)  # the same kernel and values, only the output strides differ


def _both_paths(net: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(fast, reference) outputs without autograd, each from the same generator state (gumbel routing)."""
    outs = []
    with torch.no_grad():
        for ctx in (contextlib.nullcontext, reference_paths):
            torch.manual_seed(5)
            with ctx():
                outs.append(net(x))
    return outs[0], outs[1]


@pytest.mark.parametrize("routing", ["gumbel", "argmax"])
def test_mambairv2_fast_paths_equal_reference_with_shifted_windows(routing):
    # padded to 20 x 16: 5 x 4 windows, the shifted layers mask across regions
    fast, ref = _both_paths(_tiny_mamba(routing), torch.rand(2, 3, 18, 14))
    assert _rel_err(fast, ref) <= 1e-5


def test_mambairv2_training_forward_takes_the_reference_path_and_backpropagates():
    net = _tiny_mamba("gumbel").train()
    x = torch.rand(1, 3, 16, 16)
    torch.manual_seed(2)
    out = net(x)
    torch.manual_seed(2)
    with reference_paths():
        ref = net(x)
    assert torch.equal(out, ref)  # the same code ran
    out.mean().backward()
    assm = net.layers[0].residual_group.layers[0].assm
    assert assm.in_proj[0].weight.grad.abs().sum() > 0 and assm.route[0].weight.grad.abs().sum() > 0


def test_hat_fast_paths_equal_reference_with_shifted_windows_and_batch_two():
    torch.manual_seed(0)
    net = HAT(img_size=16, embed_dim=18, depths=(2, 2), num_heads=(2, 2), window_size=4, squeeze_factor=4,
              upscale=2, upsampler="pixelshuffle").eval()
    fast, ref = _both_paths(net, torch.rand(2, 3, 14, 18))  # padded to 16 x 20: 4 x 5 windows
    assert _rel_err(fast, ref) <= 1e-5


def test_ocab_fast_windows_equal_the_unfold_windows_exactly():
    """OCAB's query, key and value windows from the padded channel-last grid are the official unfold's, value
    for value (zero padding at the borders included), for a batch of two non-square images."""
    from smt.models.common import window_partition
    from smt.models.hat import OCAB

    torch.manual_seed(0)
    ocab = OCAB(dim=12, window_size=4, overlap_ratio=0.5, num_heads=2, qkv_bias=True, qk_scale=None,
                mlp_ratio=2.0, norm_layer=torch.nn.LayerNorm).eval()
    b, h, w, c, ws, ows = 2, 8, 12, 12, 4, ocab.overlap_win_size
    qkv = torch.randn(b, h * w, 3 * c)
    q, k, v = ocab._windows_fast(qkv, h, w)
    grid = qkv.view(b, h, w, 3, c).permute(3, 0, 4, 1, 2)  # three b c h w
    kv = torch.nn.functional.unfold(torch.cat((grid[1], grid[2]), 1), kernel_size=ows, stride=ws,
                                    padding=(ows - ws) // 2)
    kv = kv.view(b, 2, c, ows * ows, -1).permute(1, 0, 4, 3, 2).reshape(2, -1, ows * ows, c)
    assert torch.equal(q, window_partition(grid[0].permute(0, 2, 3, 1), ws))
    assert torch.equal(k, kv[0]) and torch.equal(v, kv[1])
    assert k.shape == (b * (h // ws) * (w // ws), ows * ows, c) and (k[0, 0] == 0).all()  # a padded corner


def test_window_order_is_roll_then_partition_with_groups_covering_every_window():
    from smt.models.common import window_order, window_partition, windows_gather, windows_scatter

    x = torch.randn(2, 12, 8, 3)
    for shift in (0, 2):
        order = window_order(2, 12, 8, 4, shift, x.device)
        got = windows_gather(x.reshape(2, 96, 3), order, 4)
        ref = window_partition(torch.roll(x, (-shift, -shift), (1, 2)), 4)  # (2*6, 16, 3), batch-major
        assert sorted(order.index.tolist()) == list(range(2 * 96))
        assert order.groups[0][0] == 0 and order.groups[-1][1] == 12
        assert all(a[1] == b[0] for a, b in zip(order.groups, order.groups[1:]))
        # the same windows, in group order
        assert sorted(map(tuple, got.flatten(1).tolist())) == sorted(map(tuple, ref.flatten(1).tolist()))
        assert torch.equal(windows_scatter(got, order, 2), x.reshape(2, 96, 3))
    assert len(window_order(2, 12, 8, 4, 2, x.device).groups) == 4


@pytest.mark.parametrize("autocast", [False, True])
def test_fast_linear_equals_linear_and_follows_weight_changes(autocast):
    """float32: PyTorch's oneDNN linear (bias and GELU fused, contiguous output) where available; bf16 autocast:
    the padded GEMM with the padding sliced off. Both equal F.linear (+ GELU); in-place weight changes are seen;
    training and the reference paths take nn.Linear's forward."""
    torch.manual_seed(0)
    lin = FastLinear(10, 2 * gemm_row_multiple() + 3).eval()
    x = torch.randn(2, 7, 10)
    tol = 1e-6 if not autocast else 1e-2
    ctx = lambda: torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()  # noqa
    with torch.no_grad(), ctx():
        ref = torch.nn.functional.linear(x, lin.weight, lin.bias)
        out = lin(x)
        assert out.shape == (2, 7, lin.out_features) and out.dtype == ref.dtype
        assert out.is_contiguous() == (not autocast and onednn_linear_available())  # padded: a sliced view
        assert _rel_err(out.float(), ref.float()) <= tol
        assert _rel_err(lin.forward_gelu(x).float(), torch.nn.functional.gelu(ref).float()) <= tol
    with torch.no_grad():
        lin.weight.mul_(2.0)  # an in-place change (load_state_dict, optimiser step) is seen
    with torch.no_grad(), ctx():  # a new autocast region: its cast cache starts empty
        assert _rel_err(lin(x).float(), torch.nn.functional.linear(x, lin.weight, lin.bias).float()) <= tol
        with reference_paths():
            assert lin(x).is_contiguous()
    # autograd: the plain nn.Linear path, gradients reach the weight
    lin(x).sum().backward()
    assert lin.weight.grad is not None and lin.weight.grad.abs().sum() > 0
    # a 1x1 conv's (out, in, 1, 1) weight works as a matmul weight
    conv = torch.nn.Conv2d(10, 5, 1)
    with torch.no_grad():
        got = fast_linear(x, conv.weight, conv.bias)
        ref = conv(x.transpose(1, 2).reshape(2, 10, 7, 1)).reshape(2, 5, 7).transpose(1, 2)
    assert _rel_err(got, ref) <= 1e-5


def test_fast_linear_with_bf16_weights_casts_like_autocast_and_fuses_the_gelu():
    """bf16-weights: x (float32 here, as after a float32 LayerNorm) and the bias cast to bf16 as autocast's
    linear casts them; the result is bf16, within bf16 rounding of autocast's linear (+ GELU)."""
    torch.manual_seed(0)
    lin = FastLinear(24, 40).eval()
    x = torch.randn(3, 9, 24)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ref = torch.nn.functional.linear(x, lin.weight, lin.bias)
        lin_bf16 = FastLinear(24, 40).eval().to(torch.bfloat16)
        lin_bf16.load_state_dict(lin.state_dict())
        out, out_gelu = lin_bf16(x), lin_bf16.forward_gelu(x)
    assert out.dtype == out_gelu.dtype == torch.bfloat16 and out.is_contiguous() == onednn_linear_available()
    assert _rel_err(out.float(), ref.float()) <= 1e-2
    assert _rel_err(out_gelu.float(), torch.nn.functional.gelu(ref.float())) <= 1e-2


def test_onednn_linear_is_available_in_this_build():
    # PyTorch's CPU wheels ship oneDNN; a silent fallback would cost 25-40% on every linear layer
    assert onednn_linear_available()


@pytest.mark.parametrize("precision", ["fp32", "bf16-autocast", "bf16-weights"])
@pytest.mark.parametrize("activation", ["gelu", "sigmoid"])
@pytest.mark.parametrize("kernel", [3, 5])
def test_depthwise_tokens_equals_the_conv_module_and_activation(precision, activation, kernel):
    """oneDNN's depthwise conv with the activation fused, on (B, H*W, C) tokens: float32 within float rounding
    of ``act(conv(x))`` (the module on an NCHW image), bf16 within bf16 rounding of autocast's; ``None`` (the
    caller runs the module) under autograd, inside reference_paths, for float32 tokens under autocast and for
    a conv that is not depthwise with 'same' padding."""
    torch.manual_seed(0)
    c, h, w = 21, 7, 9  # odd sizes: no SIMD-multiple channels, borders on every side
    conv = torch.nn.Conv2d(c, c, kernel, 1, kernel // 2, groups=c)
    x = torch.randn(2, h * w, c)
    act = torch.nn.functional.gelu if activation == "gelu" else torch.sigmoid

    def reference(tokens: torch.Tensor, module: torch.nn.Conv2d) -> torch.Tensor:
        image = tokens.transpose(1, 2).reshape(2, c, h, w)
        return act(module(image)).flatten(2).transpose(1, 2)

    with torch.no_grad():
        ref = reference(x, conv)
        if precision == "fp32":
            out = depthwise_tokens(x, (h, w), conv, activation)
            tol = 1e-5
        else:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                assert depthwise_tokens(x, (h, w), conv, activation) is None  # float32 tokens: autocast's dtype
                module = conv if precision == "bf16-autocast" else torch.nn.Conv2d(
                    c, c, kernel, 1, kernel // 2, groups=c).to(torch.bfloat16)
                if module is not conv:
                    module.load_state_dict(conv.state_dict())
                out = depthwise_tokens(x.bfloat16(), (h, w), module, activation)
            tol = 2e-2
        assert out is not None and out.shape == (2, h * w, c) and out.dtype == (
            torch.float32 if precision == "fp32" else torch.bfloat16)
        assert _rel_err(out.float(), ref) <= tol
        with reference_paths():
            assert depthwise_tokens(x, (h, w), conv, activation) is None
        dense = torch.nn.Conv2d(c, c, kernel, 1, kernel // 2)
        assert depthwise_tokens(x, (h, w), dense, activation) is None
        assert depthwise_tokens(x, (h, w), torch.nn.Conv2d(c, c, kernel, 1, 0, groups=c), activation) is None
    assert depthwise_tokens(x, (h, w), conv, activation) is None  # autograd on


def test_onednn_conv_is_available_in_this_build():
    # PyTorch's CPU wheels ship oneDNN; without it MambaIRv2's depthwise convs take the slower module path
    assert onednn_conv_available()


@pytest.mark.parametrize("bias", [True, False])
def test_head_padded_qkv_puts_each_head_s_columns_first_and_zeros_after(bias):
    """3 x 3 heads of 9 channels: every head padded to CPU_HEAD_MULTIPLE columns, its first 9 the head's
    columns of ``qkv(x)``, the rest exactly zero (they add nothing to q . k and give zero output columns)."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(12, 81, bias=bias)
    x = torch.randn(2, 5, 12)
    with torch.no_grad():
        got, d = head_padded_qkv(x, lin, num_heads=3)
        ref = lin(x)
    dp = d + (-d % CPU_HEAD_MULTIPLE)
    assert d == 9 and got.shape == (2, 5, 9 * dp)
    heads = got.view(2, 5, 9, dp)
    torch.testing.assert_close(heads[..., :d], ref.view(2, 5, 9, d), rtol=1e-6, atol=1e-6)
    assert torch.count_nonzero(heads[..., d:]) == 0


@pytest.mark.parametrize("kernel", [True, False])
def test_head_padded_qkv_pads_bf16_heads_to_even_width_for_the_attention_kernel(monkeypatch, kernel):
    """bf16 (weights, or autocast) with the bf16 attention kernel: 9-wide heads padded to 10 (its pairs), not 16;
    without the kernel, to CPU_HEAD_MULTIPLE for PyTorch's flash attention."""
    import smt.models.common as common

    monkeypatch.setattr(common, "cpu_bf16_attention_available", lambda: kernel)
    torch.manual_seed(0)
    lin = torch.nn.Linear(12, 81)
    x = torch.randn(2, 5, 12)
    want = 10 if kernel else CPU_HEAD_MULTIPLE
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            auto, d = head_padded_qkv(x, lin, num_heads=3)
        weights, _ = head_padded_qkv(x.bfloat16(), lin.bfloat16(), num_heads=3)
        fp32, _ = head_padded_qkv(x, lin.float(), num_heads=3)
    assert auto.shape[-1] == weights.shape[-1] == 9 * want and fp32.shape[-1] == 9 * CPU_HEAD_MULTIPLE
    ref = lin(x).view(2, 5, 9, d)
    for got in (auto, weights):
        heads = got.view(2, 5, 9, want).float()
        torch.testing.assert_close(heads[..., :d], ref, rtol=2e-2, atol=2e-2)
        assert torch.count_nonzero(heads[..., d:]) == 0


def test_fast_linear_state_dict_is_nn_linear_s():
    a, b = torch.nn.Linear(6, 9), FastLinear(6, 9)
    assert a.state_dict().keys() == b.state_dict().keys()
    b.load_state_dict(a.state_dict(), strict=True)
