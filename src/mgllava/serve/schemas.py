"""The OpenAI chat-completions wire format (the subset we serve) and our `mgllava` extension field.

Request: `model`, `messages` (roles system/developer/user/assistant; content a string or a list of `text`
and `image_url` parts; images in user messages only), `max_tokens` / `max_completion_tokens`,
`temperature` (default 0: greedy, the paper's setting - OpenAI's default is 1), `top_p`, `seed` (any
integer in [-2^63, 2^64 - 1]), `frequency_penalty`, `presence_penalty`, `logit_bias` (token id -> bias),
`stream`, `stream_options.include_usage`, `response_format` of type `text` (the default).
Nothing is silently ignored that changes an answer: a field whose non-default value we cannot honour (`n`
other than 1, `stop`, `tools`, `functions`, `tool_choice`, `logprobs`, `top_logprobs`, `response_format`
other than text, `modalities` other than text, `prediction`, `audio`, `web_search_options`,
`reasoning_effort`, `verbosity`) is refused with 400 naming it (`param`), and so is a field OpenAI does not
define, as OpenAI does. Accepted and without effect on the answer: `user`, `metadata`, `store`,
`service_tier`, `parallel_tool_calls`, `safety_identifier`, `prompt_cache_key`.

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

from pydantic import BaseModel, ConfigDict, Field

from ..data.templates import IMAGE_TOKEN, VIDEO_TOKEN
from ..inference import ChatResult, VisualBoxes
from .errors import ApiError

# fields accepted without effect on the answer; UNHONOURED: refused unless at their default (None/False)
NO_EFFECT = frozenset({"user", "metadata", "store", "service_tier", "parallel_tool_calls", "safety_identifier",
                       "prompt_cache_key"})  # fmt: skip
UNHONOURED = ("tools", "functions", "logprobs", "top_logprobs", "prediction", "audio", "web_search_options",
              "reasoning_effort", "verbosity")  # fmt: skip


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


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, ge=0.0, le=1.0)  # 0: the top token only (greedy)
    seed: int | None = None
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    n: int = 1
    stop: str | list[str] | None = None
    tool_choice: Any = None
    response_format: ResponseFormat | None = None
    modalities: list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    mgllava: Extension | None = None

    def refuse_unsupported(self) -> None:
        """400 naming the first field whose value this server cannot honour (see the module notes)."""
        if self.n != 1:
            raise _unsupported("n", "only n=1 is supported")
        if self.stop:
            raise _unsupported(
                "stop", "custom stop sequences are not supported (the chat template's stop is used)"
            )
        if self.tool_choice not in (None, "none"):
            raise _unsupported("tool_choice", "tools are not supported")
        if self.response_format is not None and self.response_format.type != "text":
            raise _unsupported(
                "response_format", f"only type 'text' is supported, got {self.response_format.type!r}"
            )
        if self.modalities is not None and self.modalities != ["text"]:
            raise _unsupported("modalities", f"only ['text'] is supported, got {self.modalities}")
        extra = self.model_extra or {}
        for name in UNHONOURED:
            if extra.get(name) not in (None, False):
                raise _unsupported(name, "not supported by this server")
        unknown = sorted(set(extra) - NO_EFFECT - set(UNHONOURED))
        if unknown:
            raise _unsupported(unknown[0], "unrecognized request argument")

    def logit_bias_pairs(self) -> tuple[tuple[int, float], ...]:
        """`logit_bias` as sorted (token id, bias) pairs; keys must be token ids."""
        pairs = []
        for key, bias in (self.logit_bias or {}).items():
            if not key.strip().isdigit():
                raise ApiError(400, f"logit_bias: keys must be token ids (digits), got {key!r}", "invalid_request",
                               "logit_bias")  # fmt: skip
            pairs.append((int(key), bias))
        return tuple(sorted(pairs))

    def check_messages(self) -> None:
        """What the engine would misread, refused with the message and part named: images outside user
        messages, a literal `<image>`/`<video>` tag in text, a user message without content, no user message."""
        for i, message in enumerate(self.messages):
            parts = message.content if isinstance(message.content, list) else [message.content]
            for j, part in enumerate(parts):
                where = f"messages[{i}].content" + (f"[{j}]" if isinstance(message.content, list) else "")
                if isinstance(part, ImagePart) and message.role != "user":
                    raise ApiError(400, f"{where}: images are accepted in user messages only, not in a "
                                   f"{message.role} message", "invalid_request", where)  # fmt: skip
                text = part.text if isinstance(part, TextPart) else part if isinstance(part, str) else ""
                for tag in (IMAGE_TOKEN, VIDEO_TOKEN):
                    if tag in text:
                        raise ApiError(400, f"{where}: the text contains the literal tag {tag!r}, which this "
                                       "server reserves for images; send images as image_url parts",
                                       "invalid_request", where + (".text" if isinstance(part, TextPart) else ""))  # fmt: skip
            if message.role == "user" and not message.content:
                raise ApiError(400, f"messages[{i}]: the user message has no content", "invalid_request",
                               f"messages[{i}].content")  # fmt: skip
        if not any(m.role == "user" for m in self.messages):
            raise ApiError(
                400, "messages: the conversation has no user message", "invalid_request", "messages"
            )

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


def _unsupported(name: str, why: str) -> ApiError:
    return ApiError(400, f"{name}: {why}", "unsupported_parameter", name)


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
