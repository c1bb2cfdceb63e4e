"""Every error the server returns, in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.

| status | when | code |
|---|---|---|
| 400 | malformed JSON or fields, bad base64, not an image (or not PNG/JPEG/WebP/GIF/BMP/TIFF), bad boxes, prompt + max_tokens over the context | invalid_request, invalid_image, invalid_boxes, context_length_exceeded, max_tokens_too_large |
| 400 | over a count limit (`limits`) | too_many_images, too_many_boxes, box_budget_exceeded |
| 400 | image URL not fetched: not allowed, not http(s), refused address, failed, too slow | image_url_not_allowed, invalid_image_url, image_url_forbidden, image_url_timeout |
| 404 | unknown model, unknown path | model_not_found, not_found |
| 413 | body bytes or JSON items, pixels of an image or a request, fetched image bytes | request_too_large, image_too_large, too_many_pixels |
| 429 | too many requests in flight (with Retry-After) | rate_limit_exceeded |
| 503 | queue full or shutting down (with Retry-After) | overloaded |
| 408 | the body did not arrive within --body-timeout-s | request_timeout |
| 400 | a parameter whose value the server cannot honour (`param` names it) | unsupported_parameter |
| 500 | this request failed while it was generated (the others in its batch are answered) | generation_failed |
| 503 | the generation worker stopped (every request gets it; /health says 503) | unavailable |
| 500 | a bug (logged with its traceback; the connection stays open) | internal_error |

Refusals of a limit name the `mgllava serve` flag that sets it, e.g. "(--max-boxes-per-image)".
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..inference import Busy, EngineInputError, EngineUnavailable, RequestFailed

logger = logging.getLogger(__name__)

TYPES = {429: "rate_limit_error", 500: "server_error", 503: "server_error"}
HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 408: "request_timeout", 413: "request_too_large"}
ENGINE_STATUS = {"image_too_large": 413}


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        code: str,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        return JSONResponse(
            error_body(self.status, self.message, self.code, self.param), self.status, self.headers
        )


def error_body(status: int, message: str, code: str, param: str | None = None) -> dict[str, Any]:
    kind = TYPES.get(status, "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def from_engine(err: EngineInputError) -> ApiError:
    return ApiError(ENGINE_STATUS.get(err.code, 400), str(err), err.code, err.param)


def from_busy(err: Busy) -> ApiError:
    return ApiError(503, f"server overloaded: {err}; retry later", "overloaded", None,
                    {"Retry-After": str(int(err.retry_after))})  # fmt: skip


def from_failure(err: RequestFailed | EngineUnavailable) -> ApiError:
    if isinstance(err, EngineUnavailable):
        return ApiError(
            503, f"{err}; the server cannot generate now", "unavailable", None, {"Retry-After": "30"}
        )
    return ApiError(500, str(err), "generation_failed")


class CatchAll:
    """Answers an unexpected error with a JSON 500 itself (logged with its traceback). Starlette's handler for
    `Exception` re-raises after answering, and the server then closes the connection, so a keep-alive
    client's next call would fail too; here the error ends with the response. If the response had already
    started, nothing can be answered: the error goes on to the server."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception as err:
            if started:
                raise
            logger.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
            await ApiError(500, f"internal error: {type(err).__name__}", "internal_error").response()(
                scope, receive, send
            )


def _validation_message(err: RequestValidationError) -> tuple[str, str | None]:
    if any(item.get("type") == "json_invalid" for item in err.errors()):
        return "the request body is not valid JSON", None
    problems = []
    for item in err.errors():
        loc = ".".join(str(p) for p in item.get("loc", ()) if p != "body")
        problems.append(f"{loc or 'body'}: {item.get('msg')}")
    first = err.errors()[0].get("loc", ()) if err.errors() else ()
    param = ".".join(str(p) for p in first if p != "body") or None
    return "invalid request: " + "; ".join(problems[:5]), param


def install(app: FastAPI) -> None:
    """Register the handlers that turn every failure into an OpenAI-shaped JSON error."""

    @app.exception_handler(ApiError)
    async def _api(request: Request, err: ApiError) -> JSONResponse:
        return err.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(err)
        return ApiError(400, message, "invalid_request", param).response()

    @app.exception_handler(HTTPException)
    async def _http(request: Request, err: HTTPException) -> JSONResponse:
        code = HTTP_CODES.get(err.status_code, "http_error")
        headers = dict(err.headers or {})
        return ApiError(err.status_code, str(err.detail), code, None, headers).response()
