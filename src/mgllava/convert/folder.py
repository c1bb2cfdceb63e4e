"""An MG-LLaVA folder: model and processor saved together (`config.json` + safetensors + processor files),
loadable with `from_pretrained` and the Auto classes; and the generation settings that pair them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..model.modeling import MGLlavaForConditionalGeneration


def configure_generation(model: MGLlavaForConditionalGeneration, processor: Any) -> None:
    """Stop on the template's stop tokens, pad with the tokenizer's pad id, never emit the placeholder."""
    gen = model.generation_config
    gen.eos_token_id = processor.stop_token_ids
    gen.pad_token_id = processor.pad_token_id
    gen.bos_token_id = processor.tokenizer.bos_token_id
    gen.suppress_tokens = [model.config.image_token_id]


def write_folder(model: MGLlavaForConditionalGeneration, processor: Any, out: str | Path) -> Path:
    """Save model and processor as one HF folder that `from_pretrained` and `AutoProcessor` load."""
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return Path(out)
