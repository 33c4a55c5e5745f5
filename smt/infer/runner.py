"""The ``infer`` stage: every configuration of the ensemble on the validation and test images.

For each split it writes ``results/<split>/<method>/<id>x<scale>.png`` (rounded uint8, the challenge naming)
for the methods ``<model>`` (plain), ``<model>+SE`` (x8 self-ensemble), ``<mw model>+SE+MW`` (multi-window)
and ``fused`` (the best of each model, mixed with the weight fit on the validation images), plus
``results/methods.json`` (the methods in table order) and ``results/fusion.json`` (weight, PSNR-Y curve over
the weight on validation and test). Byte-identical on rerun: argmax routing, or Gumbel routing seeded per image.
Wall-clock seconds per image and peak memory per method are measurements of the run, not results: they go to
``timings_path`` (the pipeline's ``timings/infer.json``, which DVC does not track), never into ``results/``.
Under ``torchrun`` (``infer.nproc``/``infer.nnodes`` > 1) the images are sharded across processes (every
world-th image): each writes its PNGs, scores the fusion grid on its own validation images
(:class:`smt.infer.fusion.ShardedFit`; one all-reduce gives every rank the fit, equal to the one-process fit) and
writes its share of the fused images; rank 0 writes the JSON files. No rank waits on long work done by another
alone, so the collectives stay within the process group's timeout (:func:`smt.distributed.process_group_timeout`).
``results/`` must be on a file system every node sees.
"""
from __future__ import annotations

import json
import resource
import shutil
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from tqdm import tqdm

from smt import seeds
from smt.config import DataConfig, InferConfig, TrainConfig
from smt.data.images import float255_to_uint8, image_to_tensor, read_image, tensor_to_float255, write_png
from smt.data.manifest import has_hr, read_manifest
from smt.distributed import barrier, device_for, dist_info, init_process_group, torchrun
from smt.infer.ensemble import multi_window, self_ensemble
from smt.infer.fusion import ShardedFit, fuse
from smt.infer.malloc import keep_freed_memory
from smt.infer.paths import describe_paths
from smt.infer.precision import with_precision
from smt.infer.protocols import bbox_pass
from smt.infer.tiling import tiled_forward
from smt.models import load_model
from smt.train.engine import exported_weights

__all__ = ["run_inference", "METHOD_ORDER", "load_method_models", "model_outputs", "best_float255", "image_seed",
           "measure"]


def measure(device: torch.device, fn: Callable[[], torch.Tensor], cuda=torch.cuda) -> tuple[torch.Tensor, float, float]:
    """``(fn(), seconds, peak MB)`` of one call. On CUDA the device's peak-memory counter is reset before the
    call (so the peak is this call's, not the process's so far) and the device is synchronised before the clock
    starts and before it stops (kernels run asynchronously). On CPU the peak is the process's resident maximum,
    which cannot be reset. ``cuda`` is the module to call (a stand-in in tests)."""
    on_cuda = device.type == "cuda"
    if on_cuda:
        cuda.synchronize(device)
        cuda.reset_peak_memory_stats(device)
    t = time.perf_counter()
    y = fn()
    if on_cuda:
        cuda.synchronize(device)
    seconds = time.perf_counter() - t
    peak = (cuda.max_memory_allocated(device) / 2**20 if on_cuda
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return y, seconds, peak


def load_method_models(infer_cfg: InferConfig, train_cfg: TrainConfig, device: torch.device | str
                       ) -> dict[str, torch.nn.Module]:
    """The models of ``infer.models``: each the last round and stage of its training, in eval mode, with the
    inference routing for MambaIRv2."""
    last_round, last_stage = train_cfg.schedule()[-1]
    nets = {}
    for m in infer_cfg.models:
        if m not in train_cfg.models:
            raise KeyError(f"infer.models: {m!r} is not in train.models ({', '.join(train_cfg.models)})")
        nets[m] = load_model(exported_weights(train_cfg, m, last_round, last_stage), train_cfg.models[m].preset,
                             str(device), routing=infer_cfg.routing)
    return nets


def read_fusion_fit(path: str | Path, models: Sequence[str], missing_hint: str) -> dict:
    """The fusion weight this stage fitted (``results/fusion.json``), checked to be for ``models`` (the two of
    ``infer.models``, in order); ``missing_hint`` says what to do when the file is absent."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no fitted fusion weight; {missing_hint}")
    fit = json.loads(path.read_text())
    if [fit["model_a"], fit["model_b"]] != list(models):
        raise ValueError(f"{path}: fitted for {fit['model_a']}, {fit['model_b']}, but infer.models is "
                         f"{list(models)}; rerun the infer stage")
    return fit


def image_seed(cfg: InferConfig, image_id: int) -> int:
    """The seed of the Gumbel routing for one image (irrelevant with argmax routing)."""
    return seeds.image_seed(cfg.seed, image_id)


def _untimed(method: str, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
    return fn()


def model_outputs(net: torch.nn.Module, x: torch.Tensor, name: str, cfg: InferConfig, scale: int, seed: int,
                  timed: Callable[[str, Callable[[], torch.Tensor]], torch.Tensor] = _untimed
                  ) -> dict[str, torch.Tensor]:
    """Every configuration of model ``name`` on one LR image ``x`` (1, 3, H, W), keyed by method in table order:
    plain, ``+SE`` (self-ensemble), ``+MW`` (multi-window, for ``cfg.multi_window_model``). The last entry is the
    model's most complete configuration, the one the fusion mixes. Each configuration starts from ``seed``.
    The infer stage and ``python -m smt upscale`` both run the method through this function."""
    fwd = with_precision(net, cfg.precision)

    def plain() -> torch.Tensor:
        torch.manual_seed(seed)
        return tiled_forward(fwd, x, scale, cfg.tile, cfg.tile_overlap, cfg.tile_batch)

    outputs = {name: timed(name, plain)}
    if cfg.self_ensemble:
        def se() -> torch.Tensor:
            torch.manual_seed(seed)
            return tiled_forward(lambda t: self_ensemble(fwd, t), x, scale, cfg.tile, cfg.tile_overlap,
                                 cfg.tile_batch)
        outputs[f"{name}+SE"] = timed(f"{name}+SE", se)
    if name == cfg.multi_window_model:
        def mw() -> torch.Tensor:
            torch.manual_seed(seed)
            per_tile = (lambda f, t: self_ensemble(f, t)) if cfg.self_ensemble else None
            return multi_window(fwd, x, scale, cfg.window_tiles, cfg.window_weights, cfg.tile_overlap,
                                cfg.tile_batch, per_tile)[0]
        method = f"{name}{'+SE' if cfg.self_ensemble else ''}+MW"
        outputs[method] = timed(method, mw)
    return outputs


def best_float255(outputs: dict[str, torch.Tensor]) -> np.ndarray:
    """The fusion's input from :func:`model_outputs`: the last (most complete) configuration as float on the
    [0, 255] scale, float32-exact (the infer stage stores it as float32; this loses nothing)."""
    return tensor_to_float255(list(outputs.values())[-1]).astype(np.float32).astype(np.float64)


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


def _add_timing(timings: dict[str, dict], method: str, seconds: float, images: int, peak_mb: float) -> None:
    """Adds a measurement (one image, or a process's totals) to ``timings[method]``: seconds and images add up,
    peak memory is the largest."""
    entry = timings.setdefault(method, {"seconds": 0.0, "images": 0, "peak_mb": 0.0})
    entry["seconds"] += seconds
    entry["images"] += images
    entry["peak_mb"] = max(entry["peak_mb"], peak_mb)


def _merge_timings(parts: list[dict]) -> dict:
    """Per-process timing dicts -> one (see :func:`_add_timing`)."""
    out: dict[str, dict] = {}
    for part in parts:
        for method, e in part.items():
            _add_timing(out, method, e["seconds"], e["images"], e["peak_mb"])
    return out


def run_inference(infer_cfg: InferConfig, train_cfg: TrainConfig, data_cfg: DataConfig,
                  results_dir: str | Path = "results", log=print, params_path: str | None = None,
                  timings_path: str | Path | None = None) -> dict:
    """Run the stage; with ``infer.nproc`` (or ``nnodes``) > 1 it relaunches itself under torchrun (which needs
    ``params_path``) and every process takes every world-th image. Under torchrun all ranks return the result:
    ``{"methods": [...], "fusion": {...}, "timings": {...}}`` (timings: ``{}`` unless ``timings_path`` is set)."""
    results_dir = Path(results_dir)
    rank, world = dist_info()
    if world == 1 and (infer_cfg.nproc > 1 or infer_cfg.nnodes > 1):
        if params_path is None:
            raise ValueError("infer.nproc > 1: run_inference needs params_path to relaunch under torchrun")
        torchrun(infer_cfg.nproc, ["infer", "--params", str(params_path), "--out", str(results_dir),
                                   *(["--timings", str(timings_path)] if timings_path else [])], infer_cfg.nnodes)
        return _read_results(results_dir, timings_path)
    device = device_for(infer_cfg.device)
    if device.type == "cpu":
        keep_freed_memory()
    init_process_group(device)
    scratch = results_dir / ".fusion_inputs"  # each process's float outputs, for its share of the fused images
    if rank == 0 and scratch.exists():
        shutil.rmtree(scratch)
    barrier()
    nets = load_method_models(infer_cfg, train_cfg, device)
    if rank == 0:
        log(describe_paths(nets.values(), infer_cfg.precision))
    scale = data_cfg.scale
    timings: dict[str, dict] = {}

    def timed(method: str, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        y, seconds, peak = measure(device, fn)
        _add_timing(timings, method, seconds, 1, peak)
        return y

    splits = {s: read_manifest(data_cfg.root, s) for s in ("valid", "test")}
    fusing = len(infer_cfg.models) == 2
    # each rank scores the fusion grid on its own images while their outputs are in memory; the fit sums them
    fits = {s: ShardedFit(len(m), infer_cfg.fusion_grid, device=device)
            for s, m in splits.items() if fusing and has_hr(m)}  # no HR (the challenge's test set): no curve
    if fusing and "valid" not in fits:
        raise ValueError(f"infer: the fusion weight is fit on the validation images, but {data_cfg.root}'s valid "
                         f"split has no HR images")
    for split, manifest in splits.items():
        mine = manifest.iloc[rank::world]  # the same images on every rerun, whatever the process count
        for pos, row in tqdm(zip(range(rank, len(manifest), world), mine.itertuples()), total=len(mine),
                             desc=f"infer {split}", unit="img", disable=rank != 0):
            lr = read_image(Path(data_cfg.root) / row.lr_path)
            x = image_to_tensor(lr, device)
            bests = {}
            for m, net in nets.items():
                outputs = model_outputs(net, x, m, infer_cfg, scale, image_seed(infer_cfg, row.id), timed)
                for method, y in outputs.items():
                    write_png(results_dir / split / method / f"{row.id}x{scale}.png",
                              float255_to_uint8(tensor_to_float255(y)))
                # the most complete configuration of each model feeds the fusion. The model computes in float32,
                # so storing float32 loses nothing.
                bests[m] = best_float255(outputs)
                if fusing:
                    best = scratch / split / m / f"{row.id}.npy"
                    best.parent.mkdir(parents=True, exist_ok=True)
                    np.save(best, bests[m].astype(np.float32))
            if split in fits:
                fits[split].add(pos, *(bests[m] for m in infer_cfg.models),
                                read_image(Path(data_cfg.root) / row.hr_path))
    fusion = (_fit_and_fuse(infer_cfg, data_cfg, splits, fits, scratch, results_dir, timings, rank, world, log)
              if fusing else None)
    scratch.mkdir(parents=True, exist_ok=True)
    (scratch / f"timings.rank{rank}.json").write_text(json.dumps(timings))
    barrier()
    # what rank 0 alone does from here is seconds of work (JSON files, removing the scratch folder), so the
    # other ranks wait at the barrier below far within the process group's timeout (smt.distributed)
    if rank == 0:
        timings = _merge_timings([json.loads(f.read_text()) for f in sorted(scratch.glob("timings.rank*.json"))])
        _finish_timings(infer_cfg, timings)
        if world == 1:  # the authors' protocol beside ours (their Gumbel stream runs across images: one process)
            bbox = bbox_pass(nets, infer_cfg, data_cfg, splits, results_dir, log)
            if bbox is not None:
                timings["fused [bbox]"] = bbox
        fusion_path = results_dir / "fusion.json"
        fusion_path.unlink(missing_ok=True)
        if fusion is not None:
            fusion_path.write_text(json.dumps(fusion, indent=2) + "\n")
        shutil.rmtree(scratch)
        (results_dir / "timings.json").unlink(missing_ok=True)  # written by earlier versions, now timings_path
        (results_dir / "methods.json").write_text(json.dumps({"methods": METHOD_ORDER(infer_cfg)}, indent=2) + "\n")
        if timings_path is not None:
            Path(timings_path).parent.mkdir(parents=True, exist_ok=True)
            Path(timings_path).write_text(json.dumps(timings, indent=2) + "\n")
    barrier()
    return {**_read_results(results_dir, timings_path), **({"timings": timings} if rank == 0 else {})}


def _read_results(results_dir: Path, timings_path: str | Path | None = None) -> dict:
    fusion, timings = results_dir / "fusion.json", Path(timings_path) if timings_path else None
    return {"methods": json.loads((results_dir / "methods.json").read_text())["methods"],
            "fusion": json.loads(fusion.read_text()) if fusion.exists() else {},
            "timings": json.loads(timings.read_text()) if timings is not None and timings.exists() else {}}


def _fit_and_fuse(infer_cfg: InferConfig, data_cfg: DataConfig, splits: dict, fits: dict[str, ShardedFit],
                  scratch: Path, results_dir: Path, timings: dict, rank: int, world: int, log) -> dict:
    """The fusion weight of the two models fit on validation (every rank gets it: one all-reduce per split),
    then this rank's share of the fused images (timed into ``timings``). Returns the content of
    ``fusion.json``."""
    a_name, b_name = infer_cfg.models
    curves = {s: (fits[s].fit() if s in fits else None) for s in splits}  # the same order of collectives on all
    fit = curves["valid"]
    if rank == 0:
        log(f"fusion weight of {a_name}: {fit.weight:.2f} (validation PSNR-Y {fit.psnr_y:.3f} dB; "
            f"least-squares weight {fit.least_squares_weight:.3f})")

    def best(split: str, model: str, id_: str) -> np.ndarray:
        return np.load(scratch / split / model / f"{id_}.npy").astype(np.float64)

    scale = data_cfg.scale
    for split, manifest in splits.items():
        for r in manifest.iloc[rank::world].itertuples():
            a, b = best(split, a_name, r.id), best(split, b_name, r.id)
            t = time.perf_counter()
            fused = fuse(a, b, fit.weight)
            write_png(results_dir / split / "fused" / f"{r.id}x{scale}.png", fused)
            e = timings.setdefault("fused", {"seconds": 0.0, "images": 0, "peak_mb": 0.0})
            e["seconds"] += time.perf_counter() - t
            e["images"] += 1
    return {"model_a": a_name, "model_b": b_name, "weight_a": fit.weight,
            "least_squares_weight_a": fit.least_squares_weight, "grid": fit.grid,
            "curves": {s: (c.curve if c else None) for s, c in curves.items()}}


def _finish_timings(infer_cfg: InferConfig, timings: dict) -> None:
    """Every rank's merged timings -> seconds per image and peak memory per method, in table order (in place)."""
    for v in timings.values():
        v["seconds_per_image"] = v.pop("seconds") / max(1, v.pop("images"))
    # the fused output costs both models' best configurations plus the mixing
    if "fused" in timings:
        chosen = [[k for k in METHOD_ORDER(infer_cfg) if k.startswith(m)][-1] for m in infer_cfg.models]
        timings["fused"]["seconds_per_image"] += sum(timings[b]["seconds_per_image"] for b in chosen)
        timings["fused"]["peak_mb"] = max(timings[b]["peak_mb"] for b in chosen)
    ordered = {k: timings[k] for k in METHOD_ORDER(infer_cfg) if k in timings}  # the table's row order
    timings.clear()
    timings.update(ordered)
