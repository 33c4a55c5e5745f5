"""CPU inference fast paths (issue 17) against their references, and native-bf16 detection with fake flags."""
from __future__ import annotations

import torch

from smt.infer.precision import choose_precision, cpu_flags, cpu_has_native_bf16
from smt.kernels.attention import fast_paths_enabled, reference_paths, window_attention
from smt.models import HAT, MambaIRv2
from smt.models.common import RelativeBiasCache, relative_position_bias, relative_position_index


def _rel_close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-5) -> bool:
    return bool((a - b).abs().max() <= rtol * b.abs().max())


# --- native bf16 detection -------------------------------------------------------------------------------

def test_cpu_flags_parses_the_flags_line_of_cpuinfo():
    text = "processor\t: 0\nmodel name\t: X\nflags\t\t: fpu avx2 avx512f avx512_bf16\n\nprocessor\t: 1\n"
    assert cpu_flags(text) == frozenset({"fpu", "avx2", "avx512f", "avx512_bf16"})
    assert cpu_flags("no flags here") == frozenset()


def test_native_bf16_needs_avx512_bf16_or_amx_never_plain_avx512():
    assert not cpu_has_native_bf16(frozenset())
    assert not cpu_has_native_bf16(frozenset({"avx2", "avx512f", "avx512bw", "avx512_vnni"}))
    assert cpu_has_native_bf16(frozenset({"avx512f", "avx512_bf16"}))
    assert cpu_has_native_bf16(frozenset({"amx_tile", "amx_bf16"}))


def test_choose_precision_keeps_fp32_by_default_and_warns_for_emulated_bf16():
    plain = frozenset({"avx2"})
    assert choose_precision(False, "cpu", plain)[0] == "fp32"
    prec, why = choose_precision(True, "cpu", plain)
    assert prec == "bf16" and "warning" in why and "slower" in why.lower()
    prec, why = choose_precision(True, "cpu", frozenset({"avx512_bf16"}))
    assert prec == "bf16-weights" and "warning" not in why
    assert choose_precision(True, "cuda", plain)[0] == "bf16"
    prec, why = choose_precision(False, "cpu", frozenset({"avx512_bf16"}))
    assert prec == "fp32" and "--bf16" in why


# --- relative-position-bias cache --------------------------------------------------------------------------

def test_bias_cache_reuses_the_gather_in_eval_and_rebuilds_when_the_table_changes():
    mod = torch.nn.Linear(1, 1).eval()
    table = torch.nn.Parameter(torch.randn(49, 3))
    rpi = relative_position_index(4)
    cache = RelativeBiasCache()
    with torch.no_grad():
        first = cache.get(mod, table, rpi, 16)
        assert torch.equal(first, relative_position_bias(table, rpi, 16))
        assert cache.get(mod, table, rpi, 16) is first  # cached
        table.add_(1.0)  # an in-place weight change (load_state_dict / optimiser step) bumps the version
        second = cache.get(mod, table, rpi, 16)
        assert second is not first and torch.equal(second, relative_position_bias(table, rpi, 16))
        with reference_paths():
            assert cache.get(mod, table, rpi, 16) is not second
    # grad enabled or training mode: the reference gather each call, nothing kept
    assert cache.get(mod, table, rpi, 16).requires_grad and cache._bias is None
    with torch.no_grad():
        assert cache.get(mod.train(), table, rpi, 16) is not cache.get(mod, table, rpi, 16)
    assert fast_paths_enabled()


def test_training_forward_keeps_no_bias_cache_and_gets_gradients_into_the_table():
    torch.manual_seed(0)
    net = HAT(img_size=16, embed_dim=12, depths=(2,), num_heads=(2,), window_size=4, squeeze_factor=4,
              upscale=2, upsampler="pixelshuffle").train()
    net(torch.rand(1, 3, 16, 16)).mean().backward()
    blk = net.layers[0].residual_group.blocks[0]
    assert blk.attn._bias_cache._bias is None
    assert blk.attn.relative_position_bias_table.grad.abs().sum() > 0


# --- SDPA with strided k/v ----------------------------------------------------------------------------------

def test_sdpa_with_head_strided_kv_equals_the_reference_attention():
    torch.manual_seed(0)
    q = torch.randn(3, 2, 16, 5)
    k = torch.randn(3, 10, 36).transpose(1, 2).reshape(3, 36, 2, 5).transpose(1, 2)  # head dim strided
    v = torch.randn(3, 10, 36).transpose(1, 2).reshape(3, 36, 2, 5).transpose(1, 2)
    assert k.stride(-1) != 1
    bias = torch.randn(1, 2, 16, 36)
    ref = window_attention(q, k, v, bias, 0.4, "reference")
    assert _rel_close(window_attention(q, k, v, bias, 0.4, "sdpa"), ref)
    with reference_paths():
        assert _rel_close(window_attention(q, k, v, bias, 0.4, "sdpa"), ref)


# --- whole models: fast paths on vs off --------------------------------------------------------------------

def _fast_vs_reference(net: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        with reference_paths():
            ref = net(x)
        fast = net(x)
        again = net(x)  # second call uses the cached biases
    assert torch.equal(fast, again)
    return fast, ref


def test_hat_fast_paths_equal_the_reference_paths():
    torch.manual_seed(0)
    net = HAT(img_size=24, embed_dim=12, depths=(2, 2), num_heads=(2, 2), window_size=4, squeeze_factor=4,
              upscale=2, upsampler="pixelshuffle").eval()
    fast, ref = _fast_vs_reference(net, torch.rand(1, 3, 22, 26))
    assert _rel_close(fast, ref)
    # the cache follows weight loads
    sd = {k: v + 0.01 if "relative_position_bias_table" in k else v for k, v in net.state_dict().items()}
    net.load_state_dict(sd)
    fast2, ref2 = _fast_vs_reference(net, torch.rand(1, 3, 22, 26))
    assert _rel_close(fast2, ref2) and not torch.equal(ref, ref2)


def test_mambairv2_fast_paths_equal_the_reference_paths():
    torch.manual_seed(0)
    net = MambaIRv2(img_size=16, embed_dim=16, d_state=4, depths=(2,), num_heads=(2,), window_size=4,
                    inner_rank=8, num_tokens=16, convffn_kernel_size=5, mlp_ratio=2.0, upscale=2,
                    upsampler="pixelshuffle", routing="argmax").eval()
    fast, ref = _fast_vs_reference(net, torch.rand(1, 3, 18, 14))
    assert _rel_close(fast, ref)
