"""The first thing to run on a new GPU machine: ``python -m smt smoke``.

1. Kernels against their references on the device: the selective scan (the dispatcher's choice: mamba_ssm or
   ours) forward and backward, and SDPA attention, as max relative errors.
2. One training step of each model (multi-scale loss, Adam, bf16 autocast on CUDA) at the profile's stage-1 patch
   and a small batch: step time and peak memory.
3. One tiled inference of each model: time and peak memory.

Prints one table and exits 1 when a kernel disagrees with its reference. ``--models tiny`` runs the same checks
with the demo models (what the CPU test does).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from smt.infer.tiling import tiled_forward
from smt.kernels import selective_scan, selective_scan_ref, window_attention
from smt.models import build_model
from smt.train.losses import multiscale_loss

__all__ = ["run_smoke", "SmokeRow"]

_SIZES = {"large": ("hat_l", "mambairv2_l"), "tiny": ("hat_tiny", "mambairv2_tiny")}


@dataclass
class SmokeRow:
    check: str
    value: str
    ok: bool = True


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_mb(device: torch.device) -> str:
    return f"{torch.cuda.max_memory_allocated(device) / 2**20:.0f} MB" if device.type == "cuda" else "n/a (CPU)"


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def _kernel_rows(device: torch.device, tol: float = 1e-4) -> list[SmokeRow]:
    g = torch.Generator().manual_seed(0)
    b, d, n, length = 2, 64, 16, 777  # L not a multiple of any chunk size
    u = torch.randn(b, d, length, generator=g)
    delta = torch.randn(b, d, length, generator=g) * 0.5
    A = -torch.rand(d, n, generator=g) * 4 - 0.1
    B, C = torch.randn(b, 1, n, length, generator=g), torch.randn(b, 1, n, length, generator=g)
    D, z, bias = torch.randn(d, generator=g), torch.randn(b, d, length, generator=g), torch.randn(d, generator=g)
    leaves = [t.to(device).requires_grad_() for t in (u, delta, A, B, C, D, z, bias)]
    rows = []
    outs = {}
    for name, fn in (("fast", selective_scan), ("reference", selective_scan_ref)):
        xs = [t.detach().clone().requires_grad_() for t in leaves]
        y = fn(xs[0], xs[1], xs[2], xs[3], xs[4], xs[5], xs[6], xs[7], True)
        y.square().sum().backward()
        outs[name] = [y.detach()] + [x.grad for x in xs]
    errs = [_rel(f, r) for f, r in zip(outs["fast"], outs["reference"])]
    rows.append(SmokeRow("selective scan fwd+bwd vs reference (max rel err)", f"{max(errs):.2e}", max(errs) < tol))
    q, k, v = (torch.randn(8, 6, 256, 30, generator=g).to(device) for _ in range(3))
    bias_t = torch.randn(1, 6, 256, 256, generator=g).to(device)
    err = _rel(window_attention(q, k, v, bias_t, 0.18, "sdpa"), window_attention(q, k, v, bias_t, 0.18, "reference"))
    rows.append(SmokeRow("window attention sdpa vs reference (max rel err)", f"{err:.2e}", err < tol))
    return rows


def run_smoke(device: str = "cuda", models: str = "large", patch: int = 64, batch: int = 2,
              infer_side: int = 128, tile: int = 64) -> list[SmokeRow]:
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("smoke: --device cuda but no CUDA device is available")
    rows = [SmokeRow("device", torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu")]
    rows += _kernel_rows(dev)
    bf16 = dev.type == "cuda"
    for preset in _SIZES[models]:
        torch.manual_seed(0)
        net = build_model(preset, aux_scales=(2, 3)).to(dev)
        opt = torch.optim.Adam(net.parameters(), lr=1e-4)
        lr = torch.rand(batch, 3, patch, patch, device=dev)
        hr = torch.rand(batch, 3, patch * 4, patch * 4, device=dev)
        times = []
        for _ in range(2):  # the first step pays for kernel selection and allocation
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
            _sync(dev)
            t = time.perf_counter()
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
                outs = net.forward_multiscale(lr)
            loss, _ = multiscale_loss(outs, hr, 4, {4: 1.0, 2: 0.5, 3: 0.5}, "l1")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            _sync(dev)
            times.append(time.perf_counter() - t)
        finite = bool(torch.isfinite(loss).item())
        rows.append(SmokeRow(f"{preset} train step ({'bf16' if bf16 else 'fp32'}, {batch}x{patch}px, multi-scale)",
                             f"{times[-1]:.3f} s, peak {_peak_mb(dev)}, loss {loss.item():.4f}", finite))
        net.eval()
        x = torch.rand(1, 3, infer_side, infer_side, device=dev)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        _sync(dev)
        t = time.perf_counter()
        with torch.no_grad():
            y = tiled_forward(net, x, 4, tile, 8, 4)
        _sync(dev)
        ok = y.shape == (1, 3, infer_side * 4, infer_side * 4) and bool(torch.isfinite(y).all())
        rows.append(SmokeRow(f"{preset} tiled inference ({infer_side}px, tile {tile})",
                             f"{time.perf_counter() - t:.3f} s, peak {_peak_mb(dev)}", ok))
        del net, opt
    return rows


def format_rows(rows: list[SmokeRow]) -> str:
    width = max(len(r.check) for r in rows)
    lines = [f"{'ok  ' if r.ok else 'FAIL'} {r.check:<{width}}  {r.value}" for r in rows]
    lines.append("SMOKE OK" if all(r.ok for r in rows) else "SMOKE FAILED")
    return "\n".join(lines)
