"""Process-group setup from torchrun or Slurm variables, with a one-process fallback.

- torchrun: all of ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``,
  ``MASTER_PORT`` are set (a partial set is an error).
- Slurm (``SLURM_JOB_ID`` with ``SLURM_PROCID``/``SLURM_NTASKS``): rank and world from the task
  variables, ``MASTER_ADDR`` the first host of the node list, ``MASTER_PORT`` from the environment or
  drawn deterministically from the job id so every task agrees without talking to each other.
- Neither: a world-size-1 group on an in-memory store, so the rest of the code (FSDP2, DCP, the
  all-reduces of the losses) runs the same way on a laptop with no variables set.

The backend is ``nccl`` on CUDA and ``gloo`` on CPU.
"""

from __future__ import annotations

import os
import random
import subprocess
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass
class DistributedContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    owns_group: bool  # True when this module created the group and must destroy it

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _first_slurm_host(nodelist: str) -> str:
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], check=True, capture_output=True, text=True)
        return out.stdout.split()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        # "node[01-04],other" → "node01" without scontrol
        head = nodelist.split(",")[0]
        if "[" in head:
            prefix, rest = head.split("[", 1)
            return prefix + rest.split("-")[0].split(",")[0].rstrip("]")
        return head


def env_from_slurm(environ: dict[str, str]) -> dict[str, str]:
    """The torchrun variables implied by a Slurm task's environment."""
    job_id = environ["SLURM_JOB_ID"]
    world = int(environ["SLURM_NTASKS"])
    nodes = int(environ.get("SLURM_JOB_NUM_NODES", environ.get("SLURM_NNODES", "1")))
    return {
        "MASTER_ADDR": environ.get("MASTER_ADDR") or _first_slurm_host(environ.get("SLURM_JOB_NODELIST", "127.0.0.1")),
        "MASTER_PORT": environ.get("MASTER_PORT") or str(random.Random(int(job_id)).randint(20000, 60000)),
        "RANK": environ["SLURM_PROCID"],
        "WORLD_SIZE": str(world),
        "LOCAL_RANK": environ.get("SLURM_LOCALID", "0"),
        "LOCAL_WORLD_SIZE": str(max(world // max(nodes, 1), 1)),
    }


def resolve_device(preference: str) -> torch.device:
    if preference == "cuda" or (preference == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("parallel.device=cuda but no CUDA device is visible; use parallel.device=cpu or auto")
        return torch.device("cuda")
    return torch.device("cpu")


def init_distributed(device_preference: str = "auto") -> DistributedContext:
    """Join (or create) the process group; idempotent when a group already exists."""
    device = resolve_device(device_preference)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        return DistributedContext(rank, world, local_rank, _bind(device, local_rank), dist.get_backend(), False)
    present = [name for name in TORCHRUN_VARS if name in os.environ]
    if present and len(present) != len(TORCHRUN_VARS):
        missing = [name for name in TORCHRUN_VARS if name not in os.environ]
        raise RuntimeError(f"partial torchrun environment: {present} set but {missing} missing")
    if not present and "SLURM_JOB_ID" in os.environ and "SLURM_PROCID" in os.environ and "SLURM_NTASKS" in os.environ:
        os.environ.update(env_from_slurm(dict(os.environ)))
        present = list(TORCHRUN_VARS)
    if present:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ["LOCAL_RANK"])
        device = _bind(device, local_rank)
        dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world,
                                timeout=timedelta(minutes=30),
                                device_id=device if device.type == "cuda" else None)
    else:
        rank, world, local_rank = 0, 1, 0
        device = _bind(device, 0)
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return DistributedContext(rank, world, local_rank, device, backend, True)


def _bind(device: torch.device, local_rank: int) -> torch.device:
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return device


def shutdown(context: DistributedContext) -> None:
    if context.owns_group and dist.is_initialized():
        if context.world_size > 1:
            dist.barrier()  # no rank tears down gloo while another still talks to it
        dist.destroy_process_group()
