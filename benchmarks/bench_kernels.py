"""Kernel and model speed/memory: fast paths against their references, measured in the same run.

    python benchmarks/bench_kernels.py            # scan and fp32 model cases (~5 minutes on 2 cores)
    python benchmarks/bench_kernels.py --quick    # smaller L
    python benchmarks/bench_kernels.py --bf16     # also bf16 autocast vs fp32 (slow on CPUs without bf16 units)
    python benchmarks/bench_kernels.py --bf16-psnr   # PSNR-Y of the trained demo models, bf16 vs fp32

With CUDA the scan is also measured on the GPU: the reference loop against the dispatcher's choice (mamba_ssm
when installed, else our Triton kernel) and against Triton explicitly.

Each case runs in a fresh subprocess so its peak memory (``ru_maxrss`` growth over the post-import baseline)
is its own. Times are the median of repeats after one warm-up. Printed ratios compare cases run in this
invocation only: the machines are shared and noisy, absolute times are not comparable across runs.

The reference selective scan's backward is O(L^2) (autograd through L slices of a (B, D, L, N) tensor), so
its forward+backward is measured at L = 1,024 only (the fast path at the same L for the ratio).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from timing import median_time, rss_mb


def run_case(case: str, repeats: int) -> dict:
    import torch

    from smt.kernels.selective_scan import selective_scan

    torch.manual_seed(0)
    base = rss_mb()
    kind, *rest = case.split(":")
    if kind == "scan":
        impl, mode, length = rest[0], rest[1], int(rest[2])
        device = rest[3] if len(rest) > 3 else "cpu"
        dim, nstate = 348, 16
        u = torch.randn(1, dim, length)
        delta = torch.randn(1, dim, length) * 0.5
        A = -torch.exp(torch.randn(dim, nstate))
        B, C = torch.randn(1, 1, nstate, length), torch.randn(1, 1, nstate, length)
        D, bias = torch.randn(dim), torch.randn(dim) * 0.5
        leaves = [t.to(device) for t in (u, delta, A, B, C, D, bias)]
        if mode == "fwdbwd":
            leaves = [t.requires_grad_(True) for t in leaves]

        def step():
            y = selective_scan(*leaves[:6], None, leaves[6], True, impl=impl)
            if mode == "fwdbwd":
                y.sum().backward()
            if device == "cuda":
                torch.cuda.synchronize()

        sec = median_time(step, repeats)
    elif kind == "model":
        from smt.models import build_model

        name, variant = rest[0], rest[1]
        fast = variant in ("fast", "bf16")
        extra = {"scan_impl": "auto" if fast else "reference", "routing": "argmax"} if "mamba" in name else {}
        model = build_model(name, attn_impl="sdpa" if fast else "reference", **extra).eval()
        x = torch.rand(1, 3, 64, 64)

        def step():
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=variant == "bf16"):
                model(x)

        sec = median_time(step, repeats)
    else:
        raise ValueError(case)
    peak = (torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() and case.endswith(":cuda")
            else rss_mb() - base)
    return {"case": case, "seconds": sec, "peak_mb": peak}


def bf16_psnr(params_path: str = "params.yaml") -> None:
    """Validation PSNR-Y of each trained demo model in fp32, bf16 autocast and bf16 weights (whole images,
    NTIRE2025 protocol)."""
    import torch

    from smt.config import load_section
    from smt.infer.precision import with_precision
    from smt.data.images import read_image
    from smt.data.manifest import read_manifest
    from smt.infer.tiling import tiled_forward
    from smt.metrics import NTIRE2025, evaluate_pair
    from smt.models import load_model
    from smt.train.engine import exported_weights

    cfg, data = load_section("train", params_path), load_section("data", params_path)
    last = cfg.schedule()[-1]
    for m in cfg.models:
        net = load_model(exported_weights(cfg, m, *last), cfg.models[m].preset, routing="argmax")
        scores = {"fp32": [], "bf16": [], "bf16-weights": []}
        secs = dict.fromkeys(scores, 0.0)
        for row in read_manifest(data.root, "valid").itertuples():
            lr, hr = read_image(f"{data.root}/{row.lr_path}"), read_image(f"{data.root}/{row.hr_path}")
            x = torch.from_numpy(lr).permute(2, 0, 1)[None].float() / 255
            for p in scores:
                t = time.perf_counter()
                y = tiled_forward(with_precision(net, p), x, data.scale, 0, 0)
                secs[p] += time.perf_counter() - t
                sr = (y[0].clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
                scores[p].append(evaluate_pair(sr, hr, NTIRE2025)["psnr_y"])
        mean = {p: sum(v) / len(v) for p, v in scores.items()}
        print(f"{m}: PSNR-Y fp32 {mean['fp32']:.4f} dB; " + "; ".join(
            f"{p} {mean[p]:.4f} dB, |diff| {abs(mean[p] - mean['fp32']):.4f} dB" for p in ("bf16", "bf16-weights"))
            + "; time " + ", ".join(f"{p} {t:.1f} s" for p, t in secs.items()), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--case")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--bf16-psnr", action="store_true")
    args = parser.parse_args()
    if args.bf16_psnr:
        bf16_psnr()
        return
    if args.case:
        print(json.dumps(run_case(args.case, args.repeats)))
        return
    lengths = [1024, 4096] if args.quick else [4096, 16384]
    pairs = []  # (label, reference case, fast case)
    for length in lengths:
        pairs.append((f"scan fwd  L={length}", f"scan:reference:fwd:{length}", f"scan:cpu:fwd:{length}"))
    pairs.append(("scan fwd+bwd L=1024", "scan:reference:fwdbwd:1024", "scan:cpu:fwdbwd:1024"))
    import torch

    if torch.cuda.is_available():
        for length in lengths:
            pairs.append((f"GPU scan fwd L={length} (auto)", f"scan:reference:fwd:{length}:cuda",
                          f"scan:auto:fwd:{length}:cuda"))
            pairs.append((f"GPU scan fwd L={length} (triton)", f"scan:reference:fwd:{length}:cuda",
                          f"scan:triton:fwd:{length}:cuda"))
        pairs.append(("GPU scan fwd+bwd L=1024 (triton)", "scan:reference:fwdbwd:1024:cuda",
                      "scan:triton:fwdbwd:1024:cuda"))
    for name in ("hat_l", "mambairv2_l"):
        pairs.append((f"{name} fwd 64x64 fp32", f"model:{name}:plain", f"model:{name}:fast"))
        if args.bf16:
            pairs.append((f"{name} fwd 64x64 bf16 vs fp32", f"model:{name}:fast", f"model:{name}:bf16"))
    results = {}
    import platform

    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}")
    print(f"{'case':32s} {'reference s':>12s} {'fast s':>10s} {'ratio':>8s} {'ref MB':>8s} {'fast MB':>8s}",
          flush=True)
    for label, ref, fast in pairs:
        for case in (ref, fast):
            if case not in results:
                out = subprocess.run([sys.executable, __file__, "--case", case, "--repeats", str(args.repeats)],
                                     capture_output=True, text=True, check=True)
                results[case] = json.loads(out.stdout.strip().splitlines()[-1])
        r, f = results[ref], results[fast]
        print(f"{label:32s} {r['seconds']:12.4f} {f['seconds']:10.4f} {r['seconds'] / f['seconds']:7.1f}x "
              f"{r['peak_mb']:8.0f} {f['peak_mb']:8.0f}", flush=True)


if __name__ == "__main__":
    main()
