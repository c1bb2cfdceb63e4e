"""Export a trained stage as an HF folder (`config.json` + safetensors + processor), written atomically on
rank 0: FSDP shards gathered (to rank 0's host memory, `get_model_state_dict(full_state_dict, cpu_offload)`)
and taken as they are by a model built on the meta device (no second whole copy), LoRA merged, QLoRA adapters
merged into the full-precision LLM. The other ranks wait in a barrier under the run's `dist_timeout_minutes`."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from ..config import to_dict
from ..convert.folder import write_folder
from ..model.modeling import MGLlavaForConditionalGeneration
from ..utils import dist
from ..utils.io import atomic_write_json
from .config import TrainConfig
from .parallel import full_state, replicated_params
from .setup import lora_settings


def export(
    model: torch.nn.Module, plain: MGLlavaForConditionalGeneration, processor, config: TrainConfig, step: int
) -> Path:
    """`<output_dir>/final`: `model` is what trains (maybe sharded), `plain` the unwrapped module."""
    final = Path(config.output_dir) / "final"
    sharded = dist.info().world_size > 1 and config.parallel == "fsdp"
    state = full_state(model) if sharded else None
    if dist.info().is_main:
        out = plain
        if (
            sharded
        ):  # the sharded module holds DTensors: a plain one on meta takes the gathered tensors as they are
            with torch.device("meta"):
                out = MGLlavaForConditionalGeneration(plain.config)
            state |= replicated_params(plain, state)
            out.load_state_dict(state, assign=True)  # no second whole copy on rank 0
            out.tie_weights()
            _restore_buffers(out, plain)
            out.generation_config = plain.generation_config
        if config.stage.lora.quantize_4bit:
            out = merged_full_precision(out, config)
        elif config.stage.lora.r > 0:
            out.language_model = out.language_model.merge_and_unload()
        for tower in (out.vision_tower, out.high_res_tower):  # stored in bf16 while frozen: the folder is
            if (
                tower is not None
            ):  # fp32 throughout, the towers with the (bf16-exact) values they trained with
                tower.float()
        tmp = final.with_name("final.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        write_folder(out.cpu(), processor, tmp)
        atomic_write_json(tmp / "training.json", {"config": to_dict(config), "steps": step})
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
    dist.barrier()
    return final


DECODER = "model.language_model."  # the LLM's decoder in the model's state dict (LoRA/4-bit inside)


def _restore_buffers(out: torch.nn.Module, plain: torch.nn.Module) -> None:
    """Non-persistent buffers (not in a state dict, so still on meta in `out`): the trained module's."""
    for name, buffer in plain.named_buffers():
        module_name, _, attr = name.rpartition(".")
        module = out.get_submodule(module_name)
        if attr in module._non_persistent_buffers_set:
            module.register_buffer(attr, buffer.detach().cpu().clone(), persistent=False)


def merged_full_precision(model: MGLlavaForConditionalGeneration, config: TrainConfig):
    """QLoRA export: the source model again in fp32, the trained new modules copied in, the adapters applied
    to the full-precision LLM and merged - not a 4-bit model with rounded-in deltas."""
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    base = MGLlavaForConditionalGeneration.from_pretrained(
        config.init_from or config.model, dtype=torch.float32
    )
    trained = {k: v.float().cpu() for k, v in model.state_dict().items() if not k.startswith(DECODER)}
    result = base.load_state_dict(trained, strict=False)
    wrong = [k for k in result.missing_keys if not k.startswith(DECODER)] + list(result.unexpected_keys)
    if wrong:
        raise ValueError(f"QLoRA export: trained weights do not fit the source model: {wrong[:10]}")
    adapters = {k: v.float().cpu() for k, v in get_peft_model_state_dict(model.language_model).items()}
    base.language_model = get_peft_model(base.language_model, lora_settings(config))
    set_peft_model_state_dict(base.language_model, adapters)
    base.language_model = base.language_model.merge_and_unload()
    base.generation_config = model.generation_config
    return base
