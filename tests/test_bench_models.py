"""``benchmarks/bench_models.py``: one case (a tiny preset) returns its timings, FLOPs, peak memory and the
matmul throughput measured in the case's own process, from which the table's "% matmul" is computed."""
import importlib
import sys

from conftest import REPO


def test_bench_case_reports_times_flops_and_its_own_matmul_throughput(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))  # the script imports its sibling timing.py
    bench = importlib.import_module("bench_models")
    r = bench.run_case("hat_tiny", 16, "fp32", 1, True)
    assert r["model"] == "hat_tiny" and r["size"] == 16 and r["precision"] == "fp32"
    assert r["seconds"] > 0 and r["reference_seconds"] > 0 and r["gflop"] > 0
    assert r["matmul_gflops"] > 0 and r["peak_rss_mb"] >= 0
    sys.modules.pop("bench_models", None)


def test_model_flops_count_window_attention_as_matmuls_and_the_scan_by_mambas_formula(monkeypatch):
    """MambaIRv2 tiny at 16 px: 4 attentive layers, each with window attention over 4 windows of 8x8 (2 heads of
    16 channels: q k^T and attn v, 2 n^2 d each) and one scan of L = 256 over D = 64 channels with N = 8 states
    (9 L D N + L D): what the plain counter misses on the default (SDPA) attention and the C scan."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from smt.kernels.attention import reference_paths
    from smt.models import build_model

    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    bench = importlib.import_module("bench_models")
    torch.manual_seed(0)
    net = build_model("mambairv2_tiny").eval()
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad(), FlopCounterMode(display=False) as plain, reference_paths():  # no padded GEMM rows
        net(x)
    layers, windows, heads, n, d = 4, 4, 2, 64, 16
    attention = layers * windows * heads * 2 * (2 * n * n * d)
    scan = layers * (9 * 256 * 64 * 8 + 256 * 64)
    assert bench.model_flops(net, x) == plain.get_total_flops() + attention + scan
    assert net.attn_impl == "sdpa"  # restored after the count
    sys.modules.pop("bench_models", None)
