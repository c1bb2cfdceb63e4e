"""The evaluation runner: load a benchmark, answer every sample, score, write results.

    benchmark files --loader--> samples (+ input issues)
        --look up every sample's boxes (boxes.lookup), refuse past --max-missing-boxes--> boxes per sample
        --skip keys already answered in <out>/shards/*.jsonl (resume)--> to do
        --shard over torchrun ranks (every world_size-th sample)--> this rank's samples
        --batches through the inference engine (the same path as chat and serve: decoding, prompts,
          visual rows cached by content, left-padded greedy generate, stop tokens)-->
        <out>/shards/rank<r>.jsonl (one line per answer, appended as produced)
        --gather to rank 0--> <out>/predictions.jsonl (data order) --scorer--> results.json + results.md

`<out>/answers_for.json` records what the answers were made with (benchmark, data, model, boxes, prompt
variant, answer length); a later run into the same folder with other settings is refused rather than mixing
answers of two models.

Decoding is greedy with no system prompt, the prompt encoded as the reference does (BOS, the chat template's
instruction around the benchmark text, tokenised in pieces around the `<image>` tag): one user turn through
`inference.Engine`. Boxes: a sample's boxes are looked up in `--boxes` by the one rule of `boxes.lookup`
(its box ids - the key the reference's box file uses for this benchmark, docs/benchmarks.md - then its image
path, its content hash); images the file lacks are counted and listed in the results, and more than
`--max-missing-boxes` of them stop the run before anything is written. A box file that matches no sample at
all is refused whatever the threshold, with an error naming the key this benchmark's samples are filed
under. The boxes then go through the benchmark's box settings (the reference's: `--box-limit` etc.), set on
the engine's image processor and recorded in the results.
A sample whose image or video cannot be read, whose prompt does not fit, or whose generation raises (a CUDA
out-of-memory included) gets an error line instead of an answer: it is retried on the next run and, while it
fails, counted and listed in the results (never scored). A batch that fails is retried one sample at a time
so that one bad sample does not cost its neighbours. The scorers average the samples that have answers, so
when more than `--max-failed-samples` (default 0) failed, the headline score is withheld: results.json and
results.md are written with `score` null and the reason (`score_refused`), and `FailedSamples` is raised
(`mgllava eval` exits non-zero), as with `--max-missing-boxes`. Results files hold no timings, so a
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

from tqdm import tqdm

from ..boxes.lookup import BoxLookup, ImageKey, MissingBoxes
from ..inference.engine import Engine, GenerationSettings
from ..utils import dist
from ..utils.io import JsonlWriter, atomic_write_json, atomic_write_text, read_jsonl
from .benchmarks import Benchmark, EvalOptions, box_settings, describe_box_settings, get_benchmark
from .multiple_choice import DEFAULT_MC_INSTRUCTION
from .report import build_results, render_markdown
from .samples import Loaded, Sample, check_unique_keys, limit_samples
from .video_qa import find_video

logger = logging.getLogger(__name__)


class FailedSamples(ValueError):
    """More samples failed to generate than `--max-failed-samples` allows; the results are written without
    a score."""


PREDICTIONS = "predictions.jsonl"
RESULTS = "results.json"
TABLE = "results.md"
RUN = "run.json"  # timings and topology of the last run; kept out of results.json
STAMP = "answers_for.json"  # the settings the answers in the folder were made with
SHARDS = "shards"
# settings added to the stamp later, with the only value folders stamped before them can have been made with
STAMP_BEFORE = {"mc_instruction": DEFAULT_MC_INSTRUCTION}


@dataclass
class Request:
    """A sample ready to answer: where its pixels are (an image path or bytes, or a video path) and the boxes
    found for them (None: none found; the engine's proposer, if any, then proposes)."""

    sample: Sample
    image: str | bytes | None = None
    video: str | None = None
    boxes: Any = None  # an image's Boxes, or one Boxes per video frame


GenerateFn = Callable[[list[Request]], list[str]]


# -- boxes --------------------------------------------------------------------------------------------------
def find_boxes(
    samples: list[Sample],
    lookup: BoxLookup | None,
    max_missing: float,
    bench: Benchmark | None = None,
    loaded: Loaded | None = None,
) -> dict[str, Any]:
    """Every sample's boxes by key, looked up (by `Sample.box_ids`, then path and content) before anything
    is answered. `MissingBoxes` when the file matches no sample at all, or when more than `max_missing` of
    the samples find none; the message names the key `bench` is filed under (docs/benchmarks.md)."""
    if lookup is None:
        return {}
    found: dict[str, Any] = {}
    for sample in samples:
        if sample.video is not None:
            try:
                path = find_video(sample.video)
            except FileNotFoundError:
                path = sample.video
            found[sample.key] = lookup.video(sample.box_ids, path)
        elif sample.image is not None:
            key = ImageKey.of(
                sample.image, sample.box_ids, sample.image if isinstance(sample.image, str) else None
            )
            found[sample.key] = lookup.image(key)
    summary = lookup.summary()
    if summary["looked_up"] and not sum(summary["found"].values()):
        raise MissingBoxes(
            f"box file {lookup.name} matches none of the {summary['looked_up']} samples: "
            f"{_key_hint(samples, lookup, bench, loaded)}"
        )
    try:
        lookup.check_missing(max_missing, "benchmark samples")
    except MissingBoxes as err:
        raise MissingBoxes(f"{err}. {_key_hint(samples, lookup, bench, loaded)}") from None
    return found


def _key_hint(
    samples: list[Sample], lookup: BoxLookup, bench: Benchmark | None, loaded: Loaded | None
) -> str:
    """Which ids the samples were looked up by and which the file has, and the reference's key."""
    ours = [i for s in samples[:3] for i in s.box_ids[:1]]
    theirs = list(lookup.index.by_id)[:3]
    rule = (loaded.info.get("box_ids") if loaded is not None else None) or "their box ids"
    text = (
        f"the samples were looked up by {rule} (e.g. {', '.join(map(repr, ours)) or 'none'}), then by image "
        f"path and content; the file's ids look like {', '.join(map(repr, theirs)) or '(none)'}"
    )
    if bench is not None:
        text += f". For {bench.title}, box files are keyed by {bench.box_key} (docs/benchmarks.md)"
    return text


def prepare(sample: Sample, boxes: Any = None) -> Request:
    """Where the sample's pixels are; raises ValueError / FileNotFoundError naming the input."""
    if sample.video is not None:
        return Request(sample, video=find_video(sample.video), boxes=boxes)
    if sample.image is None:
        raise ValueError("sample has no image")
    return Request(sample, image=sample.image, boxes=boxes)


# -- generation ---------------------------------------------------------------------------------------------
class EngineGenerator:
    """Greedy answers through `inference.Engine`, the path chat and serve use: one user turn per sample,
    requests batched into one left-padded `generate`, visual rows cached by content (MMBench's rotated
    copies of a question encode their image once)."""

    def __init__(self, engine: Engine, max_new_tokens: int) -> None:
        self.engine = engine
        self.settings = GenerationSettings(max_new_tokens=max_new_tokens)

    def __call__(self, batch: list[Request]) -> list[str]:
        prepared = [self._prepare(r) for r in batch]
        return [result.text for result in self.engine.generate(prepared)]

    def _prepare(self, request: Request):
        messages = [{"role": "user", "content": request.sample.prompt}]
        if request.video is not None:
            return self.engine.prepare(messages, images=[], video=request.video, video_boxes=request.boxes,
                                       settings=self.settings)  # fmt: skip
        return self.engine.prepare(messages, images=[request.image], boxes=[request.boxes],
                                   settings=self.settings)  # fmt: skip


def load_generator(opts: EvalOptions, max_new_tokens: int, proposer: Any = None) -> EngineGenerator:
    """The saved MG-LLaVA folder `opts.model` behind an engine, ready for greedy answers, its image
    processor set to the benchmark's box settings (`benchmarks.box_settings`)."""
    if opts.model is None:
        raise ValueError("--model is required to generate answers (or pass --score-only)")
    device = opts.device or str(dist.info().device)
    settings = box_settings(get_benchmark(opts.benchmark), opts)
    engine = Engine.from_pretrained(
        opts.model, dtype=opts.dtype, device=device, proposer=proposer, box_settings=settings
    )
    return EngineGenerator(engine, max_new_tokens)


def _answer(generate: GenerateFn, batch: list[Request]) -> list[dict[str, Any]]:
    """Records for a batch; on a failing batch, each sample alone (so the error lands on its sample)."""
    try:
        texts = generate(batch)
    except (ValueError, FileNotFoundError, RuntimeError) as err:  # EngineInputError is a ValueError
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
    todo: list[Sample], generate: GenerateFn, boxes: dict[str, Any], writer: JsonlWriter, batch_size: int
) -> list[dict[str, Any]]:
    info = dist.info()
    mine = dist.shard(todo, info.rank, info.world_size)
    written: list[dict[str, Any]] = []
    bar = tqdm(
        total=len(mine), desc=f"rank {info.rank}", unit="q", disable=not info.is_main, dynamic_ncols=True
    )
    try:
        for start in range(0, len(mine), batch_size):
            ready: list[Request] = []
            records: list[dict[str, Any]] = []
            for sample in mine[start : start + batch_size]:
                try:
                    ready.append(prepare(sample, boxes.get(sample.key)))
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
    if not 0.0 <= opts.max_missing_boxes <= 1.0:
        raise ValueError(f"--max-missing-boxes is a share in [0, 1], got {opts.max_missing_boxes}")
    get_benchmark(opts.benchmark).check(opts)  # scoring settings, refused before anything is generated
    if opts.max_failed_samples < 0:
        raise ValueError(f"--max-failed-samples must be 0 or more, got {opts.max_failed_samples}")
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


def _check_folder(
    out: Path, opts: EvalOptions, max_new: int, boxes: dict[str, Any], loaded: Loaded
) -> dict[str, Any]:
    """What the answers in `out` were made with; answers made otherwise are never mixed in (ValueError).
    A loader whose prompts changed states its rule in `info["prompt_rule"]`; a folder without it was
    answered under the old prompts and is refused."""

    def path(value: str | None) -> str | None:
        return str(Path(value).resolve()) if value is not None else None

    stamp = {
        "benchmark": opts.benchmark,
        "data": path(opts.data),
        "model": path(opts.model),
        "boxes": path(opts.boxes),
        "box_settings": boxes,
        "ocr": path(opts.ocr),
        "prompt": opts.prompt,
        "mc_instruction": opts.mc_instruction,
        "split": opts.split,
        "max_new_tokens": max_new,
    }
    if "prompt_rule" in loaded.info:
        stamp["prompt_rule"] = loaded.info["prompt_rule"]
    if (out / STAMP).is_file():
        old = {**STAMP_BEFORE, **json.loads((out / STAMP).read_text(encoding="utf-8"))}
        ignore = {"model"} if opts.score_only or None in (old.get("model"), stamp["model"]) else set()
        differ = [k for k in stamp if k not in ignore and old.get(k) != stamp[k]]
        if differ:
            changes = "; ".join(f"{k}: {old.get(k)!r} there, {stamp[k]!r} now" for k in differ)
            raise ValueError(f"{out} holds answers made with other settings ({changes}); use another --out")
    return stamp


def load_benchmark(opts: EvalOptions) -> tuple[Benchmark, Loaded]:
    bench = get_benchmark(opts.benchmark)
    loaded = bench.load(opts)
    check_unique_keys(loaded, f"{bench.name} {opts.data}")
    return bench, limit_samples(loaded, opts.limit, bench.group)


def run_eval(opts: EvalOptions, generate: GenerateFn | None = None) -> dict[str, Any] | None:
    """Answer, gather, score. Returns the results on rank 0 (None on other ranks).

    `generate` replaces the model (tests, or an engine of your own); by default `opts.model` is loaded,
    and only when something is left to answer."""
    _check(opts)
    info = dist.init()
    bench, loaded = load_benchmark(opts)
    settings = box_settings(bench, opts)
    max_new = opts.max_new_tokens or bench.max_new_tokens
    out = Path(opts.out)
    stamp = _check_folder(out, opts, max_new, settings, loaded)
    lookup = BoxLookup.load(opts.boxes) if opts.boxes else None
    boxes = find_boxes(loaded.samples, lookup, opts.max_missing_boxes, bench, loaded)
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
        with JsonlWriter(out / SHARDS / f"rank{info.rank}.jsonl", key=lambda r: r["key"]) as writer:
            new = _generate_shard(todo, generate, boxes, writer, opts.batch_size)
        elapsed = time.perf_counter() - start
    gathered = dist.gather_objects(new)
    if not info.is_main:
        return None
    for records in gathered:
        for record in records:
            if "prediction" in record or "prediction" not in done.get(record["key"], {}):
                done[record["key"]] = record
    results = _finish(bench, opts, loaded, done, out, max_new, lookup, settings)
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
    if "score_refused" in results:
        raise FailedSamples(results["score_refused"])
    return results


def _finish(
    bench: Benchmark,
    opts: EvalOptions,
    loaded: Loaded,
    records: dict[str, dict[str, Any]],
    out: Path,
    max_new: int,
    lookup: BoxLookup | None,
    settings: dict[str, Any],
) -> dict[str, Any]:
    predictions = {k: r["prediction"] for k, r in records.items() if "prediction" in r}
    scored = bench.score(loaded, predictions, opts, out)
    results = build_results(bench, opts, loaded, records, scored, max_new)
    results["rules"]["box_ids"] = loaded.info.get("box_ids", "the sample id")
    results["rules"]["box_settings"] = describe_box_settings(settings)
    results["box_settings"] = settings
    if lookup is not None:
        results["boxes"] = lookup.summary()
    _refuse_score_past_failures(results, opts.max_failed_samples, out)
    _write_predictions(loaded, records, scored, out / PREDICTIONS)
    atomic_write_json(out / RESULTS, results)
    atomic_write_text(out / TABLE, render_markdown(results))
    return results


def _refuse_score_past_failures(results: dict[str, Any], allowed: int, out: Path) -> None:
    """Withhold every score (headline, categories, macro, vanilla) when more than `allowed` samples failed:
    an average over the samples that happened to answer would pass for the benchmark's score."""
    failed = results["failed"]
    if len(failed) <= allowed:
        return
    first = "; ".join(f"{f['id']}: {f['reason']}" for f in failed[:3])
    results["score_refused"] = (
        f"{len(failed)} of {results['counts']['samples']} samples failed to generate, more than "
        f"--max-failed-samples {allowed}, so no score is given (the rest would pass for the benchmark's "
        f"score). First: {first}. All are listed in {out / TABLE}; run again to retry them, or allow them "
        "with --max-failed-samples N"
    )
    results["score"] = None
    results["categories"] = {}
    for name in ("macro_accuracy", "vanilla_accuracy"):
        results.pop(name, None)


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
