"""Helpers shared by every package's tests: the tiny model and engine, scenes, PNG bytes and data URLs, chat
messages, and a stand-in detector and proposer (the fixtures built from them are in conftest.py)."""

from __future__ import annotations

import base64
import io
import struct
import zlib

import torch
from PIL import Image, ImageDraw

from mgllava import MGLlavaConfig, MGLlavaForConditionalGeneration, MGLlavaProcessor
from mgllava.boxes import Boxes, BoxProposer, FixedTagger
from mgllava.inference import Engine


def tiny_parts():
    torch.manual_seed(0)
    model = MGLlavaForConditionalGeneration(MGLlavaConfig.from_preset("tiny")).eval()
    return model, MGLlavaProcessor.from_preset("tiny")


def tiny_engine(proposer=None, **options) -> Engine:
    model, processor = tiny_parts()
    return Engine(model, processor, proposer, **options)


def scene(seed: int, size=(96, 64)) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    image = Image.new("RGB", size, tuple(int(v) for v in torch.randint(0, 255, (3,), generator=g)))
    draw = ImageDraw.Draw(image)
    x, y = (int(v) for v in torch.randint(0, 40, (2,), generator=g))
    draw.ellipse((x, y, x + 30, y + 20), fill=(200, 30, 30))
    return image


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def data_url(image: Image.Image) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode()


def ask(text: str, image_url: str | None = None) -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": image_url}}] if image_url else []
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


class ShapesDetector:
    """A stand-in for OWLv2: two labelled boxes at fixed fractions of each image; counts the images it saw."""

    def __init__(self) -> None:
        self.calls = 0

    def detect(self, images: list[Image.Image], tags: list[list[str]]) -> list[Boxes]:
        self.calls += len(images)
        out = []
        for image in images:
            w, h = image.size
            xyxy = [[0.1 * w, 0.1 * h, 0.5 * w, 0.6 * h], [0.55 * w, 0.3 * h, 0.95 * w, 0.9 * h]]
            out.append(Boxes(xyxy, [0.9, 0.7], ["circle", "square"], (w, h)))
        return out


def ShapesProposer() -> BoxProposer:
    """The one proposer type over the stand-in detector (`proposer.detector.calls` counts detections)."""
    return BoxProposer(FixedTagger(["circle", "square"]), ShapesDetector())


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims `width` x `height` but whose pixel data is a few bytes: opening it reads
    the size; decoding it fails (so a size check that answers first has not decoded it)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 16))
        + chunk(b"IEND", b"")
    )


def bytes_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()
