"""Files that survive being killed: atomic writes and append-only JSONL that resumes cleanly.

- `atomic_write_text` / `atomic_write_json`: write to a temporary file in the same folder, fsync, rename.
  A reader sees the old file or the new one, never half of one.
- `JsonlWriter`: appends one JSON record per line and flushes each line. On reopen it reads what is
  there, drops a torn last line (a kill mid-write), and reports the keys already done so a job can skip
  them. Records are never rewritten, so nothing already produced is lost.
- `read_jsonl`: every line parsed, with the file and line number in the error of a bad one.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


@contextmanager
def atomic_open(path: str | Path, mode: str = "w") -> Iterator[IO]:
    """A file written in full or not at all: a temporary file in the same folder, fsync, rename on success,
    removed on any exception. `mode` is "w" (text, UTF-8) or "wb"."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> Path:
    with atomic_open(path) as handle:
        handle.write(text)
    return Path(path)


def atomic_write_json(path: str | Path, obj: Any, indent: int | None = 2) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


class JsonlError(ValueError):
    """A malformed JSONL file: names the file and the line."""


def jsonl_spans(path: str | Path, allow_torn_tail: bool = False) -> Iterator[tuple[int, int, int, Any]]:
    """(line number, start byte, end byte, record) of each non-blank line of a JSONL file, streamed (nothing
    but the current line is held). With `allow_torn_tail`, an unterminated unparsable last line (a write
    cut short) ends the file; any other unparsable line is a `JsonlError` naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    offset = 0
    with path.open("rb") as handle:
        for number, line in enumerate(handle, 1):
            start, offset = offset, offset + len(line)
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                if allow_torn_tail and not line.endswith(b"\n"):  # only the last line can lack one
                    return
                where = f"{err.msg} at column {err.colno}" if isinstance(err, json.JSONDecodeError) else err
                raise JsonlError(f"{path}:{number}: not valid JSON ({where})") from err
            yield number, start, offset, record


def read_jsonl(path: str | Path, allow_torn_tail: bool = False) -> Iterator[dict[str, Any]]:
    """Records of a JSONL file, each a JSON object (`jsonl_spans` for the rest)."""
    for number, _, _, record in jsonl_spans(path, allow_torn_tail):
        if not isinstance(record, dict):
            raise JsonlError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
        yield record


class JsonlWriter:
    """Append-only JSONL with resume. `key(record)` identifies a record; `done` holds the keys on disk."""

    def __init__(self, path: str | Path, key: Callable[[dict[str, Any]], Any]) -> None:
        self.path = Path(path)
        self.key = key
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.records: list[dict[str, Any]] = []
        if self.path.exists():
            self.records = list(read_jsonl(self.path, allow_torn_tail=True))
            self._rewrite_if_torn()
        self.done = {key(r) for r in self.records}
        self._handle = self.path.open("a", encoding="utf-8")

    def _rewrite_if_torn(self) -> None:
        text = self.path.read_text(encoding="utf-8")
        if text and not text.endswith("\n"):  # a kill mid-line: keep only the complete records
            atomic_write_text(
                self.path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in self.records)
            )

    def write(self, record: dict[str, Any]) -> None:
        self._handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._handle.flush()
        self.records.append(record)
        self.done.add(self.key(record))

    def close(self) -> None:
        if not self._handle.closed:
            self._handle.flush()
            os.fsync(self._handle.fileno())
            self._handle.close()

    def __enter__(self) -> JsonlWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
