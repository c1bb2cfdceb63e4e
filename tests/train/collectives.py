"""Test mode for collectives: every torch.distributed collective must get tensors on the device the
training runs on, as NCCL demands (it has no CPU backend: "No backend type associated with device type cpu").

On a CPU-only machine the training device is the CPU, so a tensor made without `device=` lands there by
luck and gloo reduces it. `wrong_device_collectives` removes the luck: while it is active, tensors made
without an explicit device go to the meta device (`torch.device("meta")` as the default device, exactly as
a GPU machine's default device is not the GPU), and any collective handed a tensor that is not on
`device` raises `WrongDeviceCollective` naming the collective and both devices. The collectives run on
torch's fake process group (one process plays `world_size` ranks), so the test needs no second process.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore

CHECKED = ("all_reduce", "broadcast", "reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor",
           "all_to_all_single", "gather", "scatter")  # fmt: skip


class WrongDeviceCollective(RuntimeError):
    """A collective was given a tensor on a device its process group does not serve."""


def _tensors(value) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)


def _checked(name: str, collective, device: torch.device):
    def run(*args, **kwargs):
        for tensor in _tensors([*args, *kwargs.values()]):
            if tensor.device.type != device.type:
                raise WrongDeviceCollective(
                    f"torch.distributed.{name} got a tensor on {tensor.device}; the process group serves "
                    f"{device.type} tensors only (NCCL would refuse it)"
                )
        return collective(*args, **kwargs)

    return run


@contextlib.contextmanager
def wrong_device_collectives(monkeypatch, device: torch.device, world_size: int = 2):
    """A fake `world_size`-rank process group whose collectives accept `device` tensors only, with the
    meta device as the default for tensors made without one."""
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        with monkeypatch.context() as patch:
            for name in CHECKED:
                patch.setattr(dist, name, _checked(name, getattr(dist, name), device))
            with torch.device("meta"):
                yield
    finally:
        dist.destroy_process_group()
