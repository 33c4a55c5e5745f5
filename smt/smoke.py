"""The first thing to run on a new GPU machine: ``python -m smt smoke`` (``--nproc 2``: two processes under torchrun).

1. Kernels against their references on the device: the selective scan (the dispatcher's choice, mamba_ssm or
   ours, and our Triton kernel as well when it is not the choice) forward and backward, including MambaIRv2-L's
   shape (D=348 channels: a partial last channel block, N=16, L=4096), against a float64 reference; window
   attention through SDPA in fp32, and in bf16 at the L models' head dims (30, 29) with the shifted-window mask,
   and on CUDA whether the memory-efficient kernel takes those calls (else the math backend materialises every
   score matrix).
2. One training step of each model as the engine runs it (multi-scale loss, Adam, bf16 autocast with fp32
   output convolutions on CUDA) at the profile's stage-1 patch and per-GPU batch (``profiles/ntire2025.yaml``:
   global batch / GPUs); out of memory is a failed row, not a crash. Under torchrun (``--nproc 2``) the model is
   wrapped in DistributedDataParallel on each rank's own GPU, and the ranks' parameters must agree after the step.
3. One tiled inference of each model: time and peak memory.
4. (CUDA, large models) The selective scan's speed at MambaIRv2-L's profile shapes, stage 1 and 2: our chunked
   Triton kernel against our serial one and mamba_ssm's (when it imports), with ratios (docs/gpu_scan.md).
5. The cluster measurements of each model (docs/cluster.md): a training step with the per-sample noise against the
   global stream, with the deterministic mode against without (and whether two identical steps give bit-identical
   gradients), the foreach EMA update against the per-tensor one.

Prints one table (under torchrun: every rank's, on rank 0) and exits 1 when a check fails. ``--models tiny``
runs the same checks with the demo models and small kernel shapes (what the CPU tests do).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from smt.infer.tiling import tiled_forward
from smt.kernels import selective_scan, selective_scan_ref, window_attention
from smt.models import build_model
from smt.train.losses import multiscale_loss

__all__ = ["run_smoke", "launch_smoke", "smoke_command", "SmokeRow", "format_rows", "stage1_per_gpu_batch", "PROFILE"]

_SIZES = {"large": ("hat_l", "mambairv2_l"), "tiny": ("hat_tiny", "mambairv2_tiny")}
# (batch, channels, states, length): L not a multiple of the Triton chunk (64); MambaIRv2-L's scan (174 * 2
# channels, 16 states, a 64 x 64 patch) whose channels end in a partial block of 28; tiny: a 40-channel tail
_SCAN_CASES = {"large": ((2, 64, 16, 777), (1, 348, 16, 4096)), "tiny": ((2, 64, 16, 777), (1, 40, 16, 130))}
PROFILE = Path(__file__).resolve().parents[1] / "profiles" / "ntire2025.yaml"


@dataclass
class SmokeRow:
    check: str
    value: str
    ok: bool = True


def stage1_per_gpu_batch(profile: str | Path = PROFILE) -> tuple[int, int]:
    """(patch size, per-GPU batch) of the profile's first training stage: its global batch over every GPU."""
    from smt.config import load_section

    cfg = load_section("train", profile)
    first = cfg.stage_order[0]
    return cfg.stages[first].patch_size, cfg.per_process_batch(first, cfg.nproc * cfg.nnodes)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_mb(device: torch.device) -> str:
    return f"{torch.cuda.max_memory_allocated(device) / 2**20:.0f} MB" if device.type == "cuda" else "n/a (CPU)"


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def _scan_impls(device: torch.device) -> list[tuple[str, str]]:
    """(impl, label) of the scans to check: the dispatcher's choice, and our Triton kernel when it is not."""
    if device.type != "cuda":
        return [("auto", "auto (CPU kernel)")]
    from smt.kernels.selective_scan import _triton_fn, cuda_scan_backend

    name = cuda_scan_backend()[0]
    impls = [("auto", f"auto ({name})")]
    if name != "triton" and _triton_fn() is not None:
        impls.append(("triton", "triton"))
    return impls


def _triton_importable() -> bool:
    from smt.kernels.selective_scan import _triton_fn

    return _triton_fn() is not None


def _scan_rows(device: torch.device, cases, tol: float = 1e-4) -> list[SmokeRow]:
    rows = []
    for b, d, n, length in cases:
        g = torch.Generator().manual_seed(d)
        u = torch.randn(b, d, length, generator=g)
        delta = torch.randn(b, d, length, generator=g) * 0.5
        A = -torch.rand(d, n, generator=g) * 4 - 0.1
        B, C = torch.randn(b, 1, n, length, generator=g), torch.randn(b, 1, n, length, generator=g)
        D, z, bias = torch.randn(d, generator=g), torch.randn(b, d, length, generator=g), torch.randn(d, generator=g)
        leaves = [t.to(device) for t in (u, delta, A, B, C, D, z, bias)]

        def run(fn, dtype, **kw):
            xs = [t.to(dtype).requires_grad_() for t in leaves]
            y = fn(*xs, delta_softplus=True, **kw)
            y.square().sum().backward()
            return [y.detach()] + [x.grad for x in xs]

        ref = run(selective_scan_ref, torch.float64)
        for impl, label in _scan_impls(device):
            errs = [_rel(f, r) for f, r in zip(run(selective_scan, torch.float32, impl=impl), ref)]
            rows.append(SmokeRow(f"selective scan {label} fwd+bwd D={d} N={n} L={length} (max rel err)",
                                 f"{max(errs):.2e}", max(errs) < tol))
    return rows


def scan_profile_shapes(profile: str | Path = PROFILE, preset: str = "mambairv2_l") -> dict[str, tuple[int, ...]]:
    """(per-GPU batch, length, channels, states) of ``preset``'s scans at each distinct training shape of the
    profile, keyed by the first stage with that shape (ntire2025: s1 and s2; s3 repeats s2)."""
    from smt.config import load_section
    from smt.models.presets import PRESETS

    cfg = load_section("train", profile)
    kw = PRESETS[preset][1]
    dim = int(kw["embed_dim"] * kw["mlp_ratio"])  # the ASSM's hidden width, the scan's channels
    shapes: dict[str, tuple[int, ...]] = {}
    for stage in cfg.stage_order:
        shape = (cfg.per_process_batch(stage, cfg.nproc * cfg.nnodes), cfg.stages[stage].patch_size ** 2, dim,
                 kw["d_state"])
        if shape not in shapes.values():
            shapes[stage] = shape
    return shapes


def _scan_speed_rows(device: torch.device, shapes: dict[str, tuple[int, ...]] | None = None,
                     reps: int = 5) -> list[SmokeRow]:
    """Time one scan call, forward + backward, at the profile's MambaIRv2-L shapes (as the model calls it:
    channel-last u and delta, one group of B/C, D, delta_bias, softplus): our chunked Triton kernel, our serial
    one, and mamba_ssm's ``selective_scan_fn`` when it imports; the median of ``reps`` calls after one warm-up,
    each kernel's ratio to the chunked one, and the chunked kernel's scan time per MambaIRv2-L training step
    (54 calls) beside the README's 0.026 s for the whole step. Needs Triton (CUDA, or the interpreter on CPU)."""
    from smt.kernels import triton_scan as ts
    from smt.models.presets import PRESETS
    from smt.kernels.selective_scan import _mamba_ssm_fn

    impls = {"triton chunked": lambda *a, **k: ts.selective_scan_triton(*a, **k, kernel="chunked"),
             "triton serial": lambda *a, **k: ts.selective_scan_triton(*a, **k, kernel="serial")}
    mamba = _mamba_ssm_fn()[0] if device.type == "cuda" else None
    if mamba is not None:
        impls["mamba_ssm"] = mamba
    calls = sum(PRESETS["mambairv2_l"][1]["depths"])  # one scan per block
    rows = []
    for stage, (b, length, d, n) in (shapes or scan_profile_shapes()).items():
        g = torch.Generator().manual_seed(0)
        u = torch.randn(b, length, d, generator=g).to(device).transpose(1, 2)  # channel-last, as in the model
        delta = (torch.randn(b, length, d, generator=g) * 0.5).to(device).transpose(1, 2)
        A = (-torch.rand(d, n, generator=g) * 4 - 0.1).to(device)
        B, C = (torch.randn(b, 1, n, length, generator=g).to(device) for _ in range(2))
        D, bias = torch.randn(d, generator=g).to(device), torch.randn(d, generator=g).to(device)
        dy = torch.randn(b, d, length, generator=g).to(device)
        times = {}
        for name, fn in impls.items():
            leaves = [t.detach().requires_grad_() for t in (u, delta, A, B, C, D, bias)]
            samples = []
            for _ in range(reps + 1):
                _sync(device)
                t0 = time.perf_counter()
                y = fn(*leaves[:6], delta_bias=leaves[6], delta_softplus=True)
                torch.autograd.grad(y, leaves, dy)
                _sync(device)
                samples.append(time.perf_counter() - t0)
            times[name] = sorted(samples[1:])[reps // 2]
        base = times["triton chunked"]
        value = "; ".join(f"{k} {v * 1e3:.2f} ms ({v / base:.2f}x)" for k, v in times.items())
        value += f"; chunked x {calls} calls = {base * calls:.3f} s per training step (README: 0.026 s per step)"
        rows.append(SmokeRow(f"scan speed {stage}: fwd+bwd batch {b} L={length} D={d} N={n} (median of {reps})",
                             value))
    return rows


def _attention_rows(device: torch.device) -> list[SmokeRow]:
    from smt.models.common import attend_windows, shifted_window_mask

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(8, 6, 256, 30, generator=g).to(device) for _ in range(3))
    bias_t = torch.randn(1, 6, 256, 256, generator=g).to(device)
    err = _rel(window_attention(q, k, v, bias_t, 0.18, "sdpa"), window_attention(q, k, v, bias_t, 0.18, "reference"))
    rows = [SmokeRow("window attention sdpa vs reference, fp32 (max rel err)", f"{err:.2e}", err < 1e-4)]
    # bf16 as under autocast: windows of a 4 x 2 grid of 16 x 16 windows, shifted (masked), HAT-L / MambaIRv2-L
    for model, hd in (("HAT-L", 30), ("MambaIRv2-L", 29)):
        q, k, v = (torch.randn(2 * 8, 6, 256, hd, generator=g).to(device, torch.bfloat16) for _ in range(3))
        rel_bias = torch.randn(1, 6, 256, 256, generator=g).to(device)
        grid = (4, 2, 16, 8)
        fast = attend_windows(q, k, v, rel_bias, hd ** -0.5, "sdpa", window_attention, grid)
        mask = shifted_window_mask(64, 32, 16, 8).to(device)  # the official full bias, in fp32
        full = (rel_bias.unsqueeze(0) + mask[None, :, None]).expand(2, -1, -1, -1, -1).reshape(16, 6, 256, 256)
        ref = window_attention(q.float(), k.float(), v.float(), full, hd ** -0.5, "reference")
        err = _rel(fast, ref)
        kernel = _efficient_kernel_takes(q, k, v, rel_bias.to(torch.bfloat16), hd ** -0.5)
        rows.append(SmokeRow(f"window attention bf16 head dim {hd} ({model}), masked, vs fp32 (max rel err; "
                             f"mem-efficient kernel)", f"{err:.2e}; {kernel}",
                             err < 3e-2 and kernel in ("yes", "n/a (CPU)")))
    return rows


def _efficient_kernel_takes(q, k, v, bias, scale) -> str:
    """Whether PyTorch's memory-efficient SDPA kernel accepts our window-attention call (CUDA only)."""
    if q.device.type != "cuda":
        return "n/a (CPU)"
    from torch.nn.attention import SDPBackend, sdpa_kernel

    try:
        with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
            window_attention(q, k, v, bias, scale, "sdpa")
    except RuntimeError as exc:
        return f"no ({str(exc).splitlines()[0][:80]})"
    return "yes"


def _train_row(preset: str, dev: torch.device, patch: int, batch: int, distributed: bool) -> SmokeRow:
    from smt.train.engine import _MultiScale
    from smt.train.output_precision import fp32_output_convs

    bf16 = dev.type == "cuda"
    torch.manual_seed(0)
    net = build_model(preset, aux_scales=(2, 3)).to(dev)
    if bf16:
        fp32_output_convs(net)
    model = _MultiScale(net)
    if distributed:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(model)
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    from smt.distributed import dist_info

    g = torch.Generator().manual_seed(1 + dist_info()[0])  # each rank its own data: only DDP keeps them equal
    lr = torch.rand(batch, 3, patch, patch, generator=g).to(dev)
    hr = torch.rand(batch, 3, patch * 4, patch * 4, generator=g).to(dev)
    label = f"{preset} train step ({'bf16' if bf16 else 'fp32'}, {batch}x{patch}px per GPU, multi-scale" + \
        (", DDP)" if distributed else ")")
    times = []
    try:
        for _ in range(2):  # the first step pays for kernel selection and allocation
            _reset_peak(dev)
            _sync(dev)
            t = time.perf_counter()
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
                outs = model(lr)
            loss, _ = multiscale_loss(outs, hr, 4, {4: 1.0, 2: 0.5, 3: 0.5}, "l1")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            _sync(dev)
            times.append(time.perf_counter() - t)
    except torch.OutOfMemoryError:
        return SmokeRow(label, f"out of memory (peak {_peak_mb(dev)}): the stage needs train.micro_batch", False)
    ok = bool(torch.isfinite(loss).item())
    value = f"{times[-1]:.3f} s, peak {_peak_mb(dev)}, loss {loss.item():.4f}"
    if distributed:
        from smt.distributed import gather_objects

        sums = gather_objects(float(sum(p.double().sum().item() for p in net.parameters())))
        same = len(set(sums)) == 1
        value += f", ranks' weights {'agree' if same else 'DIFFER: ' + str(sums)}"
        ok = ok and same
    return SmokeRow(label, value, ok)


def _cluster_rows(preset: str, dev: torch.device, patch: int, batch: int) -> list[SmokeRow]:
    """The cluster measurements (docs/cluster.md), same process: a training step (bf16 on CUDA) with the
    per-sample noise against the global stream; with the deterministic mode against without, and whether two
    identical steps give bit-identical gradients either way; the foreach EMA update against the per-tensor one."""
    from contextlib import nullcontext

    from smt.models import sample_noise
    from smt.train.checkpoint import EMA
    from smt.train.determinism import set_deterministic
    from smt.train.engine import _MultiScale

    bf16 = dev.type == "cuda"
    torch.manual_seed(0)
    net = build_model(preset, aux_scales=(2, 3)).to(dev).train()
    model = _MultiScale(net)
    g = torch.Generator().manual_seed(2)
    lr = torch.rand(batch, 3, patch, patch, generator=g).to(dev)
    hr = torch.rand(batch, 3, patch * 4, patch * 4, generator=g).to(dev)

    def step(per_sample: bool, keep: bool = False):
        net.zero_grad(set_to_none=True)
        torch.manual_seed(7)  # the engine seeds the step's call keys the same way
        with sample_noise.per_sample(range(batch)) if per_sample else nullcontext():
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
                outs = model(lr)
            loss, _ = multiscale_loss(outs, hr, 4, {4: 1.0, 2: 0.5, 3: 0.5}, "l1")
            loss.backward()
        return [p.grad.detach().clone() for p in net.parameters() if p.grad is not None] if keep else None

    def timed(per_sample: bool, n: int = 2) -> float:
        step(per_sample)  # warm-up (kernel selection, allocation)
        _sync(dev)
        t = time.perf_counter()
        for _ in range(n):
            step(per_sample)
        _sync(dev)
        return (time.perf_counter() - t) / n

    def same(a, b) -> str:
        return "yes" if all(torch.equal(x, y) for x, y in zip(a, b)) else "no"

    rows = []
    try:
        t_plain, t_noise = timed(False), timed(True)
        rows.append(SmokeRow(f"{preset} train step, per-sample noise vs global stream",
                             f"{t_noise:.3f} s vs {t_plain:.3f} s ({t_noise / t_plain:.2f}x)"))
        off = same(step(True, True), step(True, True))
        try:
            set_deterministic(dev, True)
            t_det = timed(True)
            on = same(step(True, True), step(True, True))
        finally:
            set_deterministic(dev, False)
        rows.append(SmokeRow(f"{preset} train step, deterministic mode vs not",
                             f"{t_det:.3f} s vs {t_noise:.3f} s ({t_det / t_noise:.2f}x); identical gradients in "
                             f"two runs: {on} with the mode, {off} without"))
    except torch.OutOfMemoryError:
        rows.append(SmokeRow(f"{preset} cluster measurements", f"out of memory (peak {_peak_mb(dev)})", False))
    net.zero_grad(set_to_none=True)
    fast, ref = EMA(net, 0.999), EMA(net, 0.999)
    times = {}
    for name, update in (("foreach", fast.update), ("per tensor", ref.update_reference)):
        update(net, 0)
        _sync(dev)
        t = time.perf_counter()
        for i in range(10):
            update(net, i)
        _sync(dev)
        times[name] = (time.perf_counter() - t) / 10
    equal = all(torch.equal(a, b) for a, b in zip(fast.model.state_dict().values(), ref.model.state_dict().values()))
    rows.append(SmokeRow(f"{preset} EMA update, foreach vs per tensor",
                         f"{times['foreach'] * 1e3:.2f} ms vs {times['per tensor'] * 1e3:.2f} ms "
                         f"({times['per tensor'] / times['foreach']:.1f}x), equal: {'yes' if equal else 'NO'}", equal))
    return rows


def _infer_row(preset: str, dev: torch.device, infer_side: int, tile: int) -> SmokeRow:
    torch.manual_seed(0)
    net = build_model(preset).to(dev).eval()
    x = torch.rand(1, 3, infer_side, infer_side, device=dev)
    _reset_peak(dev)
    _sync(dev)
    t = time.perf_counter()
    with torch.no_grad():
        y = tiled_forward(net, x, 4, tile, 8, 4)
    _sync(dev)
    ok = y.shape == (1, 3, infer_side * 4, infer_side * 4) and bool(torch.isfinite(y).all())
    return SmokeRow(f"{preset} tiled inference ({infer_side}px, tile {tile})",
                    f"{time.perf_counter() - t:.3f} s, peak {_peak_mb(dev)}", ok)


def run_smoke(device: str = "cuda", models: str = "large", patch: int | None = None, batch: int | None = None,
              infer_side: int = 128, tile: int = 64) -> list[SmokeRow]:
    """Every check on ``device`` (under torchrun: this rank's GPU, in the job's process group); ``patch`` and
    ``batch`` default to the profile's stage-1 patch and per-GPU batch."""
    from smt.distributed import device_for, dist_info, init_process_group

    if models not in _SIZES:
        raise ValueError(f"smoke: unknown model size {models!r} (valid: {', '.join(_SIZES)})")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("smoke: --device cuda but no CUDA device is available")
    default_patch, default_batch = stage1_per_gpu_batch() if patch is None or batch is None else (patch, batch)
    patch, batch = patch or default_patch, batch or default_batch
    if patch < 1 or batch < 1:
        raise ValueError(f"smoke: patch and batch must be >= 1, got {patch} and {batch}")
    dev = device_for(device)  # cuda:LOCAL_RANK under torchrun, made current
    rank, world = dist_info()
    if world > 1:
        init_process_group(dev)
    where = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    rows = [SmokeRow("device", f"{where} ({dev}; rank {rank} of {world})" if world > 1 else f"{where} ({dev})")]
    rows += _scan_rows(dev, _SCAN_CASES[models])
    if dev.type == "cuda" and models == "large" and _triton_importable():
        rows += _scan_speed_rows(dev)
    rows += _attention_rows(dev)
    for preset in _SIZES[models]:
        rows.append(_train_row(preset, dev, patch, batch, world > 1))
        rows.append(_infer_row(preset, dev, infer_side, tile))
        rows += _cluster_rows(preset, dev, patch, batch)
    if world > 1:
        from smt.distributed import gather_objects

        per_rank = gather_objects(rows)
        rows = [SmokeRow(f"[rank {r}] {row.check}", row.value, row.ok) for r, rr in enumerate(per_rank) for row in rr]
    return rows


def smoke_command(nproc: int, device: str, models: str, patch: int | None, batch: int | None) -> list[str] | None:
    """The ``python -m smt`` arguments each torchrun process runs for ``--nproc`` > 1 (None: run here)."""
    if nproc < 1:
        raise ValueError(f"smoke: --nproc must be >= 1, got {nproc}")
    if nproc == 1:
        return None
    if device == "cuda" and torch.cuda.device_count() < nproc:
        raise RuntimeError(f"smoke: --nproc {nproc} needs {nproc} GPUs, this machine sees "
                           f"{torch.cuda.device_count()}")
    args = ["smoke", "--device", device, "--models", models]
    for flag, value in (("--patch", patch), ("--batch", batch)):
        if value is not None:
            args += [flag, str(value)]
    return args


def launch_smoke(nproc: int, device: str, models: str, patch: int | None, batch: int | None) -> bool:
    """Run the smoke check in ``nproc`` processes under torchrun (rank 0 prints); True when every check passed."""
    import subprocess

    from smt.distributed import torchrun

    args = smoke_command(nproc, device, models, patch, batch)
    if args is None:
        raise ValueError("launch_smoke: one process runs in place (run_smoke)")
    try:
        torchrun(nproc, ["smoke", *args[1:]])
    except subprocess.CalledProcessError:
        return False
    return True


def format_rows(rows: list[SmokeRow]) -> str:
    width = max(len(r.check) for r in rows)
    lines = [f"{'ok  ' if r.ok else 'FAIL'} {r.check:<{width}}  {r.value}" for r in rows]
    lines.append("SMOKE OK" if all(r.ok for r in rows) else "SMOKE FAILED")
    return "\n".join(lines)
