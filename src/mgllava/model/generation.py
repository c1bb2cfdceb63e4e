"""The generation settings that pair a model with its processor: stop on the chat template's stop tokens, pad
with the tokenizer's pad id, never emit the `<image>` placeholder. Applied by `mgllava assemble`, training's
model set-up and the inference engine, so a folder's `generation_config.json` and a live engine agree."""

from __future__ import annotations

from typing import Any

from .modeling import MGLlavaForConditionalGeneration


def configure_generation(model: MGLlavaForConditionalGeneration, processor: Any) -> None:
    """Stop on the template's stop tokens, pad with the tokenizer's pad id, never emit the placeholder."""
    gen = model.generation_config
    gen.eos_token_id = processor.stop_token_ids
    gen.pad_token_id = processor.pad_token_id
    gen.bos_token_id = processor.tokenizer.bos_token_id
    gen.suppress_tokens = [model.config.image_token_id]
