"""torch.distributed helpers shared by box generation, training and evaluation.

Under `torchrun` the environment gives RANK / WORLD_SIZE / LOCAL_RANK; `init()` starts the process group
once. Without torchrun everything works as one process of rank 0.

On CUDA the group serves both kinds of tensor, `cpu:gloo,cuda:nccl`: NCCL alone has no CPU backend and
refuses a CPU tensor ("No backend type associated with device type cpu"), and code that gathers Python
objects or small CPU counters would die at its first collective. Hot paths (the trainer's per-step counts
and loss) still hand NCCL device tensors; tests/train/collectives.py is the test mode that catches a
collective given a tensor off the training device on a CPU-only machine. The group's timeout is the
caller's: training waits in a barrier while rank 0 writes the export, longer than torch's 10-minute default.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> torch.device:
        if torch.cuda.is_available():
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")


def info() -> DistInfo:
    return DistInfo(
        rank=int(os.environ.get("RANK", 0)),
        world_size=int(os.environ.get("WORLD_SIZE", 1)),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
    )


def backend() -> str:
    """The process group's backend per device type: NCCL for CUDA tensors and gloo for CPU tensors on a GPU
    machine, gloo alone without one."""
    return "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "cpu:gloo"


def init(timeout: datetime.timedelta | None = None) -> DistInfo:
    """Start the process group when launched by torchrun with more than one process; `timeout` bounds
    every collective and barrier (None: torch's default, 10 minutes for NCCL)."""
    current = info()
    if current.world_size > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(current.local_rank)
        dist.init_process_group(backend=backend(), timeout=timeout, device_id=_device_id(current))
    return current


def _device_id(current: DistInfo) -> torch.device | None:
    """NCCL binds its communicator to this rank's GPU at start (no guessing from the current device)."""
    return current.device if torch.cuda.is_available() else None


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if active():
        dist.barrier()


def shard(items: list[T], rank: int, world_size: int) -> list[T]:
    """Every `world_size`-th item starting at `rank`: balanced, and the union over ranks is `items`."""
    return items[rank::world_size]


def gather_objects(obj: Any) -> list[Any] | None:
    """Rank 0 receives every rank's `obj` (in rank order); other ranks get None. One process: [obj]."""
    if not active():
        return [obj]
    out: list[Any] | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
