"""Inference: the engine (tensors in, tokens and text out) and the request scheduler (`Batcher`) over it."""

from .batcher import Batcher, Busy, Job
from .engine import (
    ChatResult,
    ChatStream,
    Engine,
    EngineInputError,
    GenerationSettings,
    Prepared,
    VisualBoxes,
)

__all__ = [
    "Batcher",
    "Busy",
    "ChatResult",
    "ChatStream",
    "Engine",
    "EngineInputError",
    "GenerationSettings",
    "Job",
    "Prepared",
    "VisualBoxes",
]
