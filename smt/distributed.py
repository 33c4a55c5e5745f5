"""torch.distributed plumbing shared by training and inference: who am I under ``torchrun``, the process group,
rank 0's decisions shared with every rank, and launching one of our CLI commands under ``torchrun`` when params
ask for more than one process: on one node, or across nodes from the one process DVC runs (``srun torchrun``
inside a SLURM allocation; ``SMT_LAUNCHER=local`` starts the "nodes" on this machine, for tests). See
docs/cluster.md."""
from __future__ import annotations

import inspect
import math
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

__all__ = ["dist_info", "init_process_group", "barrier", "torchrun", "device_for", "select_device", "local_rank",
           "process_group_timeout", "any_rank", "all_reduce_sum", "gather_objects", "broadcast_object",
           "broadcast_tree", "node_commands", "DEFAULT_TIMEOUT_S", "TIMEOUT_ENV", "LAUNCHER_ENV"]

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


def broadcast_object(obj, device: torch.device):
    """Rank 0's ``obj`` (picklable) on every rank; ``obj`` itself outside a process group."""
    if not dist.is_initialized():
        return obj
    box = [obj if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0, device=device if device.type == "cuda" else None)
    return box[0]


class _Slot:
    """Where a tensor sat in a tree sent by :func:`broadcast_tree` (its index among the tensors of its dtype)."""

    def __init__(self, dtype: torch.dtype, index: int, shape: tuple[int, ...]) -> None:
        self.dtype, self.index, self.shape = dtype, index, shape


def _strip(tree, tensors: dict):
    if isinstance(tree, torch.Tensor):
        group = tensors.setdefault(tree.dtype, [])
        group.append(tree)
        return _Slot(tree.dtype, len(group) - 1, tuple(tree.shape))
    if isinstance(tree, dict):
        return {k: _strip(v, tensors) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_strip(v, tensors) for v in tree)
    return tree


def _fill(tree, tensors: dict):
    if isinstance(tree, _Slot):
        return tensors[tree.dtype][tree.index]
    if isinstance(tree, dict):
        return {k: _fill(v, tensors) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_fill(v, tensors) for v in tree)
    return tree


def broadcast_tree(tree, device: torch.device):
    """Rank 0's ``tree`` (nested dicts, lists and tuples of tensors and picklable values: a ``state.pt``) on every
    rank, tensors on the CPU. The structure travels pickled, the tensors as one flat buffer per dtype through
    ``device`` (this rank's GPU under NCCL): a few collectives, whatever the number of tensors. ``tree`` itself
    outside a process group; other ranks' ``tree`` arguments are ignored."""
    if not dist.is_initialized():
        return tree
    tensors: dict = {}
    skeleton = broadcast_object(_strip(tree, tensors) if dist.get_rank() == 0 else None, device)
    shapes: dict = {}

    def collect(node):
        if isinstance(node, _Slot):
            shapes.setdefault(node.dtype, {})[node.index] = node.shape
        elif isinstance(node, dict):
            for v in node.values():
                collect(v)
        elif isinstance(node, (list, tuple)):
            for v in node:
                collect(v)

    collect(skeleton)
    received = {}
    for dtype in sorted(shapes, key=str):  # the same order on every rank
        sizes = [math.prod(shapes[dtype][i]) for i in range(len(shapes[dtype]))]
        if dist.get_rank() == 0:
            flat = torch.cat([t.detach().reshape(-1).to(device) for t in tensors[dtype]])
        else:
            flat = torch.empty(sum(sizes), dtype=dtype, device=device)
        dist.broadcast(flat, src=0)
        parts = flat.cpu().split(sizes)
        received[dtype] = [p.view(shapes[dtype][i]).clone() for i, p in enumerate(parts)]
    return _fill(skeleton, received)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


# ----------------------------------------------------------------------------------------------- launching

# How a job of several nodes is started from the one process DVC runs: "srun" (inside a SLURM allocation; the
# default there), or "local" (every node's torchrun on this machine: a stand-in for tests and rehearsals).
LAUNCHER_ENV = "SMT_LAUNCHER"
_LAUNCHERS = ("srun", "local")


def _launcher() -> str:
    name = os.environ.get(LAUNCHER_ENV, "")
    if not name:
        if "SLURM_JOB_ID" in os.environ:
            return "srun"
        raise RuntimeError(f"a job of several nodes (train.nnodes / infer.nnodes > 1) is launched from the one "
                           f"process DVC runs: inside a SLURM allocation (srun starts torchrun on every node), "
                           f"or with {LAUNCHER_ENV}=local (all nodes on this machine, for tests); see "
                           f"docs/cluster.md")
    if name not in _LAUNCHERS:
        raise RuntimeError(f"{LAUNCHER_ENV}={name!r}: valid launchers are {', '.join(_LAUNCHERS)}")
    return name


def node_commands(nproc: int, nnodes: int, smt_args: list[str], launcher: str, endpoint: str,
                  run_id: str) -> list[list[str]]:
    """The commands that start ``python -m smt <smt_args>`` as ``nnodes`` x ``nproc`` processes (pure, so
    testable). ``srun``: one command, srun starts one torchrun per node of the allocation, joined by torchrun's
    c10d rendezvous at ``endpoint`` (host:port of this, the batch, host). ``local``: one torchrun per node on this
    machine, each with its ``--node_rank`` and the static rendezvous at ``endpoint``."""
    run = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}", f"--nproc_per_node={nproc}"]
    tail = ["-m", "smt", *smt_args]
    if launcher == "srun":
        return [["srun", f"--nodes={nnodes}", f"--ntasks={nnodes}", "--ntasks-per-node=1", "--kill-on-bad-exit=1",
                 *run, "--rdzv_backend=c10d", f"--rdzv_endpoint={endpoint}", f"--rdzv_id={run_id}", *tail]]
    if launcher == "local":
        addr, port = endpoint.rsplit(":", 1)
        return [[*run, f"--node_rank={i}", f"--master_addr={addr}", f"--master_port={port}", *tail]
                for i in range(nnodes)]
    raise ValueError(f"unknown launcher {launcher!r} (valid: {', '.join(_LAUNCHERS)})")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _run_all(commands: list[list[str]]) -> None:
    """Start every command, forward stop signals to them, wait; the first failure stops the others and raises
    ``CalledProcessError`` with its exit code (75: preempted, see :mod:`smt.train.engine`)."""
    procs = [subprocess.Popen(c) for c in commands]

    def forward(signum, frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    stop_signals = [getattr(signal, n) for n in ("SIGTERM", "SIGINT", "SIGUSR1") if hasattr(signal, n)]
    previous = {}
    try:
        for sig in stop_signals:
            try:
                previous[sig] = signal.signal(sig, forward)
            except ValueError:  # not the main thread: signals keep their meaning
                break
        failed = None
        while failed is None and any(p.poll() is None for p in procs):
            failed = next((p for p in procs if p.poll() not in (None, 0)), None)
            time.sleep(0.2)
        failed = failed or next((p for p in procs if p.returncode != 0), None)
        if failed is not None:
            for p in procs:
                if p.poll() is None:
                    p.terminate()
            for p in procs:
                p.wait()
            raise subprocess.CalledProcessError(failed.returncode, shlex.join(failed.args))
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for p in procs:
            if p.poll() is None:
                p.kill()


def torchrun(nproc: int, smt_args: list[str], nnodes: int = 1) -> None:
    """Run ``python -m smt <smt_args>`` under torchrun with ``nproc`` processes on each of ``nnodes`` nodes and
    wait for it. One node: a standalone rendezvous. Several: started from this one process (the one DVC runs) on
    every node (:func:`node_commands`; the launcher from ``SMT_LAUNCHER``, else srun inside a SLURM allocation);
    the rendezvous endpoint is ``MASTER_ADDR:MASTER_PORT`` when set, else this host and a free port."""
    if nnodes == 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone"]
        subprocess.run([*cmd, "-m", "smt", *smt_args], check=True)
        return
    launcher = _launcher()
    addr = os.environ.get("MASTER_ADDR") or ("127.0.0.1" if launcher == "local" else socket.gethostname())
    port = os.environ.get("MASTER_PORT") or str(_free_port())
    run_id = f"smt-{os.environ.get('SLURM_JOB_ID', os.getpid())}-{port}"
    _run_all(node_commands(nproc, nnodes, smt_args, launcher, f"{addr}:{port}", run_id))
