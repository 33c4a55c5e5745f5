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
