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

from ..utils.records import RecordFile, cached_arrays, key_hash
from .files import BoxRecord, _same_content

KINDS = ("id", "image", "sha256", "video", "name", "video_stem")


def _name(path: str) -> str:
    return path.rsplit("/", 1)[-1]  # Path(path).name for the POSIX paths box files hold, without Path's cost


def _stem(path: str) -> str:
    name = _name(path)
    dot = name.rfind(".")
    return name[:dot] if dot > 0 else name


def _keys(obj: dict[str, Any]) -> dict[str, list[str]]:
    """The look-up keys of one raw record, as `BoxRecord.from_json` would set them."""
    rid, video, image, sha = obj.get("id"), obj.get("video"), obj.get("image"), obj.get("sha256")
    if rid is None and video:
        rid = _stem(str(video))
    ids = [str(i) for i in obj.get("ids") or ()] or ([str(rid)] if rid is not None else [])
    return {"id": ids, "image": [image] if image else [], "sha256": [sha] if sha else [],
            "video": [video] if video else [], "name": [_name(image)] if image else [],
            "video_stem": [_stem(video)] if video else []}  # fmt: skip


def _record_keys(record: BoxRecord, kind: str) -> list[str]:
    return {
        "id": record.ids, "image": [record.image] if record.image else [],
        "sha256": [record.sha256] if record.sha256 else [], "video": [record.video] if record.video else [],
        "name": [_name(record.image)] if record.image else [],
        "video_stem": [_stem(record.video)] if record.video else [],
    }[kind]  # fmt: skip


class KeyTable:
    """key -> the first (or, for the video stem, the last) record carrying it; a read-only mapping over
    `hashes` (sorted) and `rows` (the record of each hash; among equal hashes, the winner first)."""

    def __init__(
        self, kind: str, hashes: np.ndarray, rows: np.ndarray, read: Callable[[int], BoxRecord]
    ) -> None:
        self.kind, self.hashes, self.rows, self.read = kind, hashes, rows, read

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

    def __bool__(self) -> bool:
        return len(self.hashes) > 0


class DiskBoxIndex:
    """A box file's records behind `BoxIndex`'s look-up tables, parsed on access (module docstring). With a
    `cache` folder its scan is kept there and mapped back next time (`utils.records.cached_arrays`)."""

    def __init__(self, path: str | Path, cache: Path | None = None) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"box file {self.path}: no such file")
        arrays = cached_arrays(self.path, "boxes", self._scan, cache)
        self.file = RecordFile(self.path, arrays["starts"], arrays["stops"])
        self._read = lru_cache(maxsize=256)(self._parse)
        tables = {
            kind: KeyTable(kind, arrays[f"{kind}_hashes"], arrays[f"{kind}_rows"], self._read)
            for kind in KINDS
        }
        self.by_id, self.by_image, self.by_hash = tables["id"], tables["image"], tables["sha256"]
        self.by_video, self.by_video_stem, self.by_name = (
            tables["video"],
            tables["video_stem"],
            tables["name"],
        )

    def _scan(self) -> dict[str, np.ndarray]:
        """Record spans and, per key kind, the sorted key hashes with their records; checks duplicate ids."""
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
        arrays = {"starts": self.file.starts, "stops": self.file.stops}
        for kind, (hashes, rows) in keys.items():
            h, r = np.asarray(hashes, dtype=np.int64), np.asarray(rows, dtype=np.int64)
            if kind == "name":
                h, r = _unique(h, r)
            order = np.lexsort((-r if kind == "video_stem" else r, h))  # first wins; the stem: the last
            arrays[f"{kind}_hashes"], arrays[f"{kind}_rows"] = h[order], r[order]
        self._check_duplicate_ids(arrays["id_hashes"], arrays["id_rows"])
        return arrays

    def _parse(self, row: int) -> BoxRecord:
        return BoxRecord.from_json(self.file.read(row), f"box file {self.path} record {row + 1}")

    def _check_duplicate_ids(self, hashes: np.ndarray, rows: np.ndarray) -> None:
        """Same id means same image: an id on two records with different boxes is an error naming it."""
        values, counts = np.unique(hashes, return_counts=True)
        for h in values[counts > 1]:
            seen: dict[str, BoxRecord] = {}
            lo, hi = np.searchsorted(hashes, h, "left"), np.searchsorted(hashes, h, "right")
            for row in sorted(rows[lo:hi].tolist()):
                record = self._parse(row)
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
