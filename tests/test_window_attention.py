"""Shared window attention (smt.models.common): the four shift-region masks, their per-device cache, and the
grouped attention equal to the official full (batch * windows, heads, n, n) bias, with only (1, heads, n, n)
biases ever built."""
import pytest
import torch

import smt.models.common as common
from smt.kernels import window_attention
from smt.models import build_model


@pytest.mark.parametrize("h,w,ws,shift", [(16, 16, 8, 4), (8, 24, 8, 4), (40, 24, 8, 3), (8, 8, 8, 4),
                                          (64, 48, 16, 8)])
def test_shift_region_masks_are_the_official_masks(h, w, ws, shift):
    full = common.shifted_window_mask(h, w, ws, shift).view(h // ws, w // ws, ws * ws, ws * ws)
    regions = common.shift_region_masks(ws, shift, torch.device("cpu"), torch.float32)
    for i in range(h // ws):
        for j in range(w // ws):
            assert torch.equal(full[i, j], regions[int(i == h // ws - 1), int(j == w // ws - 1)]), (i, j)


def test_shift_region_masks_are_built_once_per_device_and_dtype():
    common.shift_region_masks.cache_clear()
    a = common.shift_region_masks(8, 4, torch.device("cpu"), torch.float32)
    assert common.shift_region_masks(8, 4, torch.device("cpu"), torch.float32) is a
    assert common.shift_region_masks(8, 4, torch.device("cpu"), torch.float64).dtype == torch.float64
    assert common.shift_region_masks.cache_info().misses == 2


def _official(q, k, v, bias, mask, scale, impl):
    """The official way: the mask added to the bias for every window of every image, materialised."""
    nw = mask.shape[0]
    full = (bias.unsqueeze(0) + mask[None, :, None]).expand(q.shape[0] // nw, -1, -1, -1, -1)
    return window_attention(q, k, v, full.reshape(q.shape[0], *bias.shape[1:]), scale, impl)


@pytest.mark.parametrize("impl", ["reference", "sdpa"])
@pytest.mark.parametrize("nh,nw", [(3, 2), (1, 3), (2, 1), (1, 1)])
def test_grouped_shifted_attention_equals_the_full_bias(impl, nh, nw):
    ws, shift, heads, d, batch = 4, 2, 3, 5, 2
    n = ws * ws
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch * nh * nw, heads, n, d, generator=g) for _ in range(3))
    bias = torch.randn(1, heads, n, n, generator=g)
    mask = common.shifted_window_mask(nh * ws, nw * ws, ws, shift)
    seen = []

    def attend(*args):
        seen.append(args[3].shape)
        return window_attention(*args)

    got = common.attend_windows(q, k, v, bias, 0.3, impl, attend, (nh, nw, ws, shift))
    torch.testing.assert_close(got, _official(q, k, v, bias, mask, 0.3, impl), rtol=0, atol=0)
    assert seen and all(s == (1, heads, n, n) for s in seen)  # one broadcast bias per group, never per window
    assert len(seen) == (1 + (nh > 1)) * (1 + (nw > 1))


@pytest.mark.parametrize("name", ["hat_tiny", "mambairv2_tiny"])
def test_models_build_no_mask_per_forward(name, monkeypatch):
    extra = {"routing": "argmax"} if "mamba" in name else {}
    model = build_model(name, **extra).eval()
    x = torch.rand(1, 3, 24, 20)
    with torch.no_grad():
        model(x)  # fills the cache
        calls = []
        real = common.shifted_window_mask
        monkeypatch.setattr(common, "shifted_window_mask", lambda *a: calls.append(a) or real(*a))
        model(x)
        model(torch.rand(1, 3, 40, 16))  # another size: same four masks
    assert calls == []


@pytest.mark.parametrize("d", [29, 30])
def test_head_dim_padding_for_fused_sdpa_equals_unpadded(d):
    """On CUDA the head dims of HAT-L (30) and MambaIRv2-L (29) are zero-padded to 32 so that a fused SDPA
    kernel accepts them; the padded computation equals the plain one (values and gradients)."""
    from smt.kernels.attention import _sdpa

    g = torch.Generator().manual_seed(d)
    q, k, v = (torch.randn(4, 3, 16, d, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    bias = torch.randn(1, 3, 16, 16, generator=g, dtype=torch.float64)
    plain = _sdpa(q, k, v, bias, d ** -0.5, 1)
    padded = _sdpa(q, k, v, bias, d ** -0.5, 8)
    assert padded.shape == plain.shape == (4, 3, 16, d)
    torch.testing.assert_close(padded, plain, rtol=1e-12, atol=1e-12)
    for a, b in zip(torch.autograd.grad(padded.sum(), (q, k, v)), torch.autograd.grad(plain.sum(), (q, k, v))):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
