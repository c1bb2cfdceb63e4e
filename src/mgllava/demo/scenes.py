"""The demo's scene benchmark: real easy-vqa shapes at three granularities on one canvas.

    canvas 192 x 192 (the demo model's high-res side), a 6 x 6 grid of 32 px cells (one CLIP patch of the
    84 px low-res view, one cell of the ConvNeXt's last stage):
      big shape   an easy-vqa shape scaled to 40-64 px, on its own background, in a 2 x 2 block of cells
      small shape an easy-vqa shape scaled down to 3-6 px, on a bare easy-vqa panel, in one cell
      stripe      a 1 px band cut from an easy-vqa shape, 16-28 px long, on a bare panel, in one cell
      clutter     bare easy-vqa panels (their shape painted out) in other cells
    the three colours differ, so no answer can be read off another object. The parts lie at fixed cells
    (`SceneSpec.big_cell`, `small_cell`, `stripe_cell`; their spot inside the cell is random): a 1M-parameter
    LLM trained for minutes has to learn which rows hold the answer, not also a visual search for the part.
    Even so, the baseline learns to read the big shape's rows only after ~400 stage-2 steps (README).

Questions, three kinds, asked of every scene and scored separately (`KINDS`):

    a  "What color is the big shape?"    large: the low-res view shows it
    b  "What color is the small shape?"  when the simulated detector found it: its object token holds it
    c  "What color is the small shape?"  when the detector missed it, and "What color is the stripe?"
                                          (not an object: never boxed): only the high-res view has them

In the paper's 768 px frame (x4) the big shape is a 160-256 px object and the small one 12-24 px, below
COCO's 32 px "small" bound; in the 84 px low-res view the small shape is 1.3-2.6 px and the stripe under
half a pixel wide. Boxes come from `detector.DetectorModel`, never from the answers.

Deterministic from a seed; the train split uses only easy-vqa's train images and the test split only its
test images, so the splits share no source image (`check.py` verifies it by file content).
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..boxes.files import sha256_file
from ..utils.io import atomic_write_json, atomic_write_text
from .annotations import Annotation, annotate
from .detector import DetectorModel, SceneObject, is_found

QUESTIONS = {
    "big": "What color is the big shape?",
    "small": "What color is the small shape?",
    "stripe": "What color is the stripe?",
}
KINDS = {
    "a": "large shape: visible at low resolution",
    "b": "small shape the detector found: an object token holds it",
    "c": "small shape the detector missed, or a stripe: only the high-res view has it",
}
CHANCE = 100 / 8  # eight colours
SHORT_SUFFIX = "Answer the question using a single word or phrase."


@dataclass(frozen=True)
class SceneSpec:
    grid: int = 6  # cells per side
    cell: int = 32  # pixels per cell
    clutter: int = 4  # bare panels in other cells
    big_side: tuple[int, int] = (40, 64)  # the big shape's longer side, px
    small_side: tuple[int, int] = (3, 6)  # the small shape's longer side, px
    stripe_length: tuple[int, int] = (16, 28)
    stripe_width: int = 1
    # Where the parts lie (cells, x then y): fixed, so that a 1M-parameter LLM trained for a minute has to
    # learn which token holds the answer, not a visual search for the part (see the module docstring).
    big_cell: tuple[int, int] = (1, 1)
    small_cell: tuple[int, int] = (4, 1)
    stripe_cell: tuple[int, int] = (1, 4)
    train_turns: int = 3  # questions per training conversation (random parts, random order); test asks all
    layout: str = "combined"  # combined: all three parts, three questions; separate: one part per scene
    detector: DetectorModel = field(default_factory=DetectorModel)

    @property
    def side(self) -> int:
        return self.grid * self.cell


@dataclass(frozen=True)
class Placed:
    """A source annotation placed on the canvas at `box` (canvas pixels)."""

    source: Annotation
    box: tuple[float, float, float, float]


@dataclass
class Scene:
    scene_id: str
    image: Image.Image
    big: Placed
    small: Placed
    stripe: Placed
    clutter: list[int]  # easy-vqa ids of the bare panels
    shown: tuple[str, ...] = ("big", "small", "stripe")

    @property
    def sources(self) -> list[int]:
        return [
            self.big.source.image_id,
            self.small.source.image_id,
            self.stripe.source.image_id,
            *self.clutter,
        ]

    def objects(self) -> list[SceneObject]:
        """What a detector could box: the two shapes (a stripe is not an object)."""
        return [
            SceneObject(getattr(self, p).source.shape, getattr(self, p).box)
            for p in ("big", "small")
            if p in self.shown
        ]


def easy_vqa_split(split: str) -> tuple[list[Annotation], dict[int, str], int]:
    """(annotated images, image paths, number of images left unannotated) of an easy-vqa split."""
    import easy_vqa

    if split not in ("train", "test"):
        raise ValueError(f"easy-vqa split must be train or test, got {split!r}")
    questions = easy_vqa.get_train_questions() if split == "train" else easy_vqa.get_test_questions()
    paths = easy_vqa.get_train_image_paths() if split == "train" else easy_vqa.get_test_image_paths()
    pool, dropped = annotate(*questions)
    return pool, paths, dropped


def _background_mask(image: Image.Image) -> np.ndarray:
    arr = np.asarray(image.convert("RGB"), dtype=np.int16)
    return np.abs(arr - arr[0, 0]).sum(-1) <= 30


def shape_box(image: Image.Image) -> list[float]:
    """The box of the pixels that differ from the background (the corner colour)."""
    ys, xs = np.nonzero(~_background_mask(image))
    if len(xs) == 0:
        return [0.0, 0.0, float(image.width), float(image.height)]
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


def bare(image: Image.Image) -> Image.Image:
    """The image with its shape painted in its background colour."""
    arr = np.asarray(image.convert("RGB")).copy()
    arr[~_background_mask(image)] = arr[0, 0]
    return Image.fromarray(arr)


class Composer:
    """Draws scenes of one easy-vqa split; images are read once and kept."""

    def __init__(self, pool: list[Annotation], paths: dict[int, str], spec: SceneSpec) -> None:
        self.pool, self.paths, self.spec = pool, paths, spec
        self._images: dict[int, Image.Image] = {}

    def image(self, annotation: Annotation) -> Image.Image:
        if annotation.image_id not in self._images:
            self._images[annotation.image_id] = Image.open(self.paths[annotation.image_id]).convert("RGB")
        return self._images[annotation.image_id]

    def panel(self, annotation: Annotation, size: int) -> Image.Image:
        return bare(self.image(annotation)).resize((size, size), Image.BOX)

    def compose(
        self, rng: random.Random, scene_id: str, shown: tuple[str, ...] = ("big", "small", "stripe")
    ) -> Scene:
        spec, cell = self.spec, self.spec.cell
        big_src, small_src, stripe_src = self._three_colours(rng)
        block = spec.big_cell  # top-left cell of the 2 x 2 block
        taken = {(block[0] + dx, block[1] + dy) for dx in (0, 1) for dy in (0, 1)} | {
            spec.small_cell,
            spec.stripe_cell,
        }
        free = [(x, y) for y in range(spec.grid) for x in range(spec.grid) if (x, y) not in taken]
        cells = [spec.small_cell, spec.stripe_cell, *rng.sample(free, spec.clutter)]
        canvas = Image.new("RGB", (spec.side, spec.side), (255, 255, 255))
        blank = Image.new("RGB", canvas.size)
        big = self._big(rng, canvas if "big" in shown else blank, big_src, block)
        small = self._small(rng, canvas if "small" in shown else blank, small_src, cells[0])
        stripe = self._stripe(rng, canvas if "stripe" in shown else blank, stripe_src, cells[1])
        clutter = rng.sample(self.pool, spec.clutter)
        for annotation, (x, y) in zip(clutter, cells[2:], strict=True):
            canvas.paste(self.panel(annotation, cell), (x * cell, y * cell))
        return Scene(scene_id, canvas, big, small, stripe, [a.image_id for a in clutter], shown)

    def _three_colours(self, rng: random.Random) -> tuple[Annotation, Annotation, Annotation]:
        while True:
            picks = rng.sample(self.pool, 3)
            if len({a.color for a in picks}) == 3:
                return picks[0], picks[1], picks[2]

    def _shape_crop(self, annotation: Annotation, longer: int) -> Image.Image:
        image = self.image(annotation)
        box = shape_box(image)
        crop = image.crop(tuple(int(v) for v in box))
        scale = longer / max(crop.width, crop.height)
        return crop.resize((max(1, round(crop.width * scale)), max(1, round(crop.height * scale))), Image.BOX)

    def _big(
        self, rng: random.Random, canvas: Image.Image, src: Annotation, block: tuple[int, int]
    ) -> Placed:
        """The shape at 40-64 px on its own background, filling a 2 x 2 block of cells."""
        size = 2 * self.spec.cell
        image = self.image(src)
        box = shape_box(image)
        scale = rng.randint(*self.spec.big_side) / max(box[2] - box[0], box[3] - box[1])
        grown = image.resize((round(image.width * scale), round(image.height * scale)), Image.BICUBIC)
        cx, cy = (box[0] + box[2]) / 2 * scale, (box[1] + box[3]) / 2 * scale
        left = int(min(max(cx - size / 2, 0), grown.width - size))
        top = int(min(max(cy - size / 2, 0), grown.height - size))
        x0, y0 = block[0] * self.spec.cell, block[1] * self.spec.cell
        window = grown.crop((left, top, left + size, top + size))
        canvas.paste(window, (x0, y0))
        sb = shape_box(window)
        return Placed(src, (x0 + sb[0], y0 + sb[1], x0 + sb[2], y0 + sb[3]))

    def _small(
        self, rng: random.Random, canvas: Image.Image, src: Annotation, cell: tuple[int, int]
    ) -> Placed:
        """The shape shrunk to 3-6 px at a random spot of a bare panel of its own image."""
        c = self.spec.cell
        x0, y0 = cell[0] * c, cell[1] * c
        canvas.paste(self.panel(src, c), (x0, y0))
        shape = self._shape_crop(src, rng.randint(*self.spec.small_side))
        px, py = x0 + rng.randint(1, c - shape.width - 1), y0 + rng.randint(1, c - shape.height - 1)
        mask = Image.fromarray((~_background_mask(shape)).astype(np.uint8) * 255)
        canvas.paste(shape, (px, py), mask if mask.getbbox() else None)
        return Placed(src, (px, py, px + shape.width, py + shape.height))

    def _stripe(
        self, rng: random.Random, canvas: Image.Image, src: Annotation, cell: tuple[int, int]
    ) -> Placed:
        """A band of the shape's own pixels (its middle row, edges left out), 1 px wide, on a bare panel."""
        c, spec = self.spec.cell, self.spec
        x0, y0 = cell[0] * c, cell[1] * c
        canvas.paste(self.panel(src, c), (x0, y0))
        image = self.image(src)
        inside = ~_background_mask(image)
        _, y1, _, y2 = (int(v) for v in shape_box(image))
        row = (y1 + y2) // 2
        xs = np.nonzero(inside[row])[0]
        band = np.asarray(image)[
            row : row + 1, xs.min() + 1 : xs.max()
        ]  # (1, w, 3), antialiased ends dropped
        length = rng.randint(*spec.stripe_length)
        stripe = Image.fromarray(band).resize((length, spec.stripe_width), Image.NEAREST)
        if rng.random() < 0.5:
            stripe = stripe.transpose(Image.Transpose.TRANSPOSE)
        px, py = x0 + rng.randint(1, c - stripe.width - 1), y0 + rng.randint(1, c - stripe.height - 1)
        canvas.paste(stripe, (px, py))
        return Placed(src, (px, py, px + stripe.width, py + stripe.height))


def questions(scene: Scene, boxes: dict[str, Any], detector: DetectorModel) -> list[dict[str, str]]:
    """The scene's three questions with their kind (b or c for the small shape: did the detector find it?)."""
    found = is_found(scene.small.box, boxes, detector.min_iou)
    return [
        {"part": "big", "kind": "a", "question": QUESTIONS["big"], "answer": scene.big.source.color},
        {"part": "small", "kind": "b" if found else "c", "question": QUESTIONS["small"],
         "answer": scene.small.source.color},
        {"part": "stripe", "kind": "c", "question": QUESTIONS["stripe"], "answer": scene.stripe.source.color},
    ]  # fmt: skip


def caption(scene: Scene) -> str:
    big, small = scene.big.source, scene.small.source
    return f"A big {big.color} {big.shape}, a small {small.color} {small.shape} and a {scene.stripe.source.color} stripe."


def build_split(split: str, n: int, out: Path, spec: SceneSpec, seed: int) -> dict[str, Any]:
    """Write `n` scenes of an easy-vqa split under `out`:

        images/<id>.png     the canvases
        captions.json       stage-1 pairs (LLaVA format): the scene described
        qa.json             stage-2 samples (LLaVA format): the three questions as three turns in a random
                            order, with each turn's kind and the source ids, for the checks
        test.jsonl          one line per question in the evaluation harness's short-answer format;
                            `category` = the kind, `part` = which object it asks about
        boxes.jsonl         the simulated detector's boxes; boxes-coco80.jsonl the fixed-list simulation
        scenes.jsonl        every placed object's source and true box (for the checks and the chat example)

    Returns a summary: counts per kind, the answer distribution, and the easy-vqa images left unannotated.
    """
    pool, paths, dropped = easy_vqa_split(split)
    composer = Composer(pool, paths, spec)
    rng, box_rng = random.Random(f"{seed}-{split}"), random.Random(f"{seed}-{split}-boxes")
    (out / "images").mkdir(parents=True, exist_ok=True)
    captions, qa, short, boxes, coco, layout = [], [], [], [], [], []
    for index in range(n):
        shown = (
            (("big", "small", "stripe")[index % 3],)
            if spec.layout == "separate"
            else ("big", "small", "stripe")
        )
        scene = composer.compose(rng, f"{split}-{index:05d}", shown)
        name = f"{scene.scene_id}.png"
        scene.image.save(out / "images" / name)
        key = {"id": scene.scene_id, "image": name, "sha256": sha256_file(out / "images" / name)}
        state = box_rng.getstate()
        found = spec.detector.detect(box_rng, scene.objects(), spec.side, "open")
        box_rng.setstate(state)  # both box files draw the same detector noise
        coco.append({**key, **spec.detector.detect(box_rng, scene.objects(), spec.side, "coco80")})
        boxes.append({**key, **found})
        asked = questions(scene, found, spec.detector)
        asked = [q for q in asked if q["part"] in shown]
        captions.append(
            _record(f"{scene.scene_id}-cap", name, [("Describe the image briefly.", caption(scene))])
        )
        turns = rng.sample(asked, len(asked))[: spec.train_turns if split == "train" else None]
        qa.append({**_record(scene.scene_id, name, [(f"{q['question']}\n{SHORT_SUFFIX}", q["answer"]) for q in turns]),
                   "parts": [q["part"] for q in turns], "kinds": [q["kind"] for q in turns]})  # fmt: skip
        for q in asked:
            short.append({"id": f"{scene.scene_id}-{q['part']}", "image": name, "question": q["question"],
                          "answers": [q["answer"]], "category": q["kind"], "part": q["part"]})  # fmt: skip
        layout.append({"id": scene.scene_id, "sources": {p: asdict(getattr(scene, p).source) for p in QUESTIONS},
                       "boxes": {p: list(getattr(scene, p).box) for p in QUESTIONS}, "clutter": scene.clutter})  # fmt: skip
    atomic_write_json(out / "captions.json", captions, indent=None)
    atomic_write_json(out / "qa.json", qa, indent=None)
    atomic_write_text(out / "test.jsonl", _jsonl(short))
    atomic_write_text(out / "boxes.jsonl", _jsonl(boxes))
    atomic_write_text(out / "boxes-coco80.jsonl", _jsonl(coco))
    atomic_write_text(out / "scenes.jsonl", _jsonl(layout))
    kinds = [q["category"] for q in short]
    answers = [q["answers"][0] for q in short]
    return {"split": split, "scenes": n, "questions": {k: kinds.count(k) for k in KINDS},
            "answers": {c: answers.count(c) for c in sorted(set(answers))},
            "annotated_images": len(pool), "unannotated_images": dropped}  # fmt: skip


def _jsonl(records: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


def _record(sample_id: str, image: str, turns: list[tuple[str, str]]) -> dict[str, Any]:
    conversations = []
    for k, (prompt, answer) in enumerate(turns):
        conversations.append({"from": "human", "value": f"<image>\n{prompt}" if k == 0 else prompt})
        conversations.append({"from": "gpt", "value": answer})
    return {"id": sample_id, "image": image, "conversations": conversations}
