"""Deterministic data order: global batches, split into per-rank micro-batches (docs/design.md section 8).

The order of an epoch depends only on (seed, epoch), never on the number of processes: step s trains on
the global batch `order[s * G : (s + 1) * G]`, and rank r's micro-batch m is the slice
`[(m * world + r) * b, +b)` of it. So 1 process with accumulation 2 and 2 processes with accumulation 1 see
the same samples per step, and resuming at step s needs nothing but s.

Length grouping (stage 2, LLaVA's `get_modality_length_grouped_indices` idea): image and text-only samples
are grouped separately; a shuffled list is cut into megabatches of one global batch each, sorted by length
inside, so that micro-batches hold similar lengths and pad less. The last partial global batch is dropped.
Sorted longest-first and sliced contiguously, rank 0 would always get each round's longest micro-batch (the
straggler and the memory peak), so each round of `world x per_device` samples is dealt out as LLaVA's
`split_to_even_chunks` does: longest first, each to the rank with the least length so far that still has
room (`balance_round`). Which samples a step trains on still depends only on (seed, epoch).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


def _grouped(
    indices: list[int], lengths: list[int], size: int, generator: torch.Generator
) -> list[list[int]]:
    perm = [indices[i] for i in torch.randperm(len(indices), generator=generator).tolist()]
    megabatches = [perm[i : i + size] for i in range(0, len(perm), size)]
    return [sorted(mb, key=lambda i: -lengths[i]) for mb in megabatches]


def epoch_order(
    lengths: list[int],
    multimodal: list[bool],
    global_batch: int,
    seed: int,
    epoch: int,
    length_grouped: bool,
) -> list[int]:
    """Sample indices of one epoch, a whole number of global batches long."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    n = len(lengths)
    if not length_grouped:
        order = torch.randperm(n, generator=generator).tolist()
    else:
        image = [i for i in range(n) if multimodal[i]]
        text = [i for i in range(n) if not multimodal[i]]
        full, partial = [], []
        for group in (image, text):
            for mb in _grouped(group, lengths, global_batch, generator):
                (full if len(mb) == global_batch else partial).append(mb)
        mix = torch.randperm(len(full), generator=generator).tolist()
        order = [i for k in mix for i in full[k]] + [i for mb in partial for i in mb]
    return order[: len(order) // global_batch * global_batch]


def micro_batches(
    order: list[int], step_in_epoch: int, world: int, rank: int, per_device: int, accumulation: int
) -> list[list[int]]:
    """This rank's `accumulation` micro-batches of the given step."""
    global_batch = world * per_device * accumulation
    batch = order[step_in_epoch * global_batch : (step_in_epoch + 1) * global_batch]
    return [
        batch[(m * world + rank) * per_device : (m * world + rank + 1) * per_device]
        for m in range(accumulation)
    ]


def balance_round(indices: list[int], lengths: list[int], world: int, first: int = 0) -> list[int]:
    """One round of micro-batches (`world` of equal size, contiguous in `indices`) re-dealt so that every rank
    gets a similar total length: longest first, each to the lightest rank with room left (ties go to rank
    `first`, then the next ones, so that the round's longest sample does not always land on rank 0)."""
    if world == 1 or len(indices) % world:
        return list(indices)
    size = len(indices) // world
    chunks: list[list[int]] = [[] for _ in range(world)]
    totals = [0] * world
    for i in sorted(indices, key=lambda i: -lengths[i]):
        free = (r for r in range(world) if len(chunks[r]) < size)
        rank = min(free, key=lambda r: (totals[r], (r - first) % world))
        chunks[rank].append(i)
        totals[rank] += lengths[i]
    return [i for chunk in chunks for i in chunk]


def balanced_micro_batches(
    order: list[int], lengths: list[int], step_in_epoch: int, world: int, rank: int, per_device: int,
    accumulation: int,
) -> list[list[int]]:  # fmt: skip
    """`micro_batches` with each accumulation round balanced across ranks (`balance_round`)."""
    global_batch = world * per_device * accumulation
    start = step_in_epoch * global_batch
    round_size = world * per_device
    batch = order[start : start + global_batch]
    dealt = [i for m in range(accumulation)
             for i in balance_round(batch[m * round_size : (m + 1) * round_size], lengths, world,
                                   step_in_epoch * accumulation + m)]  # fmt: skip
    return micro_batches(dealt, 0, world, rank, per_device, accumulation)


def padding_fraction(lengths: list[list[int]]) -> float:
    """Share of padded positions when each micro-batch is padded to its longest sample."""
    total = sum(max(mb) * len(mb) for mb in lengths if mb)
    return 1.0 - sum(sum(mb) for mb in lengths) / total if total else 0.0


@dataclass
class Plan:
    world: int
    per_device: int
    accumulation: int
    steps_per_epoch: int
    total_steps: int


def make_plan(config: Any, n_samples: int, world: int) -> Plan:
    stage = config.stage
    per_rank = stage.per_device_batch_size * world
    if stage.global_batch_size % per_rank:
        raise ValueError(
            f"global_batch_size {stage.global_batch_size} is not divisible by per_device_batch_size "
            f"{stage.per_device_batch_size} x {world} processes"
        )
    steps = n_samples // stage.global_batch_size
    if steps == 0:
        raise ValueError(f"{n_samples} samples are fewer than one global batch ({stage.global_batch_size})")
    total = steps * stage.epochs if config.max_steps is None else min(config.max_steps, steps * stage.epochs)
    return Plan(world, stage.per_device_batch_size, stage.global_batch_size // per_rank, steps, total)


class StepBatches:
    """Yields this rank's micro-batches (lists of sample indices) from `start` step to the end."""

    def __init__(self, samples: Any, config: Any, plan: Plan, rank: int, start: int) -> None:
        """`samples`: a `data.dataset.SampleIndex` (its `lengths` and `multimodal` arrays are used, no record is
        read) or a list of `Sample`s."""
        if hasattr(samples, "lengths"):
            self.lengths, self.multimodal = samples.lengths.tolist(), samples.multimodal.tolist()
        else:
            self.lengths = [s.length() for s in samples]
            self.multimodal = [s.is_multimodal for s in samples]
        self.config, self.plan, self.rank, self.start = config, plan, rank, start

    def __iter__(self):
        cached_epoch, order = -1, []
        for step in range(self.start, self.plan.total_steps):
            epoch = step // self.plan.steps_per_epoch
            if epoch != cached_epoch:
                order = epoch_order(self.lengths, self.multimodal, self.config.stage.global_batch_size,
                                    self.config.seed, epoch, self.config.stage.length_grouped)  # fmt: skip
                cached_epoch = epoch
            step_in_epoch = step % self.plan.steps_per_epoch
            if self.config.stage.length_grouped:
                yield from balanced_micro_batches(order, self.lengths, step_in_epoch, self.plan.world, self.rank,
                                                  self.plan.per_device, self.plan.accumulation)  # fmt: skip
            else:
                yield from micro_batches(order, step_in_epoch, self.plan.world, self.rank, self.plan.per_device,
                                         self.plan.accumulation)  # fmt: skip

    def __len__(self) -> int:
        return (self.plan.total_steps - self.start) * self.plan.accumulation
