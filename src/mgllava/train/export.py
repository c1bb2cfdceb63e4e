"""Export a trained stage as an HF folder (`config.json` + safetensors + processor), written atomically on
rank 0: FSDP shards gathered, LoRA merged, QLoRA adapters merged into the full-precision LLM."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from transformers.initialization import no_init_weights

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
        if sharded:  # the sharded module holds DTensors: rebuild a plain one from the gathered weights
            with no_init_weights():
                out = MGLlavaForConditionalGeneration(plain.config)
            state |= replicated_params(plain, state)
            out.load_state_dict(state)
            out.tie_weights()
            out.generation_config = plain.generation_config
        if config.stage.lora.quantize_4bit:
            out = merged_full_precision(out, config)
        elif config.stage.lora.r > 0:
            out.language_model = out.language_model.merge_and_unload()
        tmp = final.with_name("final.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        write_folder(out.cpu(), processor, tmp)
        atomic_write_json(tmp / "training.json", {"config": to_dict(config), "steps": step})
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
    dist.barrier()
    return final


DECODER = "model.language_model."  # the LLM's decoder in the model's state dict (LoRA/4-bit inside)


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
