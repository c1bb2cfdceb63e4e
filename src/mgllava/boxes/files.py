"""Box files: ours (JSONL, one record per image or video) and the reference's JSON, read into one index.

Our record (one line each; coordinates in original image pixels, `frame` = that image's (width, height)):

    {"id": "000123", "image": "coco/000123.jpg", "sha256": "ab12...", "tags": ["cat", ...], "frame": [640, 480],
     "boxes": [[x1, y1, x2, y2], ...], "scores": [...], "labels": [...]}
    {"id": "7", "ids": ["7", "1007"], "sha256": "cd34...", ...}          # several samples, one image
    {"id": "v7", "video": "v7.mp4", "frames": [{"frame": [w, h], "boxes": ..., "scores": ..., "labels": ...}, ...]}
    {"id": "000124", "image": "coco/000124.jpg", "error": "cannot decode (...)"}     # recorded, never fatal

The reference's file is a JSON list of `{"id", "boxes", "scores", "labels"}` (images) or
`{"video", "frames": [...]}` (videos); ids are compared as strings (the reference's training code does
`str(item["id"])`). Same id means same image (docs/design.md section 7): duplicate ids with different boxes are an
error naming the id. `to_reference_json` writes one entry per sample id (the reference looks boxes up by
id); records without any id cannot be expressed in that form and are left out.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..utils.io import read_jsonl
from .types import Boxes


def _boxes_from(obj: dict[str, Any], where: str) -> Boxes:
    frame = tuple(obj["frame"]) if obj.get("frame") else None
    try:
        return Boxes(obj.get("boxes") or [], obj.get("scores"), list(obj.get("labels") or []), frame)
    except (ValueError, TypeError, RuntimeError) as err:
        raise ValueError(f"{where}: bad boxes ({err})") from err


def _boxes_json(boxes: Boxes) -> dict[str, Any]:
    out = boxes.to_dict()
    if boxes.frame is not None:
        out["frame"] = list(boxes.frame)
    return out


@dataclass
class BoxRecord:
    """Boxes of one image (`boxes`) or one video (`frames`), or the reason they could not be made."""

    id: str | None = None
    image: str | None = None
    video: str | None = None
    sha256: str | None = None
    boxes: Boxes | None = None
    frames: list[Boxes] | None = None
    error: str | None = None
    ids: list[str] = field(default_factory=list)  # every sample id of this image; ids[0] == id
    tags: list[str] | None = None

    def __post_init__(self) -> None:
        self.ids = [str(i) for i in self.ids] or ([self.id] if self.id is not None else [])
        if self.id is None and self.ids:
            self.id = self.ids[0]

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            k: v
            for k, v in (
                ("id", self.id),
                ("image", self.image),
                ("video", self.video),
                ("sha256", self.sha256),
            )
            if v
        }
        if len(self.ids) > 1:
            out["ids"] = list(self.ids)
        if self.tags is not None:
            out["tags"] = list(self.tags)
        if self.error is not None:
            out["error"] = self.error
        elif self.frames is not None:
            out["frames"] = [_boxes_json(b) for b in self.frames]
        elif self.boxes is not None:
            out.update(_boxes_json(self.boxes))
        return out

    @classmethod
    def from_json(cls, obj: dict[str, Any], where: str = "box record") -> BoxRecord:
        rid = obj.get("id")
        if rid is None and obj.get("video"):
            rid = Path(str(obj["video"])).stem  # the reference keys videos by file name without extension
        record = cls(
            id=None if rid is None else str(rid),
            image=obj.get("image"),
            video=obj.get("video"),
            sha256=obj.get("sha256"),
            error=obj.get("error"),
            ids=[str(i) for i in obj.get("ids") or []],
            tags=obj.get("tags"),
        )
        if record.error is None:
            if "frames" in obj:
                record.frames = [_boxes_from(f, f"{where} frame {i}") for i, f in enumerate(obj["frames"])]
            elif "boxes" in obj:
                record.boxes = _boxes_from(obj, where)
            else:
                raise ValueError(f"{where}: neither 'boxes', 'frames' nor 'error'")
        return record


@dataclass
class BoxIndex:
    """All records of a box file, looked up by sample id, image path or content hash."""

    records: list[BoxRecord] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.by_id: dict[str, BoxRecord] = {}
        self.by_image: dict[str, BoxRecord] = {}
        self.by_hash: dict[str, BoxRecord] = {}
        self.by_video: dict[str, BoxRecord] = {}
        for record in self.records:
            self._add(record)
        names = Counter(Path(r.image).name for r in self.records if r.image)
        self.by_name = {
            Path(r.image).name: r for r in self.records if r.image and names[Path(r.image).name] == 1
        }
        self.by_video_stem = {Path(r.video).stem: r for r in self.records if r.video}

    def _add(self, record: BoxRecord) -> None:
        for rid in record.ids:
            old = self.by_id.get(rid)
            if old is not None and not _same_content(old, record):
                raise ValueError(f"box file: id {rid!r} appears twice with different boxes")
            self.by_id.setdefault(rid, record)
        for key, table in (
            (record.image, self.by_image),
            (record.sha256, self.by_hash),
            (record.video, self.by_video),
        ):
            if key:
                table.setdefault(key, record)

    def __len__(self) -> int:
        return len(self.records)

    def lookup(self, id: Any = None, image: str | None = None, sha256: str | None = None) -> BoxRecord | None:
        for key, table in ((id, self.by_id), (image, self.by_image), (sha256, self.by_hash)):
            if key is not None and str(key) in table:
                return table[str(key)]
        return None

    def boxes_for(self, id: Any = None, image: str | None = None, sha256: str | None = None) -> Boxes | None:
        """Boxes of an image, or None when the file has none (or only an error) for it."""
        record = self.lookup(id, image, sha256)
        return record.boxes if record is not None else None

    def frames_for(self, id: Any = None, video: str | None = None) -> list[Boxes] | None:
        record = self.lookup(id, video)
        if record is None and video is not None:
            record = self.by_id.get(Path(video).stem)
        return record.frames if record is not None else None

    @property
    def errors(self) -> list[BoxRecord]:
        return [r for r in self.records if r.error is not None]

    @classmethod
    def load(cls, path: str | Path) -> BoxIndex:
        """Our JSONL (`.jsonl`) or the reference's JSON (a list, or a dict of records)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"box file {path}: no such file")
        if path.suffix == ".jsonl":
            return cls(
                [BoxRecord.from_json(r, f"{path} record {i}") for i, r in enumerate(read_jsonl(path), 1)]
            )
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(f"box file {path}: not valid JSON (line {err.lineno}: {err.msg})") from err
        items = data.values() if isinstance(data, dict) else data
        if not isinstance(items, (list, type({}.values()))):
            raise ValueError(f"box file {path}: expected a list of records, got {type(data).__name__}")
        return cls([BoxRecord.from_json(r, f"{path} record {i}") for i, r in enumerate(items, 1)])


def _same_content(a: BoxRecord, b: BoxRecord) -> bool:
    """Duplicate ids are fine when they carry the same boxes (same id means same image)."""
    strip = ("id", "ids", "image", "sha256", "tags")
    ja = {k: v for k, v in a.to_json().items() if k not in strip}
    jb = {k: v for k, v in b.to_json().items() if k not in strip}
    return ja == jb


def to_reference_json(records: list[BoxRecord]) -> list[dict[str, Any]]:
    """Our records in the reference's JSON form (errors left out; ids as given)."""
    out = []
    for record in records:
        if record.error is not None:
            continue
        if record.frames is not None:
            out.append({"video": record.video or record.id, "frames": [b.to_dict() for b in record.frames]})
        elif record.boxes is not None:
            out.extend({"id": rid, **record.boxes.to_dict()} for rid in record.ids)
    return out
