"""Model inference speed on CPU against the same process's matmul throughput (issue 17).

    python benchmarks/bench_models.py                    # HAT-L and MambaIRv2-L at 64 and 128 px
    python benchmarks/bench_models.py --quick            # 64 px only, two timed repeats
    python benchmarks/bench_models.py --models hat_l --sizes 64 --bf16

Each case times the inference fast paths ("after") and, alternately in the same process, the reference paths
(``smt.kernels.attention.reference_paths``: the code before issue 17's changes, "before"), so the speed-up is
a same-process ratio under the same load. GFLOP/s and the matmul fraction are for the fast paths.

For each case: the forward's median time; its FLOPs (:func:`model_flops`: matmuls, convolutions and the window
attention's two matmuls counted by ``torch.utils.flop_counter.FlopCounterMode`` on the reference paths with the
attention run as plain matmuls, since the counter has no formula for PyTorch's CPU flash-attention kernel; not
the fast paths' zero-padded GEMM rows; MambaIRv2's selective scan, a C extension the counter cannot see, by
mamba's convention, 9 FLOPs per state update plus 1 per output for the D skip; other elementwise work is not
counted: the figure is a lower bound); the effective GFLOP/s; and that as a fraction of a 2048x2048 matmul's
GFLOP/s ("matmul": fp32, or bf16 for the bf16 precisions) timed in the case's own process just before each
timed forward and after the last (median), so a machine whose load changes during the run (shared cores) is
compared with its speed at that moment. The matmul line at the top is the same measurement once per invocation
(bf16 when the CPU has native bf16 units, detected at run time by
:func:`smt.infer.precision.cpu_has_native_bf16`). Peak memory is the growth of the process's peak RSS
(``ru_maxrss``) during the case, each case running in its own subprocess so the peak is its own (taken after
the fast path's warm-up forward, before the FLOP count and any reference run). The machines are shared: compare
ratios from one invocation, not absolute times across runs.

Each case process first calls :func:`smt.infer.malloc.keep_freed_memory`, as ``upscale`` and the infer stage do
(both columns run under it); ``--default-malloc`` keeps malloc's defaults instead, for an A/B of that setting
across two invocations (it cannot be undone inside one process).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from timing import median_time, rss_mb

MODELS = ("hat_l", "mambairv2_l")


def matmul_gflops(dtype_name: str, n: int = 2048, repeats: int = 3) -> float:
    import torch

    dtype = getattr(torch, dtype_name)
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    return 2 * n ** 3 / median_time(lambda: a @ b, repeats) / 1e9


def _one_matmul_gflops(a, b) -> float:
    t = time.perf_counter()
    a @ b
    return 2 * a.shape[0] ** 3 / (time.perf_counter() - t) / 1e9


def model_flops(net, x) -> int:
    """FLOPs of ``net(x)`` (an SR model of :mod:`smt.models`): see the module docstring. The window attention
    is counted as the matmuls it is (``attn_impl="reference"`` for the count), 2 n m d per window and head for
    each of q k^T and attn v, as for the official models' FLOP figures; the selective scan as
    ``9 B L D N + B L D`` (mamba's ``flops_selective_scan_fn``: state-spaces/mamba issue 110)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from smt.kernels.attention import reference_paths
    from smt.models.mambairv2 import Selective_Scan

    scan = []

    def count_scan(module, args):
        b, length, d = args[0].shape
        scan.append(9 * b * length * d * module.d_state + b * length * d)

    hooks = [m.register_forward_pre_hook(count_scan) for m in net.modules() if isinstance(m, Selective_Scan)]
    impl = getattr(net, "attn_impl", None)
    try:
        if impl is not None:
            net.attn_impl = "reference"
        with torch.no_grad(), FlopCounterMode(display=False) as counter, reference_paths():
            net(x)
    finally:
        if impl is not None:
            net.attn_impl = impl
        for h in hooks:
            h.remove()
    return counter.get_total_flops() + sum(scan)


def run_case(model: str, size: int, precision: str, repeats: int, with_reference: bool) -> dict:
    """Times the fast paths and (``with_reference``) the reference paths alternately in this process, so both
    see the same machine load; peak RSS is taken after the fast path's warm-up, before any reference run."""
    import torch

    from smt.infer.malloc import keep_freed_memory
    from smt.infer.precision import with_precision
    from smt.kernels.attention import reference_paths
    from smt.models import build_model

    keep_freed_memory()  # as upscale and the infer stage do
    torch.manual_seed(0)
    base = rss_mb()
    net = build_model(model).eval()
    fwd = with_precision(net, precision)
    x = torch.rand(1, 3, size, size)
    mm_dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    ma, mb = torch.randn(2048, 2048).to(mm_dtype), torch.randn(2048, 2048).to(mm_dtype)

    def timed(reference: bool) -> float:
        t = time.perf_counter()
        if reference:
            with reference_paths():
                fwd(x)
        else:
            fwd(x)
        return time.perf_counter() - t

    with torch.no_grad():
        timed(False)  # warm-up (fills the eval-mode caches)
        peak = rss_mb() - base
        # the model's FLOPs, counted on the reference paths (the fast paths' padded GEMMs do a few more), after
        # the peak is read (the reference paths may need more memory)
        flops = model_flops(net, x)
        fast, ref, matmul = [], [], []
        _one_matmul_gflops(ma, mb)  # warm-up
        for _ in range(repeats):
            matmul.append(_one_matmul_gflops(ma, mb))  # the machine's speed right now, beside each forward
            fast.append(timed(False))
            if with_reference:
                ref.append(timed(True))
        matmul.append(_one_matmul_gflops(ma, mb))
    return {"model": model, "size": size, "precision": precision, "seconds": statistics.median(fast),
            "reference_seconds": statistics.median(ref) if ref else None, "gflop": flops / 1e9,
            "peak_rss_mb": peak, "matmul_gflops": statistics.median(matmul)}


def _in_subprocess(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def cpu_features() -> dict:
    import torch

    from smt.infer.precision import cpu_flags, cpu_has_native_bf16

    flags = cpu_flags()
    return {"capability": torch.backends.cpu.get_cpu_capability(), "avx512f": "avx512f" in flags,
            "avx512_bf16": "avx512_bf16" in flags, "amx_bf16": "amx_bf16" in flags,
            "native_bf16": cpu_has_native_bf16(), "threads": torch.get_num_threads()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--sizes", nargs="+", type=int, default=[64, 128])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="64 px only, two timed repeats")
    p.add_argument("--bf16", action="store_true",
                   help="also bf16 autocast and bf16 weights (slow on CPUs without native bf16)")
    p.add_argument("--no-reference", action="store_true",
                   help="skip the reference-path runs (smt.kernels.attention.reference_paths) of each case")
    p.add_argument("--default-malloc", action="store_true",
                   help="keep malloc's defaults in the cases (SMT_DEFAULT_MALLOC=1), for an A/B of "
                        "smt.infer.malloc.keep_freed_memory across two invocations")
    p.add_argument("--case", nargs=5, metavar=("MODEL", "SIZE", "PRECISION", "REPEATS", "WITH_REFERENCE"),
                   help=argparse.SUPPRESS)
    p.add_argument("--matmul", metavar="DTYPE", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.case:
        m, s, prec, r, with_ref = args.case
        print(json.dumps(run_case(m, int(s), prec, int(r), with_ref == "1")))
        return
    if args.matmul:
        print(json.dumps({"gflops": matmul_gflops(args.matmul)}))
        return
    if any(s <= 0 for s in args.sizes) or args.repeats < 1:
        p.error("--sizes and --repeats must be positive")
    sizes, repeats = ([64], 2) if args.quick else (args.sizes, args.repeats)
    feats = cpu_features()
    print("CPU:", ", ".join(f"{k}={v}" for k, v in feats.items()))
    if args.bf16 and not feats["native_bf16"]:
        print("warning: this CPU has no native bf16 units (no avx512_bf16/amx_bf16): bf16 is emulated and slow")
    precisions = ["fp32"] + (["bf16", "bf16-weights"] if args.bf16 else [])
    if args.default_malloc:
        os.environ["SMT_DEFAULT_MALLOC"] = "1"  # the case subprocesses inherit it
    from smt.infer.malloc import keep_freed_memory

    print("malloc:", keep_freed_memory())
    peak = {"fp32": _in_subprocess(["--matmul", "float32"])["gflops"]}
    if args.bf16:
        peak["bf16"] = peak["bf16-weights"] = _in_subprocess(["--matmul", "bfloat16"])["gflops"]
    print("matmul 2048^2: " + ", ".join(f"{k} {v:.1f} GFLOP/s" for k, v in peak.items() if k != "bf16-weights"))
    print(f"{'model':<12} {'px':>4} {'prec':<12} {'ref s':>7} {'fast s':>7} {'speed-up':>8} {'GFLOP':>7} "
          f"{'GFLOP/s':>8} {'matmul':>7} {'% matmul':>8} {'peak MB':>8}")
    for model in args.models:
        for size in sizes:
            for prec in precisions:
                r = _in_subprocess(["--case", model, str(size), prec, str(repeats), str(int(not args.no_reference))])
                rate = r["gflop"] / r["seconds"]
                ref = r["reference_seconds"]
                ref_txt, gain = (f"{ref:>7.2f}", f"{ref / r['seconds']:.2f}x") if ref else ("", "")
                mm = r["matmul_gflops"]
                print(f"{model:<12} {size:>4} {prec:<12} {ref_txt:>7} {r['seconds']:>7.2f} {gain:>8} "
                      f"{r['gflop']:>7.1f} {rate:>8.1f} {mm:>7.1f} {100 * rate / mm:>7.0f}% "
                      f"{r['peak_rss_mb']:>8.0f}", flush=True)


if __name__ == "__main__":
    main()
