"""The training loop for one (model, round, stage): progressive schedule, multi-scale loss, EMA, resumable,
single-process or DistributedDataParallel under ``torchrun`` (gloo on CPU, NCCL on GPU), same code.

``train_stage`` writes into ``<out_root>/<model>/<run>/``:
  ``state.pt`` (resumable state, atomic), ``model.safetensors`` (EMA weights), ``train_log.csv`` (step, loss,
  per-scale losses, lr), ``val_log.csv`` (step, PSNR-Y of the EMA model and of bicubic on the validation
  images), ``metrics.json`` (final validation figures).
A stage starts from the previous stage's ``model.safetensors`` (or the configured pretrained checkpoint for
the first stage; auxiliary heads start fresh, and the log says so). Rank 0 decides whether to resume and every
rank follows (see :func:`_resume_or_init`). A non-finite loss or gradient on any process stops every process
with one error (an all-reduced flag, checked before every save): the last good state stays on disk.

Scale: the stage's ``batch_size`` is global. Each of the ``world`` processes takes its slice of every step's
batch and runs it as ``accumulation`` micro-batches of ``train.micro_batch`` (gradient sync only on the last one),
so the update does not depend on the GPU count or memory. ``train.activation_checkpointing`` recomputes each
residual group in the backward. Under bf16 autocast the output convolutions and the mean add run in fp32.

Randomness: each sample's DropPath masks and Gumbel routes are a function of the step and of the sample's index in
the global batch (:mod:`smt.models.sample_noise`), so any number of processes and any micro-batch split train the
same model (equal to float rounding: gradient sums in another order). The loop waits for the device only where it
must (a log row, a validation, a save): each step's flags are read one step late.

Preemption: SIGTERM, SIGINT or SIGUSR1 (what schedulers send before a kill) during a stage lets the current step
(under DDP: at most the next one, where every process agrees to stop) finish, or ends a validation after its
current image, saves ``state.pt`` at that step (with periodic checkpoints off too) and raises :class:`Preempted`
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
from smt.distributed import (barrier, broadcast_object, broadcast_tree, device_for, dist_info, gather_objects,
                             init_process_group)
from smt.files import atomic_path
from smt.evaluate import bicubic_upscale
from smt.metrics import NTIRE2025, evaluate_pair
from smt.models import build_model, load_weights, sample_noise
from smt.models.common import AUX_PREFIX, LEGACY_AUX_PREFIX
from smt.models.presets import preset
from smt.train.checkpoint import EMA, atomic_save, rng_state, save_safetensors, set_rng_state
from smt.train.determinism import deterministic_requested, set_deterministic
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
             rank: int = 0, world: int = 1, baseline_cache: dict | None = None,
             should_stop: Callable[[], bool] | None = None) -> dict:
    """Mean PSNR-Y (NTIRE2025 protocol) of ``model`` and of bicubic on the validation split.

    Sharded: rank ``r`` of ``world`` scores images ``r, r + world, ...`` and the per-image figures are gathered
    (every rank must call it; all get the result), so the mean is that of one process, in the same order.
    Each image runs on a forked RNG seeded with its index: a model that draws random numbers in eval mode
    (MambaIRv2's Gumbel routing) gets the same noise at every validation and on any rank, and training's random
    stream does not depend on how often it validates (``train.val_every`` is an execution setting). The bicubic
    figures do not change during a run: ``baseline_cache`` (a dict kept by the caller) keeps them.

    ``should_stop`` (a stop signal arrived) is asked before each image: a rank that sees it skips the rest of its
    shard, and the gather tells every rank; the result is then ``{"stopped": True}`` on all of them (no figures)."""
    model.eval()
    rows = list(read_manifest(root, "valid").itertuples())
    devices = [device] if device.type == "cuda" else []
    cache = {} if baseline_cache is None else baseline_cache
    mine, stopped = {}, False
    with torch.random.fork_rng(devices=devices):
        for i in range(rank, len(rows), world):
            if should_stop is not None and should_stop():
                stopped = True
                break
            torch.manual_seed(i)
            mine[i] = _validate_image(model, root, rows[i], scale, device, max_side, cache)
    parts = gather_objects((stopped, mine))
    if any(part[0] for part in parts):
        return {"stopped": True}
    scores = {i: v for part in parts for i, v in part[1].items()}
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
    return _export(run, *session, stop=stop)


def _open_run(cfg: TrainConfig, model_name: str, round_: int, stage: str, data_root: str, scale: int,
              log) -> _Run:
    """Process group, device, threads, and the fingerprint a saved state must match to be resumed."""
    rank, world = dist_info()
    device = _device(cfg)
    init_process_group(device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if deterministic_requested():
        log(set_deterministic(device))
    cfg.per_process_batch(stage, world)  # the global batch must split evenly over the processes
    arch, kwargs = preset(cfg.models[model_name].preset)
    kwargs = {**kwargs, "aux_scales": tuple(cfg.aux_scales)}
    # JSON-normalised: tuples become lists, as in the saved state
    # (not the world size: the global batch and every sample's noise are the same on any number of processes,
    # so a requeue on another node count resumes; see _resume_or_init)
    fingerprint = json.loads(json.dumps({
        "arch": arch, "kwargs": kwargs, "stage": asdict(cfg.stages[stage]), "seed": cfg.seed,
        "ema_decay": cfg.ema_decay, "ema_warmup": cfg.ema_warmup, "betas": cfg.betas, "grad_clip": cfg.grad_clip,
        "aux_weights": cfg.aux_weights, "aux_target_resize": cfg.aux_target_resize,
        "augment": asdict(cfg.augment), "data_root": data_root}))
    return _Run(cfg, model_name, round_, stage, data_root, scale, log, rank, world, device,
                run_dir(cfg, model_name, round_, stage), arch, kwargs, fingerprint)


def _resume_or_init(run: _Run) -> None:
    """The model and optimizer: from this stage's saved state when it matches, else from the previous stage's
    exported weights (or the configured pretrained checkpoint, or from scratch).

    Rank 0 alone looks at the files (``state.pt``, its fingerprint, the init checkpoint) and decides; every rank
    gets the decision, and the resumed state itself, from rank 0 (ranks that see other files, such as node-local
    disks or stale NFS metadata after a requeue, start at the same step with the same optimizer state), and a
    problem fails every rank with rank 0's message. Without a resume only rank 0 loads the init weights: DDP
    broadcasts them."""
    cfg, mspec = run.cfg, run.cfg.models[run.model_name]
    torch.manual_seed(seeds.model_init_seed(cfg.seed, run.round_, run.rank))
    run.model = build_model(mspec.preset, aux_scales=tuple(cfg.aux_scales)).to(run.device)
    decision = None
    if run.rank == 0:
        try:
            decision = _decide_start(run)
        except Exception as exc:  # noqa: BLE001 - every failure becomes the one message all ranks raise
            decision = {"error": f"{type(exc).__name__}: {exc}" if not isinstance(exc, TrainingError) else str(exc)}
    decision = broadcast_object(decision, run.device)
    if "error" in decision:
        raise TrainingError(f"{run.name}: {decision['error']} (decided on rank 0, every rank stops)")
    for message in decision["messages"]:
        run.log(message)
    if decision["resume"]:
        run.state = broadcast_tree(run.state if run.rank == 0 else None, run.device)
    run.optimizer = torch.optim.Adam(run.model.parameters(), lr=run.spec.lr, betas=tuple(cfg.betas))
    if run.state is not None:
        run.model.load_state_dict(run.state["model"])
        run.optimizer.load_state_dict(run.state["optimizer"])
        run.step, run.seconds_before = run.state["step"], float(run.state.get("train_seconds", 0.0))


def _decide_start(run: _Run) -> dict:
    """Rank 0's look at the files: resume (``run.state`` loaded) or start (init weights loaded into
    ``run.model``). Returns ``{"resume": bool, "messages": [...]}``; raises on what stops the stage."""
    cfg, mspec = run.cfg, run.cfg.models[run.model_name]
    messages = []
    if run.state_path.exists():
        state = torch.load(run.state_path, map_location="cpu", weights_only=True)
        if state.get("fingerprint") == run.fingerprint:
            run.state = state
        else:
            messages.append(f"{run.state_path}: config changed since it was written; starting this stage afresh")
    if run.state is not None:
        saved_world = int(run.state.get("world", len(run.state.get("rng_ranks") or [None])))
        messages.append(f"resuming {run.name} at step {run.state['step']}")
        if saved_world != run.world:
            messages.append(
                f"WARNING: {run.state_path} was saved by {saved_world} process(es) and this job has {run.world}: "
                f"resuming at step {run.state['step']} with the global batch kept at {run.spec.batch_size} "
                f"({run.spec.batch_size // run.world} patches per process); the data and every sample's noise "
                f"are those of an uninterrupted run, the weights equal it to float rounding (gradient sums in "
                f"another order), not bit for bit")
        return {"resume": True, "messages": messages}
    prev = cfg.previous(run.round_, run.stage)
    init = exported_weights(cfg, run.model_name, *prev) if prev else (
        Path(mspec.pretrained) if mspec.pretrained else None)
    if init is not None:
        if not init.exists():
            raise TrainingError(f"{init}: the checkpoint this stage starts from does not exist "
                                f"(run the previous stage first)")
        messages.append(load_weights(run.model, init, allow_missing=(AUX_PREFIX,),
                                     ignore_unexpected=(AUX_PREFIX, LEGACY_AUX_PREFIX)).describe())
    else:
        messages.append(f"{run.model_name}: training from scratch")
    return {"resume": False, "messages": messages}


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
        set_rng_state(ranks[run.rank] if ranks is not None and run.rank < len(ranks) else run.state["rng"])
    return loader


def _save_state(run: _Run, start: float, pending_validation: bool = False) -> None:
    """``state.pt`` at the current step (rank 0 writes it; every rank's random state goes in)."""
    rng = gather_objects(rng_state())  # every rank's stream, restored on the rank that drew it
    if run.rank != 0:
        return
    extra = {"rng_ranks": rng} if run.world > 1 else {}
    atomic_save({"fingerprint": run.fingerprint, "arch": run.arch, "model_args": run.kwargs, "step": run.step,
                 "world": run.world,
                 "train_seconds": run.seconds_before + time.perf_counter() - start,
                 "model": run.model.state_dict(), "ema": run.ema.model.state_dict(),
                 "optimizer": run.optimizer.state_dict(), "rng": rng[0], **extra,
                 "pending_validation": pending_validation}, run.state_path)


def _validate_ema(run: _Run, baseline_cache: dict, stop: _StopSignals | None = None) -> dict:
    """PSNR-Y of the EMA model (and of bicubic) on the validation images, logged to ``val_log.csv``. A stop
    signal during it ends it on every rank: the result is then ``{"stopped": True}``, nothing is logged."""
    v = validate(run.ema.model, run.data_root, run.scale, run.device, run.cfg.val_max_side, rank=run.rank,
                 world=run.world, baseline_cache=baseline_cache,
                 should_stop=(lambda: stop.received is not None) if stop is not None else None)
    if run.rank == 0 and not v.get("stopped"):
        _append_csv(run.out / "val_log.csv", {"step": run.step, "psnr_y": round(v["psnr_y"], 4),
                                              "bicubic_psnr_y": round(v["bicubic_psnr_y"], 4)})
    return v


class _StepFlags:
    """Each step's flags [non-finite loss or gradient, stop signal seen], all-reduced (MAX) so that every rank
    reads the same values. The reduction starts without waiting and is read one step later (the device keeps the
    next step's work queued: no host sync per step), or at once where a decision needs the current step (a save,
    a validation, a log row, the end)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.pending: list = []  # (step, flags, work)

    def push(self, step: int, nonfinite: torch.Tensor, stop: bool) -> None:
        flags = torch.stack((nonfinite.to(torch.float32), torch.full((), float(stop), device=self.device)))
        work = torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX, async_op=True) \
            if torch.distributed.is_initialized() else None
        self.pending.append((step, flags, work))

    def read(self, through: int) -> tuple[int | None, int | None]:
        """(first step with a non-finite loss or gradient, first step a stop signal was seen), None where none,
        among the pushed steps up to ``through``; those are then forgotten."""
        bad = stopped = None
        while self.pending and self.pending[0][0] <= through:
            step, flags, work = self.pending.pop(0)
            if work is not None:
                work.wait()
            nonfinite, stop = flags.tolist()
            bad = step if nonfinite and bad is None else bad
            stopped = step if stop and stopped is None else stopped
        return bad, stopped


def _grad_norm(model: torch.nn.Module, clip: float) -> torch.Tensor:
    """The gradients' total 2-norm (a device scalar, no host sync), clipped to ``clip`` first when > 0."""
    params = [p for p in model.parameters() if p.grad is not None]
    if clip > 0:
        return torch.nn.utils.clip_grad_norm_(params, clip)
    return torch.nn.utils.get_total_norm([p.grad for p in params])


def _stop_nonfinite(run: _Run, bad_step: int | None, bar) -> None:
    """Every rank raises together (the flag is all-reduced); ``state.pt`` keeps the last good step."""
    if bad_step is None:
        return
    bar.close()
    last = f"{run.state_path} (the last save)" if run.state_path.exists() else "none (no state was saved)"
    raise TrainingError(f"{run.name}: the loss or the gradients were not finite at step {bad_step} (on at least "
                        f"one process); stopped. The last good state is {last}")


def _preempt(run: _Run, start: float, bar, save: bool, pending_validation: bool, why: str | None) -> None:
    if save:
        _save_state(run, start, pending_validation=pending_validation)
    barrier()
    bar.close()
    why = why or "a stop signal on another rank"
    raise Preempted(f"{run.name}: stopped by {why} after step {run.step} of {run.spec.iters}; the state is saved in "
                    f"{run.state_path}; rerun the stage (or `dvc repro`) to resume", run.step, why)


def _loop(run: _Run, loader, max_steps: int | None, stop: _StopSignals) -> tuple[float, list[float], dict]:
    """The training steps up to the stage's ``iters`` (or ``max_steps``): multi-scale loss over micro-batches,
    step-wise learning rate, EMA update, logs, periodic validation and state saves; a stop signal saves the state
    and raises :class:`Preempted`; a non-finite loss or gradient on any rank stops every rank before a save.
    Returns (session start time, the times at which steps ended, validation cache)."""
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
    bar = tqdm(total=spec.iters, initial=run.step, desc=run.name, disable=run.rank != 0, mininterval=5)
    if run.state is not None and run.state.get("pending_validation") and run.step < spec.iters:
        # stopped by a signal before (or during) a validation
        if _validate_ema(run, baseline_cache, stop).get("stopped"):
            _preempt(run, start, bar, False, True, stop.received)
    if device.type == "cuda":  # the memory probe's peak is not the training's
        torch.cuda.reset_peak_memory_stats(device)
    step_ends: list[float] = []
    accumulation, micro = run.accumulation, run.micro
    per_process = cfg.per_process_batch(run.stage, run.world)
    stage_index = cfg.stage_order.index(run.stage) if run.stage in cfg.stage_order else 0
    if accumulation > 1 and run.rank == 0:
        run.log(f"{run.name}: {accumulation} micro-batches of {micro} patches per process per step "
                f"(global batch {spec.batch_size} over {run.world} process(es))")
    flags = _StepFlags(device)
    model.train()
    while run.step < last:
        lr, hr = (t.to(device, non_blocking=True) for t in next(loader))
        for group in run.optimizer.param_groups:
            group["lr"] = _lr_at(spec.lr, spec.milestones, spec.gamma, run.step)
        run.optimizer.zero_grad(set_to_none=True)
        loss_sum, parts_sum = None, {}
        noise_seed = seeds.step_noise_seed(cfg.seed, run.round_, stage_index, run.step)
        for k in range(accumulation):
            sl = slice(k * micro, (k + 1) * micro) if accumulation > 1 else slice(None)
            # every sample's DropPath masks and Gumbel routes: a function of the step and of its index in the
            # global batch (the same on any number of processes, for any micro-batch split)
            torch.default_generator.manual_seed(noise_seed)
            first = run.rank * per_process + (k * micro if accumulation > 1 else 0)
            # DDP all-reduces gradients on the last micro-batch only
            sync = run.train_model.no_sync() if run.world > 1 and k < accumulation - 1 else nullcontext()
            with sync, sample_noise.per_sample(range(first, first + lr[sl].shape[0])):
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=run.use_bf16):
                    outputs = run.train_model(lr[sl])
                loss, parts = multiscale_loss(outputs, hr[sl], model.upscale, weights, spec.loss,
                                              cfg.aux_target_resize)
                (loss if accumulation == 1 else loss / accumulation).backward()
            loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
            for s_, v_ in parts.items():
                parts_sum[s_] = v_ if s_ not in parts_sum else parts_sum[s_] + v_
        # after DDP's all-reduce every rank holds the same gradients; the loss is this rank's own
        nonfinite = torch.logical_or(~torch.isfinite(loss_sum), ~torch.isfinite(_grad_norm(model, cfg.grad_clip)))
        run.optimizer.step()
        run.ema.update(model, run.step)
        run.step += 1
        bar.update(1)
        flags.push(run.step, nonfinite, stop.received is not None)
        bad, stopped = flags.read(run.step - 1)  # the previous step's, read one step late
        validate_now = cfg.val_every > 0 and run.step % cfg.val_every == 0 and run.step < spec.iters
        save_now = (cfg.ckpt_every > 0 and run.step % cfg.ckpt_every == 0) or run.step == last
        log_now = run.step % cfg.log_every == 0 or run.step == spec.iters
        # decisions on this step: read it now (at points every rank reaches at the same step; one process needs
        # no agreement, so its own signal is one too)
        if stopped is not None or validate_now or save_now or log_now or (run.world == 1 and stop.received):
            bad_now, stopped_now = flags.read(run.step)
            bad, stopped = bad if bad is not None else bad_now, stopped if stopped is not None else stopped_now
        _stop_nonfinite(run, bad, bar)
        step_ends.append(time.perf_counter())
        if run.rank == 0 and log_now:
            values = torch.stack([loss_sum, *(parts_sum[s_] for s_ in sorted(parts_sum))]).div(accumulation)
            values = values.tolist()  # one host sync for the row
            _append_csv(train_log, {"step": run.step, "loss": round(values[0], 6),
                                    **{f"loss_x{s_}": round(v_, 6) for s_, v_ in zip(sorted(parts_sum), values[1:])},
                                    "lr": run.optimizer.param_groups[0]["lr"]})
        # every rank takes the same branch: the flags are all-reduced, so a signal seen by any rank stops all
        if stopped is not None and run.step < spec.iters:
            _preempt(run, start, bar, True, validate_now, stop.received)
        if validate_now:
            if _validate_ema(run, baseline_cache, stop).get("stopped"):
                _preempt(run, start, bar, True, True, stop.received)
            model.train()
        if save_now:
            _save_state(run, start)
    if device.type == "cuda" and step_ends:
        torch.cuda.synchronize(device)
        step_ends[-1] = time.perf_counter()
    bar.close()
    return start, step_ends, baseline_cache


def _export(run: _Run, start: float, step_ends: list[float], baseline_cache: dict,
            stop: _StopSignals | None = None) -> StageResult:
    """At the stage's last step: the final validation, the EMA weights (``model.safetensors``) and
    ``metrics.json`` (rank 0 writes both, atomically: the one writer of each file). Returns this session's result
    and measurements. A stop signal during the final validation raises :class:`Preempted` (the state at the last
    step is saved already; rerunning exports)."""
    spec, device = run.spec, run.device
    seconds = run.seconds_before + time.perf_counter() - start  # over all sessions of this stage
    # the first step is a warm-up; the rest includes data loading (steps are not synchronised one by one)
    step_seconds = (step_ends[-1] - step_ends[0]) / (len(step_ends) - 1) if len(step_ends) > 1 else math.nan
    peak_mb = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else math.nan
    v = {"psnr_y": math.nan, "bicubic_psnr_y": math.nan}
    if run.step == spec.iters:
        v = _validate_ema(run, baseline_cache, stop)
        if v.get("stopped"):
            barrier()
            why = (stop.received if stop is not None else None) or "a stop signal on another rank"
            raise Preempted(f"{run.name}: stopped by {why} during the final validation; the state at step "
                            f"{run.step} is saved in {run.state_path}; rerun the stage to export", run.step, why)
        if run.rank == 0:
            meta = {"arch": run.arch, "model_args": json.dumps(run.kwargs), "step": str(run.step),
                    "run": run.out.as_posix()}
            save_safetensors(run.ema.model.state_dict(), exported_weights(run.cfg, run.model_name, run.round_,
                                                                         run.stage), meta)
            with atomic_path(run.out / "metrics.json") as tmp:
                tmp.write_text(json.dumps({"val_psnr_y": v["psnr_y"], "bicubic_psnr_y": v["bicubic_psnr_y"],
                                           "steps": run.step, "train_seconds": seconds}, indent=2) + "\n")
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
