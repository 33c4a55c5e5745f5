"""``smt.infer.paths.describe_paths``: the line ``upscale`` prints and the infer stage logs names the paths this
machine takes (precision, fast paths, attention kernel, the scan's implementation and its threads)."""
import pytest
import torch

import smt.infer.paths as paths
from smt.infer.malloc import malloc_status
from smt.infer.paths import describe_paths
from smt.kernels.attention import reference_paths
from smt.kernels.cpu_build import load_library, openmp_status
from smt.models import build_model
from smt.models.common import onednn_conv_available


def test_paths_name_the_scan_only_for_models_with_one():
    hat, mamba = build_model("hat_tiny"), build_model("mambairv2_tiny")
    line = describe_paths([hat, mamba], "fp32")
    assert line.startswith(f"inference paths: cpu, {torch.get_num_threads()} threads, {malloc_status()}; fp32 (the "
                           "reference")
    assert "eval fast paths" in line and "attention: SDPA (CPU flash kernel)" in line
    if load_library() is not None:
        threads = "PyTorch's OpenMP threads" if openmp_status().startswith("OpenMP") else "Python threads"
        assert f"selective scan: C kernel, {load_library().scan_block_width()} channels" in line
        assert threads in line
    else:
        assert "selective scan: the PyTorch reference loop, slow" in line
    assert "selective scan" not in describe_paths([hat], "fp32")
    # MambaIRv2's depthwise convs (ConvFFN, CPE) take oneDNN's fused conv; HAT has none
    assert ("oneDNN depthwise convs with the activation fused" in line) == onednn_conv_available()
    assert "depthwise" not in describe_paths([hat], "fp32")


def test_paths_say_when_the_reference_paths_or_a_forced_scan_run():
    mamba = build_model("mambairv2_tiny", scan_impl="reference")
    assert "scan_impl=reference" in describe_paths([mamba], "fp32")
    with reference_paths():
        line = describe_paths([mamba], "fp32")
    assert "reference paths (fast paths switched off)" in line and "eval fast paths" not in line


@pytest.mark.parametrize("native,words", [(True, "native bf16 units"), (False, "bf16 EMULATED: slower than fp32")])
def test_paths_warn_when_bf16_is_emulated(monkeypatch, native, words):
    monkeypatch.setattr(paths, "cpu_has_native_bf16", lambda: native)
    assert f"bf16-weights ({words})" in describe_paths([build_model("hat_tiny")], "bf16-weights")


def test_paths_name_the_bf16_attention_kernel_where_it_runs(monkeypatch):
    hat = build_model("hat_tiny")
    monkeypatch.setattr(paths, "cpu_bf16_attention_available", lambda: True)
    assert "attention: C kernel with AVX-512 BF16 dot products" in describe_paths([hat], "bf16")
    assert "attention: SDPA (CPU flash kernel)" in describe_paths([hat], "fp32")
    monkeypatch.setattr(paths, "cpu_bf16_attention_available", lambda: False)
    assert "attention: SDPA (CPU flash kernel)" in describe_paths([hat], "bf16-weights")
