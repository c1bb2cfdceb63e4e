"""What every benchmark loader returns: samples to answer, and the input problems found while reading.

A `Sample` is one model call: its key (unique within the benchmark, a string), the user text with its
`<image>` or `<video>` tag, where its pixels come from, the ids its boxes are filed under (`box_id`, then
`alt_box_ids`, in order; docs/benchmarks.md says which id of each benchmark's file that is), its ground
truth (None when the file has none, e.g. a test split) and whatever the scorer needs (`meta`). Loaders never
raise on a bad row: they record an `Issue` naming the row and what is wrong, and go on; the results list
every issue, so a bad row is never silently scored as right or wrong.

Keys are unique: a loader whose file repeats an id either lists the later rows as invalid, naming the id
(`keep_first`), or, where the official file itself repeats one (SEED-Bench.json's "49914"), gives each copy
its own key and says so in `Loaded.info["renamed_duplicates"]`. `check_unique_keys` refuses any loader output
that still repeats a key, so two questions never share one answer or pass for the rotations of one question.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..data.templates import IMAGE_TOKEN, VIDEO_TOKEN


@dataclass
class Sample:
    key: str
    prompt: str  # user text, starting with "<image>\n" or "<video>\n"
    image: str | bytes | None = None  # a file path or encoded image bytes
    video: str | None = None  # a file path (or a name to resolve under the media folder)
    box_id: str | None = None  # id of this sample's record in a box file (the reference's key)
    answers: list[str] | None = None  # ground truth; None: not in the file
    meta: dict[str, Any] = field(default_factory=dict)
    alt_box_ids: tuple[str, ...] = ()  # further ids of the same image, tried after `box_id` in order

    @property
    def box_ids(self) -> list[str]:
        """The ids a box file is searched by, in order (`box_id` first), without repeats."""
        return [i for i in dict.fromkeys((self.box_id, *self.alt_box_ids)) if i is not None]


@dataclass(frozen=True)
class Issue:
    """An input problem: which sample (or file row) and what is wrong. `group`: the question it belongs to,
    when the benchmark groups rows (MMBench rotations), so that the question is not scored without it."""

    where: str
    reason: str
    group: str | None = None

    def to_json(self) -> dict[str, str]:
        return {"id": self.where, "reason": self.reason}


@dataclass
class Loaded:
    """A benchmark as read from disk. `info` carries facts the results should state (e.g. circular copies)."""

    samples: list[Sample]
    issues: list[Issue] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    table: list[dict[str, Any]] | None = None  # the file's rows (no images), for submission files


class RepeatedKeys(ValueError):
    """A JSON object names a key twice (json.loads would keep the last one silently)."""


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    counts = Counter(key for key, _ in pairs)
    repeated = [key for key, n in counts.items() if n > 1]
    if repeated:
        raise RepeatedKeys(
            f"key(s) {', '.join(map(repr, repeated[:10]))} appear more than once in one object"
        )
    return dict(pairs)


def read_json(path: str | Path, what: str, unique_keys: bool = False) -> Any:
    """A JSON file, or an error naming it (and the line of a syntax error). `unique_keys`: refuse an object
    that repeats a key (for files keyed by question id, such as ScienceQA's problems.json)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path}: no such file")
    try:
        return json.loads(
            path.read_text(encoding="utf-8"), object_pairs_hook=_unique_pairs if unique_keys else None
        )
    except json.JSONDecodeError as err:
        raise ValueError(f"{what} {path}: not valid JSON (line {err.lineno}: {err.msg})") from err
    except UnicodeDecodeError as err:
        raise ValueError(f"{what} {path}: not UTF-8 text ({err.reason})") from err
    except RepeatedKeys as err:
        raise ValueError(f"{what} {path}: {err}; two questions cannot share one id") from err


def expect(value: Any, kind: type | tuple[type, ...], what: str) -> Any:
    if not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise ValueError(f"{what}: expected {names}, got {type(value).__name__}")
    return value


def decode_base64(text: str) -> bytes:
    """Strict base64 (the TSV benchmarks' image column); raises ValueError with the reason."""
    try:
        data = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError) as err:
        raise ValueError(f"image is not valid base64 ({err})") from err
    if not data:
        raise ValueError("image field decodes to zero bytes")
    return data


def tag_in_text(*texts: str | None) -> str | None:
    """A literal `<image>`/`<video>` inside question text would be taken for a tag: report it."""
    for text in texts:
        if text and (IMAGE_TOKEN in text or VIDEO_TOKEN in text):
            return f"question text contains a literal {IMAGE_TOKEN} or {VIDEO_TOKEN}"
    return None


def media_path(root: str | Path | None, name: str) -> str:
    """`name` under the media folder (`--images`), or as given when no folder is set."""
    return str(Path(root) / name) if root is not None else name


def keep_first(samples: list[Sample], issues: list[Issue], what: str) -> list[Sample]:
    """The samples with the first of each key; every later one becomes an issue naming the id."""
    kept: dict[str, Sample] = {}
    for sample in samples:
        if sample.key in kept:
            reason = f"{what} {sample.key!r} appears more than once; only its first entry is answered"
            issues.append(Issue(sample.key, reason))
            continue
        kept[sample.key] = sample
    return list(kept.values())


def check_unique_keys(loaded: Loaded, source: str) -> None:
    """ValueError naming the repeated keys: a loader must refuse or rename duplicates (see the docstring)."""
    counts = Counter(s.key for s in loaded.samples)
    repeated = sorted(key for key, n in counts.items() if n > 1)
    if repeated:
        raise ValueError(
            f"{source}: sample id(s) {', '.join(map(repr, repeated[:10]))} appear more than once; "
            "two questions cannot share one answer"
        )


def limit_samples(loaded: Loaded, limit: int | None, group=None) -> Loaded:
    """The first `limit` questions. `group(sample)` says which question a row belongs to (MMBench rotations
    share one), so a question is never cut apart."""
    if limit is None:
        return loaded
    if limit < 1:
        raise ValueError(f"--limit must be at least 1, got {limit}")
    keep, seen = [], set()
    for sample in loaded.samples:
        g = group(sample) if group else sample.key
        if g not in seen:
            if len(seen) == limit:
                continue
            seen.add(g)
        keep.append(sample)
    return Loaded(keep, loaded.issues, {**loaded.info, "limit": limit}, loaded.table)
