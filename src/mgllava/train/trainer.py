"""`train(config)`: one stage of MG-LLaVA training, on 1 process or many (torchrun + FSDP2 or DDP).

    config ─► model (preset / folder / stage-1 export) ─► apply_stage (freeze, table) ─► shard (FSDP2)
    samples ─► SafeDataset ─► per-step micro-batches (train.sampler) ─► forward (autocast) ─► backward
    ─► clip 1.0 ─► AdamW ─► warmup 3% + cosine ─► log / checkpoint (DCP) ─► export HF folder

The package by concern: `setup` (processor, model, LoRA/QLoRA), `stages` (what trains), `sampler` (which
samples each step trains on), `parallel` (FSDP2/DDP), `checkpoint` (DCP save/resume), `metrics` (what is
logged), `export` (the HF folder); this module is the loop that ties them.

The loss of a step is the token-weighted mean over the whole global batch (the sum of token losses divided
by the batch's supervised-token count, all-reduced), so 1 process with accumulation and N processes give
the same losses and updates up to float rounding. Frozen modules get neither gradients nor optimizer state.
A non-finite loss stops the run naming the step and its sample ids.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR
from tqdm import tqdm

from ..config import to_dict
from ..data.dataset import LlavaDataset, SafeDataset, load_samples, scan_share
from ..utils import dist
from ..utils.io import read_jsonl
from .checkpoint import Checkpointer
from .config import TrainConfig
from .export import export
from .metrics import MetricsLog, step_record
from .parallel import check_offload, shard
from .sampler import StepBatches, make_plan
from .setup import build_model, build_sharded
from .stages import apply_stage, store_frozen_towers

logger = logging.getLogger(__name__)
MODEL_INPUTS = ("input_ids", "attention_mask", "labels", "pixel_values", "high_res_pixel_values",
                "object_boxes", "object_counts")  # fmt: skip


class NonFiniteLoss(FloatingPointError):
    """The loss became NaN or inf; names the step and the samples of that step."""


def warmup_cosine(total_steps: int, warmup_ratio: float):
    warmup = math.ceil(total_steps * warmup_ratio)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def gradient_sync(model: torch.nn.Module, sync: bool) -> contextlib.AbstractContextManager:
    """Gradients are reduced across ranks on the last micro-batch of a step only: FSDP2 through
    `set_requires_gradient_sync`, DDP through `no_sync` (which must also cover the backward)."""
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(sync)
    if not sync and hasattr(model, "no_sync"):
        return model.no_sync()
    return contextlib.nullcontext()


def skipped_ids(path: str | None) -> set[str]:
    return {str(r["id"]) for r in read_jsonl(path)} if path else set()


class Trainer:
    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        self.info = dist.init(datetime.timedelta(minutes=config.dist_timeout_minutes))
        self.out = Path(config.output_dir)
        self.device = self.info.device
        tables: list[str] = []

        def prepare(model: torch.nn.Module) -> None:
            tables.append(apply_stage(model, config.stage))
            store_frozen_towers(model, config.precision)
            if config.gradient_checkpointing:
                model.language_model.activation_checkpointing_enable({"use_reentrant": False})

        sharded = self.info.world_size > 1 and config.parallel == "fsdp"
        check_offload(config, self.info.world_size)
        if sharded:  # built on meta, sharded, filled from rank 0: no rank holds a second whole copy
            model, self.processor = build_sharded(config, self.device, prepare)
        else:
            model, self.processor = build_model(config)
            prepare(model)
        # a folder loads in eval mode (`from_pretrained`), and transformers checkpoints a layer only in training
        # mode: without this, a stage started from a folder trains with every activation kept
        model.train()
        self.log(f"stage {config.stage.name}: trainable and frozen parameters\n{tables[0]}")
        skip = skipped_ids(config.data.skip)
        cache = Path(config.data.index_cache or self.out / "data-index")
        scan_share(config.data, cache, self.info.rank, self.info.world_size)  # each rank scans its files
        dist.barrier()  # then every rank maps every scan (utils.records); records stay on disk
        samples = load_samples(config.data, config.seed, cache).without(skip)
        self.samples = samples
        self.dataset = SafeDataset(LlavaDataset(samples, self.processor))
        self.plan = make_plan(config, len(samples), self.info.world_size)
        if not sharded and not config.stage.lora.quantize_4bit:  # a 4-bit model is placed where it is loaded
            model.to(self.device)
        self.plain_model = model
        self.model = shard(model, config) if self.info.world_size > 1 and not sharded else model
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=config.stage.lr, betas=tuple(config.stage.betas),
                                           weight_decay=config.stage.weight_decay)  # fmt: skip
        self.scheduler = LambdaLR(
            self.optimizer, warmup_cosine(self.plan.total_steps, config.stage.warmup_ratio)
        )
        self.checkpointer = Checkpointer(self.out, config.keep_checkpoints)
        self.step = 0

    def log(self, message: str) -> None:
        if self.info.is_main:
            logger.info(message)

    def resume(self) -> None:
        latest = self.checkpointer.latest()
        if latest is None:
            return
        _check_same_run(
            json.loads((latest / "trainer_state.json").read_text())["config"], to_dict(self.config), latest
        )
        state = self.checkpointer.load(latest, self.model, self.optimizer, self.scheduler)
        self.step = state["step"]
        self.log(f"resumed from {latest} at step {self.step}")

    def loader(self) -> torch.utils.data.DataLoader:
        batches = StepBatches(self.samples, self.config, self.plan, self.info.rank, self.step)
        return torch.utils.data.DataLoader(self.dataset, batch_sampler=batches, collate_fn=self.collate,
                                           num_workers=self.config.data.num_workers)  # fmt: skip

    def collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.processor.collate(items, padding_side="right")
        batch["ids"] = [item["id"] for item in items]
        batch["replaced"] = [r for item in items for r in item["replaced"]]
        batch["boxes_missing"] = sum(item["boxes_missing"] for item in items)
        return batch

    def _autocast(self):
        dtype = {"bf16": torch.bfloat16}.get(self.config.precision)
        return torch.autocast(self.device.type, dtype=dtype or torch.float32, enabled=dtype is not None)

    def train_step(self, micro: list[dict[str, Any]]) -> dict[str, Any]:
        """Forward and backward over this rank's micro-batches; returns the step's global loss, grad norm and
        token count (every rank gets the same numbers)."""
        counts = torch.tensor(
            [
                sum(int((m["labels"][:, 1:] != -100).sum()) for m in micro),  # supervised (after shift)
                sum(int(m["attention_mask"].sum()) for m in micro),  # tokens processed
                sum(len(m["replaced"]) for m in micro),  # unusable samples replaced
                sum(m["boxes_missing"] for m in micro),  # images the box file lacks (zero-box fallback)
            ],
            dtype=torch.float64,
            device=self.device,  # collectives get training-device tensors: NCCL has no CPU backend
        )
        if dist.active():
            torch.distributed.all_reduce(counts)
        n_items = counts[0].long()
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for k, batch in enumerate(micro):
            inputs = {key: batch[key].to(self.device) for key in MODEL_INPUTS if key in batch}
            with gradient_sync(self.model, k == len(micro) - 1):
                with self._autocast():
                    chunking = (
                        {"loss_chunk_tokens": self.config.loss_chunk_tokens}
                        if self.config.loss_chunk_tokens
                        else {}
                    )
                    loss = self.model(**inputs, num_items_in_batch=n_items, **chunking).loss
                (loss * self.info.world_size).backward()
            total += loss.detach().double()
        if dist.active():
            torch.distributed.all_reduce(total)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.config.stage.max_grad_norm)
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        return {
            "loss": float(total),
            "grad_norm": float(grad_norm),
            "tokens": int(counts[1]),
            "replaced": int(counts[2]),
            "boxes_missing": int(counts[3]),
        }

    def check_finite(self, stats: dict[str, Any], micro: list[dict[str, Any]]) -> None:
        if math.isfinite(stats["loss"]):
            return
        ids = dist.gather_objects([i for m in micro for i in m["ids"]])
        names = sorted({i for part in ids or [] for i in part})
        raise NonFiniteLoss(f"step {self.step + 1}: loss is {stats['loss']}; samples of this step: {names}")

    def run(self) -> Path:
        self.resume()
        metrics = MetricsLog(self.out, self.step, self.info.is_main)
        bar = tqdm(
            total=self.plan.total_steps, initial=self.step, disable=not self.info.is_main, desc="train"
        )
        micro: list[dict[str, Any]] = []
        start = time.perf_counter()
        for batch in self.loader():
            micro.append(batch)
            if len(micro) < self.plan.accumulation:
                continue
            stats = self.train_step(micro)
            self.check_finite(stats, micro)
            stats["lr"] = self.scheduler.get_last_lr()[0]  # the rate this step uses
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            elapsed, start = time.perf_counter() - start, time.perf_counter()
            for reason in (r for m in micro for r in m["replaced"]):
                logger.warning("replaced an unusable sample: %s", reason)
            if stats["boxes_missing"]:
                logger.warning("step %d: %d images have no boxes in their box file (zero-box fallback)",
                               self.step, stats["boxes_missing"])  # fmt: skip
            epoch = (self.step - 1) // self.plan.steps_per_epoch
            record = step_record(
                self.step, epoch, stats, self.config.stage.global_batch_size, elapsed, self.device
            )
            metrics.write(record)
            bar.update(1)
            bar.set_postfix(loss=f"{stats['loss']:.4f}", lr=f"{record['lr']:.2e}")
            if self.step % self.config.log_every == 0:
                self.log(
                    " ".join(
                        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()
                    )
                )
            if self.step % self.config.save_every == 0 and self.step < self.plan.total_steps:
                self.save()
            micro = []
        bar.close()
        metrics.close()
        self.save()
        return self.export()

    def save(self) -> None:
        self.checkpointer.save(
            self.step, self.model, self.optimizer, self.scheduler, {"config": to_dict(self.config)}
        )

    def export(self) -> Path:
        """The trained model as an HF folder (with its processor), written atomically on rank 0."""
        return export(self.model, self.plain_model, self.processor, self.config, self.step)


RESUMABLE_CHANGES = {
    "max_steps",
    "save_every",
    "log_every",
    "keep_checkpoints",
    "num_workers",
    "dist_timeout_minutes",
}


def _check_same_run(saved: dict[str, Any], current: dict[str, Any], path: Path, prefix: str = "") -> None:
    """A checkpoint resumes only the run that wrote it: any setting that changes the optimisation must match."""
    for key in sorted(set(saved) | set(current)):
        if key in RESUMABLE_CHANGES:
            continue
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            _check_same_run(a, b, path, f"{prefix}{key}.")
        elif a != b:
            raise ValueError(
                f"{path} was written by a run with {prefix}{key}={a!r}, this run has {b!r}; resume with the same "
                "settings, or start over in a new output_dir"
            )


def train(config: TrainConfig) -> Path:
    trainer = Trainer(config)
    try:
        return trainer.run()
    finally:
        dist.cleanup()
