"""What flows through the engine: request settings, prepared requests, results, and the errors it raises.

    GenerationSettings  one request's decoding settings, validated on construction (`EngineInputError`)
    Prepared            a validated, encoded request: prompt ids, one `Frame` per image or video frame, the
                        boxes that became object tokens (`VisualBoxes`), its settings
    ChatResult          one answer: text, token ids, why it ended, token counts, the boxes used

Errors, by whose fault and what a server answers:
    EngineInputError (ValueError)   the caller's input is wrong: `param` names it, `code` says how (a 4xx)
    RequestFailed (RuntimeError)    this request failed while it ran (non-finite logits, a failed forward
                                    that a retry alone reproduced, a failing tokenizer); the others in its
                                    batch are unaffected (a 500 for this request alone)
    EngineUnavailable (RuntimeError) the engine's worker stopped or is shutting down: nothing can run (a 503)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..boxes import Boxes
from .sampling import MIN_TEMPERATURE

SEED_RANGE = (-(2**63), 2**64 - 1)  # what a torch.Generator takes: int64 and uint64 (negatives wrap)
PENALTY_RANGE = (-2.0, 2.0)  # OpenAI's frequency_penalty and presence_penalty
BIAS_RANGE = (-100.0, 100.0)  # OpenAI's logit_bias values


class EngineInputError(ValueError):
    """Bad input from the caller: `param` names it, `code` says what is wrong in a word."""

    def __init__(self, message: str, param: str | None = None, code: str = "invalid_request") -> None:
        super().__init__(message)
        self.param = param
        self.code = code


class RequestFailed(RuntimeError):
    """One request failed while it was generated; `__cause__` holds the underlying error."""


class EngineUnavailable(RuntimeError):
    """The engine cannot run requests now (its worker stopped, or it is shutting down)."""


def failed(err: Exception) -> Exception:
    """The error a request's caller gets when it failed while it ran: input errors and `RequestFailed` as
    they are, anything else as a `RequestFailed` that names it (the original is its `__cause__`)."""
    if isinstance(err, (EngineInputError, RequestFailed)):
        return err
    wrapped = RequestFailed(f"generation failed for this request: {type(err).__name__}: {err}")
    wrapped.__cause__ = err
    return wrapped


def _check_range(name: str, value: float, bounds: tuple[float, float], param: str | None = None) -> None:
    low, high = bounds
    if not low <= value <= high:
        raise EngineInputError(f"{name} must be in [{low:g}, {high:g}], got {value!r}", param or name)


@dataclass(frozen=True)
class GenerationSettings:
    """Decoding settings of one request. `temperature == 0` is greedy (the paper's evaluation setting), and
    so is any temperature below `sampling.MIN_TEMPERATURE` (the limit it approaches; see `sampling`).
    `frequency_penalty`, `presence_penalty` and `logit_bias` ((token id, bias) pairs) follow OpenAI's
    definitions (`sampling.penalize`) and apply to greedy and sampled rows alike. `seed` takes any integer
    in `SEED_RANGE` (negative seeds wrap to 64 bits, as torch does)."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise EngineInputError(
                f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}", "max_tokens"
            )
        _check_range("temperature", self.temperature, (0.0, 2.0))
        if not 0.0 < self.top_p <= 1.0:
            raise EngineInputError(f"top_p must be in (0, 1], got {self.top_p}", "top_p")
        if self.seed is not None:
            _check_range("seed", self.seed, SEED_RANGE)
        _check_range("frequency_penalty", self.frequency_penalty, PENALTY_RANGE)
        _check_range("presence_penalty", self.presence_penalty, PENALTY_RANGE)
        for token, bias in self.logit_bias:
            if not isinstance(token, int) or token < 0:
                raise EngineInputError(
                    f"logit_bias: token ids must be integers >= 0, got {token!r}", "logit_bias"
                )
            _check_range(f"logit_bias[{token}]", bias, BIAS_RANGE, "logit_bias")

    @property
    def sampled(self) -> bool:
        return self.temperature >= MIN_TEMPERATURE

    @property
    def penalized(self) -> bool:
        return bool(self.frequency_penalty or self.presence_penalty)

    def batch_key(self) -> tuple | None:
        """Requests with equal keys can share one `generate`; None: run alone (a seeded sample)."""
        if not self.sampled:
            return ("greedy",)
        return None if self.seed is not None else ("sample", self.temperature, self.top_p)

    def generate_kwargs(self) -> dict[str, Any]:
        if not self.sampled:
            return {"do_sample": False}
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p}


@dataclass
class VisualBoxes:
    """The boxes that became object tokens for one image or video frame, in its original pixels."""

    width: int
    height: int
    boxes: Boxes
    source: str  # "request" (the caller's), "box_file", "proposer" (the detector), "missing" or "none"

    @property
    def tags(self) -> list[str]:
        return list(dict.fromkeys(self.boxes.labels))

    def to_dict(self) -> dict[str, Any]:
        record = self.boxes.to_dict()
        record["boxes"] = [[round(v, 2) for v in box] for box in record["boxes"]]
        return {
            "width": self.width,
            "height": self.height,
            "source": self.source,
            "tags": self.tags,
            **record,
        }


@dataclass
class Frame:
    """One image (or video frame) of a request: its model tensors, keyed by their content."""

    key: str
    tensors: dict[str, torch.Tensor]
    rows: int  # its visual rows: placeholder tokens in the prompt


@dataclass
class Prepared:
    """A validated request, ready to batch: prompt ids with placeholder runs, frames, boxes, settings."""

    input_ids: list[int]
    frames: list[Frame]
    images: list[VisualBoxes]
    video: list[VisualBoxes]
    settings: GenerationSettings


@dataclass
class ChatResult:
    text: str
    token_ids: list[int]  # the answer's tokens, without the stop token
    finish_reason: str  # "stop" (stop token), "length" (max_new_tokens) or "cancelled"
    prompt_tokens: int  # text and visual rows
    completion_tokens: int  # generated tokens, the stop token included
    images: list[VisualBoxes] = field(default_factory=list)
    video: list[VisualBoxes] = field(default_factory=list)
