"""The ``infer`` stage: every configuration of the ensemble on the validation and test images.

For each split it writes ``results/<split>/<method>/<id>x<scale>.png`` (rounded uint8, the challenge naming)
for the methods ``<model>`` (plain), ``<model>+SE`` (x8 self-ensemble), ``<mw model>+SE+MW`` (multi-window)
and ``fused`` (the best of each model, mixed with the weight fit on the validation images), plus
``results/timings.json`` (seconds per image and peak memory per method) and ``results/fusion.json``
(weight, PSNR-Y curve over the weight on validation and test). Byte-identical on rerun: argmax routing, or
Gumbel routing seeded per image.
"""
from __future__ import annotations

import json
import resource
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from smt.config import DataConfig, InferConfig
from smt.data.dataset_builder import read_manifest
from smt.data.images import read_image, write_png
from smt.infer.ensemble import multi_window, self_ensemble
from smt.infer.fusion import fit_fusion_weight, fuse
from smt.infer.tiling import tiled_forward
from smt.train.config import TrainConfig
from smt.train.runner import load_trained

__all__ = ["run_inference", "METHOD_ORDER"]


def _peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _to_tensor(img: np.ndarray, device) -> torch.Tensor:
    return torch.from_numpy(img).permute(2, 0, 1)[None].float().div(255).to(device)


def _to_float255(y: torch.Tensor) -> np.ndarray:
    return (y[0].clamp(0, 1) * 255).permute(1, 2, 0).double().cpu().numpy()


def METHOD_ORDER(cfg: InferConfig) -> list[str]:  # noqa: N802 - reads like a constant at call sites
    names = []
    for m in cfg.models:
        names.append(m)
        if cfg.self_ensemble:
            names.append(f"{m}+SE")
        if m == cfg.multi_window_model:
            names.append(f"{m}{'+SE' if cfg.self_ensemble else ''}+MW")
    if len(cfg.models) == 2:
        names.append("fused")
    return names


def run_inference(infer_cfg: InferConfig, train_cfg: TrainConfig, data_cfg: DataConfig,
                  results_dir: str | Path = "results", log=print) -> dict:
    device = torch.device("cuda" if infer_cfg.device == "cuda" or (infer_cfg.device == "auto" and
                                                                    torch.cuda.is_available()) else "cpu")
    results_dir = Path(results_dir)
    last_round, last_stage = train_cfg.schedule()[-1]
    nets = {}
    for m in infer_cfg.models:
        if m not in train_cfg.models:
            raise KeyError(f"infer.models: {m!r} is not in train.models ({', '.join(train_cfg.models)})")
        extra = {"routing": infer_cfg.routing} if "mamba" in train_cfg.models[m].preset else {}
        nets[m] = load_trained(train_cfg, m, last_round, last_stage, str(device), **extra)
    scale = data_cfg.scale
    timings: dict[str, dict] = {}
    float_out: dict[tuple[str, str], dict[str, np.ndarray]] = {}  # (split, model) -> id -> best float output

    def timed(method: str, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        t = time.perf_counter()
        y = fn()
        entry = timings.setdefault(method, {"seconds": 0.0, "images": 0, "peak_mb": 0.0})
        entry["seconds"] += time.perf_counter() - t
        entry["images"] += 1
        entry["peak_mb"] = max(entry["peak_mb"], _peak_mb(device))
        return y

    splits = {s: read_manifest(data_cfg.root, s) for s in ("valid", "test")}
    for split, manifest in splits.items():
        for row in tqdm(manifest.itertuples(), total=len(manifest), desc=f"infer {split}", unit="img"):
            lr = read_image(Path(data_cfg.root) / row.lr_path)
            x = _to_tensor(lr, device)
            for m, net in nets.items():
                seed = infer_cfg.seed * 100_003 + int(row.id)

                def fwd(t: torch.Tensor, net=net) -> torch.Tensor:
                    return net(t)

                def plain(fwd=fwd) -> torch.Tensor:
                    torch.manual_seed(seed)
                    return tiled_forward(fwd, x, scale, infer_cfg.tile, infer_cfg.tile_overlap, infer_cfg.tile_batch)

                outputs = {m: timed(m, plain)}
                if infer_cfg.self_ensemble:
                    def se(fwd=fwd) -> torch.Tensor:
                        torch.manual_seed(seed)
                        return tiled_forward(lambda t: self_ensemble(fwd, t), x, scale, infer_cfg.tile,
                                             infer_cfg.tile_overlap, infer_cfg.tile_batch)
                    outputs[f"{m}+SE"] = timed(f"{m}+SE", se)
                if m == infer_cfg.multi_window_model:
                    def mw(fwd=fwd) -> torch.Tensor:
                        torch.manual_seed(seed)
                        per_tile = (lambda f, t: self_ensemble(f, t)) if infer_cfg.self_ensemble else None
                        return multi_window(fwd, x, scale, infer_cfg.window_tiles, infer_cfg.window_weights,
                                            infer_cfg.tile_overlap, infer_cfg.tile_batch, per_tile)[0]
                    outputs[f"{m}{'+SE' if infer_cfg.self_ensemble else ''}+MW"] = timed("mw", mw)
                for method, y in outputs.items():
                    arr = _to_float255(y)
                    write_png(results_dir / split / method / f"{row.id}x{scale}.png", fuse(arr, arr, 1.0))
                # the most complete configuration of each model feeds the fusion
                float_out.setdefault((split, m), {})[row.id] = _to_float255(list(outputs.values())[-1])
    if "mw" in timings:
        timings[[k for k in METHOD_ORDER(infer_cfg) if k.endswith("+MW")][0]] = timings.pop("mw")

    fusion = {}
    if len(nets) == 2:
        a_name, b_name = infer_cfg.models
        curves = {}
        for split, manifest in splits.items():
            hrs = {r.id: read_image(Path(data_cfg.root) / r.hr_path) for r in manifest.itertuples()}
            pairs = [(float_out[(split, a_name)][i], float_out[(split, b_name)][i], hrs[i]) for i in hrs]
            curves[split] = fit_fusion_weight(pairs, infer_cfg.fusion_grid) if pairs else None
        fit = curves["valid"]
        log(f"fusion weight of {a_name}: {fit.weight:.2f} (validation PSNR-Y {fit.psnr_y:.3f} dB; "
            f"least-squares weight {fit.least_squares_weight:.3f})")
        for split, manifest in splits.items():
            for r in manifest.itertuples():
                t = time.perf_counter()
                fused = fuse(float_out[(split, a_name)][r.id], float_out[(split, b_name)][r.id], fit.weight)
                write_png(results_dir / split / "fused" / f"{r.id}x{scale}.png", fused)
                e = timings.setdefault("fused", {"seconds": 0.0, "images": 0, "peak_mb": 0.0})
                e["seconds"] += time.perf_counter() - t
                e["images"] += 1
        fusion = {"model_a": a_name, "model_b": b_name, "weight_a": fit.weight,
                  "least_squares_weight_a": fit.least_squares_weight, "grid": fit.grid,
                  "curves": {s: (c.curve if c else None) for s, c in curves.items()}}
        (results_dir / "fusion.json").write_text(json.dumps(fusion, indent=2) + "\n")
    for v in timings.values():
        v["seconds_per_image"] = v.pop("seconds") / max(1, v.pop("images"))
    # the fused output costs both models' best configurations plus the mixing
    if "fused" in timings:
        best = [[k for k in METHOD_ORDER(infer_cfg) if k.startswith(m)][-1] for m in infer_cfg.models]
        timings["fused"]["seconds_per_image"] += sum(timings[b]["seconds_per_image"] for b in best)
        timings["fused"]["peak_mb"] = max(timings[b]["peak_mb"] for b in best)
    timings = {k: timings[k] for k in METHOD_ORDER(infer_cfg) if k in timings}  # the table's row order
    (results_dir / "timings.json").write_text(json.dumps(timings, indent=2) + "\n")
    return {"timings": timings, "fusion": fusion}
