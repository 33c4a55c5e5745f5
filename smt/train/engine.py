"""The training loop for one (model, round, stage): progressive schedule, multi-scale loss, EMA, resumable,
single-process or DistributedDataParallel under ``torchrun`` (gloo on CPU, NCCL on GPU), same code.

``train_stage`` writes into ``<out_root>/<model>/<run>/``:
  ``state.pt`` (resumable state, atomic), ``model.safetensors`` (EMA weights), ``train_log.csv`` (step, loss,
  per-scale losses, lr), ``val_log.csv`` (step, PSNR-Y of the EMA model and of bicubic on the validation
  images), ``metrics.json`` (final validation figures).
A stage starts from the previous stage's ``model.safetensors`` (or the configured pretrained checkpoint for
the first stage; auxiliary heads start fresh, and the log says so). A non-finite loss stops the run with a
clear error; the last good state stays on disk.

Scale: the stage's ``batch_size`` is global. Each of the ``world`` processes takes its slice of every step's
batch and runs it as ``accumulation`` micro-batches of ``train.micro_batch`` (gradient sync only on the last one),
so the update does not depend on the GPU count or memory. ``train.activation_checkpointing`` recomputes each
residual group in the backward. Under bf16 autocast the output convolutions and the mean add run in fp32.

Preemption: SIGTERM, SIGINT or SIGUSR1 (what schedulers send before a kill) during a stage lets the current step
finish, saves ``state.pt`` at that step (with periodic checkpoints off too) and raises :class:`Preempted`
(``python -m smt train`` exits with :data:`PREEMPTED_EXIT_CODE`); rerunning the stage resumes it exactly
(SIGKILL aborts at once; the last saved state stays). RNG states are saved per rank and restored on the
rank that saved them.
"""
from __future__ import annotations

import csv
import json
import math
import signal
import threading
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from smt import seeds
from smt.config import TrainConfig
from smt.data.images import image_to_tensor, read_image, tensor_to_image
from smt.data.manifest import read_manifest
from smt.distributed import any_rank, barrier, device_for, dist_info, gather_objects, init_process_group
from smt.evaluate import bicubic_upscale
from smt.metrics import NTIRE2025, evaluate_pair
from smt.models import build_model, load_weights
from smt.models.common import AUX_PREFIX, LEGACY_AUX_PREFIX
from smt.models.presets import preset
from smt.train.checkpoint import EMA, atomic_save, rng_state, save_safetensors, set_rng_state
from smt.train.data import GlobalBatchSampler, PairedPatchDataset, collate, read_subset
from smt.train.losses import multiscale_loss
from smt.train.output_precision import fp32_output_convs

__all__ = ["TrainingError", "Preempted", "PREEMPTED_EXIT_CODE", "STOP_SIGNALS", "StageResult", "train_stage",
           "run_dir", "tensor_to_uint8", "validate", "resolve_micro_batch", "checkpoint_residual_groups"]

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: `python -m smt train` stopped by a signal; rerunning resumes
STOP_SIGNALS = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGINT", "SIGUSR1") if hasattr(signal, n))


class TrainingError(RuntimeError):
    """Training cannot continue (non-finite loss, missing input checkpoint, ...)."""


class Preempted(TrainingError):
    """A stop signal arrived during a stage: the state was saved at ``step``; rerunning the stage resumes."""

    def __init__(self, message: str, step: int, signal_name: str) -> None:
        super().__init__(message)
        self.step, self.signal_name = step, signal_name


class _StopSignals:
    """While active, the stop signals only set :attr:`received` (the loop checks it after each step). Repeated
    signals change nothing: a scheduler and ``torchrun`` (which forwards SIGTERM and SIGINT to its workers) often
    deliver the same one twice, and the step's state must still be saved. To abort at once: SIGKILL or Ctrl-\\
    (SIGQUIT); the last saved state stays. Handlers can only be set from the main thread: elsewhere (a notebook's
    worker thread) the signals keep their default meaning, and the log says so."""

    def __init__(self, log) -> None:
        self.received: str | None = None
        self.log = log
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.received is not None:
            return
        self.received = name
        self.log(f"received {name}: finishing the current step, then saving the state and stopping")

    def __enter__(self) -> "_StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        else:
            self.log("not the main thread: stop signals end the stage without saving its current step")
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _ignore_stop_signals(worker_id: int) -> None:
    """DataLoader workers leave stop signals to the main process (it finishes the step, then shuts them down)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


@dataclass
class StageResult:
    model: str
    run: str
    steps: int
    seconds: float
    val_psnr_y: float
    bicubic_psnr_y: float
    out_dir: str
    # measurements of this session on rank 0 (not results): mean seconds of a training step (batch on the device
    # to EMA update, device synchronised; each session's first step, a warm-up, left out; nan with fewer than two
    # steps) and, on CUDA, the peak allocated memory in MiB (nan on CPU)
    step_seconds: float = math.nan
    peak_mb: float = math.nan


def run_dir(cfg: TrainConfig, model: str, round_: int, stage: str) -> Path:
    return Path(cfg.out_root) / model / cfg.run_name(round_, stage)


def exported_weights(cfg: TrainConfig, model: str, round_: int, stage: str) -> Path:
    """The EMA weights a finished stage exports: the next stage starts from them, and every later user loads
    them with :func:`smt.models.load_model` (preset ``cfg.models[model].preset``)."""
    return run_dir(cfg, model, round_, stage) / "model.safetensors"


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
def validate(model: torch.nn.Module, root: str, scale: int, device: torch.device, max_side: int = 0, *,
             rank: int = 0, world: int = 1, baseline_cache: dict | None = None) -> dict:
    """Mean PSNR-Y (NTIRE2025 protocol) of ``model`` and of bicubic on the validation split.

    Sharded: rank ``r`` of ``world`` scores images ``r, r + world, ...`` and the per-image figures are gathered
    (every rank must call it; all get the result), so the mean is that of one process, in the same order.
    Each image runs on a forked RNG seeded with its index: a model that draws random numbers in eval mode
    (MambaIRv2's Gumbel routing) gets the same noise at every validation and on any rank, and training's random
    stream does not depend on how often it validates (``train.val_every`` is an execution setting). The bicubic
    figures do not change during a run: ``baseline_cache`` (a dict kept by the caller) keeps them."""
    model.eval()
    rows = list(read_manifest(root, "valid").itertuples())
    devices = [device] if device.type == "cuda" else []
    cache = {} if baseline_cache is None else baseline_cache
    mine = {}
    with torch.random.fork_rng(devices=devices):
        for i in range(rank, len(rows), world):
            torch.manual_seed(i)
            mine[i] = _validate_image(model, root, rows[i], scale, device, max_side, cache)
    scores = {i: v for part in gather_objects(mine) for i, v in part.items()}
    ours, bic = [scores[i][0] for i in range(len(rows))], [scores[i][1] for i in range(len(rows))]
    return {"psnr_y": sum(ours) / len(ours), "bicubic_psnr_y": sum(bic) / len(bic)}


def _validate_image(model: torch.nn.Module, root: str, row, scale: int, device: torch.device, max_side: int,
                    cache: dict) -> tuple[float, float]:
    lr, hr = read_image(Path(root) / row.lr_path), read_image(Path(root) / row.hr_path)
    if max_side and max(lr.shape[:2]) > max_side:
        h, w = min(lr.shape[0], max_side), min(lr.shape[1], max_side)
        t, l = (lr.shape[0] - h) // 2, (lr.shape[1] - w) // 2
        lr, hr = lr[t:t + h, l:l + w], hr[scale * t:scale * (t + h), scale * l:scale * (l + w)]
    sr = tensor_to_image(model(image_to_tensor(lr, device)))
    key = (str(root), row.lr_path, row.hr_path, scale, max_side)
    if key not in cache:
        cache[key] = evaluate_pair(bicubic_upscale(lr, scale), hr, NTIRE2025)["psnr_y"]
    return evaluate_pair(sr, hr, NTIRE2025)["psnr_y"], cache[key]


# --------------------------------------------------------------------------------- scale: memory and precision


def checkpoint_residual_groups(model: torch.nn.Module) -> int:
    """Activation checkpointing of every residual group (``model.layers[i]``, HAT's RHAG and MambaIRv2's
    ASSG): their activations are recomputed in the backward instead of kept (memory for about one more
    forward). The RNG state is replayed in the recompute (``preserve_rng_state``), so DropPath and Gumbel
    draws, the loss and the gradients are those without it. Patches the instances' ``forward`` (state-dict
    keys unchanged); apply it to the training model only, after copies (EMA) are made. Returns the count."""
    from torch.utils.checkpoint import checkpoint

    layers = getattr(model, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or len(layers) == 0:
        raise TrainingError(f"activation checkpointing: {type(model).__name__} has no residual groups "
                            f"(a non-empty `layers` ModuleList)")
    for layer in layers:
        def run(*args, _forward=layer.forward, **kwargs):
            if not torch.is_grad_enabled():
                return _forward(*args, **kwargs)
            return checkpoint(_forward, *args, use_reentrant=False, preserve_rng_state=True, **kwargs)
        layer.forward = run
    return len(layers)


def _divisors_desc(n: int) -> list[int]:
    return [d for d in range(n, 0, -1) if n % d == 0]


def resolve_micro_batch(setting: int | str, per_process: int, probe=None, device: torch.device | None = None,
                        log=print) -> int:
    """A per-process micro-batch from ``train.micro_batch``: a count as given (0 = ``per_process``); ``"auto"``
    on CUDA = the largest divisor of ``per_process`` for which ``probe(m)`` (one forward and backward, see
    :func:`_memory_probe`) returns True; on the CPU ``"auto"`` is ``per_process`` (no accumulation: host
    memory is not what limits a CPU run). Under DDP the ranks agree on the smallest choice."""
    if setting != "auto":
        return per_process if setting == 0 else int(setting)
    if device is None or device.type != "cuda" or probe is None:
        return per_process
    chosen = 0
    for m in _divisors_desc(per_process):
        if probe(m):
            chosen = m
            break
    chosen = min(gather_objects(chosen))
    if chosen == 0:
        raise TrainingError(f"train.micro_batch auto: not even one patch per micro-batch fits in the memory of "
                            f"{device}; enable train.activation_checkpointing or use a smaller model/patch")
    log(f"micro-batch auto: {chosen} patches per process ({per_process // chosen} accumulation steps)")
    return chosen


def _memory_probe(train_model: torch.nn.Module, model: torch.nn.Module, patch: int, device: torch.device,
                  use_bf16: bool, headroom: float = 0.9):
    """``probe(m)``: can one forward and backward of ``m`` random patches run on ``device`` with the optimizer
    (Adam: two moments) and EMA copies also resident, within ``headroom`` of its memory? Weights, gradients and
    RNG are left as they were."""
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    total = torch.cuda.get_device_properties(device).total_memory

    def probe(m: int) -> bool:
        ok = False
        try:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            with torch.random.fork_rng(devices=[device]):
                x = torch.rand(m, 3, patch, patch, device=device)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                    out = train_model(x)
                sum(o.float().mean() for o in out.values()).backward()
            torch.cuda.synchronize(device)
            ok = torch.cuda.max_memory_allocated(device) + 3 * param_bytes <= headroom * total
        except torch.cuda.OutOfMemoryError:
            ok = False
        finally:
            model.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
        return ok

    return probe


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
                max_steps: int | None = None, log=print, store: str = "") -> StageResult:
    """Train one stage (resuming from ``state.pt`` when present and matching). ``max_steps`` stops early
    (for tests of kill-and-resume); the state is saved at that point. A stop signal saves the state at the
    current step and raises :class:`Preempted` (see the module docstring). ``store``: the prepared store of
    ``data_root``'s training images (``data.store``; the same patches, read without decoding PNGs)."""
    cfg.check_run(model_name, round_, stage)  # before any work: a typo is an error naming the valid names
    with _StopSignals(log) as stop:
        return _train_stage(cfg, model_name, round_, stage, data_root, scale, max_steps, log, stop, store)


@dataclass
class _Run:
    """One session of one training stage: what its steps share (the method's pieces, built in order by
    :func:`_train_stage`)."""

    cfg: TrainConfig
    model_name: str
    round_: int
    stage: str
    data_root: str
    scale: int
    log: Callable[[str], None]
    rank: int
    world: int
    device: torch.device
    out: Path
    arch: str
    kwargs: dict
    fingerprint: dict  # what must match for a saved state to be resumed
    step: int = 0
    seconds_before: float = 0.0  # training seconds of earlier sessions of this stage
    state: dict | None = None  # the resumed state.pt, if any
    model: torch.nn.Module | None = None
    optimizer: torch.optim.Optimizer | None = None
    ema: EMA | None = None
    train_model: torch.nn.Module | None = None  # the model as the loop calls it (multi-scale outputs, DDP)
    micro: int = 0
    accumulation: int = 1
    use_bf16: bool = False
    store: str = ""  # the prepared store of the training images ("" = decode the PNGs): not in the fingerprint

    @property
    def spec(self):
        return self.cfg.stages[self.stage]

    @property
    def name(self) -> str:
        return f"{self.model_name} {self.cfg.run_name(self.round_, self.stage)}"

    @property
    def state_path(self) -> Path:
        return self.out / "state.pt"


def _train_stage(cfg: TrainConfig, model_name: str, round_: int, stage: str, data_root: str, scale: int,
                 max_steps: int | None, log, stop: _StopSignals, store: str = "") -> StageResult:
    """The method, in the order it runs (the order also fixes every random draw: keep it)."""
    run = _open_run(cfg, model_name, round_, stage, data_root, scale, log)
    run.store = store
    _resume_or_init(run)
    _prepare_model(run)
    loader = _training_data(run)
    session = _loop(run, loader, max_steps, stop)
    return _export(run, *session)


def _open_run(cfg: TrainConfig, model_name: str, round_: int, stage: str, data_root: str, scale: int,
              log) -> _Run:
    """Process group, device, threads, and the fingerprint a saved state must match to be resumed."""
    rank, world = dist_info()
    device = _device(cfg)
    init_process_group(device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    cfg.per_process_batch(stage, world)  # the global batch must split evenly over the processes
    arch, kwargs = preset(cfg.models[model_name].preset)
    kwargs = {**kwargs, "aux_scales": tuple(cfg.aux_scales)}
    # JSON-normalised: tuples become lists, as in the saved state
    fingerprint = json.loads(json.dumps({
        "arch": arch, "kwargs": kwargs, "stage": asdict(cfg.stages[stage]), "seed": cfg.seed, "world": world,
        "ema_decay": cfg.ema_decay, "ema_warmup": cfg.ema_warmup, "betas": cfg.betas, "grad_clip": cfg.grad_clip,
        "aux_weights": cfg.aux_weights, "aux_target_resize": cfg.aux_target_resize, "augment": asdict(cfg.augment), "data_root": data_root}))
    return _Run(cfg, model_name, round_, stage, data_root, scale, log, rank, world, device,
                run_dir(cfg, model_name, round_, stage), arch, kwargs, fingerprint)


def _resume_or_init(run: _Run) -> None:
    """The model and optimizer: from this stage's saved state when it matches, else from the previous stage's
    exported weights (or the configured pretrained checkpoint, or from scratch)."""
    cfg, mspec = run.cfg, run.cfg.models[run.model_name]
    torch.manual_seed(seeds.model_init_seed(cfg.seed, run.round_, run.rank))
    run.model = build_model(mspec.preset, aux_scales=tuple(cfg.aux_scales)).to(run.device)
    if run.state_path.exists():
        run.state = torch.load(run.state_path, map_location="cpu", weights_only=True)
        if run.state.get("fingerprint") != run.fingerprint:
            run.log(f"{run.state_path}: config changed since it was written; starting this stage afresh")
            run.state = None
    if run.state is None:
        prev = cfg.previous(run.round_, run.stage)
        init = exported_weights(cfg, run.model_name, *prev) if prev else (
            Path(mspec.pretrained) if mspec.pretrained else None)
        if init is not None:
            if not init.exists():
                raise TrainingError(f"{init}: the checkpoint this stage starts from does not exist "
                                    f"(run the previous stage first)")
            run.log(load_weights(run.model, init, allow_missing=(AUX_PREFIX,),
                                 ignore_unexpected=(AUX_PREFIX, LEGACY_AUX_PREFIX)).describe())
        else:
            run.log(f"{run.model_name}: training from scratch")
    run.optimizer = torch.optim.Adam(run.model.parameters(), lr=run.spec.lr, betas=tuple(cfg.betas))
    if run.state is not None:
        run.model.load_state_dict(run.state["model"])
        run.optimizer.load_state_dict(run.state["optimizer"])
        run.step, run.seconds_before = run.state["step"], float(run.state.get("train_seconds", 0.0))
        run.log(f"resuming {run.model_name} {cfg.run_name(run.round_, run.stage)} at step {run.step}")


def _prepare_model(run: _Run) -> None:
    """The EMA copy, the execution settings (bf16, activation checkpointing, micro-batches) and DDP."""
    cfg, model, device = run.cfg, run.model, run.device
    run.use_bf16 = cfg.bf16 and device.type == "cuda"
    # the EMA copy is made from the plain model: the patches below apply to the training model only
    run.ema = EMA(model, cfg.ema_decay, cfg.ema_warmup)
    if run.use_bf16:
        fp32_output_convs(model)
    if cfg.activation_checkpointing:
        run.log(f"activation checkpointing: {checkpoint_residual_groups(model)} residual groups")
    run.train_model = _MultiScale(model)
    per_process = cfg.per_process_batch(run.stage, run.world)
    run.micro = resolve_micro_batch(cfg.micro_batch_setting(run.stage), per_process,
                                    _memory_probe(run.train_model, model, run.spec.patch_size, device, run.use_bf16)
                                    if device.type == "cuda" else None, device, run.log)
    run.accumulation = cfg.accumulation(run.stage, run.world, run.micro)
    if run.world > 1:
        run.train_model = DistributedDataParallel(run.train_model)  # broadcasts rank 0's weights to every rank
        with torch.no_grad():  # so the EMA starts from them too (ranks initialised from their own seeds)
            for e, p in zip(run.ema.model.parameters(), model.parameters()):
                e.copy_(p)
    if run.state is not None:
        run.ema.model.load_state_dict(run.state["ema"])


def _training_data(run: _Run):
    """The iterator of training batches (this process's slice of each global batch), from the resumed step;
    then the resumed random state (creating the loader's iterator draws from the global generator)."""
    cfg, spec = run.cfg, run.spec
    subset = read_subset(spec.subset) if spec.subset else None
    dataset = PairedPatchDataset(run.data_root, "train", spec.patch_size, run.scale, subset, store=run.store or None)
    sampler = GlobalBatchSampler(dataset.sizes(), spec.patch_size, spec.batch_size,
                                 seeds.sampler_seed(cfg.seed, run.round_), run.rank, run.world,
                                 augment=cfg.augment, start_step=run.step)
    loader = iter(DataLoader(dataset, batch_sampler=sampler, num_workers=cfg.num_workers, collate_fn=collate,
                             worker_init_fn=_ignore_stop_signals if cfg.num_workers else None))
    if run.state is not None:
        ranks = run.state.get("rng_ranks")
        set_rng_state(ranks[run.rank] if ranks is not None else run.state["rng"])
    return loader


def _save_state(run: _Run, start: float, pending_validation: bool = False) -> None:
    """``state.pt`` at the current step (rank 0 writes it; every rank's random state goes in)."""
    rng = gather_objects(rng_state())  # every rank's stream, restored on the rank that drew it
    if run.rank != 0:
        return
    extra = {"rng_ranks": rng} if run.world > 1 else {}
    atomic_save({"fingerprint": run.fingerprint, "arch": run.arch, "model_args": run.kwargs, "step": run.step,
                 "train_seconds": run.seconds_before + time.perf_counter() - start,
                 "model": run.model.state_dict(), "ema": run.ema.model.state_dict(),
                 "optimizer": run.optimizer.state_dict(), "rng": rng[0], **extra,
                 "pending_validation": pending_validation}, run.state_path)


def _validate_ema(run: _Run, baseline_cache: dict) -> dict:
    """PSNR-Y of the EMA model (and of bicubic) on the validation images, logged to ``val_log.csv``."""
    v = validate(run.ema.model, run.data_root, run.scale, run.device, run.cfg.val_max_side, rank=run.rank,
                 world=run.world, baseline_cache=baseline_cache)
    if run.rank == 0:
        _append_csv(run.out / "val_log.csv", {"step": run.step, "psnr_y": round(v["psnr_y"], 4),
                                              "bicubic_psnr_y": round(v["bicubic_psnr_y"], 4)})
    return v


def _loop(run: _Run, loader, max_steps: int | None, stop: _StopSignals) -> tuple[float, list[float], dict]:
    """The training steps up to the stage's ``iters`` (or ``max_steps``): multi-scale loss over micro-batches,
    step-wise learning rate, EMA update, logs, periodic validation and state saves; a stop signal saves the state
    and raises :class:`Preempted`. Returns (session start time, step times, validation cache)."""
    cfg, spec, device, model = run.cfg, run.spec, run.device, run.model
    weights = {model.upscale: 1.0, **dict(zip(cfg.aux_scales, cfg.aux_weights))}
    run.out.mkdir(parents=True, exist_ok=True)
    train_log = run.out / "train_log.csv"
    if run.rank == 0:
        _truncate_log(train_log, run.step)
        _truncate_log(run.out / "val_log.csv", run.step)
    baseline_cache: dict = {}
    last = min(spec.iters, max_steps) if max_steps is not None else spec.iters
    start = time.perf_counter()
    if run.state is not None and run.state.get("pending_validation"):  # stopped by a signal before a validation
        _validate_ema(run, baseline_cache)
    bar = tqdm(total=spec.iters, initial=run.step, desc=run.name, disable=run.rank != 0, mininterval=5)
    if device.type == "cuda":  # the memory probe's peak is not the training's
        torch.cuda.reset_peak_memory_stats(device)
    step_times: list[float] = []
    accumulation, micro = run.accumulation, run.micro
    if accumulation > 1 and run.rank == 0:
        run.log(f"{run.name}: {accumulation} micro-batches of {micro} patches per process per step "
                f"(global batch {spec.batch_size} over {run.world} process(es))")
    model.train()
    while run.step < last:
        lr, hr = (t.to(device, non_blocking=True) for t in next(loader))
        t_step = time.perf_counter()
        for group in run.optimizer.param_groups:
            group["lr"] = _lr_at(spec.lr, spec.milestones, spec.gamma, run.step)
        run.optimizer.zero_grad(set_to_none=True)
        loss_sum, parts_sum = None, {}
        for k in range(accumulation):
            sl = slice(k * micro, (k + 1) * micro) if accumulation > 1 else slice(None)
            # DDP all-reduces gradients on the last micro-batch only
            sync = run.train_model.no_sync() if run.world > 1 and k < accumulation - 1 else nullcontext()
            with sync:
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=run.use_bf16):
                    outputs = run.train_model(lr[sl])
                loss, parts = multiscale_loss(outputs, hr[sl], model.upscale, weights, spec.loss,
                                              cfg.aux_target_resize)
                if not torch.isfinite(loss):
                    raise TrainingError(f"{run.name}: loss is {loss.item()} at step {run.step + 1}; stopped. The "
                                        f"last good state is {run.state_path} (step of last save)")
                (loss if accumulation == 1 else loss / accumulation).backward()
            loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
            for s_, v_ in parts.items():
                parts_sum[s_] = parts_sum.get(s_, 0.0) + v_
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        run.optimizer.step()
        run.ema.update(model, run.step)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        step_times.append(time.perf_counter() - t_step)
        run.step += 1
        bar.update(1)
        if run.rank == 0 and (run.step % cfg.log_every == 0 or run.step == spec.iters):
            _append_csv(train_log, {"step": run.step, "loss": round((loss_sum / accumulation).item(), 6),
                                    **{f"loss_x{s_}": round(v_ / accumulation, 6)
                                       for s_, v_ in sorted(parts_sum.items())},
                                    "lr": run.optimizer.param_groups[0]["lr"]})
        validate_now = cfg.val_every > 0 and run.step % cfg.val_every == 0 and run.step < spec.iters
        # every rank must take the same branch: a signal seen by any rank stops all of them at this step
        if any_rank(stop.received is not None, device) and run.step < spec.iters:
            _save_state(run, start, pending_validation=validate_now)
            barrier()
            bar.close()
            why = stop.received or "a stop signal on another rank"
            raise Preempted(f"{run.name}: stopped by {why} after step {run.step} of {spec.iters}; the state is "
                            f"saved in {run.state_path}; rerun the stage (or `dvc repro`) to resume", run.step, why)
        if validate_now:
            _validate_ema(run, baseline_cache)
            model.train()
        if (cfg.ckpt_every > 0 and run.step % cfg.ckpt_every == 0) or run.step == last:
            _save_state(run, start)
    bar.close()
    return start, step_times, baseline_cache


def _export(run: _Run, start: float, step_times: list[float], baseline_cache: dict) -> StageResult:
    """At the stage's last step: the final validation, the EMA weights (``model.safetensors``) and
    ``metrics.json``. Returns this session's result and measurements."""
    spec, device = run.spec, run.device
    seconds = run.seconds_before + time.perf_counter() - start  # over all sessions of this stage
    step_seconds = sum(step_times[1:]) / (len(step_times) - 1) if len(step_times) > 1 else math.nan
    peak_mb = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else math.nan
    v = {"psnr_y": math.nan, "bicubic_psnr_y": math.nan}
    if run.step == spec.iters:
        v = _validate_ema(run, baseline_cache)
        if run.rank == 0:
            meta = {"arch": run.arch, "model_args": json.dumps(run.kwargs), "step": str(run.step),
                    "run": run.out.as_posix()}
            save_safetensors(run.ema.model.state_dict(), exported_weights(run.cfg, run.model_name, run.round_,
                                                                         run.stage), meta)
            (run.out / "metrics.json").write_text(json.dumps(
                {"val_psnr_y": v["psnr_y"], "bicubic_psnr_y": v["bicubic_psnr_y"], "steps": run.step,
                 "train_seconds": seconds}, indent=2) + "\n")
    barrier()
    return StageResult(run.model_name, run.cfg.run_name(run.round_, run.stage), run.step, seconds, v["psnr_y"],
                       v["bicubic_psnr_y"], str(run.out), step_seconds, peak_mb)


class _MultiScale(torch.nn.Module):
    """Routes ``forward`` to ``forward_multiscale`` (DDP's gradient hooks run through ``forward``)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> dict:
        return self.model.forward_multiscale(x)
