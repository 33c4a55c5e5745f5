"""The bf16 window-attention C kernel (``smt/kernels/csrc/window_attention.c``, through
``smt.kernels.attention.window_attention``): equal to float32 attention of the same bf16 inputs within bf16's
rounding of p and of the output, never worse than PyTorch's bf16 SDPA; every shape class (rows not a multiple
of the 4-row tile, odd key counts, key counts past the 64-key tile, heads 16 to 64 wide, even widths that are
not a multiple of 16), strided
and broadcast inputs, the shifted-window mask; whole models in bf16 equal to the SDPA path; and the dispatch
(bf16 inference on a CPU with AVX-512 BF16 only)."""
import pytest
import torch
import torch.nn.functional as F

import smt.kernels.attention as attention
from smt.infer.precision import with_precision
from smt.kernels.attention import cpu_bf16_attention_available, reference_paths, window_attention
from smt.models import build_model

needs_kernel = pytest.mark.skipif(not cpu_bf16_attention_available(),
                                  reason="no AVX-512 BF16 (or no OpenMP build of the kernel library) on this CPU")


def _float_reference(q, k, v, bias, scale):
    s = (q.float() @ k.float().transpose(-1, -2)) * scale
    return torch.softmax(s if bias is None else s + bias.float(), -1) @ v.float()


def _inputs(b, h, n, m, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(b, n, 3 * h * d, generator=g).bfloat16()  # q strided as a view of a qkv projection
    q = qkv[..., :h * d].view(b, n, h, d).transpose(1, 2)
    k = torch.randn(b, h, m, d, generator=g).bfloat16()
    v = torch.randn(b, h, m, d, generator=g).bfloat16()
    bias = 2 * torch.randn(1, h, n, m, generator=g)
    return q, k, v, bias


@needs_kernel
@pytest.mark.parametrize("b,h,n,m,d", [(2, 3, 256, 256, 32), (2, 2, 64, 144, 32), (3, 2, 7, 9, 16),
                                       (2, 3, 13, 37, 48), (2, 2, 5, 33, 64), (1, 2, 6, 70, 30), (1, 1, 1, 1, 16),
                                       (2, 6, 64, 576, 30), (1, 2, 9, 17, 18)])
def test_kernel_equals_float32_attention_within_bf16_rounding(b, h, n, m, d):
    q, k, v, bias = _inputs(b, h, n, m, d)
    with torch.no_grad():
        out = window_attention(q, k, v, bias, d ** -0.5)
        sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.bfloat16(), scale=d ** -0.5)
    ref = _float_reference(q, k, v, bias, d ** -0.5)
    assert out.dtype == torch.bfloat16 and out.shape == (b, h, n, d)
    err = (out.float() - ref).abs()
    # p rounded to bf16 (relative 2^-9) and the output rounded to bf16 (2^-9 of |out| <= max |v|)
    assert err.max() <= 2 ** -8 * v.float().abs().max() + 1e-6
    assert err.mean() <= (sdpa.float() - ref).abs().mean() + 1e-6


@needs_kernel
def test_kernel_applies_the_shifted_window_mask_and_a_broadcast_bias():
    q, k, v, bias = _inputs(4, 2, 64, 64, 32, seed=1)
    mask = torch.zeros(4, 1, 64, 64)
    mask[:, :, :32, 32:] = -100.0  # HAT's mask value: those keys get no weight
    mask[:, :, 32:, :32] = -100.0
    full = bias + mask  # (4, 2, 64, 64): the batch stride is real, the bias's own is 0
    with torch.no_grad():
        out = window_attention(q, k, v, full, 0.2)
        no_bias = window_attention(q, k, v, None, 0.2)
        huge = window_attention(q, k, v, 300 * bias, 0.2)  # exp overflows unless the row maximum goes first
    assert (out.float() - _float_reference(q, k, v, full, 0.2)).abs().max() <= 2 ** -8 * v.float().abs().max()
    assert (no_bias.float() - _float_reference(q, k, v, None, 0.2)).abs().max() <= 2 ** -8 * v.float().abs().max()
    assert (huge.float() - _float_reference(q, k, v, 300 * bias, 0.2)).abs().max() <= 2 ** -8 * v.float().abs().max()
    # the first 32 queries attend only to the first 32 keys: changing the others changes nothing
    v2 = v.clone()
    v2[:, :, 32:] = 9.0
    with torch.no_grad():
        assert torch.equal(window_attention(q, k, v2, full, 0.2)[:, :, :32], out[:, :, :32])


@needs_kernel
def test_kernel_runs_only_for_bf16_inference(monkeypatch):
    calls = []
    monkeypatch.setattr(attention, "_cpu_bf16_attention", lambda *a: calls.append(a) or a[0])
    q, k, v, bias = _inputs(1, 2, 16, 16, 16)
    with torch.no_grad():
        window_attention(q, k, v, bias, 0.25)
        assert len(calls) == 1
        window_attention(q.float(), k.float(), v.float(), bias, 0.25)  # float32: SDPA
        with reference_paths():
            window_attention(q, k, v, bias, 0.25)
        window_attention(q, k, v, bias.bfloat16(), 0.25, "reference")
        window_attention(*(F.pad(t, (0, 64)) for t in (q, k, v)), bias, 0.25)  # heads over 64 wide: SDPA
        window_attention(*(F.pad(t, (0, 1)) for t in (q, k, v)), bias, 0.25)  # odd width (no pairs): SDPA
    window_attention(q.requires_grad_(), k, v, bias, 0.25)  # autograd: SDPA
    assert len(calls) == 1


@needs_kernel
@pytest.mark.parametrize("name", ["hat_tiny", "mambairv2_tiny"])
@pytest.mark.parametrize("precision", ["bf16", "bf16-weights"])
def test_models_in_bf16_match_the_sdpa_path(monkeypatch, name, precision):
    torch.manual_seed(0)
    net = build_model(name, **({"routing": "argmax"} if name.startswith("mambairv2") else {})).eval()
    x = torch.rand(1, 3, 40, 40)
    fwd = with_precision(net, precision)
    with torch.no_grad():
        fp32 = net(x)
        kernel = fwd(x).float()
        monkeypatch.setattr(attention, "bf16_kernel_applies", lambda *a: False)
        sdpa = fwd(x).float()
    scale = fp32.abs().max()
    assert (kernel - sdpa).abs().max() <= 0.02 * scale
    assert (kernel - fp32).abs().mean() <= 1.2 * (sdpa - fp32).abs().mean() + 1e-6


def test_kernel_is_unavailable_without_the_library_or_its_openmp_build(monkeypatch):
    import smt.kernels.cpu_build as cpu_build

    monkeypatch.setattr(cpu_build, "openmp_library", lambda: None)
    assert not cpu_bf16_attention_available()
    monkeypatch.setattr(cpu_build, "load_library", lambda: None)
    assert not cpu_bf16_attention_available()


@needs_kernel
def test_shifted_window_groups_give_the_kernel_one_float32_masked_bias():
    """attend_window_groups casts a bf16 bias to float32 once, before adding the shifted-window masks, where
    the kernel runs (it reads float32): every group gets a float32 bias, the mask sum is exact, and the
    result equals float32 attention with the official mask within bf16 rounding."""
    from smt.models.common import attend_window_groups, shift_region_masks, window_order

    torch.manual_seed(0)
    b, h, w, ws, shift, heads, d = 1, 8, 8, 4, 2, 2, 16
    order = window_order(b, h, w, ws, shift, torch.device("cpu"))
    nwin = b * (h // ws) * (w // ws)
    q, k, v = (torch.randn(nwin, heads, ws * ws, d).bfloat16() for _ in range(3))
    bias = torch.randn(1, heads, ws * ws, ws * ws).bfloat16()
    seen = []

    def attend(q_, k_, v_, bias_, scale_, impl_):
        seen.append(bias_.dtype)
        return window_attention(q_, k_, v_, bias_, scale_, impl_)

    with torch.no_grad():
        out = attend_window_groups(q, k, v, bias, d ** -0.5, "sdpa", attend, order, ws, shift)
    assert seen and set(seen) == {torch.float32}
    # the reference: each group's windows with its region's mask (float32, exact), as attend_windows uses
    masks = shift_region_masks(ws, shift, torch.device("cpu"), torch.float32)
    ref = torch.empty(out.shape, dtype=torch.float32)
    for start, end, r, c in order.groups:
        ref[start:end] = _float_reference(q[start:end], k[start:end], v[start:end], bias.float() + masks[r, c],
                                          d ** -0.5)
    assert (out.float() - ref).abs().max() <= 0.02 * ref.abs().max()
