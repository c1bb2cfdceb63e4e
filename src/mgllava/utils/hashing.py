"""Content hashes: every digest the project takes of data, in one place, each scheme with why it exists.

| function | of | used for | why this scheme |
|---|---|---|---|
| `digest(*parts)` | tensors (dtype, shape, values), bytes, strings | feature-cache and prefix-cache keys, an image frame's key | blake2b-128: fast, in-process keys only |
| `chained(data, block)` | a byte string in blocks | the prefix cache's block index (`inference.prefix`) | each block's digest chains the ones before, so a prefix is found block by block |
| `sha256_bytes`, `sha256_file` | an encoded image file | box files' `sha256` field, looked up by content (`boxes.lookup`) | a published, tool-independent hash: box files are written by one run and read by others (and `sha256sum`) |
| `pixels_sha256(image)` | decoded RGB pixels (mode, size, bytes) | the proposer's cache key for images without file bytes (video frames, arrays) | sha256, as the file hash it stands in for |
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from PIL import Image


def digest(*parts: torch.Tensor | bytes | str) -> str:
    """Hex digest of tensors (dtype, shape and values), bytes and strings, in order."""
    h = hashlib.blake2b(digest_size=16)
    for part in parts:
        if isinstance(part, torch.Tensor):
            t = part.detach().cpu().contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else b"")
        elif isinstance(part, str):
            h.update(part.encode())
        else:
            h.update(part)
        h.update(b"\x00")
    return h.hexdigest()


def chained(data: bytes, block: int) -> list[str]:
    """Digests of the first 1, 2, ... full blocks of `block` bytes of `data`, each chaining the one before."""
    h = hashlib.blake2b(digest_size=16)
    out = []
    for start in range(0, len(data) - block + 1, block):
        h.update(data[start : start + block])
        out.append(h.copy().hexdigest())
    return out


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def pixels_sha256(image: Image.Image) -> str:
    """sha256 of an image's decoded pixels, with its mode and size."""
    h = hashlib.sha256(f"{image.mode}:{image.size[0]}x{image.size[1]}:".encode())
    h.update(image.tobytes())
    return h.hexdigest()
