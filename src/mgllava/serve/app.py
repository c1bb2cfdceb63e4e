"""The HTTP app over the engine: OpenAI-compatible chat completions, models, health, and the web page.

    POST /v1/chat/completions  -> admit (or 429, before the body is read) -> read the body (413 over
        --max-body-mb, 408 unless it all arrives within --body-timeout-s) -> count its JSON items, parse it
        in a thread (400/413) -> refuse parameters it cannot honour and messages it would misread (400,
        naming the field) -> count images and boxes
        -> fetch http(s) images if enabled (`fetch`) -> decode data URLs, read every image's header and
        check pixels -> Engine.prepare in a thread, at most `max_preparing` at once -> Batcher (or 503)
        -> JSON, or SSE chunks
    GET  /v1/models, /v1/models/{id}, /health, /  (the page), /static/*

Every request's work is bounded before it is done (`limits` lists the limits, their flags and their
refusals, each an OpenAI-shaped error naming the limit and its flag): requests in flight (429 +
Retry-After; a request holds its slot from before its body is read until its generation ends, streamed
or not), body bytes and JSON items, images, boxes and box-selection work, pixels per image and per
request, `max_tokens` (400), requests decoding images at once (they wait), batcher queue (503 +
Retry-After). Image URLs other than base64 data URLs are refused unless `allow_image_urls` is set, and
then fetched only from public addresses (`fetch`: fetching arbitrary URLs from the server would let
clients reach hosts only the server can see). Prompt text is bounded in characters (the engine's
`max_message_chars` / `max_prompt_chars`, flags `--max-message-chars`, `--max-prompt-chars`) before it
is tokenised. A slow or stalled upload holds its in-flight slot for at most `body_timeout_s`.

Failures: a request that fails while it is generated gets 500 `generation_failed` (its batch-mates are
answered); if the engine's worker stops, `/health` answers 503 and every request in flight or new gets 503
`unavailable` at once. An unexpected error is answered 500 by `errors.CatchAll`, which keeps the connection
open (Starlette's own handler re-raises, and the server then closes the keep-alive connection). On SIGTERM,
uvicorn waits up to `shutdown_timeout_s` for open requests, then the worker gets as long again to finish
what it runs before the rest fail with 503: the process stops within twice that (plus one decode step).
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.sse import EventSourceResponse, format_sse_event
from fastapi.staticfiles import StaticFiles
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from ..inference import (
    Batcher,
    Busy,
    Engine,
    EngineInputError,
    EngineUnavailable,
    GenerationSettings,
    Job,
    Prepared,
    RequestFailed,
)
from ..utils.threads import available_cores, limited_threads
from . import errors, openapi, schemas
from .errors import ApiError
from .fetch import AddressPolicy, ImageFetcher, Resolver, system_resolver
from .limits import BodyLimit, RequestLimits, data_url_bytes, image_header

logger = logging.getLogger(__name__)


@dataclass
class ServerSettings:
    """What the server allows. Each field's `mgllava serve` flag is its name with dashes (`..._bytes` fields
    are given in MB: `--max-body-mb`, `--image-url-max-mb`); docs/server.md gives the reasons for the defaults."""

    model_name: str = "mgllava"
    max_body_bytes: int = 32 << 20
    max_tokens: int = 1024  # the largest max_tokens a request may ask for
    default_max_tokens: int = 256
    max_in_flight: int = 32  # admitted requests (reading, preparing, queued or generating); more -> 429
    max_batch_size: int = 8
    batch_window_s: float = 0.01
    max_queue: int = 64
    # per request (see `limits`); None: derived from the model or the other limits
    max_images: int | None = None  # None: as many as the context holds, context // (image rows + 1)
    max_boxes_per_image: int = 300  # 3x the 100 boxes the reference and OWLv2 keep after NMS
    max_boxes_per_request: int = 1024
    max_box_pairs: int = 1_000_000  # sum of n^2 over images; NMS at ~4 ns a pair: a few ms
    max_request_pixels: int = 1 << 27  # two 64-Mpx squares, or four 12-Mpx 4:3 photos with their canvases
    max_json_items: int | None = None  # None: 65536 + 8 per allowed box
    max_preparing: int = 2  # requests decoding images and boxes at once (bounds decode memory)
    allow_image_urls: bool = False
    image_url_allow: tuple[str, ...] = ()  # hostnames or IP networks fetched from although not public
    image_url_timeout_s: float = 10.0  # the whole fetch of one URL, redirects included
    image_url_max_bytes: int = 16 << 20
    image_url_max_redirects: int = 3
    body_timeout_s: float = (
        10.0  # the whole body must arrive within this (slow uploads hold a slot until then)
    )
    shutdown_timeout_s: float = 10.0  # on SIGTERM: for open requests, then again for the worker
    threads: int | None = None  # the model thread's intra-op threads; None: the process's cores
    prepare_threads: int = (
        1  # intra-op threads of each request's preparation (never a team beside the model's)
    )

    def __post_init__(self) -> None:
        counts = ("max_body_bytes", "max_tokens", "default_max_tokens", "max_in_flight", "max_batch_size",
                  "max_queue", "max_images", "max_boxes_per_image", "max_boxes_per_request", "max_box_pairs",
                  "max_request_pixels", "max_json_items", "max_preparing", "image_url_max_bytes", "threads",
                  "prepare_threads")  # fmt: skip
        for name in counts:
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(
                    f"{name} (--{name.replace('_', '-').replace('-bytes', '-mb')}) must be >= 1, got {value}"
                )
        for name in ("image_url_timeout_s", "body_timeout_s", "shutdown_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
        if self.image_url_allow and not self.allow_image_urls:
            raise ValueError("--image-url-allow has no effect without --allow-image-urls")
        AddressPolicy(tuple(self.image_url_allow))  # refuses malformed entries now

    def request_limits(self, engine: Engine) -> RequestLimits:
        rows = engine.processor.visual_rows(1, 1)  # an image with at least one box (the zero-box fallback)
        return RequestLimits(
            max_images=self.max_images or max(1, engine.context_length // rows),
            max_boxes_per_image=self.max_boxes_per_image,
            max_boxes_per_request=self.max_boxes_per_request,
            max_box_pairs=self.max_box_pairs,
            max_image_pixels=engine.max_image_pixels,
            max_request_pixels=self.max_request_pixels,
            max_json_items=self.max_json_items or 65536 + 8 * self.max_boxes_per_request,
        )


class Admission:
    """A counter of requests in flight; slots are released from any thread."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.active = 0
        self._lock = threading.Lock()

    def try_acquire(self) -> bool:
        with self._lock:
            if self.active >= self.limit:
                return False
            self.active += 1
            return True

    def release(self) -> None:
        with self._lock:
            self.active -= 1


class Server:
    """What the routes share: engine, settings, limits, URL fetcher, batcher, admission."""

    def __init__(
        self, engine: Engine, settings: ServerSettings, resolver: Resolver = system_resolver
    ) -> None:
        self.engine = engine
        self.settings = settings
        self.limits = settings.request_limits(engine)
        self.fetcher = ImageFetcher(
            AddressPolicy(tuple(settings.image_url_allow)),
            settings.image_url_max_bytes,
            settings.image_url_timeout_s,
            settings.image_url_max_redirects,
            resolver,
        )
        self.admission = Admission(settings.max_in_flight)
        self.batcher: Batcher | None = None
        self.preparing = 0  # requests inside Engine.prepare now
        self._prepare_slots = asyncio.Semaphore(settings.max_preparing)

    def start(self) -> None:
        s = self.settings
        self.batcher = Batcher(self.engine, s.max_batch_size, s.batch_window_s, s.max_queue,
                               threads=s.threads or available_cores())  # fmt: skip

    def stop(self) -> None:
        if self.batcher is not None:
            self.batcher.close(self.settings.shutdown_timeout_s)

    def admit(self) -> None:
        """Take a slot before the body is read, so a refused request costs no parsing."""
        if not self.admission.try_acquire():
            wait = self.batcher.retry_after if self.batcher is not None else 1
            raise ApiError(429, f"{self.admission.active} requests are in flight (the limit, --max-in-flight); "
                           "retry later", "rate_limit_exceeded", None, {"Retry-After": str(wait)})  # fmt: skip

    async def read(self, request: Request) -> schemas.ChatCompletionRequest:
        """The body, bounded by `BodyLimit`, counted (`check_json`) and parsed in a worker thread."""
        timeout = self.settings.body_timeout_s
        try:
            raw = await asyncio.wait_for(_body(request), timeout)  # then 2x the body (+ strings) at most
        except TimeoutError:
            raise ApiError(408, f"the request body did not arrive within {timeout:g} s (--body-timeout-s)",
                           "request_timeout") from None  # fmt: skip
        body = await run_in_threadpool(self._parse, raw)
        body.refuse_unsupported()
        body.check_messages()
        return body

    def _parse(self, raw: bytes) -> schemas.ChatCompletionRequest:
        self.limits.check_json(raw)
        try:
            return schemas.ChatCompletionRequest.model_validate_json(raw)
        except ValidationError as err:
            raise RequestValidationError(err.errors(include_url=False, include_input=False)) from None

    def settings_for(self, body: schemas.ChatCompletionRequest) -> GenerationSettings:
        wanted = body.requested_max_tokens()
        if wanted is not None and wanted > self.settings.max_tokens:
            raise ApiError(400, f"max_tokens is {wanted} but this server allows at most {self.settings.max_tokens} "
                           "(--max-tokens)", "max_tokens_too_large", "max_tokens")  # fmt: skip
        top_p = body.top_p if body.top_p is not None else 1.0
        greedy = top_p == 0.0  # OpenAI's range includes 0: the nucleus is the most likely token alone
        try:
            return GenerationSettings(
                max_new_tokens=wanted or min(self.settings.default_max_tokens, self.settings.max_tokens),
                temperature=0.0 if greedy else body.temperature or 0.0,
                top_p=1.0 if greedy else top_p,
                seed=body.seed,
                frequency_penalty=body.frequency_penalty or 0.0,
                presence_penalty=body.presence_penalty or 0.0,
                logit_bias=body.logit_bias_pairs(),
            )
        except EngineInputError as err:
            raise errors.from_engine(err) from err

    async def prepare(self, body: schemas.ChatCompletionRequest) -> Prepared:
        """Limits first (counts, then headers), then the engine; images reach it as bytes."""
        settings = self.settings_for(body)
        messages = body.engine_messages()
        parts = _image_parts(messages)
        self.limits.check_images(len(parts))
        self.limits.check_boxes(body.box_counts())
        boxes = body.user_boxes()
        await self._fetch_urls(parts)
        await run_in_threadpool(self._check_images, parts)
        async with self._prepare_slots:
            self.preparing += 1
            try:
                return await run_in_threadpool(self._prepare, messages, boxes, settings)
            except EngineInputError as err:
                raise errors.from_engine(err) from err
            finally:
                self.preparing -= 1

    def _prepare(self, messages: list[dict[str, Any]], boxes: Any, settings: GenerationSettings) -> Prepared:
        """`Engine.prepare` with the preparation threads' intra-op count (`--prepare-threads`)."""
        with limited_threads(self.settings.prepare_threads):
            return self.engine.prepare(messages, None, boxes, None, None, settings)

    async def _fetch_urls(self, parts: list[tuple[str, dict[str, Any]]]) -> None:
        """Data URLs stay; http(s) URLs are fetched if allowed (all URLs are checked before any fetch)."""
        fetch = []
        for param, image in parts:
            url = image["url"]
            if url.startswith("data:"):
                continue
            if not url.startswith(("http://", "https://")):
                raise ApiError(400, f"{param}: expected a base64 data URL (data:image/png;base64,...)",
                               "invalid_image_url", param)  # fmt: skip
            if not self.settings.allow_image_urls:
                raise ApiError(400, f"{param}: this server does not fetch image URLs; send the image as a "
                               "base64 data URL (the operator can enable fetching with --allow-image-urls)",
                               "image_url_not_allowed", param)  # fmt: skip
            fetch.append((param, image))
        for param, image in fetch:
            image["url"] = await self.fetcher.fetch(image["url"], param)

    def _check_images(self, parts: list[tuple[str, dict[str, Any]]]) -> None:
        """Decode data URLs to bytes (in place) and check every image's header size before any decoding."""
        headers = []
        for param, image in parts:
            if isinstance(image["url"], str):
                image["url"] = data_url_bytes(image["url"], param)
            headers.append((param, image_header(image["url"], param)))
        self.limits.check_pixels(headers)

    def submit(self, prepared: Prepared, on_text: Any = None) -> Job:
        """Hand a prepared request to the batcher; its admission slot is released when the job ends."""
        assert self.batcher is not None, "the server's lifespan has not started"
        try:
            job = self.batcher.submit(prepared, on_text)
        except Busy as err:
            self.admission.release()
            raise errors.from_busy(err) from err
        job.future.add_done_callback(lambda _: self.admission.release())
        return job


async def _body(request: Request) -> bytes:
    return b"".join([chunk async for chunk in request.stream()])


def _image_parts(messages: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """(param, the part's `image_url` dict) of every image in the conversation, in order."""
    found = []
    for i, message in enumerate(messages):
        parts = message["content"] if isinstance(message["content"], list) else []
        for j, part in enumerate(parts):
            if part["type"] == "image_url":
                found.append((f"messages[{i}].content[{j}].image_url.url", part["image_url"]))
    return found


def static_dir() -> str:
    return str(resources.files("mgllava.serve") / "static")


def create_app(
    engine: Engine, settings: ServerSettings | None = None, *, resolver: Resolver = system_resolver
) -> FastAPI:
    """The app; `resolver` turns image-URL hosts into addresses (tests pass one they control)."""
    server = Server(engine, settings or ServerSettings(), resolver)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        server.start()
        try:
            yield
        finally:
            await run_in_threadpool(server.stop)

    app = FastAPI(title="MG-LLaVA", lifespan=lifespan)
    app.state.server = server
    app.openapi = lambda: openapi.build(
        app, server.settings.model_name
    )  # the chat route's body and responses
    app.add_middleware(BodyLimit, max_bytes=server.settings.max_body_bytes)
    app.add_middleware(errors.CatchAll)
    errors.install(app)
    app.mount("/static", StaticFiles(directory=static_dir()), name="static")
    _routes(app, server)
    return app


def _routes(app: FastAPI, server: Server) -> None:
    name = server.settings.model_name
    created = int(time.time())
    card = {"id": name, "object": "model", "created": created, "owned_by": "mgllava"}

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(f"{static_dir()}/index.html")

    @app.get("/health")
    async def health() -> JSONResponse:
        alive = server.batcher is not None and server.batcher.alive
        batcher = server.batcher
        body = {"status": "ok" if alive else "unavailable", "model": name, "in_flight": server.admission.active,
                "preparing": server.preparing, "queued": batcher.queued if batcher else 0,
                "running": batcher.running if batcher else 0}  # fmt: skip
        return JSONResponse(body, 200 if alive else 503)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [card]}

    @app.get("/v1/models/{model_id}")
    async def model(model_id: str) -> dict[str, Any]:
        if model_id != name:
            raise ApiError(404, f"the model {model_id!r} does not exist; this server serves {name!r}",
                           "model_not_found", "model")  # fmt: skip
        return card

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(request: Request) -> JSONResponse | EventSourceResponse:
        server.admit()
        try:
            body = await server.read(request)
            if body.model != name:
                raise ApiError(404, f"the model {body.model!r} does not exist; this server serves {name!r}",
                               "model_not_found", "model")  # fmt: skip
            prepared = await server.prepare(body)
        except BaseException:
            server.admission.release()
            raise
        stream = body.stream
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        del body  # its image strings are not needed while the answer is generated
        if stream:
            return _stream(server, prepared, include_usage)
        return await _complete(server, prepared)


async def _complete(server: Server, prepared: Prepared) -> JSONResponse:
    job = server.submit(prepared)
    try:
        result = await asyncio.wrap_future(job.future)
    except asyncio.CancelledError:
        job.cancel()
        raise
    except (RequestFailed, EngineUnavailable) as err:
        raise errors.from_failure(err) from err
    return JSONResponse(schemas.completion(result, schemas.new_id(), server.settings.model_name))


_DONE = object()


def _stream(server: Server, prepared: Prepared, include_usage: bool) -> EventSourceResponse:
    loop = asyncio.get_running_loop()
    pieces: asyncio.Queue = asyncio.Queue()

    def on_text(delta: str) -> None:
        loop.call_soon_threadsafe(pieces.put_nowait, delta)

    job = server.submit(prepared, on_text)
    job.future.add_done_callback(lambda _: loop.call_soon_threadsafe(pieces.put_nowait, _DONE))
    request_id, model = schemas.new_id(), server.settings.model_name

    def event(payload: dict[str, Any] | str) -> bytes:
        return format_sse_event(data_str=payload if isinstance(payload, str) else json.dumps(payload))

    async def events() -> AsyncIterator[bytes]:
        try:
            head = {"role": "assistant", "content": ""}
            yield event(schemas.chunk(request_id, model, head, mgllava=schemas.extension(prepared.images)))
            while (piece := await pieces.get()) is not _DONE:
                yield event(schemas.chunk(request_id, model, {"content": piece}))
            try:
                result = job.future.result()
            except (RequestFailed, EngineUnavailable) as err:
                failure = errors.from_failure(err)
                yield event(errors.error_body(failure.status, failure.message, failure.code))
                return
            except Exception as err:
                logger.exception("generation failed during a stream")
                yield event(errors.error_body(500, f"internal error: {type(err).__name__}", "internal_error"))
                return
            yield event(schemas.chunk(request_id, model, {}, schemas.finish_reason(result)))
            if include_usage:
                yield event(
                    {**schemas.chunk(request_id, model, {}), "choices": [], "usage": schemas.usage(result)}
                )
            yield event("[DONE]")
        finally:
            job.cancel()  # a no-op once finished; stops the row if the client went away

    return EventSourceResponse(events(), headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
