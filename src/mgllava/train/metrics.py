"""What a training run reports per step: `metrics.jsonl` and TensorBoard (`<output_dir>/tensorboard`), both
on rank 0, and the step record they hold (loss, lr, grad norm, throughput, memory, replaced samples, and
images whose box file lacks them: they train on the zero-box fallback row).

On resume the lines after the checkpoint's step are dropped (those steps run again) and TensorBoard purges
them, so a resumed run's files equal an uninterrupted run's.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import psutil
import torch

from ..utils.io import JsonlWriter, atomic_write_text, read_jsonl

logger = logging.getLogger(__name__)
SCALARS = (
    "loss",
    "lr",
    "grad_norm",
    "tokens_per_s",
    "samples_per_s",
    "memory_mb",
    "replaced",
    "boxes_missing",
)


def memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return psutil.Process().memory_info().rss / 2**20


def step_record(
    step: int, epoch: int, stats: dict[str, Any], samples: int, elapsed: float, device: torch.device
) -> dict[str, Any]:
    """One step's line: `stats` from the step (loss, lr, grad_norm, tokens, replaced) and its timing."""
    return {
        "step": step, "epoch": epoch, "loss": stats["loss"], "lr": stats["lr"], "grad_norm": stats["grad_norm"],
        "tokens_per_s": stats["tokens"] / elapsed, "samples_per_s": samples / elapsed,
        "memory_mb": memory_mb(device), "replaced": stats["replaced"], "boxes_missing": stats["boxes_missing"],
    }  # fmt: skip


class MetricsLog:
    """Writes step records to `metrics.jsonl` and TensorBoard; a no-op off rank 0."""

    def __init__(self, out: Path, resumed_step: int, enabled: bool) -> None:
        self.jsonl: JsonlWriter | None = None
        self.board = None
        if not enabled:
            return
        path = out / "metrics.jsonl"
        if path.exists():  # drop steps after the checkpoint we resumed from: they are recomputed
            kept = [r for r in read_jsonl(path, allow_torn_tail=True) if r["step"] <= resumed_step]
            atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
        self.jsonl = JsonlWriter(path, key=lambda r: r["step"])
        from torch.utils.tensorboard import SummaryWriter

        self.board = SummaryWriter(log_dir=str(out / "tensorboard"), purge_step=resumed_step + 1)

    def write(self, record: dict[str, Any]) -> None:
        if self.jsonl is None:
            return
        self.jsonl.write(record)
        for key in SCALARS:
            self.board.add_scalar(f"train/{key}", record[key], record["step"])

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
            self.board.close()
