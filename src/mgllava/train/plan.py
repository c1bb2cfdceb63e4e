"""`mgllava train --plan CONFIG --world-size N --gpu-memory GB`: each rank's GPU memory for a training config.

The model is the real one, built on the meta device (no memory, no weights) and sharded exactly as the trainer
shards it (`train.parallel.shard`) in a process group of torch's fake backend, so one process plays rank 0 of
N. What each rank holds is then read off the parameters:

- parameters: the local shard of every FSDP-managed parameter, and the whole of every parameter FSDP leaves
  alone (the frozen towers, replicated), at their dtype (fp32; frozen towers bf16 in bf16 runs); DDP keeps a
  whole copy;
- gradients: fp32, trainable parameters only (their shard under FSDP2; DDP also has its buckets, one more copy);
- optimizer: AdamW's two fp32 moments per trainable element of the shard;
- gather buffers (FSDP2): the root unit's parameters unsharded, and two decoder layers' (the running one and
  the prefetched next) in the compute dtype, plus one layer's unsharded fp32 gradients for the reduce-scatter;
- with `cpu_offload` the sharded parameters, their gradients and the optimizer state are in host memory (the
  "offloaded" column, per rank) and the GPU holds the replicated parameters, the gather buffers (plus the fp32
  shards of the running unit and of one layer's reduced gradients, copied in and out) and activations;
- activations: an estimate from the LLM's shapes at the configured micro-batch and `max_length`, with and
  without gradient checkpointing (below); the towers are frozen and save nothing for backward.

Activations of one decoder layer (SDPA: no L x L scores kept), per token, in the compute dtype (c bytes):
inputs of both RMSNorms kept in fp32 (2 x 4h), their outputs, q, k, v, the attention output and o_proj's
input (c x (4h + 2 h_kv)), gate, up, act(gate), act(gate) x up (c x 4i). With checkpointing a layer keeps only
its input (c x h) and the layer being recomputed holds the full set. The head: logits in the compute dtype,
their fp32 copy for the loss and its gradient (c + 8) x vocab per token, for every token of the micro-batch,
or for `loss_chunk_tokens` of them when the loss is chunked (the model's `chunked_lm_loss`).
Peak = parameters + gradients + optimizer + gather buffers + activations (checkpointed or not, as configured),
which is what `torch.cuda.max_memory_allocated` counts; the CUDA context, NCCL buffers and allocator
fragmentation (a few GB) are not in it, so the verdict keeps `HEADROOM` of the card free.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from ..model.configuration import MGLlavaConfig
from ..model.modeling import MGLlavaForConditionalGeneration
from .config import TrainConfig
from .parallel import _decoder_layers, check_offload, shard
from .stages import apply_stage, store_frozen_towers

GB = 1e9
HEADROOM = 0.1  # share of the card kept free for the CUDA context, NCCL and fragmentation
DEFAULT_MAX_LENGTH = 2048  # the processor's (data.processor)


@dataclass
class MemoryPlan:
    config: str
    world: int
    parallel: str
    parameters: float  # bytes per rank
    gradients: float
    optimizer: float
    gather: float
    activations_checkpointed: float
    activations_full: float
    checkpointing: bool
    gpu_memory: float  # bytes of one card
    offloaded: float = 0.0  # bytes per rank in host memory (cpu_offload), not in the peak

    @property
    def activations(self) -> float:
        return self.activations_checkpointed if self.checkpointing else self.activations_full

    @property
    def peak(self) -> float:
        return self.parameters + self.gradients + self.optimizer + self.gather + self.activations

    @property
    def fits(self) -> bool:
        return self.peak <= (1 - HEADROOM) * self.gpu_memory

    def row(self) -> str:
        cells = [self.parameters, self.gradients, self.optimizer, self.gather, self.activations_checkpointed,
                 self.activations_full, self.peak, self.offloaded]  # fmt: skip
        verdict = "fits" if self.fits else "**does not fit**"
        return f"| {self.config} | " + " | ".join(f"{c / GB:.1f}" for c in cells) + f" | {verdict} |"


HEADER = ("| config | parameters GB | gradients GB | optimizer GB | gather buffers GB | activations, checkpointed GB "
          "| activations, full GB | peak GB | offloaded to host GB | verdict |\n"
          "|---|---|---|---|---|---|---|---|---|---|")  # fmt: skip


def meta_model(config: TrainConfig) -> MGLlavaForConditionalGeneration:
    """The config's model on the meta device, its stage applied (what trains and what is frozen): `init_from`
    when that folder exists, else `model` (a folder or a preset; a stage-2 plan need not wait for stage 1)."""
    source = config.init_from if config.init_from and Path(config.init_from).is_dir() else config.model
    if Path(source).is_dir():
        model_config = MGLlavaConfig.from_pretrained(source)
    else:
        model_config = MGLlavaConfig.from_preset(source, **config.model_overrides)
    with torch.device("meta"):
        model = MGLlavaForConditionalGeneration(model_config)
    apply_stage(model, config.stage)
    store_frozen_towers(model, config.precision)
    return model


@contextlib.contextmanager
def fake_group(world: int) -> Iterator[None]:
    """A process group of torch's fake backend: this process is rank 0 of `world`, collectives do nothing."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("--plan runs alone: a process group is already started in this process")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _local(p: torch.Tensor) -> int:
    return p.to_local().numel() if hasattr(p, "to_local") else p.numel()


def layer_activation_bytes(text_config, tokens: int, compute: int, checkpointed: bool) -> tuple[float, float]:
    """(kept by one layer between forward and backward, held by one layer while it runs) for `tokens` tokens."""
    h, i = text_config.hidden_size, text_config.intermediate_size
    heads = text_config.num_attention_heads
    kv = getattr(text_config, "num_key_value_heads", None) or heads
    h_kv = h // heads * kv
    full = tokens * (2 * 4 * h + compute * (4 * h + 2 * h_kv) + compute * 4 * i)
    return (tokens * compute * h if checkpointed else full), full


def activation_bytes(
    config: TrainConfig, model: MGLlavaForConditionalGeneration, checkpointed: bool
) -> float:
    text = model.config.text_config
    compute = 2 if config.precision == "bf16" else 4
    tokens = config.stage.per_device_batch_size * (config.max_length or DEFAULT_MAX_LENGTH)
    kept, running = layer_activation_bytes(text, tokens, compute, checkpointed)
    layers = text.num_hidden_layers
    head = min(tokens, config.loss_chunk_tokens or tokens) * text.vocab_size * (compute + 8)
    return layers * kept + (running if checkpointed else 0) + head


def plan(config: TrainConfig, world: int, gpu_memory_gb: float, name: str) -> MemoryPlan:
    """Rank 0's memory for `config` on `world` GPUs of `gpu_memory_gb` each (module docstring)."""
    check_offload(config, world)
    model = meta_model(config)
    sharded = world > 1 and config.parallel == "fsdp"
    sizes = _fsdp_sizes(model, config, world) if sharded else _whole_sizes(model, world)
    parallel = config.parallel if world > 1 else "one process"
    return MemoryPlan(
        config=name, world=world, parallel=parallel + (", CPU offload" if config.cpu_offload else ""),
        activations_checkpointed=activation_bytes(config, model, True),
        activations_full=activation_bytes(config, model, False), checkpointing=config.gradient_checkpointing,
        gpu_memory=gpu_memory_gb * GB, **sizes,
    )  # fmt: skip


def _whole_sizes(model: torch.nn.Module, world: int) -> dict[str, float]:
    """One process, or DDP: a whole copy on every rank; DDP's buckets hold the gradients once more."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {
        "parameters": sum(p.numel() * p.element_size() for p in model.parameters()),
        "gradients": trainable * 4 * (2 if world > 1 else 1),
        "optimizer": trainable * 8,
        "gather": 0.0,
    }


def _fsdp_sizes(model: torch.nn.Module, config: TrainConfig, world: int) -> dict[str, float]:
    """Rank 0's shards after sharding `model` as the trainer does on `world` fake ranks, and the buffers."""
    compute = 2 if config.precision == "bf16" else 4
    layers = _decoder_layers(model.language_model)
    layer_params = max(sum(p.numel() for p in layer.parameters()) for layer in layers)
    layer_trainable = max(sum(p.numel() for p in layer.parameters() if p.requires_grad) for layer in layers)
    in_layers = {id(p) for layer in layers for p in layer.parameters()}
    towers = {
        id(p) for t in (model.vision_tower, model.high_res_tower) if t is not None for p in t.parameters()
    }
    root = sum(p.numel() for p in model.parameters() if id(p) not in in_layers | towers)
    with fake_group(world):
        shard(model, config)
        params = list(model.parameters())
        sharded = sum(_local(p) * p.element_size() for p in params if hasattr(p, "to_local"))
        replicated = sum(p.numel() * p.element_size() for p in params if not hasattr(p, "to_local"))
        trainable = sum(_local(p) for p in params if p.requires_grad)
    gather = (root + 2 * layer_params) * compute + layer_trainable * 4
    if not config.cpu_offload:
        return {"parameters": sharded + replicated, "gradients": trainable * 4, "optimizer": trainable * 8,
                "gather": gather}  # fmt: skip
    # the shards live on the host: the running unit's fp32 shard comes in, one layer's reduced gradients go out
    gather += (max(root, layer_params) + layer_trainable) * 4 / world
    return {"parameters": replicated, "gradients": 0.0, "optimizer": 0.0, "gather": gather,
            "offloaded": sharded + trainable * 12}  # fmt: skip


def format_plan(plans: list[MemoryPlan]) -> str:
    first = plans[0]
    lines = [f"per-rank GPU memory on {first.world} x {first.gpu_memory / GB:.0f} GB ({first.parallel}; peak with the "
             f"configured gradient checkpointing; a plan fits when its peak leaves {HEADROOM:.0%} of the card free)",
             HEADER, *(p.row() for p in plans)]  # fmt: skip
    return "\n".join(lines)
