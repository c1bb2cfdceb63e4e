"""Conversion of released weights into MG-LLaVA folders, above `model` and `data`: `assemble` builds a model
and processor from a CLIP folder, an OpenCLIP ConvNeXt file, an LLM folder and optionally the reference's
XTuner checkpoint, accounting for every key; `folder` writes and pairs them."""

from .assemble import CheckpointError, assemble
from .folder import configure_generation, write_folder

__all__ = ["CheckpointError", "assemble", "configure_generation", "write_folder"]
