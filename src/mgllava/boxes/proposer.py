"""`BoxProposer`: boxes for images given without any, at inference time - the one proposer type, with the one
cache, that the image processor, the engine, chat, serve and evaluation share.

For each image, in order:
1. a box file (`lookup`, a `BoxLookup`: by sample id, path, content hash or file name, docs/design.md
   section 7);
2. the in-memory LRU of earlier detections, keyed by content: the sha256 of the encoded file when the
   image came as a path or bytes (the hash box files store), else of the decoded pixels;
3. tagger then detector, batched over the images still missing; the result enters the LRU.
Without a detector, an image the box file lacks gets no boxes (None) and is counted as missing by the
lookup. Each proposal says where it came from (`Proposal.source`: "box_file", "detector" or "missing").

Attach it to a processor with `processor.proposer = proposer`, or give it to
`inference.Engine`: images whose boxes are not given (None) get proposals; `boxes=[]` for an image still
means "no boxes". The proposer is runtime state: `save_pretrained` leaves it out. Thread-safe.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from PIL import Image

from ..utils.hashing import pixels_sha256
from .lookup import BoxLookup, ImageKey
from .taggers import Tagger
from .types import Boxes


class Detector(Protocol):
    def detect(self, images: list[Image.Image], tags: list[list[str]]) -> list[Boxes]: ...


@dataclass
class Proposal:
    boxes: Boxes | None  # in the image's original pixels; None: nothing found
    source: str  # "box_file", "detector" (or its cache) or "missing"


def content_key(key: ImageKey, rgb: Image.Image) -> str:
    """sha256 of the encoded file when known, else of the decoded RGB pixels."""
    if key.sha256 is not None:
        return key.sha256
    return "pixels:" + pixels_sha256(rgb)


class BoxProposer:
    def __init__(
        self,
        tagger: Tagger | None = None,
        detector: Detector | None = None,
        lookup: BoxLookup | None = None,
        cache_size: int = 1024,
    ) -> None:
        if detector is None and lookup is None:
            raise ValueError("a BoxProposer needs a detector, a box file, or both")
        if (tagger is None) != (detector is None):
            raise ValueError("a detector needs a tagger (its text queries), and a tagger a detector")
        self.tagger = tagger
        self.detector = detector
        self.lookup = lookup
        self.cache_size = cache_size
        self._cache: OrderedDict[str, Boxes] = OrderedDict()
        self._lock = threading.Lock()
        self.stats = {"file": 0, "cache": 0, "detected": 0}

    def __deepcopy__(self, memo: dict) -> BoxProposer:
        # shared, not copied: `save_pretrained` deep-copies processors, and a proposer holds models
        return self

    def propose(self, keys: Sequence[ImageKey], images: Sequence[Image.Image]) -> list[Proposal]:
        """One proposal per RGB image (boxes in its original pixels)."""
        with self._lock:
            out: list[Proposal | None] = [self._known(key) for key in keys]
            missing: dict[str, list[int]] = {}
            for i, found in enumerate(out):
                if found is None:
                    cache_key = content_key(keys[i], images[i])
                    if cache_key in self._cache:
                        self._cache.move_to_end(cache_key)
                        self.stats["cache"] += 1
                        out[i] = Proposal(self._cache[cache_key], "detector")
                    else:  # the same picture twice in a batch is detected once
                        missing.setdefault(cache_key, []).append(i)
            if missing:
                self._detect(missing, images, out)
        return out  # type: ignore[return-value]

    def __call__(self, sources: Sequence[Any], images: Sequence[Image.Image]) -> list[Boxes | None]:
        """The image processor's interface: sources (paths, bytes or images) and their decoded RGB images."""
        return [p.boxes for p in self.propose([ImageKey.of(s) for s in sources], images)]

    def _known(self, key: ImageKey) -> Proposal | None:
        if self.lookup is None:
            return None
        found = self.lookup.image(key)
        if found is not None:
            self.stats["file"] += 1
            return Proposal(found, "box_file")
        return None if self.detector is not None else Proposal(None, "missing")

    def _detect(self, missing: dict[str, list[int]], images: Sequence[Image.Image], out: list) -> None:
        todo = [images[rows[0]] for rows in missing.values()]
        detections = self.detector.detect(todo, self.tagger.tags(todo))
        self.stats["detected"] += len(todo)
        for (cache_key, rows), boxes in zip(missing.items(), detections, strict=True):
            self._cache[cache_key] = boxes
            self._cache.move_to_end(cache_key)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
            for i in rows:
                out[i] = Proposal(boxes, "detector")
