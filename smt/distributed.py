"""torch.distributed plumbing shared by training and inference: who am I under ``torchrun``, the process group,
and relaunching one of our CLI commands under ``torchrun`` when params ask for more than one process."""
from __future__ import annotations

import inspect
import os
import subprocess
import sys
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

__all__ = ["dist_info", "init_process_group", "barrier", "torchrun", "device_for", "select_device", "local_rank",
           "process_group_timeout", "any_rank", "all_reduce_sum", "gather_objects", "DEFAULT_TIMEOUT_S",
           "TIMEOUT_ENV"]

# How long a collective may wait for the slowest rank before the job is aborted (NCCL's watchdog; gloo's
# timeout). torch's default for NCCL is 10 minutes. Our collectives never wait on work done by one rank alone
# for long (validation is sharded across ranks, the final save is seconds), but a first step that compiles
# kernels, a slow shared file system or an exported model's report can take minutes: 30 minutes bounds a hung
# job without killing a slow one. Override with the environment variable SMT_DIST_TIMEOUT_S (seconds).
DEFAULT_TIMEOUT_S = 1800
TIMEOUT_ENV = "SMT_DIST_TIMEOUT_S"


def dist_info() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment; (0, 1) outside it."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    """This process's index on its node (torchrun's ``LOCAL_RANK``); 0 outside torchrun."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def select_device(requested: str, local_rank: int, device_count: int) -> torch.device:
    """``auto`` | ``cpu`` | ``cuda`` -> the device of the process with index ``local_rank`` on a node that sees
    ``device_count`` CUDA devices: ``cuda:local_rank``, one GPU per process, or the CPU. Pure, so testable
    without a GPU; :func:`device_for` feeds it this process's values."""
    if requested not in ("auto", "cpu", "cuda"):
        raise ValueError(f"unknown device {requested!r} (valid: 'auto', 'cpu', 'cuda')")
    if requested == "cpu" or (requested == "auto" and device_count == 0):
        return torch.device("cpu")
    if device_count == 0:
        raise RuntimeError("device 'cuda' was asked for but no CUDA device is available")
    if not 0 <= local_rank < device_count:
        raise RuntimeError(f"LOCAL_RANK={local_rank} but this process sees only {device_count} CUDA device(s) "
                           f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): run at "
                           f"most {device_count} processes per node (torchrun --nproc_per_node)")
    return torch.device("cuda", local_rank)


def device_for(requested: str) -> torch.device:
    """``auto`` | ``cpu`` | ``cuda`` -> this process's device (``cuda:LOCAL_RANK`` under torchrun).

    A CUDA device is also made this process's current device, so kernels that launch on the current device
    (Triton, cuBLAS handles, NCCL) use this rank's GPU and not GPU 0."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    device = select_device(requested, local_rank(), count)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def process_group_timeout() -> timedelta:
    """The collectives' timeout: :data:`DEFAULT_TIMEOUT_S`, or ``SMT_DIST_TIMEOUT_S`` seconds when set."""
    raw = os.environ.get(TIMEOUT_ENV, "")
    if not raw:
        return timedelta(seconds=DEFAULT_TIMEOUT_S)
    try:
        seconds = float(raw)
    except ValueError:
        raise ValueError(f"{TIMEOUT_ENV}={raw!r}: expected a number of seconds") from None
    if seconds <= 0:
        raise ValueError(f"{TIMEOUT_ENV}={raw!r}: must be > 0")
    return timedelta(seconds=seconds)


def init_process_group(device: torch.device) -> None:
    """Join the job's process group (NCCL on GPUs, gloo on CPU) when running under torchrun, with the explicit
    :func:`process_group_timeout`; on a GPU the group is bound to ``device`` (``device_id``, where this torch
    supports it)."""
    if dist_info()[1] > 1 and not dist.is_initialized():
        timeout = process_group_timeout()
        if device.type != "cuda":
            dist.init_process_group("gloo", timeout=timeout)
            return
        torch.cuda.set_device(device)
        if "device_id" in inspect.signature(dist.init_process_group).parameters:
            dist.init_process_group("nccl", device_id=device, timeout=timeout)
        else:
            dist.init_process_group("nccl", timeout=timeout)


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when ``flag`` is true on at least one (one scalar all-reduce; no collective outside a
    process group)."""
    if not dist.is_initialized():
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def all_reduce_sum(array: np.ndarray, device: torch.device) -> np.ndarray:
    """The elementwise sum of every rank's ``array`` (same shape and dtype on all ranks), on every rank, as a new
    array; a copy of ``array`` outside a process group. ``device``: where the collective runs (this rank's GPU
    under NCCL)."""
    if not dist.is_initialized():
        return np.array(array, copy=True)
    t = torch.from_numpy(np.ascontiguousarray(array)).to(device, copy=True)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.cpu().numpy()


def gather_objects(obj) -> list:
    """Every rank's ``obj`` (picklable), in rank order, on every rank; ``[obj]`` outside a process group."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def torchrun(nproc: int, smt_args: list[str], nnodes: int = 1) -> None:
    """Run ``python -m smt <smt_args>`` under torchrun with ``nproc`` processes per node and wait for it.

    Single node: a standalone rendezvous. Several nodes: the usual torchrun variables (``MASTER_ADDR``,
    ``MASTER_PORT``, ``NODE_RANK``) must be set on every node, as the README's runbook says."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}"]
    if nnodes > 1 or "MASTER_ADDR" in os.environ:
        missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
        if missing:
            raise RuntimeError(f"multi-node launch needs {', '.join(missing)} in the environment")
        cmd += [f"--nnodes={nnodes}", f"--node_rank={os.environ.get('NODE_RANK', '0')}",
                f"--master_addr={os.environ['MASTER_ADDR']}", f"--master_port={os.environ['MASTER_PORT']}"]
    else:
        cmd.append("--standalone")
    subprocess.run([*cmd, "-m", "smt", *smt_args], check=True)
