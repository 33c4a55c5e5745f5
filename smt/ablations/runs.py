"""The runs behind the ablation notebooks; each returns a tidy table (one row per run) for :mod:`stats`.

- :func:`loss_ablation`: one training stage from scratch per (loss variant, seed), same steps and data.
- :func:`subset_ablation`: the fine-tuning stage on the CLIP-selected images vs random images of the same
  count, per seed, from the model the pipeline fed that stage.
- :func:`ensemble_ablation`: every inference switch (self-ensemble, each multi-window size, all sizes, fusion)
  alone and together on the validation images, with its forward work and time.
- :func:`fusion_curves`: mean and per-image PSNR-Y against the fusion weight, validation and test.

Every training run uses the training engine unchanged (so a killed notebook resumes its runs) with the
validation on whole images (``val_max_side = 0``), and is launched as the pipeline launches a training stage:
in-process, or under ``torchrun`` with ``train.nproc`` processes per node (``train.nnodes`` nodes), each taking
its share of the stage's global batch in ``train.micro_batch`` micro-batches; so a full-profile ablation has
the memory needs of the training stage it copies, not its whole global batch on one GPU.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch

from smt.config import AblationConfig, DataConfig, InferConfig, TrainConfig
from smt.data.images import float255_to_uint8, image_to_tensor, read_image, tensor_to_float255
from smt.data.manifest import read_manifest
from smt.distributed import device_for, torchrun
from smt.metrics import NTIRE2025, evaluate_pair
from smt.train.engine import StageResult, run_dir, train_stage

__all__ = ["loss_ablation", "subset_ablation", "random_subset", "ensemble_ablation", "fusion_curves"]


def _one_stage_cfg(cfg: TrainConfig, model: str, stage: str, out_root: Path, seed: int, iters: int,
                   init: str = "", subset: str | None = None, **overrides) -> TrainConfig:
    """A TrainConfig that runs only ``stage`` of ``model`` for ``iters`` steps (milestones scaled)."""
    spec = cfg.stages[stage]
    scale = iters / spec.iters
    spec = dataclasses.replace(spec, iters=iters, milestones=tuple(max(1, round(m * scale)) for m in spec.milestones),
                               subset=spec.subset if subset is None else subset)
    mspec = dataclasses.replace(cfg.models[model], pretrained=init)
    return dataclasses.replace(cfg, models={model: mspec}, stages={stage: spec}, stage_order=(stage,), rounds=1,
                               seed=seed, out_root=str(out_root), val_every=iters, ckpt_every=max(1, iters // 4),
                               val_max_side=0, **overrides)


def _quiet_train(*args, **kwargs):
    """train_stage without its progress bars: in a notebook they would bury the report under stderr lines."""
    with contextlib.redirect_stderr(io.StringIO()):
        return train_stage(*args, **kwargs)


def _train(run_cfg: TrainConfig, model: str, stage: str, data: DataConfig, log: Callable[[str], None],
           ) -> StageResult:
    """One ablation run (round 1 of ``run_cfg``'s single stage), launched like a pipeline training stage: in this
    process when ``train.nproc`` and ``train.nnodes`` are 1, else under torchrun with a params file written beside
    the run (``<out_root>/params.yaml``: this run's ``data`` and ``train`` sections)."""
    if run_cfg.nproc == 1 and run_cfg.nnodes == 1:
        return _quiet_train(run_cfg, model, 1, stage, data.root, data.scale, log=log, store=data.store)
    import yaml

    from smt.config import as_dict

    params = Path(run_cfg.out_root) / "params.yaml"
    params.parent.mkdir(parents=True, exist_ok=True)
    sections = json.loads(json.dumps({"data": as_dict(data), "train": as_dict(run_cfg)}))  # tuples -> lists
    params.write_text(yaml.safe_dump(sections, sort_keys=False))
    log(f"ablation run {run_cfg.out_root}: {run_cfg.nproc} process(es) per node x {run_cfg.nnodes} node(s)")
    torchrun(run_cfg.nproc, ["train", "--params", str(params), "--model", model, "--round", "1", "--stage", stage],
             run_cfg.nnodes)
    out = run_dir(run_cfg, model, 1, stage)
    metrics = json.loads((out / "metrics.json").read_text())
    return StageResult(model, run_cfg.run_name(1, stage), int(metrics["steps"]),
                       float(metrics.get("train_seconds", math.nan)), float(metrics["val_psnr_y"]),
                       float(metrics["bicubic_psnr_y"]), str(out))


def loss_ablation(ab: AblationConfig, cfg: TrainConfig, data: DataConfig, log: Callable[[str], None] = print,
                  ) -> pd.DataFrame:
    rows = []
    for name, variant in ab.loss_variants.items():
        for seed in ab.seeds:
            run_cfg = _one_stage_cfg(cfg, ab.model, ab.loss_stage, Path(ab.out_root) / "loss" / f"{name}-seed{seed}",
                                     seed, ab.loss_iters, aux_scales=variant.aux_scales,
                                     aux_weights=variant.aux_weights)
            r = _train(run_cfg, ab.model, ab.loss_stage, data, log)
            rows.append({"variant": name, "seed": seed, "aux_scales": list(variant.aux_scales),
                         "aux_weights": list(variant.aux_weights), "steps": r.steps, "train_seconds": r.seconds,
                         "psnr_y": r.val_psnr_y, "bicubic_psnr_y": r.bicubic_psnr_y})
            log(f"loss ablation {name} seed {seed}: {r.val_psnr_y:.3f} dB in {r.seconds:.0f} s")
    return pd.DataFrame(rows)


def random_subset(data_root: str, pool_split: str, count: int, seed: int, exclude_source: bool = False,
                  ) -> pd.DataFrame:
    """``count`` training images drawn uniformly without replacement (the selection file's format)."""
    pool = read_manifest(data_root, pool_split)
    if count > len(pool):
        raise ValueError(f"random subset of {count} from a pool of {len(pool)}")
    pick = np.random.default_rng(seed).choice(len(pool), size=count, replace=False)
    chosen = pool.iloc[np.sort(pick)]
    return pd.DataFrame({"id": chosen["id"].to_numpy(), "source": chosen["source"].to_numpy(),
                         "score": np.nan, "rank": np.arange(1, count + 1), "features": "random"})


def subset_ablation(ab: AblationConfig, cfg: TrainConfig, data: DataConfig, selection_csv: str | Path,
                    pool_split: str = "train", log: Callable[[str], None] = print) -> pd.DataFrame:
    stage = ab.subset_stage
    order = cfg.schedule()
    if (1, stage) not in order:
        raise ValueError(f"ablations.subset_stage {stage!r} is not a stage of train.stage_order")
    prev = cfg.previous(1, stage)
    init = run_dir(cfg, ab.model, *prev) / "model.safetensors" if prev else None
    if init is None or not init.exists():
        raise FileNotFoundError(f"{init}: the subset ablation starts from the model the pipeline fed stage "
                                f"{stage}; run the pipeline first (dvc repro)")
    clip = pd.read_csv(selection_csv, dtype={"id": str})
    iters = ab.subset_iters or cfg.stages[stage].iters
    out = Path(ab.out_root) / "subset"
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for seed in ab.seeds:
        rnd = out / f"random-seed{seed}.csv"
        random_subset(data.root, pool_split, len(clip), seed).to_csv(rnd, index=False)
        for name, subset in (("clip", str(selection_csv)), ("random", str(rnd))):
            run_cfg = _one_stage_cfg(cfg, ab.model, stage, out / f"{name}-seed{seed}", seed, iters,
                                     init=str(init), subset=subset)
            r = _train(run_cfg, ab.model, stage, data, log)
            ids = pd.read_csv(subset, dtype={"id": str})["id"].tolist()
            rows.append({"variant": name, "seed": seed, "images": " ".join(ids), "steps": r.steps,
                         "train_seconds": r.seconds, "psnr_y": r.val_psnr_y, "bicubic_psnr_y": r.bicubic_psnr_y})
            log(f"subset ablation {name} seed {seed}: {r.val_psnr_y:.3f} dB")
    return pd.DataFrame(rows)


class _Counted:
    """Wraps a model and counts its forward work in LR pixels (FLOPs are proportional to it for these nets)."""

    def __init__(self, net: torch.nn.Module) -> None:
        self.net, self.pixels = net, 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.pixels += x.shape[0] * x.shape[-2] * x.shape[-1]
        return self.net(x)


def ensemble_ablation(infer: InferConfig, cfg: TrainConfig, data: DataConfig, log: Callable[[str], None] = print,
                      results_dir: str | Path = "results") -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per configuration: mean validation PSNR-Y, forward work (LR pixels per image, relative to one plain
    forward of one model) and seconds per image. Returns (summary, per-image table)."""
    from smt.infer.fusion import fuse
    from smt.infer.runner import image_seed, model_outputs
    from smt.models import load_model
    from smt.train.engine import exported_weights

    if len(infer.models) != 2:
        raise ValueError("the ensemble ablation needs two models in infer.models (for the fusion)")
    a_name, b_name = infer.models
    last = cfg.schedule()[-1]
    device = device_for(infer.device)  # the inference stage's device
    nets = {}
    for m in infer.models:
        nets[m] = _Counted(load_model(exported_weights(cfg, m, *last), cfg.models[m].preset, device,
                                      routing=infer.routing))
    mw_model = infer.multi_window_model or b_name

    def variants(m: str) -> list[tuple[InferConfig, dict[str, str]]]:
        """Every ensemble switch alone and together, as infer settings for :func:`model_outputs` (the one
        definition of "+SE" and "+MW"), with the renaming of its methods: (settings, {method: config name})."""
        se = dataclasses.replace(infer, self_ensemble=True, multi_window_model=m if m == mw_model else "")
        out = [(se, {})]
        if m == mw_model:
            for t in infer.window_tiles:  # each window size alone
                one = dataclasses.replace(infer, self_ensemble=False, multi_window_model=m, window_tiles=(t,),
                                          window_weights=(1.0,))
                out.append((one, {f"{m}+MW": f"{m}+MW[{t}]"}))
            out.append((dataclasses.replace(infer, self_ensemble=False, multi_window_model=m), {}))
        return out

    def order(m: str) -> list[str]:  # the table order: plain, +SE, each window, +MW, +SE+MW
        if m != mw_model:
            return [m, f"{m}+SE"]
        return [m, f"{m}+SE", *(f"{m}+MW[{t}]" for t in infer.window_tiles), f"{m}+MW", f"{m}+SE+MW"]

    rows = []
    manifest = read_manifest(data.root, "valid")
    for row in manifest.itertuples():
        lr, hr = read_image(Path(data.root) / row.lr_path), read_image(Path(data.root) / row.hr_path)
        x = image_to_tensor(lr, device)
        plain_pixels = lr.shape[0] * lr.shape[1]
        floats: dict[str, tuple[np.ndarray, int, float]] = {}
        for m in infer.models:
            measured: dict[str, tuple[torch.Tensor, int, float]] = {}

            def timed(name: str, fn: Callable[[], torch.Tensor], m: str = m) -> torch.Tensor:
                if name in measured:  # a configuration shared by two settings (the plain model) runs once
                    return measured[name][0]
                nets[m].pixels = 0
                t = time.perf_counter()
                y = fn()
                if device.type == "cuda":  # kernels run asynchronously: wait for them before reading the clock
                    torch.cuda.synchronize(device)
                measured[name] = (y, nets[m].pixels, time.perf_counter() - t)
                return y

            for settings, rename in variants(m):
                with torch.no_grad():
                    outputs = model_outputs(nets[m], x, m, settings, data.scale, image_seed(infer, int(row.id)),
                                            lambda name, fn: timed(name, fn))
                for name in outputs:
                    measured[rename.get(name, name)] = measured.pop(name) if name in rename else measured[name]
            for name in order(m):
                y, px, sec = measured[name]
                floats[name] = (tensor_to_float255(y), px, sec)
        per_model = {m: order(m) for m in infer.models}
        for name, (arr, px, sec) in floats.items():
            rows.append({"config": name, "id": row.id, "psnr_y": evaluate_pair(float255_to_uint8(arr), hr, NTIRE2025)
                         ["psnr_y"], "work": px / plain_pixels, "seconds": sec})
        # fusion of every HAT configuration with every MambaIRv2 configuration, at the weight of the infer stage
        weight = _fusion_weight(infer, results_dir)
        for a in per_model[a_name]:
            for b in per_model[b_name]:
                (fa, pa, sa), (fb, pb, sb) = floats[a], floats[b]
                rows.append({"config": f"fused({a} | {b})", "id": row.id,
                             "psnr_y": evaluate_pair(fuse(fa, fb, weight), hr, NTIRE2025)["psnr_y"],
                             "work": (pa + pb) / plain_pixels, "seconds": sa + sb})
        log(f"ensemble ablation: image {row.id} done")
    per_image = pd.DataFrame(rows)
    summary = per_image.groupby("config", sort=False).agg(psnr_y=("psnr_y", "mean"), work=("work", "mean"),
                                                          seconds=("seconds", "mean")).reset_index()
    return summary, per_image


def _fusion_weight(infer: InferConfig, results_dir: str | Path = "results") -> float:
    import json

    path = Path(results_dir) / "fusion.json"
    return json.loads(path.read_text())["weight_a"] if path.exists() else 0.5


def fusion_curves(infer: InferConfig, data: DataConfig, results_dir: str | Path = "results") -> pd.DataFrame:
    """PSNR-Y of ``w * a + (1 - w) * b`` for w on the infer grid, per image, from the infer stage's outputs of each
    model's most complete configuration (rounded PNGs: within 0.5/255 of the floats the stage fused)."""
    from smt.data.manifest import has_hr
    from smt.infer.fusion import fuse
    from smt.infer.runner import METHOD_ORDER

    a_name, b_name = infer.models
    best = {m: [k for k in METHOD_ORDER(infer) if k.startswith(m) and k != "fused"][-1] for m in (a_name, b_name)}
    grid = np.linspace(0.0, 1.0, infer.fusion_grid)
    rows = []
    for split in ("valid", "test"):
        manifest = read_manifest(data.root, split)
        if not has_hr(manifest):
            continue
        for r in manifest.itertuples():
            hr = read_image(Path(data.root) / r.hr_path)
            a = read_image(Path(results_dir) / split / best[a_name] / f"{r.id}x{data.scale}.png").astype(np.float64)
            b = read_image(Path(results_dir) / split / best[b_name] / f"{r.id}x{data.scale}.png").astype(np.float64)
            for w in grid:
                rows.append({"split": split, "id": r.id, "weight": w,
                             "psnr_y": evaluate_pair(fuse(a, b, w), hr, NTIRE2025)["psnr_y"]})
    return pd.DataFrame(rows)
