"""The box job behind `mgllava boxes`: unique images -> tags -> OWLv2 boxes -> one JSONL box file.

    scan input (inputs.py) -> shard over ranks (items[rank::world]) -> per rank, in batches:
      read + hash + decode (torch DataLoader, optional workers) -> tagger -> detector -> append to the part file
    barrier -> rank 0 merges all part files into `out` in input order (atomic), optional reference JSON

Resumable: records are appended and flushed one line at a time (`JsonlWriter`); on restart every image
already in `out` or in any part file (of any world size) is skipped, and a torn last line is dropped, so a
SIGKILL at any point loses at most the batch in flight and duplicates nothing. The merge streams records
by file offset, so memory does not grow with the size of the box file. The merged file has one
record per unique image in the input's order, whatever the number of ranks (records already in `out` for
images no longer in the input are kept at its end). Unreadable images (missing, corrupt, truncated,
zero-size, too many pixels, outside the image root, bad base64) get a record with an `error` and are
counted in the summary; they never stop the run. `retry_errors` reads those images again on a rerun
(e.g. after a missing mount is back); a record with boxes then replaces the error record.

Numbers are written rounded: box coordinates to 0.01 px, scores to 1e-4.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import torch
from PIL import Image
from tqdm import tqdm

from ..media.images import DEFAULT_MAX_PIXELS, ImageError, load_image
from ..utils import dist
from ..utils.hashing import sha256_bytes, sha256_file
from ..utils.io import JsonlWriter, atomic_open, jsonl_spans
from .detector import Owlv2Detector
from .files import BoxRecord, to_reference_json
from .inputs import ImageItem, Scan, scan_input
from .taggers import Tagger

logger = logging.getLogger(__name__)


@dataclass
class BoxJob:
    input: Path
    out: Path
    image_root: Path | None = None
    batch_size: int = 4
    workers: int = 0
    max_image_pixels: int | None = DEFAULT_MAX_PIXELS
    apply_exif: bool = True
    reference_json: Path | None = None
    progress: bool = True
    retry_errors: bool = False  # read again the images whose records hold an error

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        if self.out.suffix != ".jsonl":
            raise ValueError(
                f"box file {self.out}: must end in .jsonl (use --reference-json for the JSON form)"
            )


@dataclass
class BoxSummary:
    images: int = 0
    samples: int = 0
    with_boxes: int = 0
    boxes: int = 0
    no_boxes: int = 0
    no_tags: int = 0
    errors: Counter = field(default_factory=Counter)
    skipped: dict[str, int] = field(default_factory=dict)
    already_done: int = 0
    processed: int = 0
    seconds: float = 0.0

    def count(self, record: dict[str, Any]) -> None:
        if "error" in record:
            self.errors[error_kind(record["error"])] += 1
        elif record.get("boxes"):
            self.with_boxes += 1
            self.boxes += len(record["boxes"])
        else:
            self.no_boxes += 1
            self.no_tags += not record.get("tags")

    def lines(self) -> list[str]:
        rate = self.processed / self.seconds if self.seconds > 0 else 0.0
        out = [
            f"{self.images} images from {self.samples} samples: {self.with_boxes} with boxes, {self.no_boxes} "
            f"without ({self.no_tags} had no tags), {sum(self.errors.values())} unreadable; {self.boxes} boxes",
            f"this run: {self.processed} images in {self.seconds:.1f} s ({rate:.2f} images/s), "
            f"{self.already_done} already done",
        ]
        out += [f"skipped {n} {reason} samples" for reason, n in sorted(self.skipped.items())]
        out += [f"unreadable x{n}: {reason}" for reason, n in self.errors.most_common()]
        return out


def error_kind(message: str) -> str:
    """ "image 'x.jpg': not a readable image (details)" -> "not a readable image": the summary's grouping."""
    return re.sub(r"\d+", "N", message.split(": ", 1)[-1].split(" (", 1)[0])


def record_key(record: dict[str, Any]) -> str:
    return record["image"] if record.get("image") else "sha256:" + record["sha256"]


def part_path(out: Path, rank: int, world: int) -> Path:
    return out.with_name(f"{out.name}.rank{rank}-of-{world}.part")


def _parts(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f"{out.name}.rank*-of-*.part"))


@dataclass(frozen=True)
class _Line:
    path: Path
    offset: int
    error: bool


def _index(out: Path) -> dict[str, _Line]:
    """Where each image's record is on disk: `out` first, then every part file. The first record of an
    image wins, except that a record with boxes replaces one with an error. Only positions are kept, so
    a box file of a million images costs little memory; a torn last line (a kill mid-write) is skipped."""
    found: dict[str, _Line] = {}
    for path in [out, *_parts(out)]:
        if not path.is_file():
            continue
        for _, start, _, record in jsonl_spans(path, allow_torn_tail=True):
            key, error = record_key(record), "error" in record
            if key not in found or (found[key].error and not error):
                found[key] = _Line(path, start, error)
    return found


class _Reader(torch.utils.data.Dataset):
    """Item -> (item, RGB image or None, sha256 or None, error or None); never raises for a bad image."""

    def __init__(self, items: list[ImageItem], max_pixels: int | None, apply_exif: bool) -> None:
        self.items, self.max_pixels, self.apply_exif = items, max_pixels, apply_exif

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[ImageItem, Image.Image | None, str | None, str | None]:
        item = self.items[i]
        if item.error is not None:
            return item, None, item.sha256, item.error
        digest = item.sha256
        try:
            if digest is None and isinstance(item.source, bytes):
                digest = sha256_bytes(item.source)
            elif digest is None and Path(item.source).is_file():
                digest = sha256_file(item.source)
            return item, load_image(item.source, self.max_pixels, self.apply_exif), digest, None
        except (ImageError, OSError) as err:
            return item, None, digest, str(err)


def _rounded(record: dict[str, Any]) -> dict[str, Any]:
    if "boxes" in record:
        record["boxes"] = [[round(v, 2) + 0.0 for v in box] for box in record["boxes"]]  # + 0.0: no "-0.0"
        record["scores"] = [round(v, 4) for v in record["scores"]]
    return record


def _records(batch, tagger: Tagger | None, detector: Owlv2Detector) -> list[dict[str, Any]]:
    good = [(item, image, digest) for item, image, digest, error in batch if error is None]
    images = [image for _, image, _ in good]
    if tagger is None:  # the samples' own tags
        tags = [item.tags or [] for item, _, _ in good]
    else:
        tags = tagger.tags(images) if images else []
    found = iter(zip(tags, detector.detect(images, tags), strict=True))
    out = []
    for item, _, digest, error in batch:
        record = BoxRecord(id=None, ids=item.ids, image=item.path, sha256=digest)
        if error is not None:
            record.error = error
        else:
            record.tags, record.boxes = next(found)
        out.append(_rounded(record.to_json()))
    return out


def _process(
    job: BoxJob, items: list[ImageItem], tagger: Tagger | None, detector: Owlv2Detector, info
) -> int:
    loader = torch.utils.data.DataLoader(
        _Reader(items, job.max_image_pixels, job.apply_exif),
        batch_size=job.batch_size,
        num_workers=job.workers,
        collate_fn=list,
    )
    bar = tqdm(total=len(items), unit="img", desc="boxes", disable=not (job.progress and info.is_main))
    errors = 0
    with JsonlWriter(part_path(job.out, info.rank, info.world_size), key=record_key) as writer, bar:
        for batch in loader:
            for record in _records(batch, tagger, detector):
                writer.write(record)
                errors += "error" in record
            bar.update(len(batch))
            bar.set_postfix(unreadable=errors)
    return len(items)


def _records_in_order(found: dict[str, _Line], order: list[str]) -> Iterator[bytes]:
    handles: dict[Path, BinaryIO] = {}
    try:
        for key in order:
            where = found[key]
            handle = handles.get(where.path) or handles.setdefault(where.path, where.path.open("rb"))
            handle.seek(where.offset)
            line = handle.readline()
            yield line if line.endswith(b"\n") else line + b"\n"
    finally:
        for handle in handles.values():
            handle.close()


def _merge(job: BoxJob, scan: Scan, summary: BoxSummary) -> None:
    """Rank 0: every record, input order first, into `out` (and the reference JSON), streamed."""
    found = _index(job.out)
    missing = [item.key for item in scan.items if item.key not in found]
    if missing:
        raise RuntimeError(
            f"box file {job.out}: {len(missing)} images have no record after all ranks finished "
            f"(first: {missing[0]!r}); run the same command again to finish them"
        )
    keys = {item.key for item in scan.items}
    order = [item.key for item in scan.items] + [key for key in found if key not in keys]
    with ExitStack() as stack:
        out = stack.enter_context(atomic_open(job.out, "wb"))
        ref = stack.enter_context(atomic_open(job.reference_json, "wb")) if job.reference_json else None
        separator = b"["
        for key, line in zip(order, _records_in_order(found, order), strict=True):
            out.write(line)
            record = json.loads(line)
            if key in keys:
                summary.count(record)
            for entry in to_reference_json([BoxRecord.from_json(record)]) if ref else []:
                ref.write(separator + json.dumps(entry, ensure_ascii=False).encode())
                separator = b", "
        if ref is not None:
            ref.write(b"[]\n" if separator == b"[" else b"]\n")
    for part in _parts(job.out):
        part.unlink()


def run_boxes(job: BoxJob, tagger: Tagger | None, detector: Owlv2Detector) -> BoxSummary | None:
    """Run (or resume) the job on this rank; rank 0 returns the summary, other ranks None.
    `tagger=None` uses each sample's own `tags`."""
    info = dist.init()
    start = time.perf_counter()
    scan = scan_input(job.input, job.image_root)
    done = {key for key, line in _index(job.out).items() if not (job.retry_errors and line.error)}
    todo = [item for item in dist.shard(scan.items, info.rank, info.world_size) if item.key not in done]
    logger.info("rank %d: %d images to do, %d of all %d already in %s", info.rank, len(todo), len(done),
                len(scan.items), job.out)  # fmt: skip
    processed = _process(job, todo, tagger, detector, info)
    counts = dist.gather_objects(processed)
    dist.barrier()
    if not info.is_main:
        return None
    summary = BoxSummary(images=len(scan.items), samples=scan.samples, skipped=dict(scan.skipped))
    _merge(job, scan, summary)
    summary.already_done = sum(1 for item in scan.items if item.key in done)
    summary.processed, summary.seconds = sum(counts), time.perf_counter() - start
    return summary
