"""What a training DVC stage does: run one (model, round, stage) in-process or under ``torchrun``, then make
its report (loss curves, validation PSNR against bicubic, visual crops)."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from smt.config import DataConfig, TrainConfig, load_section
from smt.data.images import image_to_tensor, read_image, tensor_to_image
from smt.data.manifest import read_manifest
from smt.distributed import device_for, torchrun
from smt.evaluate import bicubic_upscale
from smt.files import atomic_path
from smt.figures import pyplot, save_crop_grid, save_figure
from smt.models import load_model
from smt.train.engine import exported_weights, run_dir, train_stage

__all__ = ["run_training_stage", "stage_report", "StageReport"]


def run_training_stage(params_path: str, model: str, round_: int, stage: str,
                       timings_path: str | Path | None = None) -> dict:
    """Train (model, round, stage) in-process, or under torchrun when ``train.nproc``/``nnodes`` > 1 (several
    nodes: launched from here on all of them, :func:`smt.distributed.torchrun`; DVC runs once). Returns the
    run's ``metrics.json`` (validation PSNR-Y, steps). Wall-clock seconds are a measurement of this run, not a
    result: they are kept out of the run folder (a DVC output) and written to ``timings_path`` when given, with
    (in-process runs) this session's ``step_seconds`` and, on CUDA, ``peak_mb`` (see ``StageResult``)."""
    data_cfg: DataConfig = load_section("data", params_path)
    cfg: TrainConfig = load_section("train", params_path)
    if model not in cfg.models:
        raise KeyError(f"unknown model {model!r} (train.models has: {', '.join(cfg.models)})")
    session = {}
    if cfg.nproc == 1 and cfg.nnodes == 1:
        result = train_stage(cfg, model, round_, stage, data_cfg.root, data_cfg.scale, store=data_cfg.store)
        # this session's step time and peak GPU memory (JSON has no NaN: left out where not measured)
        session = {k: getattr(result, k) for k in ("step_seconds", "peak_mb") if math.isfinite(getattr(result, k))}
    else:
        torchrun(cfg.nproc, ["train", "--params", params_path, "--model", model, "--round", str(round_),
                             "--stage", stage], cfg.nnodes)
    path = run_dir(cfg, model, round_, stage) / "metrics.json"
    if not path.exists():
        raise FileNotFoundError(
            f"{path}: the training job ended without it here. Rank 0 writes it on its node: with "
            f"train.nnodes > 1, {cfg.out_root}/ must be on storage shared by every node (docs/cluster.md)")
    # this process (the one DVC runs, once per stage) is the only one that rewrites the file
    metrics = json.loads(path.read_text())
    if "train_seconds" in metrics:  # the engine writes it beside the results; move it out
        seconds = metrics.pop("train_seconds")
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(metrics, indent=2) + "\n")
        if timings_path is not None:
            Path(timings_path).parent.mkdir(parents=True, exist_ok=True)
            Path(timings_path).write_text(json.dumps({"train_seconds": seconds, **session}, indent=2) + "\n")
    return metrics


@dataclass
class StageReport:
    summary: str
    curves_png: Path
    crops_png: Path


def stage_report(cfg: TrainConfig, data_cfg: DataConfig, model: str, round_: int, stage: str,
                 out_dir: str | Path, num_crops: int = 2, crop_size: int = 96) -> StageReport:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    run = run_dir(cfg, model, round_, stage)
    train_log, val_log = pd.read_csv(run / "train_log.csv"), pd.read_csv(run / "val_log.csv")
    fig, (ax1, ax2) = pyplot().subplots(1, 2, figsize=(9, 3.2))
    for col in [c for c in train_log.columns if c.startswith("loss")]:
        ax1.plot(train_log["step"], train_log[col], label=col, lw=1)
    ax1.set_yscale("log"), ax1.set_xlabel("step"), ax1.legend(fontsize=7), ax1.set_title("training loss")
    ax2.plot(val_log["step"], val_log["psnr_y"], "o-", label=f"{model} (EMA)")
    ax2.plot(val_log["step"], val_log["bicubic_psnr_y"], "--", label="bicubic")
    ax2.set_xlabel("step"), ax2.set_ylabel("PSNR-Y (dB)"), ax2.legend(fontsize=7), ax2.set_title("validation")
    fig.tight_layout()
    curves = save_figure(fig, out_dir / "curves.png")

    device = device_for(cfg.device)  # the L models on full validation images: the training stage's device
    net = load_model(exported_weights(cfg, model, round_, stage), cfg.models[model].preset, device, routing="argmax")
    rows = []
    for row in read_manifest(data_cfg.root, "valid").head(num_crops).itertuples():
        lr, hr = read_image(Path(data_cfg.root) / row.lr_path), read_image(Path(data_cfg.root) / row.hr_path)
        with torch.no_grad():
            sr = tensor_to_image(net(image_to_tensor(lr, device)))
        rows.append((row.id, {"HR": hr, "bicubic": bicubic_upscale(lr, data_cfg.scale), model: sr}))
    crops = out_dir / "crops.png"
    save_crop_grid(crops, rows, crop_size)
    last = val_log.iloc[-1]
    gain = last["psnr_y"] - last["bicubic_psnr_y"]
    summary = (f"After {int(last['step'])} steps: validation PSNR-Y **{last['psnr_y']:.3f} dB** (EMA weights) vs "
               f"bicubic {last['bicubic_psnr_y']:.3f} dB: **{gain:+.3f} dB** (NTIRE2025 protocol, "
               f"{len(read_manifest(data_cfg.root, 'valid'))} validation images"
               + (f", centre crops of at most {cfg.val_max_side} LR px" if cfg.val_max_side else "") + ").")
    return StageReport(summary, curves, crops)
