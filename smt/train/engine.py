"""The training loop for one (model, round, stage): progressive schedule, multi-scale loss, EMA, resumable,
single-process or DistributedDataParallel under ``torchrun`` (gloo on CPU, NCCL on GPU), same code.

``train_stage`` writes into ``<out_root>/<model>/<run>/``:
  ``state.pt`` (resumable state, atomic), ``model.safetensors`` (EMA weights), ``train_log.csv`` (step, loss,
  per-scale losses, lr), ``val_log.csv`` (step, PSNR-Y of the EMA model and of bicubic on the validation
  images), ``metrics.json`` (final validation figures).
A stage starts from the previous stage's ``model.safetensors`` (or the configured pretrained checkpoint for
the first stage; auxiliary heads start fresh, and the log says so). A non-finite loss stops the run with a
clear error; the last good state stays on disk.
"""
from __future__ import annotations

import csv
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from smt.data.dataset_builder import read_manifest
from smt.distributed import barrier, device_for, dist_info, init_process_group
from smt.data.images import image_to_tensor, read_image, tensor_to_image
from smt.evaluate import bicubic_upscale
from smt.metrics import NTIRE2025, evaluate_pair
from smt.models import build_model, load_weights
from smt.models.presets import preset
from smt.train.checkpoint import EMA, atomic_save, rng_state, save_safetensors, set_rng_state
from smt.train.config import TrainConfig
from smt.train.data import GlobalBatchSampler, PairedPatchDataset, collate, read_subset
from smt.train.losses import multiscale_loss

__all__ = ["TrainingError", "StageResult", "train_stage", "run_dir", "tensor_to_uint8"]


class TrainingError(RuntimeError):
    """Training cannot continue (non-finite loss, missing input checkpoint, ...)."""


@dataclass
class StageResult:
    model: str
    run: str
    steps: int
    seconds: float
    val_psnr_y: float
    bicubic_psnr_y: float
    out_dir: str


def run_dir(cfg: TrainConfig, model: str, round_: int, stage: str) -> Path:
    return Path(cfg.out_root) / model / cfg.run_name(round_, stage)


def tensor_to_uint8(x: torch.Tensor):
    """(3, H, W) float in [0, 1] -> uint8 HxWx3 by the pipeline's one rule (:func:`smt.data.images.tensor_to_image`)."""
    return tensor_to_image(x)


def _device(cfg: TrainConfig) -> torch.device:
    try:
        return device_for(cfg.device)
    except RuntimeError as exc:
        raise TrainingError(f"train.device: {exc}") from None


def _lr_at(stage_lr: float, milestones: tuple[int, ...], gamma: float, step: int) -> float:
    return stage_lr * gamma ** sum(step >= m for m in milestones)


@torch.no_grad()
def validate(model: torch.nn.Module, root: str, scale: int, device: torch.device, max_side: int = 0) -> dict:
    """Mean PSNR-Y (NTIRE2025 protocol) of ``model`` and of bicubic on the validation split.

    Runs on a forked RNG seeded with 0: a model that draws random numbers in eval mode (MambaIRv2's Gumbel
    routing) gets the same noise at every validation, and training's random stream does not depend on how often
    it validates (``train.val_every`` is an execution setting)."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(0)
        return _validate(model, root, scale, device, max_side)


def _validate(model: torch.nn.Module, root: str, scale: int, device: torch.device, max_side: int) -> dict:
    model.eval()
    ours, bic = [], []
    for row in read_manifest(root, "valid").itertuples():
        lr, hr = read_image(Path(root) / row.lr_path), read_image(Path(root) / row.hr_path)
        if max_side and max(lr.shape[:2]) > max_side:
            h, w = min(lr.shape[0], max_side), min(lr.shape[1], max_side)
            t, l = (lr.shape[0] - h) // 2, (lr.shape[1] - w) // 2
            lr, hr = lr[t:t + h, l:l + w], hr[scale * t:scale * (t + h), scale * l:scale * (l + w)]
        sr = tensor_to_image(model(image_to_tensor(lr, device)))
        ours.append(evaluate_pair(sr, hr, NTIRE2025)["psnr_y"])
        bic.append(evaluate_pair(bicubic_upscale(lr, scale), hr, NTIRE2025)["psnr_y"])
    return {"psnr_y": sum(ours) / len(ours), "bicubic_psnr_y": sum(bic) / len(bic)}


def _append_csv(path: Path, row: dict) -> None:
    new = not path.exists()
    with open(path, "a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)


def _truncate_log(path: Path, step: int) -> None:
    """Drop log rows after ``step`` (a resumed run rewrites them)."""
    if not path.exists():
        return
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    keep = [r for r in rows if int(r["step"]) <= step]
    if not keep:  # a fresh start: the next append writes the header
        path.unlink()
        return
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(keep[0]))
        writer.writeheader()
        writer.writerows(keep)


def train_stage(cfg: TrainConfig, model_name: str, round_: int, stage: str, data_root: str, scale: int,
                max_steps: int | None = None, log=print) -> StageResult:
    """Train one stage (resuming from ``state.pt`` when present and matching). ``max_steps`` stops early
    (for tests of kill-and-resume); the state is saved at that point."""
    rank, world = dist_info()
    device = _device(cfg)
    init_process_group(device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    spec, mspec = cfg.stages[stage], cfg.models[model_name]
    out = run_dir(cfg, model_name, round_, stage)
    arch, kwargs = preset(mspec.preset)
    kwargs = {**kwargs, "aux_scales": tuple(cfg.aux_scales)}
    # what must match for a saved state to be resumed (JSON-normalised: tuples become lists)
    fingerprint = json.loads(json.dumps({
        "arch": arch, "kwargs": kwargs, "stage": asdict(spec), "seed": cfg.seed, "world": world,
        "ema_decay": cfg.ema_decay, "ema_warmup": cfg.ema_warmup, "betas": cfg.betas, "grad_clip": cfg.grad_clip,
        "aux_weights": cfg.aux_weights, "augment": asdict(cfg.augment), "data_root": data_root}))

    torch.manual_seed(cfg.seed + 1000 * round_ + rank)
    model = build_model(mspec.preset, aux_scales=tuple(cfg.aux_scales)).to(device)
    state_path = out / "state.pt"
    state = None
    if state_path.exists():
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        if state.get("fingerprint") != fingerprint:
            log(f"{state_path}: config changed since it was written; starting this stage afresh")
            state = None
    if state is None:
        prev = cfg.previous(round_, stage)
        init = run_dir(cfg, model_name, *prev) / "model.safetensors" if prev else (
            Path(mspec.pretrained) if mspec.pretrained else None)
        if init is not None:
            if not init.exists():
                raise TrainingError(f"{init}: the checkpoint this stage starts from does not exist "
                                    f"(run the previous stage first)")
            report = load_weights(model, init, allow_missing=("aux_heads.",))
            log(report.describe())
        else:
            log(f"{model_name}: training from scratch")
    ema = EMA(model, cfg.ema_decay, cfg.ema_warmup)
    optimizer = torch.optim.Adam(model.parameters(), lr=spec.lr, betas=tuple(cfg.betas))
    step, seconds_before = 0, 0.0
    if state is not None:
        model.load_state_dict(state["model"])
        ema.model.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        step, seconds_before = state["step"], float(state.get("train_seconds", 0.0))
        log(f"resuming {model_name} {cfg.run_name(round_, stage)} at step {step}")
    train_model = _MultiScale(model)
    if world > 1:
        train_model = DistributedDataParallel(train_model)

    subset = read_subset(spec.subset) if spec.subset else None
    dataset = PairedPatchDataset(data_root, "train", spec.patch_size, scale, subset)
    sampler = GlobalBatchSampler(dataset.sizes(), spec.patch_size, spec.batch_size, cfg.seed + 7919 * round_,
                                 rank, world, augment=cfg.augment, start_step=step)
    loader = iter(DataLoader(dataset, batch_sampler=sampler, num_workers=cfg.num_workers, collate_fn=collate))
    if state is not None:  # after the loader: creating its iterator draws from the global generator
        set_rng_state(state["rng"])
    weights = {model.upscale: 1.0, **dict(zip(cfg.aux_scales, cfg.aux_weights))}
    out.mkdir(parents=True, exist_ok=True)
    train_log, val_log = out / "train_log.csv", out / "val_log.csv"
    if rank == 0:
        _truncate_log(train_log, step)
        _truncate_log(val_log, step)

    def save() -> None:
        if rank != 0:
            return
        atomic_save({"fingerprint": fingerprint, "arch": arch, "model_args": kwargs, "step": step,
                     "train_seconds": seconds_before + time.perf_counter() - start,
                     "model": model.state_dict(), "ema": ema.model.state_dict(),
                     "optimizer": optimizer.state_dict(), "rng": rng_state()}, state_path)

    def run_validation() -> dict:
        v = validate(ema.model, data_root, scale, device, cfg.val_max_side)
        _append_csv(val_log, {"step": step, "psnr_y": round(v["psnr_y"], 4),
                              "bicubic_psnr_y": round(v["bicubic_psnr_y"], 4)})
        return v

    use_bf16 = cfg.bf16 and device.type == "cuda"
    last = min(spec.iters, max_steps) if max_steps is not None else spec.iters
    start = time.perf_counter()
    bar = tqdm(total=spec.iters, initial=step, desc=f"{model_name} {cfg.run_name(round_, stage)}",
               disable=rank != 0, mininterval=5)
    model.train()
    while step < last:
        lr, hr = (t.to(device, non_blocking=True) for t in next(loader))
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(spec.lr, spec.milestones, spec.gamma, step)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            outputs = train_model(lr)
        loss, parts = multiscale_loss(outputs, hr, model.upscale, weights, spec.loss)
        if not torch.isfinite(loss):
            raise TrainingError(f"{model_name} {cfg.run_name(round_, stage)}: loss is {loss.item()} at step "
                                f"{step + 1}; stopped. The last good state is {state_path} (step of last save)")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        ema.update(model, step)
        step += 1
        bar.update(1)
        if rank == 0 and (step % cfg.log_every == 0 or step == spec.iters):
            _append_csv(train_log, {"step": step, "loss": round(loss.item(), 6),
                                    **{f"loss_x{s}": round(v, 6) for s, v in sorted(parts.items())},
                                    "lr": optimizer.param_groups[0]["lr"]})
        if rank == 0 and step % cfg.val_every == 0 and step < spec.iters:
            run_validation()
            model.train()
        if step % cfg.ckpt_every == 0 or step == last:
            save()
    bar.close()
    seconds = seconds_before + time.perf_counter() - start  # over all sessions of this stage
    v = {"psnr_y": math.nan, "bicubic_psnr_y": math.nan}
    if rank == 0 and step == spec.iters:
        v = run_validation()
        meta = {"arch": arch, "model_args": json.dumps(kwargs), "step": str(step), "run": out.as_posix()}
        save_safetensors(ema.model.state_dict(), out / "model.safetensors", meta)
        (out / "metrics.json").write_text(json.dumps(
            {"val_psnr_y": v["psnr_y"], "bicubic_psnr_y": v["bicubic_psnr_y"], "steps": step,
             "train_seconds": seconds}, indent=2) + "\n")
    barrier()
    return StageResult(model_name, cfg.run_name(round_, stage), step, seconds, v["psnr_y"], v["bicubic_psnr_y"],
                       str(out))


class _MultiScale(torch.nn.Module):
    """Routes ``forward`` to ``forward_multiscale`` (DDP's gradient hooks run through ``forward``)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> dict:
        return self.model.forward_multiscale(x)
