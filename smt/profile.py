"""Profiles (``profiles/<name>.yaml``: complete params files) and the readiness check.

``python -m smt profile NAME`` validates the profile, checks it (below), copies it to ``params.yaml`` and
regenerates ``dvc.yaml``; a ``params.yaml`` that matches no profile (hand-edited) is first saved beside it, so
nothing is lost. ``--dry-run`` only checks. ``python -m smt check`` checks the active params.

The check validates every section and lists, without training or downloading anything, what a run would still
need: data (folders to provide, archives to download), weights (pretrained checkpoints, CLIP weights), GPUs
(processes asked for vs devices present) and optional accelerators.
"""
from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from smt.config import ConfigError, load_section

__all__ = ["CheckItem", "check_params", "list_profiles", "switch_profile", "format_check"]

SECTIONS = ("data", "select", "train", "infer", "report", "ablations")


@dataclass(frozen=True)
class CheckItem:
    status: str  # "ok" | "todo" (the pipeline will do it) | "missing" (you must provide it)
    what: str


def _ok_or_todo(ok: bool, ok_what: str, todo_what: str) -> CheckItem:
    """An "ok" item when ``ok``, else a "todo" one (something the pipeline or the user still has to do)."""
    return CheckItem("ok", ok_what) if ok else CheckItem("todo", todo_what)


def list_profiles(repo: str | Path = ".") -> dict[str, Path]:
    return {p.stem: p for p in sorted((Path(repo) / "profiles").glob("*.yaml"))}


def _gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def check_params(params_path: str | Path, gpus: int | None = None) -> list[CheckItem]:
    """Everything a run of ``params_path`` needs, found or not. Raises ConfigError for an invalid file."""
    cfgs = {s: load_section(s, params_path) for s in SECTIONS}  # every section parses and validates
    data, select, train, infer = cfgs["data"], cfgs["select"], cfgs["train"], cfgs["infer"]
    items = [CheckItem("ok", f"{params_path}: all sections valid")]
    # data
    if data.source == "demo":
        items.append(CheckItem("ok", "data: embedded demo images (no download)"))
    else:
        from smt.data.sources import missing_inputs

        lines = missing_inputs(data)
        for line in lines:
            items.append(CheckItem("missing" if line.startswith("MISSING") else "todo", line.removeprefix(
                "MISSING ")))
        if not lines:
            items.append(CheckItem("ok", f"data: every source of {data.root} is present"))
    for split in ("train", "valid"):
        if not (list(getattr(data, f"{split}_sources")) or list(getattr(data, f"{split}_images"))):
            items.append(CheckItem("missing", f"data: no {split} images"))
    # weights
    for name, m in train.models.items():
        if m.pretrained:
            ok = Path(m.pretrained).is_file()
            items.append(CheckItem("ok" if ok else "missing",
                                   f"weights: train.models.{name}.pretrained {m.pretrained}"
                                   + ("" if ok else " not found (download it from the authors' release)")))
    if select.pretrained:
        items.append(_ok_or_todo(Path(select.pretrained).is_file(), f"CLIP weights: {select.pretrained}",
                                 f"CLIP weights: open_clip will download {select.model}/{select.pretrained}"
                                 " (needs internet once; or set select.pretrained to a local file)"))
    elif not select.allow_untrained:
        items.append(CheckItem("missing", "CLIP weights: select.pretrained is empty and allow_untrained is false"))
    # devices
    gpus = _gpu_count() if gpus is None else gpus
    for section, cfg in (("train", train), ("infer", infer)):
        procs = cfg.nproc
        if cfg.device == "cuda" and gpus == 0:
            items.append(CheckItem("missing", f"GPUs: {section}.device is cuda but this machine has no CUDA device"))
        elif cfg.device != "cpu" and gpus and procs > gpus:
            items.append(CheckItem("missing", f"GPUs: {section}.nproc = {procs} but this machine has {gpus}"))
        elif cfg.device != "cpu" and gpus:
            items.append(CheckItem("ok", f"GPUs: {section} uses {procs} of {gpus} per node x {cfg.nnodes} node(s)"))
        if cfg.nnodes > 1:
            items.append(CheckItem("todo", f"{section}.nnodes = {cfg.nnodes}: run `dvc repro` once, inside a SLURM "
                                           "allocation of the nodes (srun starts them), with the checkout on "
                                           "shared storage (docs/cluster.md)"))
    uses_mamba = any("mamba" in m.preset for m in train.models.values())
    if uses_mamba and (gpus or train.device == "cuda"):
        from smt.kernels.selective_scan import cuda_scan_backend

        name, reason = cuda_scan_backend()
        items.append(_ok_or_todo(name == "mamba_ssm", f"selective scan on CUDA: {name} ({reason})",
                                 f"selective scan on CUDA: {name} ({reason}); for mamba_ssm's kernel "
                                 "install it with its CUDA build (README, GPU machines)"))
    stages = len(train.schedule()) * len(train.models)
    iters = sum(train.stages[s].iters for _, s in train.schedule())
    items.append(CheckItem("ok", f"schedule: {stages} training stages ({len(train.models)} models x "
                                 f"{train.rounds} rounds x {len(train.stage_order)}), {iters:,} steps per model"))
    return items


def format_check(items: list[CheckItem]) -> str:
    mark = {"ok": "ok     ", "todo": "todo   ", "missing": "MISSING"}
    lines = [f"{mark[i.status]} {i.what}" for i in items]
    n = sum(i.status == "missing" for i in items)
    lines.append("READY: nothing missing" if n == 0 else f"NOT READY: {n} thing(s) missing (lines marked MISSING)")
    return "\n".join(lines)


def switch_profile(name: str, repo: str | Path = ".", dry_run: bool = False, gpus: int | None = None,
                   ) -> tuple[list[CheckItem], list[str]]:
    """Check profile ``name`` and (unless ``dry_run``) make it the active params. Returns (check, actions)."""
    from smt.pipeline import write_dvc_yaml

    repo = Path(repo)
    profiles = list_profiles(repo)
    if name not in profiles:
        raise ConfigError(f"unknown profile {name!r} (profiles/: {', '.join(profiles) or 'none'})")
    items = check_params(profiles[name], gpus)
    actions: list[str] = []
    if dry_run:
        return items, actions
    params = repo / "params.yaml"
    if params.exists():
        current = params.read_text()
        if current == profiles[name].read_text():
            actions.append(f"params.yaml already is profile {name}")
        elif all(current != p.read_text() for p in profiles.values()):
            backup = repo / f"params.yaml.{time.strftime('%Y%m%d-%H%M%S')}.bak"
            shutil.copyfile(params, backup)
            actions.append(f"params.yaml matched no profile (edited by hand): saved as {backup.name}")
    shutil.copyfile(profiles[name], params)
    write_dvc_yaml(params, repo / "dvc.yaml")
    actions.append(f"params.yaml <- profiles/{name}.yaml; dvc.yaml regenerated")
    return items, actions
