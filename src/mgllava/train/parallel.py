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
    gradients and the optimizer state stay fp32. With `cpu_offload` they stay in host memory
    (`CPUOffloadPolicy`, pinned on GPU machines): a module sharded on the meta device is then materialised
    on the CPU and `place_unsharded` puts what FSDP does not manage on the device.
    """
    if config.parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model)
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    if config.stage.lora.r > 0:
        raise ValueError("LoRA with FSDP is not supported yet; use parallel=ddp or one process")
    bf16 = config.precision == "bf16"
    policy = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if bf16
        else MixedPrecisionPolicy()
    )
    offload = (
        CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if config.cpu_offload else OffloadPolicy()
    )
    options = {"mp_policy": policy, "offload_policy": offload}
    ignored = set()
    towers = ((model.vision_tower, model.vision_tower.clip.encoder.layers), (model.high_res_tower, None))
    for tower, layers in towers:
        if tower is None:
            continue
        if any(p.requires_grad for p in tower.parameters()):
            for unit in layers if layers is not None else tower.encoder.stages:
                fully_shard(unit, **options)
        else:
            ignored |= set(tower.parameters())
    for layer in _decoder_layers(model.language_model):
        fully_shard(layer, **options)
    fully_shard(model, ignored_params=ignored, **options)
    return model


def check_offload(config: TrainConfig, world: int) -> None:
    """`cpu_offload` moves FSDP2's shards to the host: there are none in one process."""
    if config.cpu_offload and world < 2:
        raise ValueError(
            "cpu_offload offloads FSDP2's shards: run it under torchrun with 2 or more processes, or set "
            "cpu_offload=false"
        )


def place_unsharded(model: torch.nn.Module, device: torch.device) -> None:
    """Under CPU offload the model is materialised on the CPU; what FSDP does not manage (the frozen towers'
    parameters, replicated, and every buffer) runs on `device` and goes there."""
    for param in model.parameters():
        if not hasattr(param, "to_local"):
            param.data = param.data.to(device)
    for module in model.modules():
        for name, buffer in module._buffers.items():
            if buffer is not None:
                module._buffers[name] = buffer.to(device)


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
