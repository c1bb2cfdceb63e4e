"""LLaVA-format training data: records, mixtures, boxes, and encoding one sample (docs/design.md sections 6-8).

A record is `{"id": ..., "image": "rel/path.jpg" | ["a.jpg", "b.jpg"] | absent, "video": "rel.mp4" | absent,
"conversations": [{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", "value": "..."}, ...]}`.
Sources are JSON lists or JSONL files, each with its image/video root, an optional box file (ours or the
reference's; the one look-up rule of `boxes.lookup`: sample id, path, content hash, file name) and a
sampling rule (all, first:N, random:N).

`LlavaDataset[i]` returns the processor's encoding (input_ids, labels, visual tensors) plus `id` and
`box_problems` (images the box file lacks, boxes that will be dropped), which check-data reports and
training counts per step; a sample that cannot be used raises `SampleError` with the reason. Paths may not
leave their root.

At the paper's scale (1.2M+ samples) records are not held parsed: `load_samples` returns a `SampleIndex`,
the byte spans of each source's records (`utils.records`) plus per-sample numpy arrays (length estimate,
image or not, id hash), and a `Sample` is parsed from disk when it is asked for. The arrays are flat
buffers, so DataLoader workers share them instead of copying a million dicts page by page.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..boxes.lookup import BoxLookup, ImageKey
from ..boxes.types import Boxes
from ..config import from_dict, read_yaml
from ..media.images import ImageError
from ..media.video import VideoError
from ..utils.io import JsonlError, read_jsonl
from ..utils.records import RecordFile, RecordFileError, cached_arrays, key_hash
from .config import DataConfig, DataSource
from .templates import IGNORE_INDEX, IMAGE_TOKEN, VIDEO_TOKEN


class SampleError(ValueError):
    """One unusable sample; the message starts with its id."""


@dataclass
class Sample:
    record: dict[str, Any]
    source: DataSource
    boxes: BoxLookup | None

    @property
    def id(self) -> str:
        return str(self.record.get("id", "?"))

    @property
    def images(self) -> list[str]:
        image = self.record.get("image")
        if image is None:
            return []
        return list(image) if isinstance(image, list) else [image]

    @property
    def video(self) -> str | None:
        return self.record.get("video")

    def length(self) -> int:
        """Cheap length estimate for length-grouped batching: words of the conversation plus visual rows."""
        return record_length(self.record)

    @property
    def is_multimodal(self) -> bool:
        return bool(self.images or self.video)


def record_length(record: Any) -> int:
    """`Sample.length` of a raw record (words of the conversation plus visual rows)."""
    if not isinstance(record, dict):
        return 0
    turns = record.get("conversations")
    words = (
        sum(len(str(t.get("value", ""))) // 4 for t in turns if isinstance(t, dict))
        if isinstance(turns, list)
        else 0
    )
    image = record.get("image")
    images = 0 if image is None else len(image) if isinstance(image, list) else 1
    return words + 600 * images + (600 * 8 if record.get("video") else 0)


def record_is_multimodal(record: Any) -> bool:
    return isinstance(record, dict) and bool(record.get("image") or record.get("video"))


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Records of a LLaVA JSON list or JSONL file; malformed files are an error naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {path}: no such file")
    if path.suffix == ".jsonl":
        try:
            return list(read_jsonl(path))
        except JsonlError as err:
            raise ValueError(str(err)) from err
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"data file {path}: not valid JSON (line {err.lineno}: {err.msg})") from err
    if not isinstance(data, list):
        raise ValueError(f"data file {path}: expected a JSON list of records, got {type(data).__name__}")
    return data


def _apply_rule(n: int, rule: str, seed: int) -> np.ndarray:
    """Positions (into a source's `n` records) that a sampling rule keeps, in order."""
    kind, _, count = rule.partition(":")
    if kind == "first":
        return np.arange(min(int(count), n), dtype=np.int64)
    if kind == "random":  # random.sample picks by position: the same records as sampling the records list
        return np.asarray(random.Random(seed).sample(range(n), min(int(count), n)), dtype=np.int64)
    return np.arange(n, dtype=np.int64)


@dataclass
class _SourceIndex:
    """One source's records on disk and the per-record facts the sampler and the skip list need."""

    source: DataSource
    records: RecordFile
    lengths: np.ndarray  # (n,) int32
    multimodal: np.ndarray  # (n,) bool
    id_hashes: np.ndarray  # (n,) int64, `key_hash(str(id))`

    @classmethod
    def scan(cls, source: DataSource, cache: Path | None = None) -> _SourceIndex:
        path = Path(source.path)
        if not path.is_file():
            raise FileNotFoundError(f"data file {path}: no such file")
        arrays = cached_arrays(path, "samples", lambda: _scan_source(path), cache)
        records = RecordFile(path, arrays["starts"], arrays["stops"])
        return cls(source, records, arrays["lengths"], arrays["multimodal"], arrays["id_hashes"])


def _scan_source(path: Path) -> dict[str, np.ndarray]:
    lengths: list[int] = []
    multimodal: list[bool] = []
    ids: list[int] = []

    def visit(_: int, record: Any) -> None:
        lengths.append(record_length(record))
        multimodal.append(record_is_multimodal(record))
        ids.append(key_hash(str(record.get("id", "?")) if isinstance(record, dict) else "?"))

    try:
        records = RecordFile.scan(path, visit)
    except RecordFileError as err:
        raise ValueError(str(err)) from err
    return {"starts": records.starts, "stops": records.stops, "lengths": np.asarray(lengths, dtype=np.int32),
            "multimodal": np.asarray(multimodal, dtype=bool), "id_hashes": np.asarray(ids, dtype=np.int64)}  # fmt: skip


class SampleIndex(Sequence[Sample]):
    """The samples of a data config, parsed from disk on access (`index[i]` is a `Sample`).

    `lengths` and `multimodal` are per-sample numpy arrays for the sampler; nothing else is held per sample
    but its source number and record number."""

    def __init__(self, sources: list[_SourceIndex], boxes: list[BoxLookup | None], which: np.ndarray,
                 rows: np.ndarray) -> None:  # fmt: skip
        self.sources, self.boxes = sources, boxes
        self.which, self.rows = which, rows  # (n,) source number and record number of each sample
        self.lengths = np.concatenate([s.lengths for s in sources])[self._flat()] if len(rows) else rows
        self.multimodal = np.concatenate([s.multimodal for s in sources])[self._flat()] if len(rows) else rows

    def _flat(self) -> np.ndarray:
        offsets = np.cumsum([0] + [len(s.records) for s in self.sources])[:-1]
        return offsets[self.which] + self.rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        k = int(self.which[index])
        record = self.sources[k].records.read(int(self.rows[index]))
        return Sample(
            record if isinstance(record, dict) else {"_raw": record}, self.sources[k].source, self.boxes[k]
        )

    def without(self, ids: set[str]) -> SampleIndex:
        """The samples whose id is not in `ids` (a check-data skip list)."""
        if not ids:
            return self
        skip = np.asarray([key_hash(i) for i in ids], dtype=np.int64)
        hashes = np.concatenate([s.id_hashes for s in self.sources])[self._flat()]
        keep = ~np.isin(hashes, skip)
        return SampleIndex(self.sources, self.boxes, self.which[keep], self.rows[keep])


def data_sources(config: DataConfig) -> list[DataSource]:
    """The config's sources and its mixture file's, in order."""
    sources = list(config.sources)
    if config.mixture:
        mixture = from_dict(DataConfig, read_yaml(config.mixture, "data"), "mixture")
        sources += mixture.sources
    if not sources:
        raise ValueError("no data sources: set data.sources or data.mixture")
    return sources


def scan_share(config: DataConfig, cache: Path, rank: int = 0, world: int = 1) -> None:
    """Scan this rank's share of the config's data and box files into `cache`: the largest file first, each
    to the rank with the fewest bytes so far, so that N ranks scan N files at once and `load_samples` then
    maps every scan (call it on every rank, then a barrier)."""
    files: dict[tuple[str, str], DataSource] = {}
    for source in data_sources(config):
        files.setdefault(("samples", source.path), source)
        if source.boxes:
            files.setdefault(("boxes", source.boxes), source)
    sizes = {key: Path(key[1]).stat().st_size if Path(key[1]).is_file() else 0 for key in files}
    loads = [0] * world
    for key in sorted(files, key=lambda k: -sizes[k]):
        owner = min(range(world), key=lambda r: loads[r])
        loads[owner] += sizes[key]
        if owner != rank:
            continue
        if key[0] == "samples":
            _SourceIndex.scan(files[key], cache)
        else:
            BoxLookup.on_disk(key[1], cache)


def load_samples(config: DataConfig, seed: int = 0, cache: Path | None = None) -> SampleIndex:
    """All samples of the config's sources (and its mixture file), in source order. With a `cache` folder
    the scans of the data and box files are kept there and mapped back by later calls (utils.records)."""
    sources = data_sources(config)
    indexed = [_SourceIndex.scan(source, cache) for source in sources]
    boxes = [BoxLookup.on_disk(source.boxes, cache) if source.boxes else None for source in sources]
    kept = [_apply_rule(len(s.records), s.source.sample, seed) for s in indexed]
    which = np.concatenate([np.full(len(rows), k, dtype=np.int32) for k, rows in enumerate(kept)])
    return SampleIndex(indexed, boxes, which, np.concatenate(kept))


def resolve_under(root: str | None, relative: str, sample_id: str) -> Path:
    """`root/relative`, refusing paths that leave `root` (no traversal via .. or absolute paths)."""
    base = Path(root or ".").resolve()
    path = (base / relative).resolve()
    if not path.is_relative_to(base):
        raise SampleError(f"{sample_id}: path {relative!r} leaves the data root {base}")
    return path


class LlavaDataset(torch.utils.data.Dataset):
    """Encodes samples with the processor; failures raise `SampleError` (see `SafeDataset`)."""

    def __init__(self, samples: Sequence[Sample], processor: Any) -> None:
        self.samples = samples
        self.processor = processor

    def __len__(self) -> int:
        return len(self.samples)

    def messages(self, sample: Sample) -> list[dict[str, Any]]:
        conversations = sample.record.get("conversations")
        if not isinstance(conversations, list) or not conversations:
            raise SampleError(f"{sample.id}: no conversations")
        return conversations

    def _visuals(self, sample: Sample) -> tuple[dict[str, Any], list[str], int]:
        """The processor's visual arguments, the box problems found, and how many images/videos the box
        file lacks."""
        images = [resolve_under(sample.source.image_root, p, sample.id) for p in sample.images]
        boxes, problems, missing = self._image_boxes(sample, images)
        out: dict[str, Any] = {"images": images, "boxes": boxes}
        if sample.video:
            root = sample.source.video_root or sample.source.image_root
            video = resolve_under(root, sample.video, sample.id)
            frames = sample.boxes.video([sample.id], sample.video) if sample.boxes else None
            if sample.boxes is not None and frames is None:
                problems.append(f"no boxes for this sample's video in {sample.source.boxes}")
                missing += 1
            out |= {"videos": [video], "video_boxes": [frames] if frames is not None else None}
        return out, problems, missing

    @staticmethod
    def _image_boxes(sample: Sample, images: list[Path]) -> tuple[list[Boxes | None] | None, list[str], int]:
        """Each image's boxes from the source's box file, what is wrong with them, and how many miss."""
        if sample.boxes is None or not images:
            return None, [], 0
        found = [
            sample.boxes.image(ImageKey.of(path, [sample.id], relative), single=len(images) == 1)
            for relative, path in zip(sample.images, images, strict=True)
        ]
        problems = [f"no boxes for this sample in {sample.source.boxes}" for b in found if b is None]
        problems += [p for b in found if b is not None for p in box_sanity(b)]
        missing = sum(b is None for b in found)
        return (found if any(b is not None for b in found) else None), problems, missing

    def encode(self, sample: Sample) -> dict[str, Any]:
        messages = self.messages(sample)
        try:
            visuals, box_problems, boxes_missing = self._visuals(sample)
        except SampleError:
            raise
        except ValueError as err:  # a malformed box record, parsed only now (boxes.ondisk)
            raise SampleError(f"{sample.id}: {err}") from err
        text = "".join(str(m.get("value", m.get("content", ""))) for m in messages)
        for tag, n in ((IMAGE_TOKEN, len(visuals["images"])), (VIDEO_TOKEN, len(visuals.get("videos", [])))):
            if text.count(tag) != n:
                raise SampleError(
                    f"{sample.id}: {text.count(tag)} {tag} tags but {n} {tag[1:-1]}s in the record"
                )
        try:
            encoded = self.processor.encode_conversation(messages, **visuals, truncation=True)
        except (ImageError, VideoError) as err:
            raise SampleError(f"{sample.id}: {err}") from err
        except ValueError as err:
            raise SampleError(f"{sample.id}: {err}") from err
        if all(label == IGNORE_INDEX for label in encoded["labels"]):
            raise SampleError(f"{sample.id}: no supervised token left after truncation")
        return {"id": sample.id, **encoded, "box_problems": box_problems, "boxes_missing": boxes_missing}

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.encode(self.samples[index])


class SafeDataset(torch.utils.data.Dataset):
    """Wraps `LlavaDataset`: a failing sample is replaced by the next usable one (deterministically, so all
    ranks and resumed runs see the same data) and the replacement is reported in `replaced`."""

    def __init__(self, dataset: LlavaDataset, max_tries: int = 32) -> None:
        self.dataset = dataset
        self.max_tries = max_tries

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        reasons = []
        for k in range(self.max_tries):
            try:
                item = self.dataset[(index + k) % len(self.dataset)]
            except SampleError as err:
                reasons.append(str(err))
                continue
            return {**item, "replaced": reasons[:1]}  # the sample asked for, if it had to be replaced
        raise SampleError(f"{self.max_tries} consecutive unusable samples from index {index}: {reasons[-3:]}")


def box_sanity(boxes: Boxes) -> list[str]:
    """Problems of one image's boxes that the processor will silently repair (by dropping boxes)."""
    xyxy, problems = boxes.xyxy, []
    if not torch.isfinite(xyxy).all() or ((xyxy[:, 2] < xyxy[:, 0]) | (xyxy[:, 3] < xyxy[:, 1])).any():
        problems.append("boxes with NaN/inf or inverted coordinates (they will be dropped)")
    if boxes.frame is not None and len(xyxy):
        width, height = boxes.frame
        if (xyxy[:, 0] > width).any() or (xyxy[:, 1] > height).any():
            problems.append("boxes outside their image frame (they will be dropped)")
    return problems
