"""The server's OpenAPI document: what `/openapi.json` and `/docs` show, complete enough for a client generator
or `schemathesis` to run from it.

FastAPI documents a route from its signature; the chat route reads and parses its body itself (after
admission, with bounded parsing: `app`), so its request and responses are described here:
    request      ChatCompletionRequest (pydantic's schema; its `$defs` moved under `components/schemas`,
                 where OpenAPI resolves `$ref`s; `model` is the served model's name, the one accepted)
    200          `application/json` ChatCompletion, or `text/event-stream` (server-sent events: each `data:`
                 line a JSON ChatCompletionChunk or an ErrorResponse, then `data: [DONE]`)
    4xx / 5xx    ErrorResponse, OpenAI's shape (`errors` lists when each is given); every operation also
                 gets a `default` ErrorResponse, and FastAPI's 422 is dropped (validation errors are 400 here)
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from ..inference.requests import SEED_RANGE
from .schemas import NO_EFFECT, ChatCompletionRequest

CHAT_PATH = "/v1/chat/completions"
CHAT_ERRORS = {
    400: "invalid request, image, boxes or parameter; over a count limit; image URL not fetched",
    404: "unknown model",
    408: "the body did not arrive within --body-timeout-s",
    413: "body, JSON items, image pixels or fetched bytes over their limits",
    429: "too many requests in flight (Retry-After)",
    500: "this request failed while it was generated, or a bug",
    503: "queue full, shutting down, or the generation worker stopped (Retry-After)",
}


# what the server accepts of fields that OpenAI allows more of (the rest is refused with a 400 naming it)
ACCEPTED: dict[str, Any] = {
    "n": {"type": "integer", "enum": [1], "default": 1},
    "stop": {"type": "null", "description": "custom stop sequences are not supported"},
    "tool_choice": {"enum": [None, "none"]},
    "response_format": {"anyOf": [{"type": "null"}, {"type": "object", "required": ["type"],
                                                      "properties": {"type": {"enum": ["text"]}}}]},
    "modalities": {"anyOf": [{"type": "null"}, {"type": "array", "items": {"enum": ["text"]}, "minItems": 1,
                                                "maxItems": 1}]},
    "seed": {"anyOf": [{"type": "null"}, {"type": "integer", "minimum": SEED_RANGE[0], "maximum": SEED_RANGE[1]}]},
    "logit_bias": {"anyOf": [{"type": "null"}, {"type": "object", "propertyNames": {"pattern": "^[0-9]+$"},
                                                "additionalProperties": {"type": "number", "minimum": -100,
                                                                         "maximum": 100}}]},
}  # fmt: skip


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class AnswerMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class Choice(BaseModel):
    index: int
    message: AnswerMessage
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ImageBoxes(BaseModel):
    width: int
    height: int
    source: str
    tags: list[str]
    boxes: list[list[float]]
    scores: list[float]
    labels: list[str]


class BoxesUsed(BaseModel):
    images: list[ImageBoxes]


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    mgllava: BoxesUsed


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int
    delta: Delta
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    mgllava: BoxesUsed | None = None


def _component(schemas: dict[str, Any], model: type[BaseModel]) -> dict[str, str]:
    """Add `model` (and the models it uses) under components/schemas; a `$ref` to it."""
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    schemas.update(schema.pop("$defs", {}))
    schemas[model.__name__] = schema
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _error(schemas: dict[str, Any], description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": _component(schemas, ErrorResponse)}},
    }


def _messages(schemas: dict[str, Any]) -> dict[str, Any]:
    """Messages as the server takes them: user content not empty, images in user messages only, and at least
    one user message (`ChatCompletionRequest.check_messages`)."""
    ref = "#/components/schemas/"
    part = {"oneOf": [{"$ref": ref + "TextPart"}, {"$ref": ref + "ImagePart"}]}
    schemas["UserMessage"] = {
        "type": "object", "required": ["role", "content"], "additionalProperties": False,
        "properties": {"role": {"enum": ["user"]}, "name": {"type": "string"},
                       "content": {"anyOf": [{"type": "string", "minLength": 1},
                                             {"type": "array", "items": part, "minItems": 1}]}},
    }  # fmt: skip
    schemas["OtherMessage"] = {
        "type": "object", "required": ["role"], "additionalProperties": False,
        "properties": {"role": {"enum": ["system", "developer", "assistant"]}, "name": {"type": "string"},
                       "content": {"anyOf": [{"type": "null"}, {"type": "string"},
                                             {"type": "array", "items": {"$ref": ref + "TextPart"}}]}},
    }  # fmt: skip
    schemas.pop("Message", None)
    return {
        "type": "array", "minItems": 1,
        "items": {"oneOf": [{"$ref": ref + "UserMessage"}, {"$ref": ref + "OtherMessage"}]},
        "contains": {"$ref": ref + "UserMessage"},
    }  # fmt: skip


def build(app: FastAPI, model_name: str) -> dict[str, Any]:
    """The document for `app` serving `model_name` (cached on it, as FastAPI's own `openapi()` does)."""
    if app.openapi_schema:
        return app.openapi_schema
    doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    for path in doc["paths"].values():
        for operation in path.values():
            operation["responses"].pop("422", None)
            operation["responses"]["default"] = _error(schemas, "an error, in OpenAI's shape")
    chat = doc["paths"][CHAT_PATH]["post"]
    chat["requestBody"] = {
        "required": True,
        "content": {"application/json": {"schema": _component(schemas, ChatCompletionRequest)}},
    }
    request = schemas["ChatCompletionRequest"]
    request["properties"]["model"] = {
        "type": "string",
        "enum": [model_name],
        "description": "the served model",
    }
    request["properties"].update(ACCEPTED)
    for name in sorted(NO_EFFECT):  # accepted, without effect; any other field is refused (400)
        request["properties"][name] = {"description": "accepted; no effect on the answer"}
    request["additionalProperties"] = False
    request["properties"]["messages"] = _messages(schemas)
    chat["responses"]["200"] = {
        "description": "the answer; with `stream: true`, server-sent events",
        "content": {
            "application/json": {"schema": _component(schemas, ChatCompletion)},
            "text/event-stream": {"schema": {"type": "string", "description": "`data: <ChatCompletionChunk JSON>` "
                                             "lines (an ErrorResponse if generation fails), then `data: [DONE]`"},
                                  "x-chunk-schema": _component(schemas, ChatCompletionChunk)},
        },
    }  # fmt: skip
    for status, description in CHAT_ERRORS.items():
        chat["responses"][str(status)] = _error(schemas, description)
    app.openapi_schema = doc
    return doc
