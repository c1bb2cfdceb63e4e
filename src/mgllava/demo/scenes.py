"""The demo's scene benchmark: real easy-vqa shapes at three granularities, one part per scene.

    canvas 192 x 192 (the demo model's high-res side), a 6 x 6 grid of 32 px cells (one CLIP patch of the
    84 px low-res view, one cell of the ConvNeXt's last stage); each scene shows ONE part, in turn:
      big shape   an easy-vqa shape scaled to 40-64 px, on its own background, in the 2 x 2 block of cells
                  at `SceneSpec.big_cell`
      small shape an easy-vqa shape scaled down to 3-6 px, on a bare easy-vqa panel, in a random free cell,
                  sharing it with a neighbour: a 3 px band of another colour, 10-14 px long, in the other
                  half of the cell (the band dominates the cell's colour; it is not an object, never boxed)
      stripe      a 1 px band cut from an easy-vqa shape, 16-28 px long, on a bare panel, at `stripe_cell`
      clutter     bare easy-vqa panels (their shape painted out) in other cells
    The big shape and the stripe lie at fixed cells (their spot inside the cell is random), so an LLM trained
    from random weights for minutes learns where to look rather than a visual search; the small shape lies
    anywhere, as small objects do: a detector's box finds it wherever it is. One part per scene
    (`layout="separate"`) because a random-weight LLM given all three parts and three questions did not
    learn, within the demo's budget, to route each question to its part (every variant collapsed to one
    colour; README); `layout="combined"` still builds those. A part not shown is still drawn on a blank
    canvas, so every scene's random draws are the same either way.

Questions, three kinds, asked of the part each scene shows and scored separately (`KINDS`):

    a  "What color is the big shape?"    large: the low-res view shows it
    b  "What color is the small shape?"  when the simulated detector found it: its object token holds it
    c  "What color is the small shape?"  when the detector missed it, and "What color is the stripe?"
                                          (not an object: never boxed): only the high-res view has the
                                          stripe; a missed small shape is lost under its neighbour band

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

from ..utils.hashing import sha256_file
from ..utils.io import atomic_write_json, atomic_write_text
from .annotations import Annotation, annotate
from .detector import DetectorModel, SceneObject, is_found

QUESTIONS = {
    "big": "What color is the big shape?",
    "small": "What color is the small shape?",
    "stripe": "What color is the stripe?",
}
PARTS = tuple(QUESTIONS)  # big, small, stripe
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
    # A band of another colour shares the small shape's cell (one half each): the 32 px grid cell then mixes
    # two colours, the band's dominant, as small objects sit among other things in real images; the
    # detector's box isolates the small shape (a band, like the stripe, is not an object: never boxed).
    neighbour_length: tuple[int, int] | None = (10, 14)
    neighbour_width: int = 3
    # Where the parts lie (cells, x then y), see the module docstring; `small_cell` only when not
    # `small_anywhere`.
    big_cell: tuple[int, int] = (1, 1)
    small_cell: tuple[int, int] = (4, 1)
    stripe_cell: tuple[int, int] = (1, 4)
    train_turns: int = 3  # questions per training conversation (random parts, random order); test asks all
    # The small shape lies in a random free cell (a detector finds objects anywhere; an LLM reading a grid
    # has to know where to look, so the stripe, kind c's other half, stays at `stripe_cell`).
    small_anywhere: bool = True
    layout: str = "separate"  # combined: all three parts, three questions; separate: one part per scene
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
    neighbour: Placed | None = None  # the band sharing the small shape's cell

    @property
    def sources(self) -> list[int]:
        near = [self.neighbour.source.image_id] if self.neighbour else []
        return [self.big.source.image_id, self.small.source.image_id, self.stripe.source.image_id, *near,
                *self.clutter]  # fmt: skip

    def objects(self) -> list[SceneObject]:
        """What a detector could box: the two shapes (a stripe or band is not an object)."""
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
        self,
        rng: random.Random,
        scene_id: str,
        shown: tuple[str, ...] = ("big", "small", "stripe"),
        anywhere: bool = False,
    ) -> Scene:
        """One scene; `anywhere` puts every part in random cells (the towers' pretraining scenes)."""
        spec, cell = self.spec, self.spec.cell
        big_src, small_src, stripe_src = self._three_colours(rng)
        block = (rng.randrange(spec.grid - 1), rng.randrange(spec.grid - 1)) if anywhere else spec.big_cell
        taken = {(block[0] + dx, block[1] + dy) for dx in (0, 1) for dy in (0, 1)}  # the big shape's 2 x 2
        fixed = {} if anywhere else {"stripe": spec.stripe_cell}
        if not (anywhere or spec.small_anywhere):
            fixed["small"] = spec.small_cell
        free = [(x, y) for y in range(spec.grid) for x in range(spec.grid)
                if (x, y) not in taken | set(fixed.values())]  # fmt: skip
        picks = rng.sample(free, 2 - len(fixed) + spec.clutter)
        cells = [fixed["small"] if "small" in fixed else picks.pop(0),
                 fixed["stripe"] if "stripe" in fixed else picks.pop(0), *picks]  # fmt: skip
        canvas = Image.new("RGB", (spec.side, spec.side), (255, 255, 255))
        blank = Image.new("RGB", canvas.size)
        big = self._big(rng, canvas if "big" in shown else blank, big_src, block)
        near_src = self._other_colour(rng, small_src) if spec.neighbour_length else None
        small, near = self._small(rng, canvas if "small" in shown else blank, small_src, cells[0], near_src)
        stripe = self._stripe(rng, canvas if "stripe" in shown else blank, stripe_src, cells[1])
        clutter = rng.sample(self.pool, spec.clutter)
        for annotation, (x, y) in zip(clutter, cells[2:], strict=True):
            canvas.paste(self.panel(annotation, cell), (x * cell, y * cell))
        return Scene(scene_id, canvas, big, small, stripe, [a.image_id for a in clutter], shown, near)

    def _other_colour(self, rng: random.Random, than: Annotation) -> Annotation:
        while True:
            pick = rng.choice(self.pool)
            if pick.color != than.color:
                return pick

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
        self,
        rng: random.Random,
        canvas: Image.Image,
        src: Annotation,
        cell: tuple[int, int],
        neighbour: Annotation | None,
    ) -> tuple[Placed, Placed | None]:
        """The shape shrunk to 3-6 px at a random spot of a bare panel of its own image; with a neighbour,
        a 3 px band of the neighbour's colour in one half of the cell (random side), the small shape in the
        other."""
        c = self.spec.cell
        x0, y0 = cell[0] * c, cell[1] * c
        canvas.paste(self.panel(src, c), (x0, y0))
        region, near = (x0, y0, x0 + c, y0 + c), None
        if neighbour is not None:
            halves = _halves(region, across=rng.random() < 0.5)
            first, second = halves if rng.random() < 0.5 else halves[::-1]
            length = rng.randint(*self.spec.neighbour_length)
            near = self._band(rng, canvas, neighbour, first, length, self.spec.neighbour_width)
            region = second
        return self._paste_shape(rng, canvas, src, rng.randint(*self.spec.small_side), region), near

    def _paste_shape(self, rng: random.Random, canvas: Image.Image, src: Annotation, side: int,
                     region: tuple[int, int, int, int]) -> Placed:  # fmt: skip
        """The annotation's shape, its longer side `side` px, at a random spot of `region` (1 px margin)."""
        shape = self._shape_crop(src, side)
        px = rng.randint(region[0] + 1, region[2] - shape.width - 1)
        py = rng.randint(region[1] + 1, region[3] - shape.height - 1)
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
        length = rng.randint(*spec.stripe_length)
        return self._band(rng, canvas, src, (x0, y0, x0 + c, y0 + c), length, spec.stripe_width)

    def _band(self, rng: random.Random, canvas: Image.Image, src: Annotation, region: tuple[int, ...],
              length: int, width: int) -> Placed:  # fmt: skip
        """`length` x `width` px of the shape's middle row, across or down (random), at a random spot of
        `region` (1 px margin)."""
        image = self.image(src)
        inside = ~_background_mask(image)
        _, y1, _, y2 = (int(v) for v in shape_box(image))
        row = (y1 + y2) // 2
        xs = np.nonzero(inside[row])[0]
        band = np.asarray(image)[
            row : row + 1, xs.min() + 1 : xs.max()
        ]  # (1, w, 3), antialiased ends dropped
        stripe = Image.fromarray(band).resize((length, width), Image.NEAREST)
        if rng.random() < 0.5:
            stripe = stripe.transpose(Image.Transpose.TRANSPOSE)
        px = rng.randint(region[0] + 1, region[2] - stripe.width - 1)
        py = rng.randint(region[1] + 1, region[3] - stripe.height - 1)
        canvas.paste(stripe, (px, py))
        return Placed(src, (px, py, px + stripe.width, py + stripe.height))


def _halves(region: tuple[int, int, int, int], across: bool) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The region's two halves: left and right, or (`across`) top and bottom."""
    x0, y0, x1, y1 = region
    if across:
        return (x0, y0, x1, (y0 + y1) // 2), (x0, (y0 + y1) // 2, x1, y1)
    return (x0, y0, (x0 + x1) // 2, y1), ((x0 + x1) // 2, y0, x1, y1)


def questions(scene: Scene, boxes: dict[str, Any], detector: DetectorModel) -> list[dict[str, str]]:
    """The scene's three questions with their kind (b or c for the small shape: did the detector find it?)."""
    read_back = {
        "boxes": np.asarray(boxes["boxes"], dtype=np.float32).tolist()
    }  # as box files load (float32)
    found = is_found(scene.small.box, read_back, detector.min_iou)  # an IoU of 0.49999 must not flip on load
    return [
        {"part": "big", "kind": "a", "question": QUESTIONS["big"], "answer": scene.big.source.color},
        {"part": "small", "kind": "b" if found else "c", "question": QUESTIONS["small"],
         "answer": scene.small.source.color},
        {"part": "stripe", "kind": "c", "question": QUESTIONS["stripe"], "answer": scene.stripe.source.color},
    ]  # fmt: skip


def caption(scene: Scene) -> str:
    """The parts shown, described: "A big red circle, a small blue triangle and a green stripe."."""
    near = f" beside a {scene.neighbour.source.color} band" if scene.neighbour else ""
    described = {"big": lambda s: f"a big {s.color} {s.shape}", "small": lambda s: f"a small {s.color} {s.shape}{near}",
                 "stripe": lambda s: f"a {s.color} stripe"}  # fmt: skip
    phrases = [described[p](getattr(scene, p).source) for p in PARTS if p in scene.shown]
    text = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    return text[0].upper() + text[1:] + "."


def build_split(split: str, n: int, out: Path, spec: SceneSpec, seed: int) -> dict[str, Any]:
    """Write `n` scenes of an easy-vqa split under `out`:

        images/<id>.png     the canvases
        captions.json       stage-1 pairs (LLaVA format): the scene described
        qa.json             stage-2 samples (LLaVA format): the three questions as three turns in a random
                            order, with each turn's kind and the source ids, for the checks
        test.jsonl          one line per question in the evaluation harness's short-answer format;
                            `category` = the kind, `part` = which object it asks about
        boxes.jsonl         the simulated detector's boxes; boxes-coco80.jsonl the fixed-list simulation
        scenes.jsonl        every placed object's source and true box, and the parts shown (drawn): for
                            the checks, the probes and the chat example

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
        placed = {p: getattr(scene, p) for p in QUESTIONS} | (
            {"neighbour": scene.neighbour} if scene.neighbour else {}
        )
        layout.append({"id": scene.scene_id, "sources": {p: asdict(q.source) for p, q in placed.items()},
                       "boxes": {p: list(q.box) for p, q in placed.items()}, "clutter": scene.clutter,
                       "shown": list(scene.shown)})  # fmt: skip
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
