"""`MGLlavaVLMEval`: MG-LLaVA behind VLMEvalKit's model interface, over `inference.Engine`. It needs no
VLMEvalKit import: VLMEvalKit's inference loop calls its models by name (`vlmeval/inference.py`), and this
class answers to those names.

    from vlmeval.dataset import build_dataset
    from vlmeval.inference import infer_data_job
    from mgllava.harness.vlmeval import MGLlavaVLMEval

    model = MGLlavaVLMEval("FOLDER", box_file="mmbench_dev_boxes.json")   # or detector=OWLV2_DIR, ...
    dataset = build_dataset("MMBench_DEV_EN")
    infer_data_job(model, work_dir="outputs/MG-LLaVA", model_name="MG-LLaVA", dataset=dataset)
    dataset.evaluate("outputs/MG-LLaVA/MG-LLaVA_MMBench_DEV_EN.xlsx")

The contract (VLMEvalKit's `vlmeval/vlm/base.py`, `BaseModel`):
- `generate(message, dataset=None)`: `message` is a string, a dict, a list of strings (paths of existing image
  files are images) or a list of `{"type": "text" | "image", "value": ...}`; returns the answer.
  `generate_inner` answers the normalised list: the parts in order, images as `<image>` tags (INTERLEAVE),
  joined by newlines, as one user turn of the chat template (a lone image moves to the front, docs/design.md
  section 6.2). Greedy, at most `max_new_tokens` (100, the paper's image benchmarks: section 9.1).
- `chat(messages, dataset=None)` / `chat_inner`: a conversation of `{"role", "content"}` messages, answered as
  one engine conversation. Unlike `BaseModel.chat`, a failing conversation is an error, not retried with its
  first turns dropped.
- `use_custom_prompt(dataset)` / `build_prompt(line, dataset)`: for the paper's multiple-choice benchmarks
  (`REFERENCE_MCQ`), the reference's prompt (`eval.multiple_choice.mc_prompt`, docs/design.md section 9.2)
  replaces VLMEvalKit's `Hint:/Question:/Options:` prompt, so that answers equal `mgllava eval`'s; the line's
  `index` (and its CircularEval group, `index % 1_000_000`) goes with its images as their box-file ids, the
  key of the reference's box files. `reference_prompts=False` keeps VLMEvalKit's prompts everywhere.
- `set_dump_image(fn)` / `dump_image(line, dataset)`: VLMEvalKit hands over its dataset's image writer.

Boxes: an image's boxes come from `box_file` (its ids when `build_prompt` made the message, then its path, its
content hash, its file name: `boxes.lookup`), then from the `detector`. VLMEvalKit asks one question at a
time, so the threshold is a count: without a detector, more than `max_missing_boxes` images (default 0)
missing from the box file is an error (`MissingBoxes`). `last_boxes` holds the last answer's boxes and their
sources; `box_summary()` the box file's look-up counts.
"""

from __future__ import annotations

import math
import mimetypes
import string
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..boxes import Boxes, ImageKey, MissingBoxes
from ..data.templates import IMAGE_TOKEN
from ..eval.metrics import circular_key
from ..eval.multiple_choice import mc_prompt
from ..inference import EngineInputError, GenerationSettings, VisualBoxes
from .common import BoxFinder, load_engine

# VLMEvalKit's names of the multiple-choice TSVs the reference evaluated (docs/design.md section 9.2)
REFERENCE_MCQ = frozenset(
    {
        "MMBench_DEV_EN",
        "MMBench_TEST_EN",
        "SEEDBench_IMG",
        "MMStar",
        "ScienceQA_VAL",
        "ScienceQA_TEST",
        "AI2D_TEST",
    }
)
Part = dict[str, Any]


def _missing(value: Any) -> bool:
    """pandas' missing value as VLMEvalKit's lines carry it (NaN, None)."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def _is_image_file(text: str) -> bool:
    kind, _ = mimetypes.guess_type(text)
    return kind is not None and kind.startswith("image/") and Path(text).is_file()


class MGLlavaVLMEval:
    """A VLMEvalKit model over `inference.Engine` (see the module docstring)."""

    INSTALL_REQ = False
    INTERLEAVE = True
    VIDEO_LLM = False
    is_api = False
    allowed_types = ("text", "image")

    def __init__(
        self,
        model_path: str,
        *,
        max_new_tokens: int = 100,
        reference_prompts: bool = True,
        box_file: str | None = None,
        max_missing_boxes: int = 0,
        detector: str | None = None,
        tagger: str = "clip",
        tagger_model: str | None = None,
        vocabulary: str | None = None,
        dtype: str | None = None,
        device: str | None = None,
    ) -> None:
        self.engine = load_engine(model_path, dtype=dtype, device=device, detector=detector, tagger=tagger,
                                  tagger_model=tagger_model, vocabulary=vocabulary)  # fmt: skip
        self.settings = GenerationSettings(max_new_tokens=max_new_tokens)
        self.reference_prompts = reference_prompts
        self.boxes = BoxFinder(box_file, self.engine, what="VLMEvalKit images")
        if not isinstance(max_missing_boxes, int) or max_missing_boxes < 0:
            raise ValueError(f"max_missing_boxes is a count of images >= 0, got {max_missing_boxes!r}")
        self.max_missing_boxes = max_missing_boxes
        self.dump_image_func: Callable[[Any], Any] | None = None
        self.last_boxes: list[VisualBoxes] = []

    # -- VLMEvalKit's prompt hooks --------------------------------------------------------------------------
    def set_dump_image(self, dump_image_func: Callable[[Any], Any]) -> None:
        self.dump_image_func = dump_image_func

    def dump_image(self, line: Mapping[str, Any], dataset: str | None = None) -> list[str]:
        if self.dump_image_func is None:
            raise ValueError(
                "no image writer: VLMEvalKit sets it with model.set_dump_image(dataset.dump_image)"
            )
        paths = self.dump_image_func(line)
        return [paths] if isinstance(paths, (str, Path)) else [str(p) for p in paths]

    def use_custom_prompt(self, dataset: str | None) -> bool:
        return self.reference_prompts and dataset in REFERENCE_MCQ

    def build_prompt(self, line: Mapping[str, Any], dataset: str | None = None) -> list[Part]:
        """The reference's multiple-choice prompt for a line of one of `REFERENCE_MCQ`, images first."""
        if not self.use_custom_prompt(dataset):
            raise ValueError(
                f"build_prompt is for {sorted(REFERENCE_MCQ)}, not {dataset!r}; use the dataset's"
            )
        options = {c: str(line[c]) for c in string.ascii_uppercase if c in line and not _missing(line[c])}
        hint = None if _missing(line.get("hint")) else str(line["hint"])
        text = mc_prompt(str(line["question"]), options, hint).removeprefix(IMAGE_TOKEN + "\n")
        index = int(line["index"])
        ids = list(dict.fromkeys((str(index), str(circular_key(index)))))
        images = [{"type": "image", "value": path, "box_ids": ids} for path in self.dump_image(line, dataset)]
        return [*images, {"type": "text", "value": text}]

    # -- answering ------------------------------------------------------------------------------------------
    def preproc_content(self, message: Any) -> list[Part]:
        """VLMEvalKit's accepted message forms -> a list of {"type", "value"} parts."""
        if isinstance(message, str):
            return [{"type": "text", "value": message}]
        if isinstance(message, Mapping):
            message = [message]
        if not isinstance(message, Sequence) or not message:
            raise ValueError(
                f"a message is a string, a dict or a non-empty list, got {type(message).__name__}"
            )
        parts = []
        for k, item in enumerate(message):
            if isinstance(item, str):
                parts.append({"type": "image" if _is_image_file(item) else "text", "value": item})
            elif isinstance(item, Mapping) and "type" in item and "value" in item:
                if item["type"] not in self.allowed_types:
                    raise ValueError(
                        f"message part {k}: type {item['type']!r} is not one of {self.allowed_types}"
                    )
                parts.append(dict(item))
            else:
                raise ValueError(
                    f"message part {k}: expected a string or a {{'type', 'value'}} dict, got {item!r}"
                )
        return parts

    def generate(self, message: Any, dataset: str | None = None) -> str:
        return self.generate_inner(self.preproc_content(message), dataset)

    def generate_inner(self, message: list[Part], dataset: str | None = None) -> str:
        return self.chat_inner([{"role": "user", "content": message}], dataset)

    def chat(self, messages: list[Mapping[str, Any]], dataset: str | None = None) -> str:
        turns = []
        for k, turn in enumerate(messages):
            if not isinstance(turn, Mapping) or "role" not in turn or "content" not in turn:
                raise ValueError(f"messages[{k}]: expected a {{'role', 'content'}} dict")
            turns.append({"role": turn["role"], "content": self.preproc_content(turn["content"])})
        return self.chat_inner(turns, dataset)

    def chat_inner(self, messages: list[Mapping[str, Any]], dataset: str | None = None) -> str:
        """Answer a conversation whose contents are lists of parts (already normalised)."""
        conversation, images, keys = [], [], []
        for turn in messages:
            pieces = []
            for part in turn["content"]:
                if part["type"] == "image":
                    pieces.append(IMAGE_TOKEN)
                    images.append(part["value"])
                    keys.append(part.get("box_ids", ()))
                else:
                    pieces.append(str(part["value"]))
            conversation.append({"role": turn["role"], "content": "\n".join(pieces)})
        found = self._find(images, keys)
        try:
            result = self.engine.chat(conversation, images=images, boxes=found, settings=self.settings)
        except EngineInputError as err:
            raise ValueError(f"VLMEvalKit {dataset or 'message'}: {err}") from err
        self.last_boxes = self.boxes.sources(found, result.images)
        return result.text

    # -- boxes ----------------------------------------------------------------------------------------------
    def _find(self, images: list[Any], ids: list[Sequence[str]]) -> list[Boxes | None]:
        keys = [ImageKey.of(image, tuple(i), str(image) if isinstance(image, (str, Path)) else None)
                for image, i in zip(images, ids, strict=True)]  # fmt: skip
        found = self.boxes.find(keys)
        lookup = self.boxes.lookup
        if lookup is not None and self.boxes.enabled and not self.boxes.has_detector:
            summary = lookup.summary()
            if summary["missing"] > self.max_missing_boxes:
                raise MissingBoxes(
                    f"{summary['missing']} images have no boxes in {lookup.name} (allowed: {self.max_missing_boxes}); "
                    f"first misses: {'; '.join(summary['missing_examples'])}. The box file is looked up by the "
                    "line's index (prompts built by build_prompt), then the image's path, content hash and file name"
                )
        return found

    def box_summary(self) -> dict[str, Any] | None:
        return self.boxes.summary()
