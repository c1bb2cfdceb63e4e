"""Inference: the engine (tensors in, tokens and text out) and the request scheduler (`Batcher`) over it."""

from .batcher import Batcher, Busy, Job
from .engine import ChatStream, Engine
from .requests import (
    ChatResult,
    EngineInputError,
    EngineUnavailable,
    GenerationSettings,
    Prepared,
    RequestFailed,
    VisualBoxes,
)

__all__ = [
    "Batcher",
    "Busy",
    "ChatResult",
    "ChatStream",
    "Engine",
    "EngineInputError",
    "EngineUnavailable",
    "GenerationSettings",
    "Job",
    "Prepared",
    "RequestFailed",
    "VisualBoxes",
]
