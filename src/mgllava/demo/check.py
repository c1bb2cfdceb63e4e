"""Checks of the built benchmark: every answer against easy-vqa's annotations, every kind against the boxes,
splits disjoint, boxes present.

The annotations (`annotations.py`) are read off easy-vqa's questions; here each annotated image is checked
against every one of its questions (a colour question's answer is its colour, "is there a red shape?" is
"yes" exactly when it is red, ...), and every question's answer against its source image's annotation.
A question's kind is re-derived from the box file: kind b exactly when a box matches the small shape.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from ..boxes.files import BoxIndex
from .annotations import Annotation, annotate, facts
from .detector import is_found
from .scenes import QUESTIONS, SceneSpec


def checked_annotations(split: str) -> tuple[dict[int, Annotation], int]:
    """The split's annotations, each agreeing with all of its image's easy-vqa answers; the facts checked."""
    import easy_vqa

    questions, answers, ids = (
        easy_vqa.get_train_questions() if split == "train" else easy_vqa.get_test_questions()
    )
    pool, _ = annotate(questions, answers, ids)
    by_id = {a.image_id: a for a in pool}
    per_image = defaultdict(list)
    for q, a, i in zip(questions, answers, ids, strict=True):
        per_image[i].append((q, a))
    n = 0
    for image_id, annotation in by_id.items():
        for q, a in per_image[image_id]:
            for kind, value, holds in facts(q, a):
                if (getattr(annotation, kind) == value) != holds:
                    raise ValueError(
                        f"easy-vqa {split} image {image_id}: annotation {annotation} contradicts {q!r} -> {a!r}"
                    )
                n += 1
    return by_id, n


def _check_split(
    root: Path, split: str, spec: SceneSpec, truth: dict[int, Annotation]
) -> tuple[int, int, set[int]]:
    """(answers checked, kinds checked, source ids used) of one split; raises on the first disagreement."""
    boxes = BoxIndex.load(root / split / "boxes.jsonl")
    layout = {r["id"]: r for r in map(json.loads, (root / split / "scenes.jsonl").read_text().splitlines())}
    answers = kinds = 0
    for record in json.loads((root / split / "qa.json").read_text()):
        scene = layout[record["id"]]
        found = boxes.lookup(id=record["id"])
        if found is None:
            raise ValueError(f"{record['id']}: no box record")
        replies = record["conversations"][1::2]
        for part, kind, reply in zip(record["parts"], record["kinds"], replies, strict=True):
            source = scene["sources"][part]
            color = truth[source["image_id"]].color
            if reply["value"] != color or source["color"] != color:
                raise ValueError(
                    f"{record['id']} ({part}): answer {reply['value']!r} but its easy-vqa image is {color}"
                )
            expected = "a" if part == "big" else "c" if part == "stripe" else None
            if part == "small":
                expected = "b" if is_found(scene["boxes"]["small"], {"boxes": found.boxes.xyxy.tolist()},
                                           spec.detector.min_iou) else "c"  # fmt: skip
            if kind != expected:
                raise ValueError(f"{record['id']} ({part}): kind {kind} but the boxes make it {expected}")
            answers += 1
            kinds += 1
    used = {s["image_id"] for r in layout.values() for s in r["sources"].values()}
    used |= {c for r in layout.values() for c in r["clutter"]}
    return answers, kinds, used


def _check_test_file(root: Path) -> None:
    """test.jsonl asks exactly what qa.json answers, with the same kinds."""
    qa = {r["id"]: r for r in json.loads((root / "test" / "qa.json").read_text())}
    for line in (root / "test" / "test.jsonl").read_text().splitlines():
        q = json.loads(line)
        scene_id, part = q["id"].rsplit("-", 1)
        record = qa[scene_id]
        k = record["parts"].index(part)
        if q["question"] != QUESTIONS[part] or q["category"] != record["kinds"][k] or \
                q["answers"] != [record["conversations"][2 * k + 1]["value"]]:  # fmt: skip
            raise ValueError(f"test.jsonl {q['id']} disagrees with qa.json")


def verify_benchmark(root: Path, spec: SceneSpec | None = None) -> dict[str, Any]:
    """Raise if any answer disagrees with its source image's annotation, a kind with the boxes, a scene has
    no box record, or a source image (by content) is in both splits; return what was checked."""
    spec = spec or SceneSpec()
    sources: dict[str, set[int]] = {}
    answers = kinds = facts_checked = 0
    for split in ("train", "test"):
        truth, n = checked_annotations(split)
        facts_checked += n
        a, k, sources[split] = _check_split(root, split, spec, truth)
        answers, kinds = answers + a, kinds + k
    _check_test_file(root)
    shared = _shared_files(sources)
    if shared:
        raise ValueError(f"{shared} source images appear in both splits")
    return {
        "answers_checked": answers,
        "kinds_checked": kinds,
        "annotation_facts_checked": facts_checked,
        "shared_source_images": shared,
    }


def _shared_files(sources: dict[str, set[int]]) -> int:
    """Source images used by both splits, compared by file content (ids restart in each easy-vqa split)."""
    import easy_vqa

    paths = {"train": easy_vqa.get_train_image_paths(), "test": easy_vqa.get_test_image_paths()}
    digests = {
        split: {hashlib.sha256(Path(paths[split][i]).read_bytes()).hexdigest() for i in ids}
        for split, ids in sources.items()
    }
    return len(digests["train"] & digests["test"])
