"""A simulated open-vocabulary detector for the demo's scenes: boxes with OWLv2's failure modes, stated.

MG-LLaVA takes its object boxes from OWLv2 (docs/design.md section 7). No OWLv2 weights exist on the demo's
machine, so the demo simulates what OWLv2 gives on its scenes from the scenes' true object boxes, with the
detector's known weaknesses made explicit and adjustable (`DetectorModel`):

- **recall falls with object size.** OWLv2 (Minderer et al. 2023, arXiv 2306.09683) predicts one box per
  14 px patch token of a 960 px input, and like every detector evaluated on COCO and LVIS its average
  precision on small objects (COCO's rule: area below 32 x 32 px) is a fraction of its precision on
  large ones. Sizes here are read in the paper's 768 px high-res frame (`frame_scale` = 768 / the demo's
  192 px), so the demo's 3-6 px shapes are 12-24 px objects: "small". Recall at the score threshold
  (0.2, the reference's) is `large_recall` for objects of at least `large_side` px and falls linearly to
  `small_recall` at `small_side` px and below.
- **boxes are noisy.** Each edge of a found box moves by a normal draw with a standard deviation of
  `box_noise` x the box's side (0.1: a typical matched box keeps an IoU around 0.7-0.8 with the truth).
- **false positives.** A Poisson number (mean `false_positives` per image) of spurious boxes, 4-24 px,
  anywhere on the canvas, with low scores and a random shape label.
- **not everything is an object.** Only the listed objects can be found; a stripe is not one.

These rates are our model of that behaviour, chosen, not measured: there is no OWLv2 here to measure.
Scores: found large objects 0.5-0.95, found small ones 0.2-0.6, false positives 0.2-0.35 (above the 0.2
threshold, below most true boxes), as OWLv2's sigmoid scores rank true large objects first.

With `vocabulary="coco80"` the detector is prompted with the 80 COCO names (the paper's fixed-list
ablation): of the easy-vqa shapes only a circle has a COCO name ("sports ball"), so only circles are found.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

COCO80_NAMES = {"circle": "sports ball"}  # the only easy-vqa shape a COCO-80 vocabulary can name
SHAPE_NAMES = ("circle", "rectangle", "triangle")


@dataclass(frozen=True)
class SceneObject:
    """One detectable object of a scene: its true box (canvas pixels) and its open-vocabulary name."""

    name: str
    box: tuple[float, float, float, float]

    @property
    def side(self) -> float:
        return max(self.box[2] - self.box[0], self.box[3] - self.box[1])


@dataclass(frozen=True)
class DetectorModel:
    large_recall: float = 0.95
    small_recall: float = 0.45
    large_side: float = 96.0  # px in the 768 frame: COCO's "large" starts here
    small_side: float = 16.0  # px in the 768 frame: at and below this, recall is `small_recall`
    frame_scale: float = 4.0  # the paper's 768 px frame / the demo's 192 px canvas
    box_noise: float = 0.1  # std of each edge's shift, as a fraction of the box side
    false_positives: float = 0.3  # mean spurious boxes per image (Poisson)
    min_iou: float = 0.5  # a box "finds" an object when their IoU reaches this (the usual match rule)

    def recall(self, side: float) -> float:
        """Chance of finding an object whose longer side is `side` canvas pixels."""
        s = side * self.frame_scale
        if s >= self.large_side:
            return self.large_recall
        if s <= self.small_side:
            return self.small_recall
        t = (s - self.small_side) / (self.large_side - self.small_side)
        return self.small_recall + t * (self.large_recall - self.small_recall)

    def detect(
        self, rng: random.Random, objects: list[SceneObject], side: int, vocabulary: str = "open"
    ) -> dict[str, Any]:
        """Boxes, scores and labels for one scene (score-sorted), as a box file record holds them."""
        found: list[tuple[list[float], float, str]] = []
        for obj in objects:
            name = obj.name if vocabulary == "open" else COCO80_NAMES.get(obj.name)
            hit = rng.random() < self.recall(obj.side)  # drawn for every object: both vocabularies agree
            noisy = self._jitter(rng, obj.box, side)
            large = obj.side * self.frame_scale >= self.large_side
            score = rng.uniform(0.5, 0.95) if large else rng.uniform(0.2, 0.6)
            if hit and name is not None:
                found.append((noisy, score, name))
        for _ in range(_poisson(rng, self.false_positives)):
            size = rng.uniform(4, 24)
            x, y = rng.uniform(0, side - size), rng.uniform(0, side - size)
            label = rng.choice(SHAPE_NAMES)
            score = rng.uniform(0.2, 0.35)
            name = label if vocabulary == "open" else COCO80_NAMES.get(label)
            if name is not None:
                found.append(([x, y, x + size, y + size], score, name))
        found.sort(key=lambda f: -f[1])
        return {
            "boxes": [[round(v, 1) for v in b] for b, _, _ in found],
            "scores": [round(s, 3) for _, s, _ in found],
            "labels": [n for _, _, n in found],
        }

    def _jitter(self, rng: random.Random, box: tuple[float, ...], side: int) -> list[float]:
        x1, y1, x2, y2 = box
        sigma = self.box_noise * max(x2 - x1, y2 - y1)
        x1, x2 = sorted((x1 + rng.gauss(0, sigma), x2 + rng.gauss(0, sigma)))
        y1, y2 = sorted((y1 + rng.gauss(0, sigma), y2 + rng.gauss(0, sigma)))
        x1, y1 = min(max(x1, 0.0), side - 1.0), min(max(y1, 0.0), side - 1.0)
        return [x1, y1, min(max(x2, x1 + 1.0), float(side)), min(max(y2, y1 + 1.0), float(side))]


def iou(a: list[float] | tuple[float, ...], b: list[float] | tuple[float, ...]) -> float:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    if w <= 0 or h <= 0:
        return 0.0
    inter = w * h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def is_found(box: tuple[float, ...], record: dict[str, Any], min_iou: float) -> bool:
    """Whether a box of the record matches the object at `box` (IoU >= min_iou)."""
    return any(iou(box, b) >= min_iou for b in record["boxes"])


def _poisson(rng: random.Random, mean: float) -> int:
    """Knuth's draw: the number of unit-rate arrivals before exp(-mean) (small means only)."""
    limit, k, p = math.exp(-mean), 0, rng.random()
    while p > limit:
        k += 1
        p *= rng.random()
    return k
