"""Intra-op (OpenMP) threads per thread role: the model thread with the full count, preparation with one.

torch's intra-op thread count is a per-thread setting under OpenMP: each Python thread that runs a torch op
gets its own OpenMP team, sized by that thread's count (a new thread takes the count last set anywhere in
the process at its first op). A preparation thread with a team of its own competes with the model thread's
team for the cores, and the model's parallel regions then wait for partners (issue 25: a batch-1 decode
step of 9.6 ms alone took 16.5 ms beside a preparation thread with 2 OpenMP threads, 10.5 ms beside one
with 1). So the serving model thread takes the full count (`set_threads`, at its start) and preparation
runs inside `limited_threads(1)`, which restores the caller's count after.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity), else the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def set_threads(n: int) -> None:
    """Make the calling thread's torch ops use `n` intra-op threads from now on."""
    if n < 1:
        raise ValueError(f"threads must be >= 1, got {n}")
    torch.get_num_threads()  # the thread's lazy first-op set-up first, so that it cannot undo this later
    torch.set_num_threads(n)


@contextmanager
def limited_threads(n: int | None) -> Iterator[None]:
    """Run the body with `n` intra-op threads in the calling thread (None: as it is), then restore its count."""
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    set_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
