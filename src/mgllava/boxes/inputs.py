"""Inputs of `mgllava boxes`: the unique images of a LLaVA JSON/JSONL, an image folder or a benchmark TSV.

Each input becomes a list of `ImageItem`s, one per unique image, in order of first appearance (the order
of the box file). An item's `key` names the image within the run: its normalised relative path, or
`sha256:<hex>` for an image embedded in a TSV (the same picture under several indices is one item).

- LLaVA (`.json` list or `.jsonl`): samples `{"id", "image", "conversations"}`; `image` is relative to the
  image root (default: the file's folder). Samples without an image are text-only and skipped, `video`
  samples are skipped too (counted in `skipped`). An optional `tags` field (list or comma-separated)
  gives the sample's own tags (`--tagger sample`). Same id means same image (docs/design.md section 7): an id used
  with two different images is an error naming both samples.
- Folder: every image file below it (by extension), sorted by relative path; the id is that path.
- TSV (MMBench style, as VLMEvalKit writes it): columns `index` and `image` (base64); an `image` cell that
  holds another row's index instead of base64 means "the same image as that row".

Paths are checked lexically: an absolute path or one with `..` that leaves the image root is recorded
as an error for that image (no path traversal); symbolic links inside the root are followed.
"""

from __future__ import annotations

import base64
import binascii
import csv
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..utils.hashing import sha256_bytes

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


@dataclass
class ImageItem:
    key: str
    path: str | None = None  # as given, normalised, relative to the image root (None: embedded)
    source: Path | bytes | None = None  # where the bytes are; None when `error` is set
    ids: list[str] = field(default_factory=list)  # sample ids using this image, input order
    tags: list[str] | None = None  # the first sample's own tags, if it had any
    error: str | None = None  # known before reading (e.g. path outside the root)
    sha256: str | None = None  # known at scan time for embedded images (of the cell text if not base64)


@dataclass
class Scan:
    items: list[ImageItem]
    samples: int = 0
    skipped: dict[str, int] = field(default_factory=dict)


def scan_input(path: str | Path, image_root: str | Path | None = None) -> Scan:
    path = Path(path)
    if path.is_dir():
        return scan_folder(path)
    if not path.is_file():
        raise FileNotFoundError(f"input {path}: no such file or folder")
    if path.suffix.lower() == ".tsv":
        return scan_tsv(path)
    if path.suffix.lower() in (".json", ".jsonl"):
        return scan_llava(path, Path(image_root) if image_root else path.parent)
    raise ValueError(f"input {path}: expected a LLaVA .json/.jsonl, a benchmark .tsv or an image folder")


def resolve_under(root: Path, relative: str) -> tuple[Path | None, str | None]:
    """(absolute path, None) for a path inside `root`, else (None, reason)."""
    if os.path.isabs(relative):
        return None, f"image {relative!r}: absolute path; paths must be relative to the image root {root}"
    joined = os.path.normpath(os.path.join(os.path.abspath(root), relative))
    if os.path.commonpath([joined, os.path.abspath(root)]) != os.path.abspath(root):
        return None, f"image {relative!r}: path leaves the image root {root}"
    return Path(joined), None


def _samples(path: Path) -> list[Any]:
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() == ".jsonl":
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"input {path}: not valid JSON ({err.msg}, line {err.lineno})") from err
    if not isinstance(data, list):
        raise ValueError(f"input {path}: expected a JSON list of samples, got {type(data).__name__}")
    return data


def _tags(value: Any) -> list[str] | None:
    if value is None:
        return None
    return [t.strip() for t in (value.split(",") if isinstance(value, str) else value) if str(t).strip()]


def scan_llava(path: Path, image_root: Path) -> Scan:
    scan = Scan(items=[])
    by_key: dict[str, ImageItem] = {}
    image_of_id: dict[str, tuple[str, int]] = {}
    for number, sample in enumerate(_samples(path), 1):
        if not isinstance(sample, dict):
            raise ValueError(f"input {path}: sample {number} is not a JSON object")
        scan.samples += 1
        if sample.get("video") is not None:
            scan.skipped["video"] = scan.skipped.get("video", 0) + 1  # frames are not decoded here yet
            continue
        image = sample.get("image")
        if image is None:
            scan.skipped["text-only"] = scan.skipped.get("text-only", 0) + 1
            continue
        if not isinstance(image, str) or not image:
            raise ValueError(f"input {path}: sample {number} has image {image!r}; expected one path")
        key = os.path.normpath(image).replace(os.sep, "/")
        sid = None if sample.get("id") is None else str(sample["id"])
        if sid is not None:
            first = image_of_id.setdefault(sid, (key, number))
            if first[0] != key:
                raise ValueError(
                    f"input {path}: id {sid!r} is sample {first[1]} with image {first[0]!r} and sample {number} "
                    f"with image {key!r}; the same id must mean the same image (docs/design.md section 7)"
                )
        item = by_key.get(key)
        if item is None:
            source, error = resolve_under(image_root, image)
            item = by_key[key] = ImageItem(key, key, source, tags=_tags(sample.get("tags")), error=error)
            scan.items.append(item)
        if sid is not None and sid not in item.ids:
            item.ids.append(sid)
    return scan


def scan_folder(root: Path) -> Scan:
    files = sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
    )
    items = [ImageItem(rel, rel, root / rel, ids=[rel]) for rel in files]
    return Scan(items=items, samples=len(items))


def _decode_base64(text: str) -> bytes | None:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None


def scan_tsv(path: Path) -> Scan:
    csv.field_size_limit(sys.maxsize)
    with path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))
    if rows and not {"index", "image"} <= set(rows[0]):
        raise ValueError(
            f"input {path}: a benchmark TSV needs 'index' and 'image' columns, has {sorted(rows[0])}"
        )
    cells = {str(row["index"]): row["image"] or "" for row in rows}
    scan = Scan(items=[], samples=len(rows))
    by_key: dict[str, ImageItem] = {}
    seen: set[str] = set()
    for number, row in enumerate(rows, 2):  # line numbers: the header is line 1
        index, cell = str(row["index"]), row["image"] or ""
        if index in seen:
            raise ValueError(f"input {path}: index {index!r} appears twice (line {number})")
        seen.add(index)
        if len(cell) < 64 and cell in cells and cell != index:  # "same image as row <cell>"
            cell = cells[cell]
        data = _decode_base64(cell)
        digest = sha256_bytes(data if data is not None else cell.encode())
        key = "sha256:" + digest
        item = by_key.get(key)
        if item is None:
            error = None if data else f"row {index}: image cell is empty or not valid base64"
            item = by_key[key] = ImageItem(key, None, data or None, error=error, sha256=digest)
            scan.items.append(item)
        item.ids.append(index)
    return scan
