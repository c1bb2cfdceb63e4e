"""What one request may cost the server, checked in the order the work happens, each before its work.

| limit (flag) | checked | refusal |
|---|---|---|
| body bytes (`--max-body-mb`) | declared length before reading; counted while reading | 413 request_too_large |
| JSON items (`--max-json-items`) | `,` `[` `{` counted in the raw body, before parsing | 413 request_too_large |
| images per request (`--max-images`) | after parsing, before any image is decoded or fetched | 400 too_many_images |
| boxes per image / per request (`--max-boxes-per-image`, `--max-boxes-per-request`) | after parsing | 400 too_many_boxes |
| box-selection work (`--max-box-pairs`) | sum over images of n^2, before NMS runs | 400 box_budget_exceeded |
| pixels per image (`--max-image-pixels`) | from the image header, before decoding | 413 image_too_large |
| decoded pixels per request (`--max-request-pixels`) | from the headers, before decoding | 413 too_many_pixels |

Why these measures: parsing JSON turns each array, object and list item into Python objects (about
20-35x the bytes for a body of small arrays, against ~1x for base64 strings), and every item needs one of
`,` `[` `{` (base64 has none), so counting those bounds the parsed size before parsing. Class-wise NMS
compares up to n^2 box pairs per image (~4 ns a pair on one core). Decoding an image holds about 3-4 bytes
per pixel, and the processor pads a non-square W x H image onto a max(W, H)^2 canvas before resizing, so a
request's decoded pixels are counted as sum(W*H + (max(W, H)^2 if W != H else 0)) - a 65536 x 1 strip
is 65536 pixels but a 4.3-gigapixel canvas; 16-bit and float images count 3x (`WIDE_MODES_WEIGHT`). At
the budget, preparing costs about 6 bytes per counted pixel (bench/bench_serve_limits.py).
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings
from dataclasses import dataclass
from typing import NamedTuple

from PIL import Image, UnidentifiedImageError
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..media.images import plain
from .errors import ApiError

SERVED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
"""Image formats the server opens (JPEG includes cameras' multi-picture MPO); others are refused."""


class BodyLimit:
    """Request body limit as ASGI middleware, answering 413 in the OpenAI error shape.

    FastAPI's own `max_body_size` replaces any response to a request whose declared Content-Length is over
    the limit with a plain-text 413; clients of an OpenAI-compatible API expect a JSON error, so the limit
    is enforced here instead: a declared length over the limit is refused before the body is read, and a
    chunked body is counted as it arrives (the route's body read then fails with the same 413).
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _message(self, size: int | str) -> str:
        return f"request body of {size} bytes exceeds the limit of {self.max_bytes} bytes (--max-body-mb)"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await ApiError(413, self._message(declared), "request_too_large").response()(scope, receive, send)
            return
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise HTTPException(413, self._message(f"more than {self.max_bytes}"))
            return message

        await self.app(scope, limited, send)


def json_items(body: bytes) -> int:
    """An upper bound on the arrays, objects and list items of a JSON body (strings' commas included)."""
    return body.count(b",") + body.count(b"[") + body.count(b"{")


WIDE_MODES_WEIGHT = 3
"""16-bit, 32-bit and float images (PIL modes I;16*, I, F) count 3x: decoding converts them to 8 bits through a
float32 array (`media.images`; ~16 bytes a pixel with float64 before), on top of the decoded image itself; the
weight was measured with float64 (bench_serve_limits.py) and is kept as a margin."""


class ImageHeader(NamedTuple):
    width: int
    height: int
    mode: str  # PIL's mode, e.g. RGB, RGBA, P, L, I;16


def decoded_pixels(width: int, height: int, mode: str = "RGB") -> int:
    """What preparing an image costs, in 8-bit RGB pixels: the image, plus its square canvas when it is not
    square; times `WIDE_MODES_WEIGHT` for 16-bit, 32-bit and float images."""
    side = max(width, height)
    pixels = width * height + (side * side if width != height else 0)
    return pixels * (WIDE_MODES_WEIGHT if mode in ("I", "F") or mode.startswith("I;") else 1)


@dataclass(frozen=True)
class RequestLimits:
    max_images: int
    max_boxes_per_image: int
    max_boxes_per_request: int
    max_box_pairs: int
    max_image_pixels: int | None
    max_request_pixels: int
    max_json_items: int

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")

    def check_json(self, body: bytes) -> None:
        items = json_items(body)
        if items > self.max_json_items:
            raise ApiError(413, f"the request body holds {items} JSON separators and brackets (',' '[' '{{', "
                           f"inside strings too); the limit is {self.max_json_items} (--max-json-items)",
                           "request_too_large")  # fmt: skip

    def check_images(self, count: int) -> None:
        if count > self.max_images:
            raise ApiError(400, f"the conversation holds {count} images; this server takes at most "
                           f"{self.max_images} per request (--max-images)", "too_many_images", "messages")  # fmt: skip

    def check_boxes(self, counts: list[int]) -> None:
        """`counts[k]`: how many boxes the request gives for image k (0 when it gives none)."""
        for k, n in enumerate(counts):
            if n > self.max_boxes_per_image:
                raise ApiError(400, f"mgllava.boxes[{k}] has {n} boxes; the limit is {self.max_boxes_per_image} "
                               "per image (--max-boxes-per-image)", "too_many_boxes", f"mgllava.boxes[{k}]")  # fmt: skip
        total = sum(counts)
        if total > self.max_boxes_per_request:
            raise ApiError(400, f"mgllava.boxes has {total} boxes in all; the limit is "
                           f"{self.max_boxes_per_request} per request (--max-boxes-per-request)",
                           "too_many_boxes", "mgllava.boxes")  # fmt: skip
        pairs = sum(n * n for n in counts)
        if pairs > self.max_box_pairs:
            raise ApiError(400, f"mgllava.boxes needs {pairs} box pairs of selection work (each image's box count "
                           f"squared, summed: what NMS compares at worst); the budget is {self.max_box_pairs} "
                           "per request (--max-box-pairs)", "box_budget_exceeded", "mgllava.boxes")  # fmt: skip

    def check_pixels(self, headers: list[tuple[str, ImageHeader]]) -> None:
        """`headers`: (param, header) of each image of the request."""
        for param, (width, height, _) in headers:
            if self.max_image_pixels is not None and width * height > self.max_image_pixels:
                raise ApiError(413, f"{param}: {width}x{height} = {width * height} pixels exceeds the limit of "
                               f"{self.max_image_pixels} per image (--max-image-pixels)", "image_too_large",
                               param)  # fmt: skip
        total = sum(decoded_pixels(*header) for _, header in headers)
        if total > self.max_request_pixels:
            raise ApiError(413, f"the request's images decode to {total} pixels (width x height, plus the "
                           "max(width, height)^2 square each non-square image is padded onto; 16-bit and float "
                           f"images count {WIDE_MODES_WEIGHT}x); the limit is {self.max_request_pixels} per request "
                           "(--max-request-pixels)", "too_many_pixels", "messages")  # fmt: skip


def data_url_bytes(url: str, param: str) -> bytes:
    header, _, payload = url.partition(",")
    if ";base64" not in header:
        raise ApiError(400, f"{param}: image data URLs must be base64-encoded (data:image/png;base64,...)",
                       "invalid_image", param)  # fmt: skip
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as err:
        raise ApiError(
            400, f"{param}: image data URL is not valid base64: {err}", "invalid_image", param
        ) from err


def image_header(data: bytes, param: str) -> ImageHeader:
    """Size and mode from an image's header, without decoding its pixels."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=SERVED_FORMATS) as image:
                (width, height), mode = image.size, image.mode
    except Image.DecompressionBombError as err:
        raise ApiError(413, f"{param}: the image header claims more than {2 * Image.MAX_IMAGE_PIXELS} pixels "
                       "(--max-image-pixels)", "image_too_large", param) from err  # fmt: skip
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise ApiError(400, f"{param}: not a readable image in a served format ({', '.join(SERVED_FORMATS)}): "
                       f"{plain(err)}", "invalid_image", param) from err  # fmt: skip
    if width <= 0 or height <= 0:
        raise ApiError(400, f"{param}: zero-size image ({width}x{height})", "invalid_image", param)
    return ImageHeader(width, height, mode)
