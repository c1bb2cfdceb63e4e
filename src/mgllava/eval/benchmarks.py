"""The benchmark registry: name -> how to load it, how to score it, how long answers may be.

| name | family | files | score |
|---|---|---|---|
| mmbench_dev, mmbench_test | multiple choice | VLMEvalKit TSV | CircularEval accuracy (+ vanilla) / submission xlsx |
| seed_image | multiple choice | TSV or SEED-Bench.json | accuracy per question type (+ upload jsonl from the JSON) |
| mmstar, ai2d | multiple choice | TSV | accuracy (micro, and macro over categories) |
| scienceqa_img | multiple choice | TSV or problems.json | accuracy per subject |
| textvqa_val | short answer | TextVQA JSON (+OCR) or LLaVA jsonl + annotations | TextVQA accuracy |
| docvqa_val | short answer | DocVQA JSON or TSV | ANLS |
| vqav2_val, vqav2_testdev | short answer | VQAv2 questions (+annotations) or LLaVA jsonl | VQA accuracy / upload file |
| msvd_qa, msrvtt_qa | video | Video-ChatGPT test_q/test_a JSON | rule judge, GPT judge |
| short_vqa | short answer | our short-answer JSONL (easy-vqa, generated sets) | --metric |

Boxes (docs/benchmarks.md): each benchmark names the id the reference's released box file uses (`box_key`;
the loaders set `Sample.box_id` to it) and the reference's box settings for it (`box_settings`, the image
processor's `box_*` fields: class-wise NMS at IoU 0.2 and the per-label cap above 100 boxes everywhere, no
cap for VQAv2, 20 per label per frame for video). `EvalOptions.box_settings` overrides them
(`mgllava eval --box-limit none` etc.); the settings used are recorded in the results.

Every benchmark is scored by the `--scoring` pipeline (default "official"; `scoring.SCORING`, docs/scoring.md).
A multiple-choice benchmark names, per pipeline, the letter rule it uses (`Benchmark.choice_rules`);
`--choice-rule` overrides it (e.g. "reference", the MG-LLaVA reference's own rule).
The metric is the benchmark's, never inferred from how a file's ids group: CircularEval for MMBench only
(`Benchmark.circular`), plain accuracy for the other multiple-choice benchmarks.

Answer length: 100 new tokens, the reference model's `evaluate_max_tokens` default, for images and video
alike; the reference's 13B config sets 50 (pass `--max-new-tokens 50` to reproduce its runs).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..boxes.select import BoxOptions
from .judge import GptJudge
from .metrics import CHOICE_RULES
from .multiple_choice import (
    DEFAULT_MC_INSTRUCTION,
    MC_INSTRUCTIONS,
    SEED_FORMAT,
    load_multiple_choice,
    load_scienceqa_json,
    load_tsv,
    score_multiple_choice,
    write_mmbench_submission,
    write_seed_upload,
)
from .samples import Loaded, Sample
from .scoring import DEFAULT_SCORING, check_scoring
from .short_answer import (
    load_docvqa,
    load_short_vqa,
    load_textvqa,
    load_vqav2,
    score_short_answer,
    upload_rules,
    write_vqav2_upload,
)
from .video_qa import load_video_qa, score_video_qa


@dataclass
class EvalOptions:
    """Everything `mgllava eval` takes; the library entry point is `runner.run_eval(EvalOptions(...))`."""

    benchmark: str
    data: str
    out: str
    model: str | None = None
    images: str | None = None
    boxes: str | None = None
    max_missing_boxes: float = 0.0  # share of samples allowed to find no boxes in `boxes`
    box_settings: dict[str, Any] = field(default_factory=dict)  # overrides of the benchmark's BOX_FIELDS
    annotations: str | None = None
    ocr: str | None = None
    limit: int | None = None
    batch_size: int = 1
    max_new_tokens: int | None = None
    scoring: str = DEFAULT_SCORING
    choice_rule: str | None = None  # None: the benchmark's rule under `scoring`
    prompt: str = "ocr"
    mc_instruction: str = DEFAULT_MC_INSTRUCTION  # multiple choice: MC_INSTRUCTIONS
    max_failed_samples: int = 0  # samples whose generation may fail before the score is refused
    metric: str | None = None
    split: str = "test"
    submission_questions: str | None = None
    judge_url: str | None = None
    judge_model: str = "gpt-3.5-turbo"
    judge_key_env: str = "MGLLAVA_JUDGE_API_KEY"
    judge_workers: int = 4
    judge_rounds: int = 3
    dtype: str = "auto"
    device: str | None = None
    score_only: bool = False

    def judge(self) -> GptJudge | None:
        if self.judge_url is None:
            return None
        if self.judge_rounds < 1:
            raise ValueError(f"--judge-rounds must be at least 1, got {self.judge_rounds}")
        return GptJudge(
            self.judge_url, self.judge_model, self.judge_key_env, self.judge_workers, rounds=self.judge_rounds
        )


Scorer = Callable[[Loaded, dict[str, str], EvalOptions, Path], dict[str, Any]]

# The image processor's box fields a benchmark sets, with the reference's values (docs/design.md section 5).
BOX_FIELDS = ("box_nms_iou", "box_limit", "box_cap", "box_per_label")
REFERENCE_BOXES: dict[str, Any] = {
    "box_nms_iou": 0.2,
    "box_limit": 100,
    "box_cap": "per_label",
    "box_per_label": None,  # 20 when the limit is above 50, else 5
}
VQAV2_BOXES = {**REFERENCE_BOXES, "box_limit": None}  # the reference's VQAv2 config sets no limit_num
VIDEO_BOXES = {**REFERENCE_BOXES, "box_per_label": 20}  # its video dataset keeps 20 per label at any limit
VIDEO_NAME = (
    "the video name (test_q.json `video_name` = the box file's `video` without its extension), as the "
    "reference's box files"
)
TSV_INDEX = "the VLMEvalKit TSV `index` ({tsv}, one record per row), as the reference's released box file"


@dataclass(frozen=True)
class Benchmark:
    name: str
    title: str
    family: str  # "multiple_choice" | "short_answer" | "video"
    load: Callable[[EvalOptions], Loaded]
    score: Scorer
    max_new_tokens: int = 100
    group: Callable[[Sample], str] | None = None  # rows answered together (MMBench rotations), for --limit
    box_key: str = "the sample id"  # what box files for this benchmark are keyed by (the reference's key)
    box_settings: dict[str, Any] = field(default_factory=lambda: dict(REFERENCE_BOXES))
    choice_rules: dict[str, str] | None = None  # multiple choice: scoring pipeline -> letter rule
    # multiple choice: CircularEval over rotated rows (MMBench); else one row is one question
    circular: bool = False

    def check(self, opts: EvalOptions) -> None:
        """Refuse, before anything is generated, scoring settings this benchmark cannot score with."""
        check_scoring(opts.scoring)
        if self.family == "multiple_choice":
            self.choice_rule(opts)
            if opts.mc_instruction not in MC_INSTRUCTIONS:
                raise ValueError(
                    f"unknown --mc-instruction {opts.mc_instruction!r}; available: {', '.join(MC_INSTRUCTIONS)}"
                )
        elif opts.choice_rule is not None:
            raise ValueError(f"--choice-rule applies to multiple-choice benchmarks, not {self.name}")

    def choice_rule(self, opts: EvalOptions) -> tuple[str, str]:
        """The letter rule for `opts` and why: `--choice-rule` if given, else this benchmark's rule under
        `--scoring`. ValueError when the pipeline has no rule for this benchmark."""
        check_scoring(opts.scoring)
        if opts.choice_rule is not None:
            if opts.choice_rule not in CHOICE_RULES:
                raise ValueError(
                    f"unknown --choice-rule {opts.choice_rule!r}; available: {', '.join(CHOICE_RULES)}"
                )
            return opts.choice_rule, "--choice-rule"
        rules = self.choice_rules or {}
        if opts.scoring not in rules:
            raise ValueError(
                f"--scoring {opts.scoring} has no multiple-choice rule for {self.name} "
                f"({NO_CHOICE_RULE.get(opts.scoring, '')}); pick one with --choice-rule "
                f"({', '.join(CHOICE_RULES)}) or use --scoring {' or '.join(rules)}"
            )
        return rules[opts.scoring], f"--scoring {opts.scoring}"


NO_CHOICE_RULE = {
    "llava": "LLaVA publishes no scoring script for it",
    "lmms-eval": "lmms-eval's per-task multiple-choice extraction is not implemented here",
}


def _mc_group(sample: Sample) -> str:
    return sample.meta["group"]


def _score_mc(loaded: Loaded, predictions: dict[str, str], opts: EvalOptions, out: Path) -> dict[str, Any]:
    bench = get_benchmark(opts.benchmark)
    rule, chosen_by = bench.choice_rule(opts)
    result = score_multiple_choice(loaded, predictions, rule, circular=bench.circular)
    result["rules"]["scoring"] = opts.scoring
    result["rules"]["choice_extraction"] = f"{rule} (by {chosen_by})"
    result["rules"]["mc_instruction"] = f"{opts.mc_instruction}: {MC_INSTRUCTIONS[opts.mc_instruction]}"
    if loaded.table is not None and not loaded.info.get("has_answers", True):
        path = write_mmbench_submission(loaded, predictions, out / "submission.xlsx")
        result["submission"] = path.name
    if loaded.info.get("format") == SEED_FORMAT:
        path, empty = write_seed_upload(loaded, predictions, out / "seed_upload.jsonl")
        result["submission"] = path.name
        result["submission_empty_answers"] = empty
    return result


def _short(metric: str, *categories: str) -> Scorer:
    def score(loaded: Loaded, predictions: dict[str, str], opts: EvalOptions, out: Path) -> dict[str, Any]:
        return score_short_answer(loaded, predictions, metric, categories, opts.scoring)

    return score


def _score_short_vqa(
    loaded: Loaded, predictions: dict[str, str], opts: EvalOptions, out: Path
) -> dict[str, Any]:
    return score_short_answer(loaded, predictions, opts.metric or "exact", ("category",), opts.scoring)


def _score_vqav2_testdev(
    loaded: Loaded, predictions: dict[str, str], opts: EvalOptions, out: Path
) -> dict[str, Any]:
    path, empty = write_vqav2_upload(
        loaded, predictions, out / "vqav2_upload.json", opts.submission_questions, opts.scoring
    )
    return {
        "metric": "none (scored by the EvalAI server)",
        "score": None,
        "scored": 0,
        "rules": upload_rules(opts.scoring),
        "categories": {},
        "no_ground_truth": [],
        "submission": path.name,
        "submission_empty_answers": empty,
    }


def _score_video(loaded: Loaded, predictions: dict[str, str], opts: EvalOptions, out: Path) -> dict[str, Any]:
    return score_video_qa(loaded, predictions, opts.judge(), out, opts.scoring)


def _load_vqav2_val(opts: EvalOptions) -> Loaded:
    if opts.annotations is None:
        raise ValueError("vqav2_val is scored against --annotations v2_mscoco_val2014_annotations.json")
    return load_vqav2(opts.data, opts.images, opts.annotations)


def _mc(
    name: str,
    title: str,
    load: Callable[[EvalOptions], Loaded],
    tsv: str,
    circular: bool = False,
    **rules: str,
) -> Benchmark:
    """A multiple-choice benchmark; `tsv`: the VLMEvalKit file whose `index` keys the reference's box file;
    `circular`: scored by CircularEval (MMBench); `rules`: pipeline -> letter rule (official: VLMEvalKit's
    can_infer unless given)."""
    choice_rules = {"official": "vlmevalkit", **rules}
    key = TSV_INDEX.format(tsv=tsv)
    group = _mc_group if circular else None  # --limit keeps a question's rotations together
    return Benchmark(
        name,
        title,
        "multiple_choice",
        load,
        _score_mc,
        100,
        group,
        key,
        choice_rules=choice_rules,
        circular=circular,
    )


BENCHMARKS: dict[str, Benchmark] = {
    b.name: b
    for b in (
        # LLaVA sends MMBench to its evaluation server, whose exact-matching stage is VLMEvalKit's can_infer
        _mc(
            "mmbench_dev",
            "MMBench dev",
            lambda o: load_tsv(o.data, o.images, o.mc_instruction),
            "MMBench_DEV_EN.tsv",
            circular=True,
            llava="vlmevalkit",
        ),
        _mc(
            "mmbench_test",
            "MMBench test",
            lambda o: load_tsv(o.data, o.images, o.mc_instruction),
            "MMBench_TEST_EN.tsv",
            circular=True,
            llava="vlmevalkit",
        ),
        _mc(
            "seed_image",
            "SEED-Bench (image)",
            lambda o: load_multiple_choice(o.data, o.images, o.mc_instruction),
            "SEEDBench_IMG.tsv",
            llava="llava-seed",
        ),
        _mc(
            "mmstar",
            "MMStar",
            lambda o: load_tsv(o.data, o.images, o.mc_instruction),
            "MMStar.tsv",
            official="mmstar",
        ),
        _mc(
            "scienceqa_img",
            "ScienceQA-IMG",
            lambda o: _load_scienceqa(o),
            "ScienceQA_TEST.tsv",
            llava="llava-sqa",
        ),
        _mc("ai2d", "AI2D", lambda o: load_tsv(o.data, o.images, o.mc_instruction), "AI2D_TEST.tsv"),
        Benchmark(
            "textvqa_val",
            "TextVQA val",
            "short_answer",
            lambda o: load_textvqa(o.data, o.images, o.ocr, o.annotations, o.prompt),
            _short("textvqa"),
            box_key="the `question_id` of LLaVA's llava_textvqa_val_v051_ocr.jsonl, which is the TextVQA "
            "image id (`image_id` in TextVQA_0.5.1_val.json), as the reference's released box file",
        ),
        Benchmark(
            "docvqa_val",
            "DocVQA val",
            "short_answer",
            lambda o: load_docvqa(o.data, o.images),
            _short("anls", "question_types", "split"),
            box_key=TSV_INDEX.format(tsv="DocVQA_VAL.tsv"),
        ),
        Benchmark(
            "vqav2_val",
            "VQAv2 val",
            "short_answer",
            _load_vqav2_val,
            _short("vqa", "answer_type"),
            box_key="the VQAv2 `question_id`, the reference's rule for test-dev (it evaluates no val split)",
            box_settings=dict(VQAV2_BOXES),
        ),
        Benchmark(
            "vqav2_testdev",
            "VQAv2 test-dev",
            "short_answer",
            lambda o: load_vqav2(o.data, o.images),
            _score_vqav2_testdev,
            box_key="the VQAv2 `question_id` (as LLaVA's llava_vqav2_mscoco_test-dev2015.jsonl carries it), "
            "as the reference's released box file",
            box_settings=dict(VQAV2_BOXES),
        ),
        Benchmark(
            "msvd_qa",
            "MSVD-QA",
            "video",
            lambda o: load_video_qa(o.data, o.images, o.annotations),
            _score_video,
            box_key=VIDEO_NAME,
            box_settings=dict(VIDEO_BOXES),
        ),
        Benchmark(
            "msrvtt_qa",
            "MSRVTT-QA",
            "video",
            lambda o: load_video_qa(o.data, o.images, o.annotations),
            _score_video,
            box_key=VIDEO_NAME,
            box_settings=dict(VIDEO_BOXES),
        ),
        Benchmark(
            "short_vqa",
            "short-answer VQA",
            "short_answer",
            lambda o: load_short_vqa(o.data, o.images),
            _score_short_vqa,
            box_key="the record's `id` (our format; the reference has no such benchmark)",
        ),
    )
}


def _load_scienceqa(opts: EvalOptions) -> Loaded:
    if Path(opts.data).suffix.lower() == ".tsv":
        return load_tsv(opts.data, opts.images, opts.mc_instruction)
    return load_scienceqa_json(opts.data, opts.images, opts.split, opts.mc_instruction)


def box_settings(bench: Benchmark, opts: EvalOptions) -> dict[str, Any]:
    """The box settings a run uses: the benchmark's reference values, then the user's overrides; checked
    (ValueError naming the option) before anything runs."""
    unknown = sorted(set(opts.box_settings) - set(BOX_FIELDS))
    if unknown:
        raise ValueError(f"unknown box setting(s) {unknown}; known: {', '.join(BOX_FIELDS)}")
    settings = {**bench.box_settings, **opts.box_settings}
    iou = settings["box_nms_iou"]
    if iou is not None and not 0.0 < iou <= 1.0:
        raise ValueError(f"--box-nms-iou must be in (0, 1] or none, got {iou}")
    if settings["box_per_label"] is not None and settings["box_per_label"] < 1:
        raise ValueError(f"--box-per-label must be at least 1 or auto, got {settings['box_per_label']}")
    try:
        BoxOptions(nms_iou=iou, limit=settings["box_limit"], cap=settings["box_cap"])
    except ValueError as err:
        raise ValueError(f"box settings: {err}") from err
    return settings


def describe_box_settings(settings: dict[str, Any]) -> str:
    """One line for results.md: what NMS and capping a run's boxes went through."""
    iou, limit = settings["box_nms_iou"], settings["box_limit"]
    nms = "no NMS" if iou is None else f"class-wise NMS at IoU {iou}"
    if limit is None:
        cap = "no cap"
    elif settings["box_cap"] == "top_k":
        cap = f"at most {limit} boxes, highest scores first"
    else:
        per = settings["box_per_label"] or (20 if limit > 50 else 5)
        cap = f"above {limit} boxes, the top {per} per label"
    return f"{nms}; {cap}"


def get_benchmark(name: str) -> Benchmark:
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; available: {', '.join(BENCHMARKS)}")
    return BENCHMARKS[name]
