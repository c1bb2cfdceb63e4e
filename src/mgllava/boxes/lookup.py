"""Finding an image's (or a video's) boxes in a box file: one rule for training data, check-data,
evaluation, chat, serve and the online proposer.

The rule, first hit wins (docs/design.md section 7):

1. **id**: the sample's id(s), in the order given (a benchmark may pass its question id and then the id of
   the image the question is about). Only for a sample with one image: a multi-image sample's id names no
   single image. Same id means same image (the reference's convention).
2. **path**: the image path as the data file writes it (relative to its image root); our box files record it.
3. **content**: the sha256 of the encoded image file, or of the bytes a TSV or a request carried; our box
   files record it. Hashed only when 1 and 2 miss.
4. **file name**: the path's last component, only when exactly one record of the file has that name.

For a video: id(s), then its path, then its file name without extension (how the reference keys videos).
A record holding an error (the image could not be read when the file was made) is a miss.

Every look-up is counted (`BoxLookup.counts`: hits per rule, misses, and the first keys that missed);
callers report the counts and refuse past their threshold with `check_missing`.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from ..utils.hashing import sha256_bytes, sha256_file
from .files import BoxIndex, BoxRecord
from .ondisk import DiskBoxIndex
from .types import Boxes

EXAMPLES = 10  # missed keys kept for the report


class MissingBoxes(ValueError):
    """More images than allowed found no boxes; names the box file, the share and examples."""


@dataclass(frozen=True)
class ImageKey:
    """What is known about one image: its sample ids, its path as the data names it, and where its encoded
    bytes are (a file on disk, or the bytes themselves) for the content hash."""

    ids: tuple[str, ...] = ()
    path: str | None = None
    file: str | Path | None = None
    data: bytes | None = None

    @classmethod
    def of(cls, source: Any, ids: Sequence[Any] = (), path: str | None = None) -> ImageKey:
        """The key of an image given as a file path or encoded bytes (a decoded image has no content key)."""
        ids = tuple(str(i) for i in ids if i is not None)
        if isinstance(source, bytes):
            return cls(ids, path, data=source)
        if isinstance(source, (str, Path)) and Path(source).is_file():
            return cls(ids, path if path is not None else str(source), file=source)
        return cls(ids, path)

    @cached_property
    def sha256(self) -> str | None:
        """The content hash of the encoded image (computed once), or None for a decoded image."""
        if self.data is not None:
            return sha256_bytes(self.data)
        if self.file is not None:
            return sha256_file(self.file)
        return None

    def describe(self) -> str:
        parts = [f"id {i!r}" for i in self.ids[:2]] + ([f"path {self.path!r}"] if self.path else [])
        return ", ".join(parts) or "an image without id or path"


def _first_char(path: Path) -> str:
    if not path.is_file():
        raise FileNotFoundError(f"box file {path}: no such file")
    with path.open("rb") as handle:
        return handle.read(4096).decode("utf-8", errors="replace").lstrip()[:1]


class BoxLookup:
    """A box file's records behind the one look-up rule, with counts of what was found and missed.
    Thread-safe (the server looks up from many threads)."""

    def __init__(self, index: BoxIndex | DiskBoxIndex, name: str = "box file") -> None:
        self.index = index
        self.name = name
        self._by_name = index.by_name
        self._by_video_stem = index.by_video_stem
        self._lock = threading.Lock()
        self.counts: Counter[str] = Counter()  # "id", "path", "sha256", "name", "missing"
        self.missed: list[str] = []

    @classmethod
    def load(cls, path: str | Path) -> BoxLookup:
        return cls(BoxIndex.load(path), str(path))

    @classmethod
    def on_disk(cls, path: str | Path, cache: Path | None = None) -> BoxLookup:
        """For training data at scale: records parsed when looked up (`boxes.ondisk`; `cache`: where its
        scan is kept for the next run). The reference's dict-of-records layout has no list to index and is
        read whole, as `load` does."""
        path = Path(path)
        if path.suffix != ".jsonl" and _first_char(path) == "{":
            return cls.load(path)
        return cls(DiskBoxIndex(path, cache), str(path))

    # -- look-ups -------------------------------------------------------------------------------------------
    def image(self, key: ImageKey, single: bool = True) -> Boxes | None:
        """Boxes of one image (see the module docstring); `single=False` for one image of a multi-image
        sample (its ids are then not used)."""
        rule, record = self._find_image(key, single)
        found = record.boxes if record is not None and record.error is None else None
        self._count(rule if found is not None else "missing", key.describe())
        return found

    def video(self, ids: Sequence[Any] = (), path: str | None = None) -> list[Boxes] | None:
        """Per-frame boxes of one video, or None."""
        candidates = [("id", self.index.by_id, str(i)) for i in ids if i is not None]
        if path is not None:
            stem = Path(path).stem
            candidates += [("path", self.index.by_video, path), ("name", self.index.by_id, stem),
                           ("name", self._by_video_stem, stem)]  # fmt: skip
        rule, record = next(((r, t[v]) for r, t, v in candidates if v in t), (None, None))
        found = record.frames if record is not None and record.error is None else None
        self._count(rule if found is not None else "missing", ImageKey(tuple(map(str, ids)), path).describe())
        return found

    def _find_image(self, key: ImageKey, single: bool) -> tuple[str | None, BoxRecord | None]:
        if single:
            for rid in key.ids:
                if rid in self.index.by_id:
                    return "id", self.index.by_id[rid]
        if key.path is not None and key.path in self.index.by_image:
            return "path", self.index.by_image[key.path]
        if self.index.by_hash:
            digest = key.sha256
            if digest is not None and digest in self.index.by_hash:
                return "sha256", self.index.by_hash[digest]
        if key.path is not None and Path(key.path).name in self._by_name:
            return "name", self._by_name[Path(key.path).name]
        return None, None

    def _count(self, rule: str, what: str) -> None:
        with self._lock:
            self.counts[rule] += 1
            if rule == "missing" and len(self.missed) < EXAMPLES:
                self.missed.append(what)

    # -- reporting ------------------------------------------------------------------------------------------
    @property
    def looked_up(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> dict[str, Any]:
        """`{"box_file", "looked_up", "found": {rule: n}, "missing", "missing_share", "missing_examples"}`."""
        with self._lock:
            total = sum(self.counts.values())
            return {
                "box_file": self.name,
                "looked_up": total,
                "found": {k: v for k, v in self.counts.items() if k != "missing"},
                "missing": self.counts["missing"],
                "missing_share": self.counts["missing"] / total if total else 0.0,
                "missing_examples": list(self.missed),
            }

    def check_missing(self, max_share: float, what: str = "images") -> None:
        """Raise `MissingBoxes` when more than `max_share` of the look-ups so far missed."""
        s = self.summary()
        if s["looked_up"] and s["missing_share"] > max_share:
            raise MissingBoxes(
                f"{s['missing']} of {s['looked_up']} {what} ({s['missing_share']:.1%}) have no boxes in "
                f"{self.name} (allowed: {max_share:.1%}); first misses: {'; '.join(s['missing_examples'])}. "
                "Check that the box file belongs to this data and is keyed as docs/design.md section 7 says"
            )
