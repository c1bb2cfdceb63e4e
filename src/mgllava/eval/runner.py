"""The evaluation runner: load a benchmark, answer every sample, score, write results.

    benchmark files --loader--> samples (+ input issues)
        --skip keys already answered in <out>/shards/*.jsonl (resume)--> to do
        --shard over torchrun ranks (every world_size-th sample)--> this rank's samples
        --batches: decode image/video, look up boxes, left-padded batch, greedy generate-->
        <out>/shards/rank<r>.jsonl (one line per answer, appended as produced)
        --gather to rank 0--> <out>/predictions.jsonl (data order) --scorer--> results.json + results.md

`<out>/answers_for.json` records what the answers were made with (benchmark, data, model, boxes, prompt
variant, answer length); a later run into the same folder with other settings is refused rather than mixing
answers of two models.

Decoding is greedy with no system prompt, the prompt encoded as the reference does (BOS, the chat template's
instruction around the benchmark text, tokenised in pieces around the `<image>` tag). A sample whose image or
video cannot be read, or whose prompt does not fit, gets an error line instead of an answer: it is retried on
the next run and, while it fails, listed in the results (never scored). A batch that fails is retried one
sample at a time so that one bad sample does not cost its neighbours. Results files hold no timings, so a
resumed run and an uninterrupted one write identical files.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm import tqdm

from ..boxes.files import BoxIndex, sha256_bytes, sha256_file
from ..boxes.types import Boxes
from ..data.templates import get_template
from ..media.images import ImageError, load_image
from ..media.video import VideoError, as_frames
from ..utils import dist
from ..utils.io import JsonlWriter, atomic_write_json, atomic_write_text, read_jsonl
from .benchmarks import Benchmark, EvalOptions, get_benchmark
from .report import build_results, render_markdown
from .samples import Loaded, Sample, limit_samples
from .video_qa import find_video

logger = logging.getLogger(__name__)

PREDICTIONS = "predictions.jsonl"
RESULTS = "results.json"
TABLE = "results.md"
RUN = "run.json"  # timings and topology of the last run; kept out of results.json
STAMP = "answers_for.json"  # the settings the answers in the folder were made with
SHARDS = "shards"


@dataclass
class Prepared:
    """A sample with its pixels decoded and its boxes found (None: no boxes, the zero-box fallback)."""

    sample: Sample
    image: Image.Image | None = None
    frames: list[Image.Image] | None = None
    boxes: Any = None


GenerateFn = Callable[[list[Prepared]], list[str]]


# -- preparing samples --------------------------------------------------------------------------------------
def _image_boxes(sample: Sample, index: BoxIndex | None) -> Boxes | None:
    if index is None:
        return None
    ids = [sample.box_id, sample.meta.get("group")]
    for box_id in dict.fromkeys(i for i in ids if i is not None):
        boxes = index.boxes_for(id=box_id)
        if boxes is not None:
            return boxes
    if isinstance(sample.image, bytes):
        return index.boxes_for(sha256=sha256_bytes(sample.image))
    if isinstance(sample.image, str) and Path(sample.image).is_file():
        return index.boxes_for(image=sample.image, sha256=sha256_file(sample.image))
    return None


def prepare(sample: Sample, index: BoxIndex | None) -> Prepared:
    """Decode the sample's image or video; raises ValueError / FileNotFoundError naming the input."""
    if sample.video is not None:
        path = find_video(sample.video)
        frames = as_frames(path, 8)
        boxes = index.frames_for(id=sample.box_id, video=Path(path).name) if index is not None else None
        if boxes is not None and len(boxes) != len(frames):
            raise ValueError(
                f"box file has {len(boxes)} frames for video {sample.box_id!r}, the video gives {len(frames)}"
            )
        return Prepared(sample, frames=frames, boxes=boxes)
    if sample.image is None:
        raise ValueError("sample has no image")
    return Prepared(sample, image=load_image(sample.image), boxes=_image_boxes(sample, index))


# -- generation ---------------------------------------------------------------------------------------------
class Generator:
    """Batched greedy answers from an MG-LLaVA model and its processor."""

    def __init__(self, model: Any, processor: Any, max_new_tokens: int) -> None:
        self.model = model
        self.processor = processor
        self.max_new_tokens = max_new_tokens
        self.template = get_template(processor.template)

    def __call__(self, batch: list[Prepared]) -> list[str]:
        texts = [self.template.instruction.format(input=p.sample.prompt) for p in batch]
        images = [p for p in batch if p.image is not None]
        videos = [p for p in batch if p.frames is not None]
        inputs = self.processor(
            text=texts,
            images=[p.image for p in images] or None,
            boxes=[p.boxes for p in images] if images else None,
            videos=[p.frames for p in videos] or None,
            video_boxes=[p.boxes for p in videos] if videos else None,
            padding_side="left",
        )
        device = next(self.model.parameters()).device
        inputs = inputs.to(device)
        with torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        new = out[:, inputs["input_ids"].shape[1] :]
        return [self.processor.decode_answer(row) for row in new]


def load_generator(opts: EvalOptions, max_new_tokens: int) -> Generator:
    """The saved MG-LLaVA folder `opts.model`, ready for greedy generation."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from ..model.loading import configure_generation
    from ..model.modeling import MGLlavaForConditionalGeneration

    if opts.model is None:
        raise ValueError("--model is required to generate answers (or pass --score-only)")
    if not Path(opts.model).is_dir():
        raise FileNotFoundError(f"model folder {opts.model}: no such folder")
    dtypes = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if opts.dtype not in dtypes:
        raise ValueError(f"--dtype must be one of {', '.join(dtypes)}, got {opts.dtype!r}")
    model = AutoModelForImageTextToText.from_pretrained(opts.model, dtype=dtypes[opts.dtype])
    if not isinstance(model, MGLlavaForConditionalGeneration):
        raise ValueError(f"{opts.model} holds a {type(model).__name__}, not an MG-LLaVA model")
    device = opts.device or str(dist.info().device)
    model = model.to(device).eval()
    processor = AutoProcessor.from_pretrained(opts.model)
    configure_generation(model, processor)
    return Generator(model, processor, max_new_tokens)


def _answer(generate: GenerateFn, batch: list[Prepared]) -> list[dict[str, Any]]:
    """Records for a batch; on a failing batch, each sample alone (so the error lands on its sample)."""
    try:
        texts = generate(batch)
    except (ValueError, ImageError, VideoError, RuntimeError) as err:
        if len(batch) > 1:
            return [r for p in batch for r in _answer(generate, [p])]
        return [{"key": batch[0].sample.key, "error": f"generation failed: {type(err).__name__}: {err}"}]
    return [{"key": p.sample.key, "prediction": t} for p, t in zip(batch, texts, strict=True)]


# -- records on disk ----------------------------------------------------------------------------------------
def read_records(out: Path) -> dict[str, dict[str, Any]]:
    """The best record per key over every shard file and the merged file: an answer beats an error."""
    files = sorted((out / SHARDS).glob("*.jsonl")) + [out / PREDICTIONS]
    best: dict[str, dict[str, Any]] = {}
    for path in files:
        if not path.is_file():
            continue
        for record in read_jsonl(path, allow_torn_tail=True):
            key = str(record.get("key"))
            if key not in best or "prediction" in record or "prediction" not in best[key]:
                best[key] = {k: record[k] for k in ("key", "prediction", "error") if k in record}
    return best


def _generate_shard(
    todo: list[Sample], generate: GenerateFn, index: BoxIndex | None, writer: JsonlWriter, batch_size: int
) -> list[dict[str, Any]]:
    info = dist.info()
    mine = dist.shard(todo, info.rank, info.world_size)
    written: list[dict[str, Any]] = []
    bar = tqdm(
        total=len(mine), desc=f"rank {info.rank}", unit="q", disable=not info.is_main, dynamic_ncols=True
    )
    try:
        for start in range(0, len(mine), batch_size):
            ready: list[Prepared] = []
            records: list[dict[str, Any]] = []
            for sample in mine[start : start + batch_size]:
                try:
                    ready.append(prepare(sample, index))
                except (ValueError, FileNotFoundError, OSError) as err:
                    records.append({"key": sample.key, "error": str(err)})
            if ready:
                records += _answer(generate, ready)
            for record in records:
                writer.write(record)
                written.append(record)
            bar.update(len(records))
    finally:
        bar.close()
    return written


# -- the run ------------------------------------------------------------------------------------------------
def _check(opts: EvalOptions) -> None:
    if opts.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {opts.batch_size}")
    if opts.max_new_tokens is not None and opts.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be at least 1, got {opts.max_new_tokens}")
    for name in ("data", "annotations", "ocr", "boxes", "submission_questions"):
        value = getattr(opts, name)
        if value is not None and not Path(value).is_file():
            raise FileNotFoundError(f"--{name.replace('_', '-')} {value}: no such file")
    if opts.images is not None and not Path(opts.images).is_dir():
        raise FileNotFoundError(f"--images {opts.images}: no such folder")


def _check_folder(out: Path, opts: EvalOptions, max_new: int) -> dict[str, Any]:
    """What the answers in `out` were made with; answers made otherwise are never mixed in (ValueError)."""

    def path(value: str | None) -> str | None:
        return str(Path(value).resolve()) if value is not None else None

    stamp = {
        "benchmark": opts.benchmark,
        "data": path(opts.data),
        "model": path(opts.model),
        "boxes": path(opts.boxes),
        "ocr": path(opts.ocr),
        "prompt": opts.prompt,
        "split": opts.split,
        "max_new_tokens": max_new,
    }
    if (out / STAMP).is_file():
        old = json.loads((out / STAMP).read_text(encoding="utf-8"))
        ignore = {"model"} if opts.score_only or None in (old.get("model"), stamp["model"]) else set()
        differ = [k for k in stamp if k not in ignore and old.get(k) != stamp[k]]
        if differ:
            changes = "; ".join(f"{k}: {old.get(k)!r} there, {stamp[k]!r} now" for k in differ)
            raise ValueError(f"{out} holds answers made with other settings ({changes}); use another --out")
    return stamp


def load_benchmark(opts: EvalOptions) -> tuple[Benchmark, Loaded]:
    bench = get_benchmark(opts.benchmark)
    return bench, limit_samples(bench.load(opts), opts.limit, bench.group)


def run_eval(opts: EvalOptions, generate: GenerateFn | None = None) -> dict[str, Any] | None:
    """Answer, gather, score. Returns the results on rank 0 (None on other ranks).

    `generate` replaces the model (tests, or an engine of your own); by default `opts.model` is loaded,
    and only when something is left to answer."""
    _check(opts)
    info = dist.init()
    bench, loaded = load_benchmark(opts)
    max_new = opts.max_new_tokens or bench.max_new_tokens
    out = Path(opts.out)
    stamp = _check_folder(out, opts, max_new)
    done = read_records(out)
    dist.barrier()  # every rank has read what is on disk before anyone appends
    todo = [s for s in loaded.samples if "prediction" not in done.get(s.key, {})]
    new: list[dict[str, Any]] = []
    elapsed = 0.0
    if todo and not opts.score_only:
        start = time.perf_counter()
        generate = generate or load_generator(opts, max_new)
        if info.is_main and not (out / STAMP).is_file():
            atomic_write_json(out / STAMP, stamp)
        index = BoxIndex.load(opts.boxes) if opts.boxes else None
        with JsonlWriter(out / SHARDS / f"rank{info.rank}.jsonl", key=lambda r: r["key"]) as writer:
            new = _generate_shard(todo, generate, index, writer, opts.batch_size)
        elapsed = time.perf_counter() - start
    gathered = dist.gather_objects(new)
    if not info.is_main:
        return None
    for records in gathered:
        for record in records:
            if "prediction" in record or "prediction" not in done.get(record["key"], {}):
                done[record["key"]] = record
    results = _finish(bench, opts, loaded, done, out, max_new)
    answered = sum(len(r) for r in gathered)
    run = {
        "world_size": info.world_size,
        "batch_size": opts.batch_size,
        "answered_this_run": answered,
        "seconds": round(elapsed, 3),
        "samples_per_second": round(answered / elapsed, 4) if elapsed > 0 else None,
    }
    atomic_write_json(out / RUN, run)
    logger.info("%s: %d answered in %.1f s", bench.name, answered, elapsed)
    return results


def _finish(
    bench: Benchmark,
    opts: EvalOptions,
    loaded: Loaded,
    records: dict[str, dict[str, Any]],
    out: Path,
    max_new: int,
) -> dict[str, Any]:
    predictions = {k: r["prediction"] for k, r in records.items() if "prediction" in r}
    scored = bench.score(loaded, predictions, opts, out)
    results = build_results(bench, opts, loaded, records, scored, max_new)
    _write_predictions(loaded, records, scored, out / PREDICTIONS)
    atomic_write_json(out / RESULTS, results)
    atomic_write_text(out / TABLE, render_markdown(results))
    return results


def _write_predictions(
    loaded: Loaded, records: dict[str, dict[str, Any]], scored: dict[str, Any], path: Path
) -> None:
    """The merged answers in data order, each with its ground truth and what the scorer made of it."""
    per_sample = scored.get("per_sample", {})
    extracted = scored.get("extracted", {})
    lines = []
    for sample in loaded.samples:
        record = records.get(sample.key)
        if record is None:
            continue
        line = dict(record)
        if sample.answers is not None:
            line["answers"] = sample.answers
        if sample.key in extracted:
            line["extracted"] = extracted[sample.key]
        if sample.key in per_sample:
            line["score"] = per_sample[sample.key]
        lines.append(line)
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in lines))
