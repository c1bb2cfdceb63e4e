"""Records of a JSON list or JSONL file, read from disk on access: byte offsets instead of parsed dicts.

At the paper's scale (1.26M + 1.38M samples, a box record per image) holding every parsed record on every
rank, and again in every DataLoader worker (copy-on-write pages grow as reference counts are touched), costs
tens of GB per rank. `RecordFile.scan` parses each record once, hands it to a callback that keeps what the
caller needs (a length, a key hash) in numpy arrays, and keeps only the record's byte span; `read(i)`
parses record i again from disk. numpy arrays are a few flat buffers, so forked workers share them.

Both LLaVA layouts: a JSON list (`[{...}, {...}]`, pretty-printed or not; decoded in chunks, never whole) and
JSONL (one record per line). Errors name the file and the byte offset (JSON) or line (JSONL).

Scanning 1.2M records takes a minute of one core; `cached_arrays` keeps what a scan produced (a dict of
numpy arrays) under a cache folder, keyed by the file's path, size and modification time and the kind of
index, and maps it back read-only (`np.load(mmap_mode="r")`): the next run, every rank and every worker
share one copy in the page cache. A cache is written to a temporary folder and renamed into place.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .io import JsonlError, jsonl_spans

INDEX_VERSION = 1  # bump when what a scan keeps changes
CHUNK = 1 << 24  # bytes decoded at a time from a JSON list
SEPARATORS = re.compile(r"[ \t\r\n,]*")
WHITESPACE = re.compile(r"[ \t\r\n]*")


class RecordFileError(ValueError):
    """A malformed data file: names the file and where."""


def key_hash(key: str) -> int:
    """A stable 63-bit hash of a string key (ids, paths), equal in every process (unlike `hash`): two C
    checksums side by side, fast enough for millions of keys. Callers confirm a hit against the record."""
    data = key.encode("utf-8")
    return ((zlib.crc32(data) << 31) ^ zlib.adler32(data) ^ (len(data) << 48)) & 0x7FFF_FFFF_FFFF_FFFF


def _cache_key(path: Path, kind: str) -> str:
    stat = path.stat()
    raw = f"{kind}|{INDEX_VERSION}|{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()
    return f"{path.name}-{kind}-{zlib.crc32(raw):08x}{zlib.adler32(raw):08x}"


def cached_arrays(
    path: Path, kind: str, build: Callable[[], dict[str, np.ndarray]], cache: Path | None
) -> dict[str, np.ndarray]:
    """`build()`'s arrays for `path`, from `cache` when a scan of this very file was kept there (then
    memory-mapped read-only), else built and, with a `cache`, kept."""
    if cache is None:
        return build()
    folder = Path(cache) / _cache_key(path, kind)
    if (folder / "done").is_file():
        return {f.stem: np.load(f, mmap_mode="r") for f in folder.glob("*.npy")}
    arrays = build()
    tmp = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        np.save(tmp / f"{name}.npy", np.ascontiguousarray(array))
    (tmp / "done").touch()
    try:
        tmp.rename(folder)
    except OSError:  # another process kept the same scan first
        shutil.rmtree(tmp, ignore_errors=True)
    return arrays


@dataclass
class RecordFile:
    """The byte spans of a file's records; `read(i)` parses record i from disk."""

    path: Path
    starts: np.ndarray  # (n,) int64
    stops: np.ndarray  # (n,) int64

    def __len__(self) -> int:
        return len(self.starts)

    def read(self, i: int) -> Any:
        start, stop = int(self.starts[i]), int(self.stops[i])
        with self.path.open("rb") as handle:
            handle.seek(start)
            return json.loads(handle.read(stop - start))

    @classmethod
    def scan(cls, path: str | Path, visit: Callable[[int, Any], None] | None = None) -> RecordFile:
        """Index `path` (`.jsonl`: JSONL; otherwise a JSON list), calling `visit(i, record)` on each record."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"data file {path}: no such file")
        starts: list[int] = []
        stops: list[int] = []
        spans = _jsonl_spans(path) if path.suffix == ".jsonl" else _json_list_spans(path)
        for i, (start, stop, record) in enumerate(spans):
            starts.append(start)
            stops.append(stop)
            if visit is not None:
                visit(i, record)
        return cls(path, np.asarray(starts, dtype=np.int64), np.asarray(stops, dtype=np.int64))


def _jsonl_spans(path: Path) -> Iterator[tuple[int, int, Any]]:
    try:
        for _, start, stop, record in jsonl_spans(path):
            yield start, stop, record
    except JsonlError as err:
        raise RecordFileError(str(err)) from err


def _safe_cut(data: bytes) -> int:
    """The longest prefix of `data` that does not end inside a UTF-8 character."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte & 0xC0 != 0x80:  # ASCII or a lead byte: is its character complete?
            width = 1 if byte < 0x80 else 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
            return len(data) if width <= back else len(data) - back
    return len(data)


def _json_list_spans(path: Path) -> Iterator[tuple[int, int, Any]]:
    """(byte start, byte stop, record) of each element of a top-level JSON list, decoded chunk by chunk."""
    decoder = json.JSONDecoder()
    with path.open("rb") as handle:
        pending, base, opened, eof = b"", 0, False, False  # base: file offset of pending[0]
        while True:
            if not eof:
                block = handle.read(CHUNK)
                eof = not block
                pending += block
            cut = len(pending) if eof else _safe_cut(pending)
            try:
                text = pending[:cut].decode("utf-8")
            except UnicodeDecodeError as err:
                raise RecordFileError(f"{path}: not UTF-8 at byte {base + err.start}") from err
            pos = bpos = 0  # character and byte position in text
            ascii_only = text.isascii()
            while True:
                skip = (SEPARATORS if opened else WHITESPACE).match(text, pos).end() - pos
                bpos, pos = bpos + skip, pos + skip  # separators are ASCII: one byte each
                if pos == len(text):
                    break
                if not opened:
                    if text[pos] != "[":
                        raise RecordFileError(f"{path}: expected a JSON list of records, starting with '['")
                    opened, pos, bpos = True, pos + 1, bpos + 1
                    continue
                if text[pos] == "]":
                    return
                try:
                    record, end = decoder.raw_decode(text, pos)
                except json.JSONDecodeError as err:
                    if eof:
                        where = base + bpos + len(text[pos : err.pos].encode("utf-8"))
                        raise RecordFileError(f"{path}: not valid JSON at byte {where} ({err.msg})") from err
                    break  # the record continues in the next chunk
                size = end - pos if ascii_only else len(text[pos:end].encode("utf-8"))
                yield base + bpos, base + bpos + size, record
                pos, bpos = end, bpos + size
            pending, base = pending[bpos:], base + bpos
            if eof:
                if not opened:
                    raise RecordFileError(f"{path}: empty file, expected a JSON list of records")
                raise RecordFileError(f"{path}: the JSON list is not closed with ']'")
