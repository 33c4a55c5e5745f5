"""``python -m smt rehearse [PROFILE]``: a dress rehearsal of a profile (default ``ntire2025``) on this machine.

It runs every pipeline stage of one round of the profile, in order, through the command DVC runs
(``python -m smt.stages NAME``), with the profile's real architectures, losses, auxiliary heads, CLIP model
name, tile and multi-window sizes, fusion and report — only the counts are reduced (steps, batch, patch,
images) so that it finishes in minutes on a CPU. What it exercises that no demo run does: HAT-L started from a
checkpoint in the official BasicSR container layout (``{'params': ..., 'params_ema': ...}``, random values made
on the fly), MambaIRv2-L from scratch, the ``sources`` data path (stand-in folders in each data set's own file
layout, so the profile's globs, LR pairing and LR-only test split run), CLIP selection with the configured model
(untrained weights when they cannot be loaded offline, and the output says so), gradient accumulation
(``train.micro_batch: 1`` when the code has it) and a DataLoader worker.

**Nothing of the user's is touched.** Everything happens in a scratch folder (a temporary one unless
``--workdir`` names one) holding its own ``params.yaml`` (derived from the profile by :func:`reduced_params`),
``dvc.yaml``, data, models, results and reports; every path of the profile that points outside it is redirected
into it. The code and notebooks are linked into the scratch folder, read-only use (:func:`smt.stages.run_stage`
looks for notebooks, and for the code whose digest decides whether a training run may resume, under the folder it
runs in). The user's ``params.yaml``, ``dvc.yaml``, ``dvc.lock``, ``data/``, ``models/``, ``results/`` and
``reports/`` are fingerprinted (size and modification time of every file) before and after, and the run fails if
any changed.

**Measurements and the extrapolation.** Per stage: wall-clock seconds (the stage's process, kernel start
included), seconds per unit of work (training: the engine's own ``train_seconds`` per optimizer step, which
includes the first step's warm-up and the final checkpoint save; inference: the runner's seconds per image per
method; other stages: the stage's papermill time per image, kernel start included, so an upper bound), and the
peak resident memory of the stage's largest process (``wait4``'s ``ru_maxrss``). The extrapolation to the full
profile on this device is, per stage::

    full seconds = full units x (seconds per unit measured) x (work per unit, full / work per unit, rehearsal)

with work per unit = LR pixels per optimizer step (batch x patch^2) for training, LR pixels actually processed
per image under the method's tiling (every distinct tiling of the multi-window ensemble counted, tiles overlap)
for inference, HR pixels per image for the data and report stages and 1 for CLIP selection (each view is resized
to the encoder's input). Linear in pixels because both architectures are windowed (attention within fixed
windows, convolutions, a linear-time scan); at these tiny sizes fixed per-step costs weigh more, so the figure
tends to be high. Training stages count once per round of the profile. One process: the profile's ``nproc`` is
not applied. It is an extrapolation, not a measurement, and the output labels it so.
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable

import yaml

__all__ = ["Reduction", "DEFAULT", "SMALLEST", "reduced_params", "make_standin_sources", "write_pretrained_standin",
           "user_fingerprint", "processed_pixels", "StageRow", "Rehearsal", "rehearse", "format_rehearsal",
           "RehearsalError", "USER_PATHS", "DEFAULT_PROFILE"]

DEFAULT_PROFILE = "ntire2025"
USER_PATHS = ("params.yaml", "dvc.yaml", "dvc.lock", "data", "models", "results", "reports")
MARKER = ".smt_rehearsal"  # marks a scratch folder as ours, so --workdir reuses only one of those
STANDIN_DIR = "standin"  # stand-in copies of the profile's data sets, inside the scratch folder
NOMINAL_HR = (1356, 2040)  # a DIV2K-sized HR image (height, width): the unit of the full profile's data
# colour photographs first: the stand-ins of different images should look different to CLIP
_STANDIN_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "motorcycle_left",
                   "grace_hopper", "retina", "hubble_deep_field", "motorcycle_right", "camera", "coins", "brick",
                   "gravel", "grass", "moon")


class RehearsalError(RuntimeError):
    """A stage of the rehearsal failed, or it would have touched the user's files."""


@dataclass(frozen=True)
class Reduction:
    """How far the counts shrink; everything else stays the profile's."""

    steps: int = 2  # optimizer steps per training stage (milestones scale with it)
    patch_div: int = 4  # LR patch = max(min_patch, profile's // patch_div), at most the profile's
    min_patch: int = 16  # the L models' window size: a patch still fills one attention window
    batch_div: int = 32  # global batch = max(1, profile's // batch_div): 64 -> 2, 16 -> 1
    train_images: int = 4  # training images in all (at least one per training source)
    train_hr: tuple[int, int] = (160, 192)  # stand-in training HR (height, width)
    eval_hr: int = 128  # stand-in validation/test HR side (LR 32 px at x4)
    top_k: int = 2  # CLIP picks (the stage-3 subset)
    num_workers: int = 1  # DataLoader worker processes (0 = in the training process)
    benchmark_images: int = 1  # stand-in HR images per benchmark set (when the profile has that stage)
    benchmark_hr: int = 64  # their side (LR 16 px: one attention window of the L models)

    def patch(self, full: int) -> int:
        return min(full, max(self.min_patch, full // self.patch_div))

    def batch(self, full: int) -> int:
        return max(1, full // self.batch_div)


DEFAULT = Reduction()
SMALLEST = Reduction(steps=1, train_images=2, top_k=1, num_workers=0)


# ------------------------------------------------------------------------------------------------- the config


def _inside(path: str, kind: str) -> str:
    """A path that stays inside the scratch folder: relative ones as they are, others redirected."""
    p = Path(path)
    if path.startswith("~") or p.is_absolute() or ".." in p.parts:
        return f"external/{kind}/{p.name}"
    return path


def _scaled_milestones(milestones: list[int], iters: int, steps: int) -> list[int]:
    return [max(1, min(steps, m * steps // iters)) for m in milestones]


def reduced_params(full: dict, red: Reduction = DEFAULT) -> tuple[dict, list[str]]:
    """The rehearsal's ``params.yaml`` (a new dict) from a profile's: counts reduced, architectures, losses, CLIP
    model, tiles and windows kept, one round, one process, every path inside the scratch folder. Returns it with
    notes saying what changed beyond the counts. ``data.folders`` (sources profiles) is filled in by
    :func:`make_standin_sources`."""
    from smt.config import TrainConfig

    p = copy.deepcopy(full)
    notes: list[str] = []
    d = p["data"]
    for key in ("root", "raw", "lock", "downloads", "store"):
        if key in d and (key != "store" or d[key]):  # an empty store means none
            d[key] = _inside(str(d[key]), f"data.{key}")
    if d.get("source", "demo") == "demo":
        d["train_images"] = list(d["train_images"])[:red.train_images]
        for split in ("valid", "test"):
            d[f"{split}_images"] = list(d.get(f"{split}_images") or [])[:1]
        d["max_side"] = max(red.train_hr)
    else:
        for split in ("valid", "test"):
            d[f"{split}_sources"] = list(d.get(f"{split}_sources") or [])[:1]
        d["folders"] = {}  # filled with the stand-in folders
    s = p["select"]
    s["cache_dir"] = _inside(str(s.get("cache_dir", "data/clip_cache")), "select.cache_dir")
    s["top_k"] = min(int(s.get("top_k", 2000)), red.top_k)
    if not s.get("allow_untrained", False):
        s["allow_untrained"] = True
        notes.append(f"select.allow_untrained set: CLIP {s.get('model')}/{s.get('pretrained') or '(none)'} falls back "
                     "to untrained weights when they cannot be loaded (the stage's output then says so)")
    t = p["train"]
    for name, m in t["models"].items():
        if m.get("pretrained"):
            m["pretrained"] = _inside(str(m["pretrained"]), f"train.models.{name}")
    for name, st in t["stages"].items():
        full_iters = int(st["iters"])
        st["iters"] = red.steps
        st["milestones"] = _scaled_milestones(list(st.get("milestones") or []), full_iters, red.steps)
        st["patch_size"] = red.patch(int(st["patch_size"]))
        st["batch_size"] = red.batch(int(st["batch_size"]))
        if st.get("subset"):
            st["subset"] = _inside(str(st["subset"]), f"train.stages.{name}.subset")
    t["rounds"] = 1
    t["out_root"] = _inside(str(t.get("out_root", "models")), "train.out_root")
    t.update(device="auto", nproc=1, nnodes=1, num_workers=min(int(t.get("num_workers", 0)), red.num_workers),
             log_every=1, val_every=red.steps, ckpt_every=red.steps)
    t["val_max_side"] = min(int(t.get("val_max_side") or 10**9), red.eval_hr // int(d.get("scale", 4)))
    if any(f.name == "micro_batch" for f in fields(TrainConfig)):
        t["micro_batch"] = 1  # accumulation over micro-batches of one patch: the path the profile needs on GPUs
    i = p["infer"]
    i.update(device="auto", nproc=1, nnodes=1)
    if "ablations" in p and "out_root" in p["ablations"]:
        p["ablations"]["out_root"] = _inside(str(p["ablations"]["out_root"]), "ablations.out_root")
    if "benchmark" in p:
        b = p["benchmark"]
        for key in ("root", "downloads", "lock"):
            if key in b:
                b[key] = _inside(str(b[key]), f"benchmark.{key}")
    return p, notes


# ----------------------------------------------------------------------------------------------- stand-in data


def _photo(k: int, h: int, w: int):
    """The k-th demo photograph, centre-cropped to the aspect of (h, w) and resized (uint8 RGB)."""
    import numpy as np
    from PIL import Image

    from smt.data.demo import load_demo_image

    img = load_demo_image(_STANDIN_PHOTOS[k % len(_STANDIN_PHOTOS)])
    ih, iw = img.shape[:2]
    if ih * w > iw * h:
        ch, cw = iw * h // w, iw
    else:
        ch, cw = ih, ih * w // h
    top, left = (ih - ch) // 2, (iw - cw) // 2
    crop = Image.fromarray(np.ascontiguousarray(img[top:top + ch, left:left + cw]))
    return np.asarray(crop.resize((w, h), Image.Resampling.LANCZOS))


def _pattern_path(pattern: str, stem: str) -> str:
    """A file name that the source's glob ``pattern`` matches (``*`` -> ``stem``, ``**`` -> a folder)."""
    path = pattern.replace("**", "standin").replace("*", stem)
    return path if Path(path).suffix.lower() in (".png", ".jpg", ".jpeg") else path + ".png"


def make_standin_sources(params: dict, folder: Path, red: Reduction = DEFAULT) -> dict[str, str]:
    """Stand-in copies of a ``sources`` profile's data sets under ``folder``: demo photographs in each set's own
    layout (HR and LR globs of ``sources.json``, LR = MATLAB bicubic of the HR, LR-only sets LR-only), so the
    data stage's real path (globs, pairing, checks) builds them. Returns ``data.folders`` (source -> folder,
    relative to the scratch folder) and sets it in ``params``."""
    from smt.data.images import write_png
    from smt.data.imresize import bicubic_degrade
    from smt.data.sources import load_sources

    d = params["data"]
    scale = int(d.get("scale", 4))
    sources = load_sources()
    folders: dict[str, str] = {}
    photo = 0
    train = list(d["train_sources"])
    per_source = max(1, math.ceil(red.train_images / len(train)))
    plan = [(n, "train", per_source) for n in train] + [(n, s, 1) for s in ("valid", "test")
                                                        for n in d.get(f"{s}_sources") or []]
    first = {"train": 1, "valid": 801, "test": 901}  # DIV2K's numbering
    for name, split, count in plan:
        if name not in sources:
            raise RehearsalError(f"data source {name!r} is unknown (known: {', '.join(sources)})")
        src = sources[name]
        root = folder / name
        for k in range(count):
            stem = f"{first[split]:04d}"
            first[split] += 1
            h, w = red.train_hr if split == "train" else (red.eval_hr, red.eval_hr)
            hr = _photo(photo, h - h % scale, w - w % scale)
            photo += 1
            if src.hr:
                write_png(root / _pattern_path(src.hr, stem), hr)
            if src.lr:
                write_png(root / _pattern_path(src.lr, f"{stem}x{scale}"), bicubic_degrade(hr, scale))
        for pattern in (src.hr, src.lr):
            if pattern and not any(p.is_file() for p in root.glob(pattern)):
                raise RehearsalError(f"stand-in for {name}: nothing under {root} matches {pattern!r}")
        folders[name] = (Path(STANDIN_DIR) / name).as_posix()
    d["folders"] = folders
    return folders


def make_standin_benchmark(params: dict, scratch: Path, red: Reduction = DEFAULT) -> list[str]:
    """One stand-in HR image per benchmark set in ``<benchmark.root>/<Set>/HR`` (so nothing is downloaded)."""
    from smt.data.images import write_png

    b = params.get("benchmark")
    if not b:
        return []
    sets = list(b.get("sets") or ("Set5", "Set14", "B100", "Urban100"))
    for j, name in enumerate(sets):
        for k in range(red.benchmark_images):
            write_png(scratch / b.get("root", "data/benchmark") / name / "HR" / f"standin{k}.png",
                      _photo(j * red.benchmark_images + k + 3, red.benchmark_hr, red.benchmark_hr))
    return sets


def write_pretrained_standin(preset_name: str, path: str | Path, seed: int = 0) -> dict:
    """A checkpoint for ``preset_name`` in the official BasicSR container layout: ``{'params': ...,
    'params_ema': ...}`` (two different sets of random values; our loader must take ``params_ema``) and without
    the auxiliary heads, which the official models do not have. Returns a description."""
    import torch

    from smt.models import build_model

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        state = build_model(preset_name).state_dict()
    ema = {k: v.clone() for k, v in state.items()}
    params = {k: (v * 0.5 if v.is_floating_point() else v.clone()) for k, v in state.items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"params": params, "params_ema": ema}, path)
    return {"preset": preset_name, "path": str(path), "tensors": len(ema),
            "bytes": path.stat().st_size, "container": ["params", "params_ema"]}


# ------------------------------------------------------------------------------------------------ user files


def user_fingerprint(repo: str | Path) -> dict[str, tuple[int, int]]:
    """Size and modification time (ns) of every file under the user's :data:`USER_PATHS` of ``repo``."""
    repo = Path(repo)
    out = {}
    for rel in USER_PATHS:
        top = repo / rel
        files = [top] if top.is_file() else sorted(p for p in top.rglob("*") if p.is_file()) if top.is_dir() else []
        for f in files:
            st = f.stat()
            out[f.relative_to(repo).as_posix()] = (st.st_size, st.st_mtime_ns)
    return out


# --------------------------------------------------------------------------------------------- extrapolation


def processed_pixels(h: int, w: int, tiles: list[int] | tuple[int, ...], overlap: int) -> int:
    """LR pixels a model processes for an ``h x w`` image tiled at each size in ``tiles`` (0 = whole image):
    every distinct tiling once (as :func:`smt.infer.ensemble.multi_window` computes them), overlaps counted."""
    from smt.infer.ensemble import tiling_key

    keys = {tiling_key(h, w, t, min(overlap, max(t - 1, 0))) for t in tiles}
    total = 0
    for key in keys:
        if key == ("whole",):
            total += h * w
        else:
            ys, xs, th, tw = key
            total += len(ys) * len(xs) * th * tw
    return total


@dataclass
class StageRow:
    """One stage's measurements and its extrapolation (``full_seconds``; None = not extrapolated, ``formula``
    says why)."""

    stage: str
    wall_seconds: float
    peak_rss_mb: float
    unit: str
    units: float
    seconds_per_unit: float
    full_units: float | None
    work_ratio: float | None  # work per unit, full / rehearsal
    full_seconds: float | None
    formula: str
    per_round: bool = False  # a training stage: the profile runs it once per round
    cpu_seconds: float = math.nan  # user + system time of the stage's processes (waited-for descendants included)
    detail: list[dict] = field(default_factory=list)  # infer: one entry per method


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def _source_counts(names: list[str]) -> tuple[int, list[str]]:
    from smt.data.sources import load_sources

    sources = load_sources()
    known = [sources[n].images for n in names if n in sources and sources[n].images]
    unknown = [n for n in names if n not in sources or not sources[n].images]
    return sum(known), unknown


# --------------------------------------------------------------------------------------------------- running


def _link_code(scratch: Path) -> None:
    from smt.pipeline import ROOT

    for name in ("smt", "notebooks"):
        link = scratch / name
        if not link.exists():
            link.symlink_to(ROOT / name, target_is_directory=True)


# Runs a command and writes its peak RSS (KiB) and CPU seconds (user + system) to a file as JSON. A small process
# in between, because Linux counts the memory a child had before exec (a fork or vfork of this process, which
# has built the stand-in checkpoint's model) in the child's ru_maxrss; wait4's usage covers the child and the
# descendants it waited for (the notebook's kernel).
_USAGE = """import json, os, subprocess, sys
proc = subprocess.Popen(sys.argv[2:])
_, status, usage = os.wait4(proc.pid, 0)
json.dump({"maxrss_kib": usage.ru_maxrss, "cpu_seconds": usage.ru_utime + usage.ru_stime}, open(sys.argv[1], "w"))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def _run_stage(name: str, scratch: Path, env: dict, log_dir: Path) -> tuple[float, float, float, int]:
    """``python -m smt.stages NAME`` in ``scratch``: (seconds, CPU seconds of its process tree, peak RSS of its
    largest process in MB, exit code)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    usage = log_dir / f"{name}.usage.json"
    start = time.perf_counter()
    with open(log_dir / f"{name}.log", "w") as log:
        rc = subprocess.call([sys.executable, "-c", _USAGE, str(usage), sys.executable, "-m", "smt.stages", name],
                             cwd=scratch, env=env, stdout=log, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    u = json.loads(usage.read_text()) if usage.is_file() else {"maxrss_kib": math.nan, "cpu_seconds": math.nan}
    return seconds, u["cpu_seconds"], u["maxrss_kib"] / 1024, rc


def _notebook_text(path: Path) -> str:
    nb = json.loads(path.read_text())
    parts = []
    for cell in nb["cells"]:
        for out in cell.get("outputs", []):
            parts.append(out.get("text", "") if isinstance(out.get("text", ""), str) else "".join(out["text"]))
            for v in out.get("data", {}).values():
                parts.append(v if isinstance(v, str) else "".join(v))
    return "\n".join(parts)


@dataclass
class Rehearsal:
    profile: str
    workdir: str
    rows: list[StageRow]
    notes: list[str]
    rounds: int
    wall_seconds: float
    device: str
    clip_untrained: bool | None
    untouched: bool
    load_average: tuple[float, float] = (math.nan, math.nan)  # 1-minute load average at the start and the end

    def total_full_seconds(self) -> float:
        return sum(r.full_seconds * (self.rounds if r.per_round else 1) for r in self.rows
                   if r.full_seconds is not None)

    def to_json(self) -> dict:
        return {**{k: v for k, v in asdict(self).items() if k != "rows"}, "rows": [asdict(r) for r in self.rows],
                "total_full_seconds": self.total_full_seconds()}


def _prepare(profile_path: Path, scratch: Path, red: Reduction, log: Callable[[str], None]
             ) -> tuple[dict, dict, list[str]]:
    from smt.config import load_params
    from smt.pipeline import write_dvc_yaml

    full = load_params(profile_path)
    params, notes = reduced_params(full, red)
    if params["data"].get("source", "demo") != "demo":
        make_standin_sources(params, scratch / STANDIN_DIR, red)
        notes.append("data: the profile's data sets are not available offline; stand-ins (demo photographs, "
                     f"{red.train_hr[1]}x{red.train_hr[0]} training and {red.eval_hr} px validation/test HR) are laid "
                     f"out like each set under {STANDIN_DIR}/ and built by the real data stage")
    else:
        notes.append(f"data: the profile's own offline photographs, centre-cropped to {params['data']['max_side']} px")
    if make_standin_benchmark(params, scratch, red):
        notes.append("benchmark: one stand-in HR image per set (the test sets are a download)")
    for name, m in params["train"]["models"].items():
        if m.get("pretrained"):
            info = write_pretrained_standin(m["preset"], scratch / m["pretrained"])
            notes.append(f"train.models.{name}.pretrained: stand-in {m['pretrained']} written in the official "
                         f"BasicSR layout {{'params', 'params_ema'}} ({info['tensors']} tensors, random values, "
                         f"{info['bytes'] / 2**20:.0f} MB)")
    (scratch / "params.yaml").write_text(
        f"# dress rehearsal of profile {profile_path.stem} (python -m smt rehearse): counts reduced, nothing else\n"
        + yaml.safe_dump(params, sort_keys=False, width=120))
    _link_code(scratch)
    write_dvc_yaml(scratch / "params.yaml", scratch / "dvc.yaml")
    log(f"scratch params.yaml and dvc.yaml written in {scratch}")
    return full, params, notes


def _measure(name: str, scratch: Path, wall: float, rss: float, full: dict, params: dict, red: Reduction
             ) -> StageRow:
    """Read what the stage recorded and extrapolate it (module docstring)."""
    from smt.data.manifest import read_manifest
    from smt.pipeline import TIMINGS_DIR

    timings = json.loads((scratch / TIMINGS_DIR / f"{name}.json").read_text())
    stage_s = float(timings.get("stage_seconds", wall))
    d, fd = params["data"], full["data"]
    root = scratch / d["root"]
    scale = int(d.get("scale", 4))
    demo = fd.get("source", "demo") == "demo"
    full_hr = ((min(fd.get("max_side") or NOMINAL_HR[1], NOMINAL_HR[1]),) * 2) if demo else NOMINAL_HR

    def manifest(split: str):
        return read_manifest(root, split)

    if name.startswith("train_"):
        model, rnd, stage = name[len("train_"):].rsplit("_", 2)
        st, fst = params["train"]["stages"][stage], full["train"]["stages"][stage]
        steps = int(st["iters"])
        spu = float(timings.get("train_seconds", stage_s)) / steps
        ratio = (fst["batch_size"] * fst["patch_size"] ** 2) / (st["batch_size"] * st["patch_size"] ** 2)
        formula = (f"{fst['iters']:,} steps x {spu:.2f} s/step x ({fst['batch_size']}x{fst['patch_size']}^2 / "
                   f"{st['batch_size']}x{st['patch_size']}^2 LR px per step)")
        return StageRow(name, wall, rss, "step", steps, spu, fst["iters"], ratio, fst["iters"] * spu * ratio,
                        formula, per_round=True)
    if name == "infer":
        inf, finf = params["infer"], full["infer"]
        tiles = {m: ([inf["tile"]] if not m.endswith("+MW") else list(inf["window_tiles"]))
                 for m in timings if m not in ("stage", "stage_seconds") and not m.startswith("fused")}
        lr = [(r.lr_height, r.lr_width) for s in ("valid", "test") for r in manifest(s).itertuples()]
        if demo:
            full_images, unknown = len(fd.get("valid_images") or []) + len(fd.get("test_images") or []), []
        else:
            full_images, unknown = _source_counts([*(fd.get("valid_sources") or []), *(fd.get("test_sources") or [])])
        fh, fw = full_hr[0] // scale, full_hr[1] // scale
        detail, total, spu_all = [], 0.0, 0.0
        for m, t in tiles.items():
            spi = float(timings[m]["seconds_per_image"])
            here = _mean([processed_pixels(h, w, t, inf["tile_overlap"]) for h, w in lr])
            there = processed_pixels(fh, fw, [finf["tile"]] if not m.endswith("+MW") else list(finf["window_tiles"]),
                                     finf["tile_overlap"])
            full_s = full_images * spi * there / here
            detail.append({"method": m, "seconds_per_image": spi, "peak_mb": timings[m].get("peak_mb"),
                           "work_ratio": there / here, "full_seconds": full_s})
            total += full_s
            spu_all += spi
        formula = (f"sum over methods of {full_images} images x s/image x (LR px processed for a {fw}x{fh} LR image "
                   f"/ for the rehearsal's) at tile {finf['tile']}, windows {list(finf['window_tiles'])}"
                   + (f"; {', '.join(unknown)} uncounted" if unknown else ""))
        return StageRow(name, wall, rss, "image (all methods)", len(lr), spu_all, full_images,
                        total / (full_images * spu_all) if spu_all and full_images else None, total, formula,
                        detail=detail)
    if name == "data":
        rows = [r for s in ("train", "valid", "test") for r in manifest(s).itertuples()]
        px = _mean([(r.hr_height * r.hr_width) or (r.lr_height * r.lr_width * scale * scale) for r in rows])
        if demo:
            n, unknown = sum(len(fd.get(f"{s}_images") or []) for s in ("train", "valid", "test")), []
        else:
            n, unknown = _source_counts([x for s in ("train", "valid", "test") for x in fd.get(f"{s}_sources") or []])
        spu = stage_s / len(rows)
        ratio = full_hr[0] * full_hr[1] / px
        formula = (f"{n:,} images x {spu:.2f} s/image (kernel start included) x ({full_hr[1]}x{full_hr[0]} / "
                   f"{px:,.0f} HR px)" + (f"; {', '.join(unknown)}: count unknown, not included" if unknown else "")
                   + "; downloads not included")
        return StageRow(name, wall, rss, "image", len(rows), spu, n, ratio, n * spu * ratio, formula)
    if name == "prepare":  # the training images only
        rows = list(manifest("train").itertuples())
        px = _mean([r.hr_height * r.hr_width for r in rows])
        if demo:
            n, unknown = len(fd.get("train_images") or []), []
        else:
            n, unknown = _source_counts(list(fd.get("train_sources") or []))
        spu = stage_s / len(rows)
        ratio = full_hr[0] * full_hr[1] / px
        formula = (f"{n:,} training images x {spu:.2f} s/image (kernel start included) x ({full_hr[1]}x{full_hr[0]} "
                   f"/ {px:,.0f} HR px)" + (f"; {', '.join(unknown)}: count unknown, not included" if unknown else ""))
        return StageRow(name, wall, rss, "image", len(rows), spu, n, ratio, n * spu * ratio, formula)
    if name == "select":
        pool = manifest(params["select"].get("pool_split", "train"))
        targets = sum(len(manifest(s)) for s in params["select"].get("target_splits", ["valid", "test"]))
        units = len(pool) + targets
        if demo:
            n, unknown = len(fd.get("train_images") or []) + len(fd.get("valid_images") or []) + \
                len(fd.get("test_images") or []), []
        else:
            n, unknown = _source_counts([x for s in ("train", "valid", "test") for x in fd.get(f"{s}_sources") or []])
        spu = stage_s / units
        formula = (f"{n:,} images x {spu:.2f} s/image (model load and kernel start included; CLIP resizes every "
                   f"view, so no pixel scaling)" + (f"; {', '.join(unknown)}: count unknown" if unknown else ""))
        return StageRow(name, wall, rss, "image embedded", units, spu, n, 1.0, n * spu, formula)
    if name == "report":
        valid = manifest("valid")
        px = _mean([r.hr_height * r.hr_width for r in valid.itertuples()])
        n = len(fd.get("valid_images") or []) if demo else _source_counts(list(fd.get("valid_sources") or []))[0]
        spu = stage_s / len(valid)
        ratio = full_hr[0] * full_hr[1] / px
        formula = (f"{n} validation images x {spu:.2f} s/image (kernel start included) x ({full_hr[1]}x{full_hr[0]} "
                   f"/ {px:,.0f} HR px)")
        return StageRow(name, wall, rss, "validation image", len(valid), spu, n, ratio, n * spu * ratio, formula)
    if name == "benchmark":
        return StageRow(name, wall, rss, "stage", 1, stage_s, None, None, None,
                        "not extrapolated: the test sets' image sizes differ by set and are unknown offline")
    return StageRow(name, wall, rss, "stage", 1, stage_s, None, None, None,
                    "not extrapolated (no per-unit model for this stage)")


def rehearse(profile: str = DEFAULT_PROFILE, repo: str | Path = ".", workdir: str | Path | None = None,
             red: Reduction = DEFAULT, allow_download: bool = False, keep: bool | None = None,
             log: Callable[[str], None] = print) -> Rehearsal:
    """Run the rehearsal of ``profiles/<profile>.yaml`` of ``repo`` (see the module docstring). ``workdir``:
    the scratch folder (new, empty, or one an earlier rehearsal made); default a temporary folder, removed at
    the end unless ``keep``. ``allow_download``: let open_clip fetch the CLIP weights (default: the Hugging Face
    hub is put offline, so only cached weights load)."""
    import torch

    from smt.config import ConfigError
    from smt.pipeline import ABLATION_NOTEBOOKS, SELECTION_DIR, stage_definitions
    from smt.profile import check_params, list_profiles

    repo = Path(repo).resolve()
    profiles = list_profiles(repo)
    if profile not in profiles:
        raise ConfigError(f"unknown profile {profile!r} (profiles/ of {repo}: {', '.join(profiles) or 'none'})")
    temporary = workdir is None
    scratch = Path(tempfile.mkdtemp(prefix=f"smt-rehearse-{profile}-") if temporary else workdir).resolve()
    if not temporary:
        if scratch == repo or repo.is_relative_to(scratch) or any(
                scratch.is_relative_to(repo / p) for p in USER_PATHS):
            raise ValueError(f"--workdir {scratch}: must not be the project folder, a folder above it, or inside "
                             f"its {', '.join(USER_PATHS)}")
        if scratch.exists() and any(scratch.iterdir()) and not (scratch / MARKER).is_file():
            raise ValueError(f"--workdir {scratch}: not empty and not made by an earlier rehearsal (no {MARKER}); "
                             "give a new or empty folder")
        if (scratch / MARKER).is_file():  # an earlier rehearsal's folder: start clean
            shutil.rmtree(scratch)
        scratch.mkdir(parents=True, exist_ok=True)
    (scratch / MARKER).write_text(json.dumps({"profile": profile}) + "\n")
    keep = (not temporary) if keep is None else keep
    before = user_fingerprint(repo)
    load_start = os.getloadavg()[0]
    start = time.perf_counter()
    finished = False
    try:
        log(f"rehearsal of profile {profile} in {scratch}")
        full, params, notes = _prepare(profiles[profile], scratch, red, log)
        with contextlib.chdir(scratch):  # the readiness check resolves the params' relative paths
            check = check_params("params.yaml")
        notes += [f"check (python -m smt check, scratch params): {i.status} {i.what}" for i in check
                  if i.status != "ok"]
        # every DVC stage of the pipeline but the ablations (which `make repro` does not run either)
        definitions = stage_definitions(scratch / "params.yaml")
        stages = [n for n in definitions if n not in ABLATION_NOTEBOOKS]
        env = {**os.environ, "MPLBACKEND": "Agg", "PYTHONDONTWRITEBYTECODE": "1"}
        if not allow_download:
            env["HF_HUB_OFFLINE"] = "1"
        rows = []
        for name in stages:
            log(f"stage {name} ...")
            wall, cpu, rss, rc = _run_stage(name, scratch, env, scratch / "logs")
            if rc != 0:
                tail = (scratch / "logs" / f"{name}.log").read_text()[-3000:]
                raise RehearsalError(f"stage {name} failed (exit code {rc}) after {wall:.0f} s; its log is "
                                     f"{scratch / 'logs' / f'{name}.log'} (the scratch folder is kept); last "
                                     f"lines:\n{tail}")
            rows.append(_measure(name, scratch, wall, rss, full, params, red))
            rows[-1].cpu_seconds = cpu
            log(f"stage {name}: {wall:.1f} s ({cpu:.0f} CPU s), peak RSS {rss:.0f} MB")
        clip_untrained = None
        selection = scratch / SELECTION_DIR / "selection.json"
        if selection.is_file():
            clip_untrained = bool(json.loads(selection.read_text())["features_untrained"])
        for name, m in params["train"]["models"].items():
            first = next((n for n in stages if n.startswith(f"train_{name}_")), None)
            if first and m.get("pretrained"):
                text = _notebook_text(scratch / definitions[first].report_dir / Path(definitions[first].notebook).name)
                line = next((ln for ln in text.splitlines() if m["pretrained"] in ln and "loaded" in ln), None)
                if line is None or "(from 'params_ema')" not in line:
                    raise RehearsalError(f"{first}: the log does not show {m['pretrained']} loaded from 'params_ema'")
                notes.append(f"{first}: {line.strip()}")
        finished = True
    finally:
        wall_total = time.perf_counter() - start
        after = user_fingerprint(repo)
        if temporary and not keep and finished:  # a failed run's folder stays, for its logs
            shutil.rmtree(scratch, ignore_errors=True)
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    if changed:
        raise RehearsalError(f"the user's files changed during the rehearsal: {', '.join(changed[:10])}")
    device = "cuda: " + torch.cuda.get_device_name(0) if torch.cuda.is_available() else \
        f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"
    return Rehearsal(profile, str(scratch) if keep else f"{scratch} (removed)", rows, notes,
                     int(full["train"].get("rounds", 1)), wall_total, device, clip_untrained, True,
                     (load_start, os.getloadavg()[0]))


# ---------------------------------------------------------------------------------------------------- output


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    for unit, size in (("years", 365.25 * 86400), ("days", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:,.1f} {unit}"
    return f"{seconds:.1f} s"


def format_rehearsal(r: Rehearsal) -> str:
    head = ("stage", "wall s", "CPU s", "peak RSS MB", "unit", "done", "s/unit", "full units", "work ratio",
            "EXTRAPOLATED full wall-clock")
    body = []
    for row in r.rows:
        body.append((row.stage, f"{row.wall_seconds:.1f}", f"{row.cpu_seconds:.0f}", f"{row.peak_rss_mb:.0f}",
                     row.unit, f"{row.units:g}",
                     f"{row.seconds_per_unit:.3f}", "n/a" if row.full_units is None else f"{row.full_units:,.0f}",
                     "n/a" if row.work_ratio is None else f"{row.work_ratio:,.1f}",
                     _duration(row.full_seconds) + (f" per round (x{r.rounds})" if row.per_round else "")))
        for m in row.detail:
            body.append((f"  {m['method']}", "", "", f"{m['peak_mb']:.0f}" if m.get("peak_mb") else "", "image", "",
                         f"{m['seconds_per_image']:.3f}", "", f"{m['work_ratio']:,.1f}", _duration(m["full_seconds"])))
    widths = [max(len(str(x[i])) for x in (head, *body)) for i in range(len(head))]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    out = [f"Dress rehearsal of profile {r.profile} on {r.device}: {len(r.rows)} stages in order, "
           f"{r.wall_seconds:.0f} s in all ({r.wall_seconds / 60:.1f} min); scratch folder {r.workdir}",
           f"load average {r.load_average[0]:.1f} at the start, {r.load_average[1]:.1f} at the end, on "
           f"{os.cpu_count()} cores (above the core count, other work shared the machine and every time is longer)",
           "",
           line(head), line(["-" * w for w in widths]), *map(line, body), ""]
    out.append(f"EXTRAPOLATION (not a measurement) of the full profile on this device, one process, all "
               f"{r.rounds} round(s): {_duration(r.total_full_seconds())}")
    out.append("  full seconds = full units x s/unit measured x work ratio (work per unit, full / rehearsal): LR px "
               "per optimizer step (batch x patch^2) for training; LR px processed per image under the method's "
               "tiling (distinct tilings of the multi-window ensemble, overlaps) for inference; HR px per image "
               "for data and report; 1 for CLIP (views are resized). Linear in pixels (windowed attention, "
               "convolutions, a linear scan); fixed per-step costs weigh more at these sizes, so it tends to be high.")
    out.append("  s/unit: training = the engine's train_seconds / steps (first-step warm-up and the final "
               "checkpoint save included); inference = the runner's seconds per image per method; other stages = "
               "papermill seconds / images (kernel start included). Peak RSS: the stage's largest process; CPU s: "
               "user + system seconds of the stage's processes.")
    out.append("  per stage:")
    out += [f"    {row.stage}: {row.formula}" for row in r.rows]
    out.append("CLIP features: " + ("UNTRAINED (weights not available offline; the selection shows the mechanism, "
                                   "not a meaningful ranking)" if r.clip_untrained else
                                   "trained" if r.clip_untrained is not None else "n/a"))
    out += [f"note: {n}" for n in r.notes]
    out.append("user files (params.yaml, dvc.yaml, dvc.lock, data/, models/, results/, reports/): untouched "
               "(size and mtime of every file compared before and after)" if r.untouched else "USER FILES CHANGED")
    return "\n".join(out)
