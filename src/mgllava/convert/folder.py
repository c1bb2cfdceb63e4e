"""An MG-LLaVA folder: model and processor saved together (`config.json` + safetensors + processor files),
loadable with `from_pretrained` and the Auto classes (the generation settings that pair them live in
`model.generation`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..model.generation import configure_generation
from ..model.modeling import MGLlavaForConditionalGeneration

__all__ = ["configure_generation", "write_folder"]


def write_folder(model: MGLlavaForConditionalGeneration, processor: Any, out: str | Path) -> Path:
    """Save model and processor as one HF folder that `from_pretrained` and `AutoProcessor` load."""
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return Path(out)
