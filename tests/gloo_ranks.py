"""Run a function in ``world`` CPU processes joined in a gloo process group, the way torchrun would start them
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT in the environment), without torchrun's start-up cost. The
functions the tests run in those processes live here too, so spawned processes can import them."""
from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import socket
import traceback
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn, args: tuple, err_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        fn(*args)
    except BaseException:
        Path(err_dir, f"rank{rank}.txt").write_text(traceback.format_exc())
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(world: int, fn, *args, tmp: Path, timeout: float = 240) -> None:
    """``fn(*args)`` in ``world`` gloo processes; raises with the first rank's traceback if any fails."""
    ctx = mp.get_context("spawn")
    port = free_port()
    err = Path(tmp) / f"errors_{port}"
    err.mkdir(parents=True, exist_ok=True)
    procs = [ctx.Process(target=_entry, args=(r, world, port, fn, args, str(err))) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    for p in procs:
        if p.is_alive():
            p.kill()
    failed = sorted(err.glob("rank*.txt"))
    if failed or any(p.exitcode != 0 for p in procs):
        detail = failed[0].read_text() if failed else f"exit codes {[p.exitcode for p in procs]}"
        raise AssertionError(f"a gloo rank failed:\n{detail}")


# ------------------------------------------------------------------------------- what the ranks run in tests


def train_recording_inputs(cfg, model: str, root: str, out_file: str, max_steps=None) -> None:
    """``train_stage`` with every model input recorded (per rank, in order) into ``out_file``.rank<N>."""
    import torch

    import smt.train.engine as engine
    from smt.distributed import dist_info

    inputs = []
    real = engine._MultiScale.forward

    def forward(self, x):
        inputs.append(x.detach().clone())
        return real(self, x)

    engine._MultiScale.forward = forward
    try:
        engine.train_stage(cfg, model, 1, "s1", root, 4, max_steps=max_steps, log=lambda m: None)
    finally:
        engine._MultiScale.forward = real
    torch.save(inputs, f"{out_file}.rank{dist_info()[0]}")


def validate_sharded(model_preset: str, root: str, out_file: str) -> None:
    """Sharded :func:`smt.train.engine.validate` of a seeded tiny model; rank 0 writes the figures."""
    import torch

    from smt.distributed import dist_info, init_process_group
    from smt.models import build_model
    from smt.train.engine import validate

    rank, world = dist_info()
    init_process_group(torch.device("cpu"))
    torch.manual_seed(0)
    net = build_model(model_preset)
    v = validate(net, root, 4, torch.device("cpu"), 16, rank=rank, world=world)
    if rank == 0:
        Path(out_file).write_bytes(pickle.dumps(v))


def train_runs(runs: list, model: str, root: str) -> None:
    """:func:`train_recording_ema` for each ``(cfg, out_file, max_steps)`` in turn, in the same processes."""
    for cfg, out_file, max_steps in runs:
        train_recording_ema(cfg, model, root, out_file, max_steps)


def train_recording_ema(cfg, model: str, root: str, out_file: str, max_steps=None) -> None:
    """``train_stage``; each rank saves the EMA weights it validates with into ``out_file``.rank<N>."""
    import torch

    import smt.train.engine as engine
    from smt.distributed import dist_info

    seen = []
    real = engine.validate

    def validate(model_, *args, **kwargs):
        seen.append({k: v.clone() for k, v in model_.state_dict().items()})
        return real(model_, *args, **kwargs)

    engine.validate = validate
    try:
        engine.train_stage(cfg, model, 1, "s1", root, 4, max_steps=max_steps, log=lambda m: None)
    finally:
        engine.validate = real
    torch.save(seen, f"{out_file}.rank{dist_info()[0]}")


def train_with_overrides(cfg, model: str, root: str, overrides: dict, per_sample: bool = True,
                         max_steps=None) -> None:
    """``train_stage`` with constructor ``overrides`` for the preset (e.g. ``drop_path_rate``); with
    ``per_sample=False`` the per-sample noise is switched off (every rank draws from its own stream, as before)."""
    import contextlib

    import smt.train.engine as engine

    real_build, real_per_sample = engine.build_model, engine.sample_noise.per_sample
    engine.build_model = lambda name, **kw: real_build(name, **{**kw, **overrides})
    if not per_sample:
        engine.sample_noise.per_sample = lambda indices: contextlib.nullcontext()
    try:
        engine.train_stage(cfg, model, 1, "s1", root, 4, max_steps=max_steps, log=lambda m: None)
    finally:
        engine.build_model, engine.sample_noise.per_sample = real_build, real_per_sample


def train_hiding_state_on_rank1(runs: list, model: str, root: str, log_file: str) -> None:
    """For each ``(cfg, max_steps, hide)``: ``train_stage``; where ``hide``, rank 1 cannot see any ``state.pt``
    (``Path.exists`` says no, ``torch.load`` of it fails), as on a node-local disk. Rank 0's log goes to
    ``log_file``."""
    from pathlib import Path as P

    import torch

    import smt.train.engine as engine
    from smt.distributed import dist_info

    rank = dist_info()[0]
    messages = []
    real_exists, real_load = P.exists, torch.load
    for cfg, max_steps, hide in runs:
        if hide and rank == 1:
            P.exists = lambda self: False if self.name == "state.pt" else real_exists(self)

            def load(f, *a, **k):
                if str(f).endswith("state.pt"):
                    raise FileNotFoundError(f)
                return real_load(f, *a, **k)
            torch.load = load
        try:
            engine.train_stage(cfg, model, 1, "s1", root, 4, max_steps=max_steps, log=messages.append)
        finally:
            P.exists, torch.load = real_exists, real_load
    if rank == 0:
        P(log_file).write_text("\n".join(messages))


def train_expecting_error(cfg, model: str, root: str, stage: str, out_file: str, nan_rank: int = -1,
                          nan_step: int = 0, where: str = "loss") -> None:
    """``train_stage`` that must raise ``TrainingError``; each rank writes its message to ``out_file``.rank<N>.
    With ``nan_rank`` >= 0, that rank makes its loss (``where="loss"``) or, with a finite loss, its gradients
    (``where="grad"``) NaN at step ``nan_step`` (1-based)."""
    import torch

    import smt.train.engine as engine
    from smt.distributed import dist_info

    rank = dist_info()[0]
    real = engine.multiscale_loss
    calls = {"n": 0}

    def poisoned(outputs, *args, **kwargs):
        calls["n"] += 1
        if rank == nan_rank and calls["n"] == nan_step and where == "grad":
            for out in outputs.values():
                out.register_hook(lambda g: torch.full_like(g, float("nan")))
        loss, parts = real(outputs, *args, **kwargs)
        if rank == nan_rank and calls["n"] == nan_step and where == "loss":
            loss = loss * float("nan")
        return loss, parts

    engine.multiscale_loss = poisoned
    try:
        engine.train_stage(cfg, model, 1, stage, root, 4, log=lambda m: None)
    except engine.TrainingError as exc:
        Path(f"{out_file}.rank{rank}").write_text(str(exc))
        return
    finally:
        engine.multiscale_loss = real
    raise AssertionError("train_stage did not raise TrainingError")
