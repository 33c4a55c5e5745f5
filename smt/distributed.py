"""torch.distributed plumbing shared by training and inference: who am I under ``torchrun``, the process group,
and relaunching one of our CLI commands under ``torchrun`` when params ask for more than one process."""
from __future__ import annotations

import os
import subprocess
import sys

import torch
import torch.distributed as dist

__all__ = ["dist_info", "init_process_group", "barrier", "torchrun", "device_for"]


def dist_info() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment; (0, 1) outside it."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def device_for(requested: str) -> torch.device:
    """``auto`` | ``cpu`` | ``cuda`` -> this process's device (``cuda:LOCAL_RANK`` under torchrun)."""
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' was asked for but no CUDA device is available")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def init_process_group(device: torch.device) -> None:
    """Join the job's process group (NCCL on GPUs, gloo on CPU) when running under torchrun."""
    if dist_info()[1] > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


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
