"""Parallelism for training: FSDP2 (`fully_shard`) or DDP over torchrun processes, and gathering the full
weights back for export."""

from __future__ import annotations

import torch

from ..utils import dist
from .config import TrainConfig


def shard(model: torch.nn.Module, config: TrainConfig) -> torch.nn.Module:
    """FSDP2 (one unit per LLM decoder layer, then the root) or DDP.

    Frozen vision towers are left out of FSDP (`ignored_params`): every rank keeps its own copy and no
    collective ever runs for them, so ranks whose batches hold different numbers of images (or none) stay
    in step. A trainable tower is sharded, one unit per layer/stage; text-only batches then run it on a
    zero image (`_visual_graph_anchor`) so that every rank still runs the same units in the same order.

    With `precision: bf16` the units all-gather parameters and compute in bf16 and reduce-scatter gradients
    in fp32 (`MixedPrecisionPolicy`), the bytes of the reference's bf16 ZeRO; the sharded parameters, their
    gradients and the optimizer state stay fp32.
    """
    if config.parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if config.stage.lora.r > 0:
        raise ValueError("LoRA with FSDP is not supported yet; use parallel=ddp or one process")
    bf16 = config.precision == "bf16"
    policy = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if bf16
        else MixedPrecisionPolicy()
    )
    ignored = set()
    towers = ((model.vision_tower, model.vision_tower.clip.encoder.layers), (model.high_res_tower, None))
    for tower, layers in towers:
        if tower is None:
            continue
        if any(p.requires_grad for p in tower.parameters()):
            for unit in layers if layers is not None else tower.encoder.stages:
                fully_shard(unit, mp_policy=policy)
        else:
            ignored |= set(tower.parameters())
    for layer in _decoder_layers(model.language_model):
        fully_shard(layer, mp_policy=policy)
    fully_shard(model, ignored_params=ignored, mp_policy=policy)
    return model


def _decoder_layers(llm: torch.nn.Module) -> list[torch.nn.Module]:
    base = getattr(llm, "model", llm)
    layers = getattr(base, "layers", None)
    if layers is None:
        raise ValueError(f"cannot find the decoder layers of {type(llm).__name__} to shard")
    return list(layers)


def full_state(model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return state if dist.info().is_main else None


def replicated_params(model: torch.nn.Module, gathered: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Parameters FSDP left alone (the frozen towers): every rank holds them whole, so rank 0 copies its own."""
    own = {}
    for name, tensor in model.state_dict().items():
        if name not in gathered and not hasattr(tensor, "full_tensor"):
            own[name] = tensor.detach().cpu()
    return own
