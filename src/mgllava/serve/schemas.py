"""The OpenAI chat-completions wire format (the subset we serve) and our `mgllava` extension field.

Request: `model`, `messages` (roles system/developer/user/assistant; content a string or a list of `text`
and `image_url` parts), `max_tokens` / `max_completion_tokens`, `temperature` (default 0: greedy, the
paper's setting - OpenAI's default is 1), `top_p`, `seed`, `stream`, `stream_options.include_usage`.
Other OpenAI fields are accepted and ignored, except ones whose non-default value we cannot honour
(`n > 1`, `stop`, `tools`, `logprobs`), which are refused rather than silently dropped.

Extension (request): `"mgllava": {"boxes": [entry per image, in message order]}` where an entry is
`[[x1, y1, x2, y2], ...]` or `{"boxes": [...], "labels": [...], "scores": [...]}` in the image's pixels,
or null to let the server's proposer find boxes. Extension (response, and the first stream chunk):
`"mgllava": {"images": [{"width", "height", "source", "tags", "boxes", "scores", "labels"}, ...]}` - the
boxes that became object tokens, in each image's pixels.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..inference import ChatResult, VisualBoxes


class ImageURL(BaseModel):
    url: str
    detail: str | None = None


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class BoxRecord(BaseModel):
    boxes: list[Annotated[list[float], Field(min_length=4, max_length=4)]]
    labels: list[str] | None = None
    scores: list[float] | None = None


BoxEntry = BoxRecord | list[Annotated[list[float], Field(min_length=4, max_length=4)]] | None


class Extension(BaseModel):
    model_config = ConfigDict(extra="forbid")
    boxes: list[BoxEntry] | None = None


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, ge=0.0, le=1.0)  # 0: the top token only (greedy)
    seed: int | None = None
    n: int = 1
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    mgllava: Extension | None = None

    @model_validator(mode="after")
    def _refuse_unsupported(self) -> ChatCompletionRequest:
        if self.n != 1:
            raise ValueError("n: only n=1 is supported")
        if self.stop:
            raise ValueError(
                "stop: custom stop sequences are not supported (the chat template's stop is used)"
            )
        extra = self.model_extra or {}
        for name in ("tools", "functions", "logprobs", "top_logprobs", "response_format"):
            if extra.get(name):
                raise ValueError(f"{name}: not supported by this server")
        return self

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def engine_messages(self) -> list[dict[str, Any]]:
        """Plain dict messages for the engine (developer messages are system messages)."""
        out = []
        for message in self.messages:
            content = message.content
            if isinstance(content, list):
                content = [part.model_dump(exclude_none=True) for part in content]
            role = "system" if message.role == "developer" else message.role
            out.append({"role": role, "content": content if content is not None else ""})
        return out

    def box_counts(self) -> list[int]:
        """How many boxes the request gives for each image (0 for an image left to the proposer)."""
        if self.mgllava is None or self.mgllava.boxes is None:
            return []
        return [
            0 if e is None else len(e.boxes if isinstance(e, BoxRecord) else e) for e in self.mgllava.boxes
        ]

    def user_boxes(self) -> list[Any] | None:
        if self.mgllava is None or self.mgllava.boxes is None:
            return None
        return [entry.model_dump(exclude_none=True) if isinstance(entry, BoxRecord) else entry
                for entry in self.mgllava.boxes]  # fmt: skip


def new_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def extension(images: list[VisualBoxes]) -> dict[str, Any]:
    return {"images": [image.to_dict() for image in images]}


def usage(result: ChatResult) -> dict[str, int]:
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "total_tokens": result.prompt_tokens + result.completion_tokens,
    }


def finish_reason(result: ChatResult) -> str:
    return "stop" if result.finish_reason == "stop" else "length"


def completion(result: ChatResult, request_id: str, model: str) -> dict[str, Any]:
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": result.text},
                "finish_reason": finish_reason(result),
                "logprobs": None,
            }
        ],
        "usage": usage(result),
        "mgllava": extension(result.images),
    }


def chunk(
    request_id: str, model: str, delta: dict[str, Any], finish: str | None = None, **extra: Any
) -> dict[str, Any]:
    return {
        "id": request_id,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
        **extra,
    }
