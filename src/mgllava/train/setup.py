"""Model and adapter setup for a training stage: the processor, the model (a preset with random weights, a
saved folder, or a stage-1 export), LoRA / QLoRA adapters on the LLM.

    config --build_processor--> MGLlavaProcessor (no model needed: `check-data` uses only this)
    config --build_model--> (model, processor): preset | folder | init_from, 4-bit LLM for QLoRA, adapters
    config --build_sharded--> FSDP2 model: built on the meta device, stage applied, sharded, then filled
                              from rank 0's weights (only rank 0 ever holds the whole model)

Sharded loading (`build_sharded`): every rank builds the model on the meta device (no memory), applies the
stage, shards it as `train.parallel.shard` does and allocates only its own shards (`to_empty`); rank 0 alone
builds the full model exactly as one process would (same seed, same folder) and
`set_model_state_dict(full_state_dict=True, broadcast_from_rank0=True)` sends every rank its shards (and the
replicated frozen towers). Non-persistent buffers (rotary frequencies) are not in a state dict: rank 0
broadcasts them too. So a run's initial weights equal the one-process run's, with one host copy in all.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from ..data.processor import MGLlavaProcessor
from ..model.configuration import MGLlavaConfig
from ..model.generation import configure_generation
from ..model.modeling import MODULES, MGLlavaForConditionalGeneration
from ..utils import dist
from .config import TrainConfig


def _source(config: TrainConfig) -> str:
    """The folder or preset the stage starts from, after checking the stage's requirements."""
    source = config.init_from or config.model
    if config.stage.requires_init and not config.init_from:
        raise ValueError(
            f"stage {config.stage.name} starts from a stage-1 model: set init_from=<folder exported by stage 1>"
        )
    if config.stage.lora.quantize_4bit and not Path(source).is_dir():
        raise ValueError(
            "QLoRA (lora.quantize_4bit) starts from a saved folder: set init_from or model=<folder>"
        )
    if Path(source).is_dir() and config.model_overrides:
        raise ValueError("model_overrides apply to presets only; this model comes from a folder")
    return source


def build_processor(config: TrainConfig) -> MGLlavaProcessor:
    """The stage's processor, without building the model: a saved folder's, or the preset's tokenizer and
    template around the (overridden) preset config; `max_length` and `data.num_frames` applied."""
    source = _source(config)
    if Path(source).is_dir():
        processor = MGLlavaProcessor.from_pretrained(source)
    else:
        model_config = MGLlavaConfig.from_preset(source, **config.model_overrides)
        preset = MGLlavaProcessor.from_preset(source)  # its tokenizer and template, for the overridden config
        processor = MGLlavaProcessor.for_config(model_config, preset.tokenizer, template=preset.template)
    if config.max_length is not None:
        processor.max_length = config.max_length
    if config.data.num_frames is not None:
        processor.image_processor.num_frames = config.data.num_frames
    return processor


def build_model(config: TrainConfig) -> tuple[MGLlavaForConditionalGeneration, MGLlavaProcessor]:
    """The model to train (with LoRA adapters when the stage asks) and its processor."""
    source = _source(config)
    processor = build_processor(config)
    if Path(source).is_dir():
        model = load_for_training(source, config)
    else:
        torch.manual_seed(config.seed)  # identical initial weights on every rank
        model = MGLlavaForConditionalGeneration(MGLlavaConfig.from_preset(source, **config.model_overrides))
        configure_generation(model, processor)
    if config.stage.lora.r > 0:
        model.language_model = add_lora(model.language_model, config)
    return model, processor


def build_sharded(
    config: TrainConfig, device: torch.device, prepare: Callable[[torch.nn.Module], None]
) -> tuple[MGLlavaForConditionalGeneration, MGLlavaProcessor]:
    """The FSDP2-sharded model (module docstring) and the processor; `prepare(model)` runs on the meta model
    before sharding (the stage and gradient checkpointing, as the trainer applies them)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    from .parallel import place_unsharded, shard

    main = dist.info().is_main
    full = build_model(config)[0] if main else None  # the one-process model, on rank 0 only
    processor = build_processor(config)
    source = _source(config)
    model_config = full.config if full is not None else _model_config(source, config)
    with torch.device("meta"):
        model = MGLlavaForConditionalGeneration(model_config)
    prepare(model)
    shard(model, config)
    model.to_empty(device=torch.device("cpu") if config.cpu_offload else device)
    if config.cpu_offload:
        place_unsharded(model, device)
    state = full.state_dict() if full is not None else {}
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, state, options=options)
    _broadcast_buffers(model, full)
    if full is not None:
        model.generation_config = full.generation_config
    del full, state
    return model, processor


def _model_config(source: str, config: TrainConfig) -> MGLlavaConfig:
    if Path(source).is_dir():
        return MGLlavaConfig.from_pretrained(source)
    return MGLlavaConfig.from_preset(source, **config.model_overrides)


def _broadcast_buffers(model: torch.nn.Module, full: torch.nn.Module | None) -> None:
    """Rank 0's non-persistent buffers (not in a state dict: e.g. rotary inverse frequencies) and train/eval
    modes (a loaded folder is in eval mode, a fresh preset in train mode) on every rank."""
    names = {f"{prefix}.{name}" if prefix else name for prefix, module in model.named_modules()
             for name in module._non_persistent_buffers_set}  # fmt: skip
    sent = None
    if full is not None:
        buffers = {n: b.detach().cpu() for n, b in full.named_buffers() if n in names}
        sent = (buffers, {n: m.training for n, m in full.named_modules()})
    values = [sent]
    torch.distributed.broadcast_object_list(values, src=0)
    buffers, modes = values[0]
    for name, value in buffers.items():
        module_name, _, buffer = name.rpartition(".")
        getattr(model.get_submodule(module_name), buffer).copy_(value)
    for name, module in model.named_modules():
        module.training = modes[name]


# QLoRA quantises the LLM's decoder layers only: every other part of the base model (matched from the start
# of the full module name, `model.<part>`), and the LM head, stays full
NOT_QUANTIZED = [*(f"model.{m}" for m in MODULES if m != "language_model"), "lm_head"]


def load_for_training(source: str, config: TrainConfig) -> MGLlavaForConditionalGeneration:
    """A saved model in fp32, or for QLoRA with the LLM's decoder layers in 4-bit NF4 (bitsandbytes; the
    towers, new modules and `lm_head` stay in full precision)."""
    if not config.stage.lora.quantize_4bit:
        return MGLlavaForConditionalGeneration.from_pretrained(source, dtype=torch.float32)
    from transformers import BitsAndBytesConfig

    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32,
        bnb_4bit_use_double_quant=True, llm_int8_skip_modules=NOT_QUANTIZED,
    )  # fmt: skip
    device = dist.info().device
    return MGLlavaForConditionalGeneration.from_pretrained(
        source, dtype=torch.float32, quantization_config=quantization, device_map={"": str(device)}
    )


def lora_settings(config: TrainConfig):
    from peft import LoraConfig

    lora = config.stage.lora
    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                      target_modules=lora.target_modules)  # fmt: skip


def add_lora(llm: torch.nn.Module, config: TrainConfig) -> torch.nn.Module:
    """LoRA adapters on the LLM's decoder (`model.language_model`, a plain PEFT model: the LM head is outside
    it); for QLoRA the 4-bit decoder is first made trainable-ready."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    if config.stage.lora.quantize_4bit:
        llm = prepare_model_for_kbit_training(llm, use_gradient_checkpointing=config.gradient_checkpointing)
    return get_peft_model(llm, lora_settings(config))
