"""The lmms-eval model `mgllava`: lmms-eval's tasks answered by MG-LLaVA through `inference.Engine`.

    pip install 'mgllava[lmms]'
    lmms-eval --model mgllava --model_args pretrained=FOLDER --tasks TASKS --batch_size 8
        [--model_args ...,box_file=BOXES.jsonl,box_id_field=question_id]              # boxes from a box file
        [--model_args ...,detector=OWLV2_DIR,tagger=clip,tagger_model=CLIP_DIR]       # or proposed online

Registered through the entry-point group `lmms_eval.models` (pyproject.toml; `lmms_plugin.manifest`), as a
"simple" model: lmms-eval hands over `(context, gen_kwargs, doc_to_visual, doc_id, task, split)` and the
model reads its document from `task_dict`.

- `generate_until`: the task's context is one user turn of our chat template (docs/design.md section 6);
  its images (PIL) come first as `<image>` tags unless the context places them, a video path as `<video>`.
  Requests with the same decoding settings are batched (`--batch_size`) into one `Engine.generate`, longest
  first; greedy unless the task samples. `gen_kwargs`: `max_new_tokens` (else the model argument
  `max_new_tokens`, 256), `temperature`, `do_sample`, `top_p`, `seed`, and `until`, whose strings cut the
  answer. Beams, top-k sampling and a repetition penalty are refused (`common.settings_from_gen_kwargs`).
- `loglikelihood` (multiple-choice tasks): the model's log-probabilities of the continuation's tokens after
  the same prompt, images included (`likelihood.score_continuations`). Returned as lmms-eval's models return
  it and as its multiple-choice scorer ranks it (argmin): `(mean negative log-likelihood per token, greedy)`,
  i.e. the LM loss over the continuation, not the sum of log-probabilities its docstring names.
- `generate_until_multi_round` is not supported (NotImplementedError naming the alternative).

Boxes: `box_file` is looked up by the one rule of `boxes.lookup` with the document's `box_id_field` as the
sample id (the reference's box files are keyed by question id), then the image's file path when the
dataset gives one; without `detector`, images it lacks are counted and more than `max_missing_boxes`
(a share, default 0) stop the run before anything is answered. `detector` (+ `tagger`, `tagger_model`,
`vocabulary`) proposes boxes for the rest. `box_report=FILE` writes, per request, where each image's boxes
came from and the boxes that became object tokens (JSONL; one file per rank).

A request that cannot be answered (an unreadable image, a prompt longer than the model's context) stops the
run with an error naming the task, split and document: lmms-eval would score an empty answer as wrong.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from PIL import Image
from tqdm import tqdm

from ..boxes import Boxes, ImageKey
from ..data.templates import IMAGE_TOKEN, VIDEO_TOKEN
from ..inference import ChatResult, EngineInputError, GenerationSettings, Prepared, VisualBoxes
from ..media.images import ImageError
from .common import BoxFinder, HarnessSettings, load_engine, settings_from_gen_kwargs
from .likelihood import score_continuations

logger = logging.getLogger(__name__)


@dataclass
class _Job:
    """One lmms-eval request, unpacked; `visuals` is filled on demand from the document."""

    context: str
    doc_to_visual: Callable[[Any], Any]
    doc_id: int
    task: str
    split: str
    gen_kwargs: dict[str, Any] | None = None
    continuation: str | None = None

    def where(self) -> str:
        return f"task {self.task!r}, split {self.split!r}, document {self.doc_id}"


@dataclass
class _Found:
    """A request's boxes from the box file: per image (None: not in the file), per video frame (or None)."""

    image_boxes: list[Boxes | None]
    video_boxes: list[Boxes] | None


def _batch_size(value: Any) -> int:
    try:
        size = int(value)
    except (TypeError, ValueError):
        raise ValueError(
            f"batch_size must be a positive integer, got {value!r} ('auto' is not supported)"
        ) from None
    if size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {value!r}")
    return size


def _prompt(context: str, images: int, video: bool) -> str:
    """The user turn: the task's context with its images' tags in front unless it places them itself."""
    tags = ""
    if images and IMAGE_TOKEN not in context:
        tags += (IMAGE_TOKEN + "\n") * images
    if video and VIDEO_TOKEN not in context:
        tags += VIDEO_TOKEN + "\n"
    return tags + context


class MGLlavaLmms(lmms):
    """lmms-eval's `lmms` interface over `inference.Engine` (model arguments: see the module docstring)."""

    is_simple = True

    def __init__(
        self,
        pretrained: str,
        dtype: str | None = None,
        device: str | None = None,
        batch_size: int | str = 1,
        max_batch_size: int | None = None,
        max_new_tokens: int = 256,
        box_file: str | None = None,
        box_id_field: str | None = None,
        max_missing_boxes: float = 0.0,
        detector: str | None = None,
        tagger: str = "clip",
        tagger_model: str | None = None,
        vocabulary: str | None = None,
        tag_threshold: float = 0.05,
        tag_top_k: int = 10,
        max_image_pixels: int | None = None,
        box_report: str | None = None,
    ) -> None:
        super().__init__()
        if max_batch_size is not None:
            raise ValueError(
                f"max_batch_size={max_batch_size} applies to batch_size=auto, which is not supported"
            )
        self.batch_size_per_gpu = _batch_size(batch_size)
        self.max_new_tokens = int(max_new_tokens)
        self.engine = load_engine(
            pretrained, dtype=dtype, device=device, detector=detector, tagger=tagger, tagger_model=tagger_model,
            vocabulary=vocabulary, tag_threshold=tag_threshold, tag_top_k=tag_top_k,
            max_image_pixels=max_image_pixels,
        )  # fmt: skip
        self.boxes = BoxFinder(box_file, self.engine, max_missing_boxes, "lmms-eval images")
        if box_id_field is not None and box_file is None:
            raise ValueError(
                "box_id_field names the document field to look up in box_file; give box_file too"
            )
        self.box_id_field = box_id_field
        self._rank = int(os.environ.get("RANK", 0))
        self._world_size = int(os.environ.get("WORLD_SIZE", 1))
        self.report_path = self._report_path(box_report)

    def _report_path(self, box_report: str | None) -> Path | None:
        if box_report is None:
            return None
        path = Path(box_report)
        if self._world_size > 1:
            path = path.with_name(f"{path.stem}.rank{self._rank}{path.suffix}")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("", encoding="utf-8")  # this run's report only
        return path

    # -- what lmms-eval reads -------------------------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self) -> Any:
        return self.engine.model.device

    @property
    def tokenizer(self) -> Any:
        return self.engine.processor.tokenizer

    # -- requests -------------------------------------------------------------------------------------------
    def generate_until(self, requests: list[Instance]) -> list[str]:
        jobs = [self._generation_job(r.args) for r in requests]
        settings = [self._settings(job) for job in jobs]
        found = self._find_boxes(jobs)
        answers: list[str | None] = [None] * len(jobs)
        bar = tqdm(total=len(jobs), disable=self.rank != 0, desc="mgllava generate_until")
        for batch in self._batches(jobs, settings):
            prepared = [self._prepare(jobs[i], found[i], settings[i].settings) for i in batch]
            results = self.engine.generate(prepared)
            for i, result in zip(batch, results, strict=True):
                answers[i] = settings[i].cut(self._raw_text(result))
                self._record("generate_until", jobs[i], found[i], result.images, result.video)
                self.cache_hook.add_partial(
                    "generate_until", (jobs[i].context, jobs[i].gen_kwargs), answers[i]
                )
            bar.update(len(batch))
        bar.close()
        self._log_boxes()
        return answers  # type: ignore[return-value]

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        jobs = [self._likelihood_job(r.args) for r in requests]
        found = self._find_boxes(jobs)
        out: list[tuple[float, bool] | None] = [None] * len(jobs)
        # a document's choices side by side, so that its image is encoded once per batch
        order = sorted(range(len(jobs)), key=lambda i: (jobs[i].task, jobs[i].split, jobs[i].doc_id, i))
        bar = tqdm(total=len(jobs), disable=self.rank != 0, desc="mgllava loglikelihood")
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            pairs = []
            for i in batch:
                continuation = self.tokenizer.encode(jobs[i].continuation, add_special_tokens=False)
                if not continuation:
                    raise ValueError(
                        f"lmms-eval {jobs[i].where()}: the continuation {jobs[i].continuation!r} is empty"
                    )
                prepared = self._prepare(
                    jobs[i], found[i], GenerationSettings(max_new_tokens=len(continuation))
                )
                pairs.append((prepared, continuation))
            for i, (prepared, _), score in zip(
                batch, pairs, score_continuations(self.engine, pairs), strict=True
            ):
                out[i] = (score.mean_nll, score.greedy)
                self._record("loglikelihood", jobs[i], found[i], prepared.images, prepared.video)
                self.cache_hook.add_partial("loglikelihood", (jobs[i].context, jobs[i].continuation), out[i])
            bar.update(len(batch))
        bar.close()
        self._log_boxes()
        return out  # type: ignore[return-value]

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError(
            "the mgllava lmms-eval model does not run generate_until_multi_round tasks; evaluate "
            "generate_until and multiple-choice tasks with it, or hold the conversation yourself through "
            "mgllava.inference.Engine.chat (every turn re-sends the conversation; images are encoded once)"
        )

    # -- unpacking ------------------------------------------------------------------------------------------
    @staticmethod
    def _generation_job(args: Sequence[Any]) -> _Job:
        context, gen_kwargs, doc_to_visual, doc_id, task, split = args
        return _Job(context, doc_to_visual, doc_id, task, split, gen_kwargs=dict(gen_kwargs or {}))

    def _likelihood_job(self, args: Sequence[Any]) -> _Job:
        if len(args) != 6:
            raise ValueError(
                f"loglikelihood request {tuple(args)!r}: a continuation without its document (the "
                "unconditional term of acc_mutual_info) is not supported; drop acc_mutual_info from the task"
            )
        context, target, doc_to_visual, doc_id, task, split = args
        job = _Job(context, doc_to_visual, doc_id, task, split)
        job.continuation = target if isinstance(target, str) else str(target(self._doc(job)))
        return job

    def _settings(self, job: _Job) -> HarnessSettings:
        try:
            return settings_from_gen_kwargs(job.gen_kwargs, self.max_new_tokens)
        except ValueError as err:
            raise ValueError(f"lmms-eval {job.where()}: {err}") from err

    def _doc(self, job: _Job) -> Any:
        return self.task_dict[job.task][job.split][job.doc_id]

    def _visuals(self, job: _Job) -> tuple[Any, list[Image.Image], str | None]:
        """The document, its images and its video path (lmms-eval gives images as PIL, videos as paths)."""
        doc = self._doc(job)
        raw = job.doc_to_visual(doc) if job.doc_to_visual is not None else None
        items = [v for group in (raw or []) for v in (group if isinstance(group, (list, tuple)) else [group])]
        images, videos = [], []
        image_suffixes = set(Image.registered_extensions())
        for item in items:
            is_path = isinstance(item, (str, Path))
            if isinstance(item, Image.Image) or (is_path and Path(item).suffix.lower() in image_suffixes):
                images.append(item)
            elif is_path:
                videos.append(str(item))
            else:
                raise ValueError(
                    f"lmms-eval {job.where()}: visual of type {type(item).__name__} is not an image or a video"
                )
        if len(videos) > 1:
            raise ValueError(
                f"lmms-eval {job.where()}: {len(videos)} videos; the model takes one per conversation"
            )
        return doc, images, videos[0] if videos else None

    # -- boxes ----------------------------------------------------------------------------------------------
    def _ids(self, job: _Job, doc: Any) -> tuple[str, ...]:
        if self.box_id_field is None:
            return ()
        if not isinstance(doc, Mapping) or self.box_id_field not in doc:
            fields = sorted(doc) if isinstance(doc, Mapping) else type(doc).__name__
            raise ValueError(
                f"lmms-eval {job.where()}: box_id_field {self.box_id_field!r} is not a field of the document ({fields})"
            )
        value = doc[self.box_id_field]
        return () if value is None else (str(value),)

    @staticmethod
    def _image_key(image: Any, ids: tuple[str, ...]) -> ImageKey:
        if isinstance(image, Image.Image):
            path = getattr(image, "filename", "") or None  # set when the dataset decoded it from a file
            return ImageKey(ids, path, file=path if path is not None and Path(path).is_file() else None)
        return ImageKey.of(image, ids, str(image))

    def _find_boxes(self, jobs: list[_Job]) -> list[_Found | None]:
        """Every request's box-file boxes, looked up before anything is answered (None: no box file)."""
        if self.boxes.lookup is None:
            return [None] * len(jobs)
        found = []
        for job in jobs:
            doc, images, video = self._visuals(job)
            ids = self._ids(job, doc)
            image_boxes = self.boxes.find([self._image_key(image, ids) for image in images])
            video_boxes = self.boxes.find_video(ids, video) if video is not None else None
            found.append(_Found(image_boxes, video_boxes))
        self.boxes.check()
        return found

    # -- answering ------------------------------------------------------------------------------------------
    def _batches(self, jobs: list[_Job], settings: list[HarnessSettings]) -> Iterator[list[int]]:
        """Indices of requests that can share a `generate`, longest context first."""
        groups: dict[Any, list[int]] = {}
        for i, s in enumerate(settings):
            key = s.settings.batch_key()
            groups.setdefault(key if key is not None else ("alone", i), []).append(i)
        for members in groups.values():
            members.sort(key=lambda i: -len(jobs[i].context))
            for start in range(0, len(members), self.batch_size):
                yield members[start : start + self.batch_size]

    def _prepare(self, job: _Job, found: _Found | None, settings: GenerationSettings) -> Prepared:
        _, images, video = self._visuals(job)
        messages = [{"role": "user", "content": _prompt(job.context, len(images), video is not None)}]
        boxes = found.image_boxes if found is not None else None
        video_boxes = found.video_boxes if found is not None else None
        try:
            return self.engine.prepare(messages, images=images, boxes=boxes, video=video, video_boxes=video_boxes,
                                       settings=settings)  # fmt: skip
        except (EngineInputError, ImageError) as err:
            raise ValueError(f"lmms-eval {job.where()}: {err}") from err

    def _raw_text(self, result: ChatResult) -> str:
        """The answer as decoded, before stripping, so that a stop string at its start cuts everything."""
        return self.tokenizer.decode(result.token_ids, skip_special_tokens=True)

    # -- reporting ------------------------------------------------------------------------------------------
    def _record(
        self, kind: str, job: _Job, found: _Found | None, images: list[VisualBoxes], video: list[VisualBoxes]
    ) -> None:
        if self.report_path is None:
            return
        image_found = found.image_boxes if found is not None else [None] * len(images)
        frames_found = found.video_boxes if found is not None and found.video_boxes is not None else None
        record = {
            "kind": kind,
            "task": job.task,
            "split": job.split,
            "doc_id": job.doc_id,
            "images": [v.to_dict() for v in self.boxes.sources(image_found, images)],
        }
        if video:
            record["video"] = [
                v.to_dict() for v in self.boxes.sources(frames_found or [None] * len(video), video)
            ]
        with self.report_path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")

    def _log_boxes(self) -> None:
        summary = self.boxes.summary()
        if summary is None:
            return
        level = logging.WARNING if summary["missing"] else logging.INFO
        logger.log(level, "box file %s: %d look-ups, found %s, missing %d (first: %s)", summary["box_file"],
                   summary["looked_up"], summary["found"], summary["missing"], summary["missing_examples"])  # fmt: skip
