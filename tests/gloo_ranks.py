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
