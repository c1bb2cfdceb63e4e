"""What the harness adapters share: the engine with an optional online detector, each image's boxes from a
box file, where every image's boxes came from, and a harness's generation settings.

    harness request --images + ids--> BoxFinder.find: the box file, by the one look-up rule (boxes.lookup)
        --boxes found, or None--> Engine.prepare: None goes to the engine's proposer (tagger + OWLv2 detector),
        or, without a detector, the image has no boxes (the model's zero-box fallback row)
        --Engine.generate--> answers; BoxFinder.sources names each image's source

The box file is looked up here rather than by the engine's proposer because a harness knows more than the
pixels: the benchmark's question id (lmms-eval's document field, VLMEvalKit's `index`), which is how the
reference's box files are keyed. The engine's proposer then holds only the detector, so a miss is counted
once. Sources reported: `box_file`, `proposer` (the detector), `missing` (a box file without detector lacked
the image), `request` (boxes the caller gave) or `none` (no box file, no detector, or a model without object
tokens). Without a detector, more than `max_missing` of the images missing from the box file is an error
(`boxes.MissingBoxes`), as in `mgllava eval`.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from ..boxes import Boxes, BoxLookup, ImageKey
from ..boxes.cli import proposer_from_args
from ..inference import Engine, GenerationSettings, VisualBoxes

logger = logging.getLogger(__name__)


def default_device() -> str:
    """This process's GPU (`LOCAL_RANK` under torchrun or accelerate) if there is one, else the CPU."""
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return "cpu"


def load_engine(
    pretrained: str | Path,
    *,
    dtype: str | None = None,
    device: str | None = None,
    detector: str | None = None,
    tagger: str = "clip",
    tagger_model: str | None = None,
    vocabulary: str | None = None,
    tag_threshold: float = 0.05,
    tag_top_k: int = 10,
    max_image_pixels: int | None = None,
) -> Engine:
    """An engine over a saved MG-LLaVA folder; with `detector` (an OWLv2 folder) it proposes boxes online for
    images without any, tagging them with `tagger` as `mgllava chat --detector ... --tagger ...` does."""
    device = device or default_device()
    options = argparse.Namespace(
        box_file=None,  # looked up by BoxFinder, with the harness's ids
        detector=detector,
        tagger=tagger,
        tagger_model=tagger_model,
        vocabulary=vocabulary,
        tags=None,
        tag_threshold=float(tag_threshold),
        tag_top_k=int(tag_top_k),
        dtype="float32",  # the tagger's, as the detector's in proposer_from_args
    )
    proposer = proposer_from_args(options, device)
    extra = {"max_image_pixels": int(max_image_pixels)} if max_image_pixels is not None else {}
    return Engine.from_pretrained(pretrained, dtype=dtype, device=device, proposer=proposer, **extra)


class BoxFinder:
    """Boxes of harness images from a box file, and the report of where each image's boxes came from."""

    def __init__(
        self, box_file: str | Path | None, engine: Engine, max_missing: float = 0.0, what: str = "images"
    ) -> None:
        if not 0.0 <= float(max_missing) <= 1.0:
            raise ValueError(f"max_missing_boxes is a share in [0, 1], got {max_missing!r}")
        if box_file is not None and not Path(box_file).is_file():
            raise FileNotFoundError(f"box_file {str(box_file)!r}: no such file")
        self.lookup = BoxLookup.load(box_file) if box_file is not None else None
        self.enabled = engine.uses_object_tokens
        self.has_detector = engine.proposer is not None
        self.max_missing = float(max_missing)
        self.what = what

    def find(self, keys: Sequence[ImageKey]) -> list[Boxes | None]:
        """The box file's boxes of one request's images (None: not in the file, or no file). The ids of a
        key are used only when the request has a single image (the rule of `boxes.lookup`)."""
        if self.lookup is None or not self.enabled:
            return [None] * len(keys)
        single = len(keys) == 1
        return [self.lookup.image(key, single) for key in keys]

    def find_video(self, ids: Sequence[str], path: str | Path) -> list[Boxes] | None:
        """The box file's per-frame boxes of a video (by id, path, or file name without extension)."""
        if self.lookup is None or not self.enabled:
            return None
        return self.lookup.video(ids, str(path))

    def check(self) -> None:
        """Refuse (`MissingBoxes`) when, without a detector to fill in, too many images missed."""
        if self.lookup is not None and self.enabled and not self.has_detector:
            self.lookup.check_missing(self.max_missing, self.what)

    def sources(self, found: Sequence[Boxes | None], used: Sequence[VisualBoxes]) -> list[VisualBoxes]:
        """The engine's report of the boxes that became object tokens, with the box file named as their source
        (the engine saw them as the caller's) and its misses named `missing`."""
        out = []
        for boxes, report in zip(found, used, strict=True):
            if boxes is not None:
                out.append(replace(report, source="box_file"))
            elif self.lookup is not None and self.enabled and report.source == "none":
                out.append(replace(report, source="missing"))
            else:
                out.append(report)
        return out

    def summary(self) -> dict[str, Any] | None:
        return self.lookup.summary() if self.lookup is not None else None


# -- generation settings ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class HarnessSettings:
    """A request's decoding settings and the strings its answer is cut at (the harness's `until`)."""

    settings: GenerationSettings
    until: tuple[str, ...] = ()

    def cut(self, text: str) -> str:
        """The answer up to the first of the stop strings (generation ran on to the template's stop token;
        greedy tokens before a stop string do not depend on what follows it, so this equals stopping there)."""
        for stop in self.until:
            if stop:
                text = text.split(stop, 1)[0]
        return text.strip()


PASSIVE = ("image_aspect_ratio",)  # LLaVA's padding option; ours pads as the reference (docs/design.md 2)


def _stops(until: Any) -> tuple[str, ...]:
    if until is None:
        return ()
    if isinstance(until, str):
        return (until,)
    if isinstance(until, (list, tuple)) and all(isinstance(s, str) for s in until):
        return tuple(until)
    raise ValueError(f"gen_kwargs until must be a string or a list of strings, got {until!r}")


def settings_from_gen_kwargs(
    gen_kwargs: Mapping[str, Any] | None, default_max_new_tokens: int
) -> HarnessSettings:
    """lmms-eval's (and lm-eval's) `generation_kwargs` -> our settings. Greedy unless `do_sample` is true, or
    `temperature` > 0 with `do_sample` unset; `until` (a string or a list) cuts the answer; `top_p`/`top_k`
    matter only when sampling. What the engine cannot honour (beams, top-k sampling, a repetition penalty) is
    an error; other unknown keys are logged as unused."""
    kw = dict(gen_kwargs or {})
    stops = _stops(kw.pop("until", None))
    max_new = kw.pop("max_new_tokens", default_max_new_tokens)
    if isinstance(max_new, float) and max_new.is_integer():
        max_new = int(max_new)
    temperature = float(kw.pop("temperature", 0.0) or 0.0)
    do_sample = kw.pop("do_sample", None)
    sampled = bool(do_sample) if do_sample is not None else temperature > 0
    top_p, top_k, seed = kw.pop("top_p", None), kw.pop("top_k", None), kw.pop("seed", None)
    unsupported = {
        "num_beams": (kw.pop("num_beams", 1), (None, 1), "there is no beam search"),
        "repetition_penalty": (kw.pop("repetition_penalty", None), (None, 1, 1.0), "it is not supported"),
    }
    for name, (value, neutral, why) in unsupported.items():
        if value not in neutral:
            raise ValueError(f"gen_kwargs {name}={value!r}: {why} in the mgllava model")
    for key in PASSIVE:
        kw.pop(key, None)
    if kw:
        logger.warning("gen_kwargs not used by the mgllava model: %s", ", ".join(sorted(kw)))
    if not sampled:
        return HarnessSettings(GenerationSettings(max_new_tokens=max_new), stops)
    if temperature <= 0:
        raise ValueError(f"gen_kwargs do_sample=True needs temperature > 0, got {temperature}")
    if top_k not in (None, 0):
        raise ValueError(f"gen_kwargs top_k={top_k!r}: top-k sampling is not supported (use top_p)")
    settings = GenerationSettings(
        max_new_tokens=max_new,
        temperature=temperature,
        top_p=1.0 if top_p is None else float(top_p),
        seed=None if seed is None else int(seed),
    )
    return HarnessSettings(settings, stops)
