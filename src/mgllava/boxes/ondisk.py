"""A box file indexed by byte offset: records are parsed from disk when looked up, never held (training scale).

`BoxIndex` (boxes.files) parses every record into `Boxes` tensors and label lists; with a box record per
image of 1.2M+ samples that is GBs per rank, copied again into each DataLoader worker. `DiskBoxIndex` scans
the file once (`utils.records`), keeps each record's byte span and, per look-up key (sample id, image path,
content hash, video path, unique file name, video stem), a sorted array of 63-bit key hashes with the record
numbers. A look-up hashes the key, bisects, parses the candidate record and checks that it really carries
the key (so a hash collision is a miss, not a wrong answer). It offers the tables `BoxLookup` reads, with the
same first-wins rules as `BoxIndex`, and the same error for an id given twice with different boxes.

Both layouts that `BoxIndex.load` reads as lists: our JSONL and the reference's JSON list. A record's boxes
are checked when it is parsed: a malformed record raises `ValueError` naming the file and record number at
look-up (the data set turns it into a replaced sample), not at load.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from ..utils.records import RecordFile, key_hash
from .files import BoxRecord, _same_content

KINDS = ("id", "image", "sha256", "video", "name", "video_stem")


def _keys(obj: Any) -> dict[str, list[str]]:
    """The look-up keys of one raw record, as `BoxRecord.from_json` would set them."""
    if not isinstance(obj, dict):
        return {}
    rid = obj.get("id")
    video = obj.get("video")
    if rid is None and video:
        rid = Path(str(video)).stem
    ids = [str(i) for i in obj.get("ids") or []] or ([str(rid)] if rid is not None else [])
    image = obj.get("image")
    return {"id": ids, "image": [image] if image else [], "sha256": [obj["sha256"]] if obj.get("sha256") else [],
            "video": [video] if video else [], "name": [Path(image).name] if image else [],
            "video_stem": [Path(video).stem] if video else []}  # fmt: skip


def _record_keys(record: BoxRecord, kind: str) -> list[str]:
    return {
        "id": record.ids, "image": [record.image] if record.image else [],
        "sha256": [record.sha256] if record.sha256 else [], "video": [record.video] if record.video else [],
        "name": [Path(record.image).name] if record.image else [],
        "video_stem": [Path(record.video).stem] if record.video else [],
    }[kind]  # fmt: skip


class KeyTable:
    """key -> the first (or, for `last_wins`, the last) record carrying it; a read-only mapping."""

    def __init__(self, kind: str, hashes: np.ndarray, rows: np.ndarray, read: Callable[[int], BoxRecord],
                 last_wins: bool = False) -> None:  # fmt: skip
        order = np.lexsort((-rows if last_wins else rows, hashes))
        self.kind, self.hashes, self.rows, self.read = kind, hashes[order], rows[order], read

    def get(self, key: Any, default: Any = None) -> BoxRecord | Any:
        h = key_hash(str(key))
        lo, hi = np.searchsorted(self.hashes, h, "left"), np.searchsorted(self.hashes, h, "right")
        for row in self.rows[lo:hi]:
            record = self.read(int(row))
            if str(key) in _record_keys(record, self.kind):
                return record
        return default

    def __contains__(self, key: Any) -> bool:
        return self.get(key) is not None

    def __getitem__(self, key: Any) -> BoxRecord:
        record = self.get(key)
        if record is None:
            raise KeyError(key)
        return record

    def __len__(self) -> int:
        return len(np.unique(self.hashes))

    def __bool__(self) -> bool:
        return len(self.hashes) > 0


class DiskBoxIndex:
    """A box file's records behind `BoxIndex`'s look-up tables, parsed on access (module docstring)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        keys: dict[str, tuple[list[int], list[int]]] = {kind: ([], []) for kind in KINDS}

        def visit(i: int, obj: Any) -> None:
            if not isinstance(obj, dict) or not ({"boxes", "frames", "error"} & obj.keys()):
                raise ValueError(
                    f"box file {self.path} record {i + 1}: neither 'boxes', 'frames' nor 'error'"
                )
            for kind, values in _keys(obj).items():
                for value in values:
                    keys[kind][0].append(key_hash(value))
                    keys[kind][1].append(i)

        self.file = RecordFile.scan(self.path, visit)
        self._read = lru_cache(maxsize=256)(self._parse)
        tables = {
            kind: (np.asarray(h, dtype=np.int64), np.asarray(r, dtype=np.int64))
            for kind, (h, r) in keys.items()
        }
        self.by_id = KeyTable("id", *tables["id"], self._read)
        self.by_image = KeyTable("image", *tables["image"], self._read)
        self.by_hash = KeyTable("sha256", *tables["sha256"], self._read)
        self.by_video = KeyTable("video", *tables["video"], self._read)
        self.by_video_stem = KeyTable("video_stem", *tables["video_stem"], self._read, last_wins=True)
        self.by_name = KeyTable("name", *_unique(*tables["name"]), self._read)
        self._check_duplicate_ids(*tables["id"])

    def _parse(self, row: int) -> BoxRecord:
        return BoxRecord.from_json(self.file.read(row), f"box file {self.path} record {row + 1}")

    def _check_duplicate_ids(self, hashes: np.ndarray, rows: np.ndarray) -> None:
        """Same id means same image: an id on two records with different boxes is an error naming it."""
        values, counts = np.unique(hashes, return_counts=True)
        for h in values[counts > 1]:
            seen: dict[str, BoxRecord] = {}
            for row in sorted(rows[hashes == h].tolist()):
                record = self._read(row)
                for rid in record.ids:
                    if key_hash(rid) == h and rid in seen and not _same_content(seen[rid], record):
                        raise ValueError(f"box file: id {rid!r} appears twice with different boxes")
                    seen.setdefault(rid, record)

    def __len__(self) -> int:
        return len(self.file)

    @property
    def records(self) -> Iterator[BoxRecord]:
        """Every record, parsed one at a time."""
        return (self._parse(i) for i in range(len(self.file)))

    @property
    def errors(self) -> list[BoxRecord]:
        return [r for r in self.records if r.error is not None]


def _unique(hashes: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Only the keys that exactly one record carries (file names: a name shared by two images names neither)."""
    values, counts = np.unique(hashes, return_counts=True)
    keep = np.isin(hashes, values[counts == 1])
    return hashes[keep], rows[keep]
