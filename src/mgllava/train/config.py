"""The training config: model, data, stage, run settings (docs/design.md section 8 defaults).

Global batch = per_device_batch_size x gradient accumulation x world size; the accumulation is derived
from `global_batch_size` and the number of processes, so one config runs on 1 or N workers with the same
optimisation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from ..data.config import DataConfig
from ..model.modeling import MODULES

NEW_MODULES_GROUP = "new_modules"  # every module of MG-LLaVA's own that the variant has (train.stages)
TRAINABLE = (NEW_MODULES_GROUP, *MODULES)


@dataclass
class LoraSettings:
    r: int = 0  # 0: no LoRA
    alpha: int = 16
    dropout: float = 0.05
    target_modules: str | list[str] = "all-linear"
    quantize_4bit: bool = (
        False  # QLoRA: the LLM's layers in 4-bit NF4 (bitsandbytes), exported merged in fp32
    )


@dataclass
class StageConfig:
    name: str
    trainable: list[str]  # top-level modules of the model, or `new_modules` (see train.stages)
    lr: float
    global_batch_size: int
    per_device_batch_size: int
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    max_grad_norm: float = 1.0
    epochs: int = 1
    length_grouped: bool = False
    requires_init: bool = False  # stage 2: must start from an explicit stage-1 checkpoint (`init_from`)
    lora: LoraSettings = field(default_factory=LoraSettings)

    def __post_init__(self) -> None:
        unknown = set(self.trainable) - set(TRAINABLE)
        if unknown:
            raise ValueError(
                f"unknown trainable modules {sorted(unknown)}; choose from {', '.join(TRAINABLE)}"
            )
        if self.global_batch_size % self.per_device_batch_size:
            raise ValueError(
                f"global_batch_size {self.global_batch_size} is not a multiple of per_device_batch_size "
                f"{self.per_device_batch_size}"
            )


@dataclass
class TrainConfig:
    model: str  # a preset name (random init) or an HF folder (e.g. made by `mgllava assemble`)
    stage: StageConfig
    data: DataConfig
    output_dir: str
    init_from: str | None = None  # an exported stage folder to start from (stage 2 names its stage 1 here)
    model_overrides: dict[str, Any] = field(default_factory=dict)  # config fields, e.g. fusion: none
    seed: int = 0
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    gradient_checkpointing: bool = True
    parallel: Literal["fsdp", "ddp"] = "fsdp"
    max_steps: int | None = None  # stop early (smoke runs); None: the stage's epochs
    save_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 10
    max_length: int | None = None  # None: the processor's (2048)
    # the loss over this many supervised tokens at a time, logits recomputed in the backward (the head then
    # holds one chunk's logits, not the micro-batch's: 84 -> 2.6 GB for Llama-3 at 32 x 2048); None: plain
    loss_chunk_tokens: int | None = None
    dist_timeout_minutes: float = (
        60.0  # collectives and barriers (rank 0 writes the export while others wait)
    )
    # FSDP2 only: each rank's shards of the parameters, their gradients and AdamW's state live in host memory
    # and the optimizer steps on the CPU (`CPUOffloadPolicy`, as DeepSpeed's ZeRO-3 offload); the GPU holds the
    # gathered layers, activations and the frozen towers. For models whose sharded state outgrows the cards
    # (Yi-1.5-34B's stage 2 on 8 GPUs); slower per step, so off where the state fits (`mgllava train --plan`)
    cpu_offload: bool = False

    def __post_init__(self) -> None:
        if self.cpu_offload and self.parallel != "fsdp":
            raise ValueError(
                f"cpu_offload needs parallel=fsdp (it offloads FSDP2's shards); this config has "
                f"parallel={self.parallel}"
            )
        if self.loss_chunk_tokens is not None and self.loss_chunk_tokens < 1:
            raise ValueError(f"loss_chunk_tokens must be >= 1 or null, got {self.loss_chunk_tokens}")
        if self.precision == "fp16":
            raise ValueError(
                "precision: fp16 needs a gradient scaler, which this trainer does not have (fp16 gradients "
                "underflow without one); use bf16 (the paper's) or fp32"
            )
