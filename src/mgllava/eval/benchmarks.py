"""The benchmark registry: name -> how to load it, how to score it, how long answers may be.

| name | family | files | score |
|---|---|---|---|
| mmbench_dev, mmbench_test | multiple choice | VLMEvalKit TSV | CircularEval accuracy (+ vanilla) / submission xlsx |
| seed_image | multiple choice | TSV or SEED-Bench.json | accuracy per question type |
| mmstar, ai2d | multiple choice | TSV | accuracy (micro, and macro over categories) |
| scienceqa_img | multiple choice | TSV or problems.json | accuracy per subject |
| textvqa_val | short answer | TextVQA JSON (+OCR) or LLaVA jsonl + annotations | TextVQA accuracy |
| docvqa_val | short answer | DocVQA JSON or TSV | ANLS |
| vqav2_val, vqav2_testdev | short answer | VQAv2 questions (+annotations) or LLaVA jsonl | VQA accuracy / upload file |
| msvd_qa, msrvtt_qa | video | Video-ChatGPT test_q/test_a JSON | rule judge, GPT judge |
| short_vqa | short answer | our short-answer JSONL (easy-vqa, generated sets) | --metric |

Every benchmark is scored by the `--scoring` pipeline (default "official"; `scoring.SCORING`, docs/scoring.md).
A multiple-choice benchmark names, per pipeline, the letter rule it uses (`Benchmark.choice_rules`);
`--choice-rule` overrides it (e.g. "reference", the MG-LLaVA reference's own rule).

Answer length: 100 new tokens, the reference model's `evaluate_max_tokens` default, for images and video
alike; the reference's 13B config sets 50 (pass `--max-new-tokens 50` to reproduce its runs).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .judge import GptJudge
from .metrics import CHOICE_RULES
from .multiple_choice import (
    load_multiple_choice,
    load_scienceqa_json,
    load_tsv,
    score_multiple_choice,
    write_mmbench_submission,
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
    annotations: str | None = None
    ocr: str | None = None
    limit: int | None = None
    batch_size: int = 1
    max_new_tokens: int | None = None
    scoring: str = DEFAULT_SCORING
    choice_rule: str | None = None  # None: the benchmark's rule under `scoring`
    prompt: str = "ocr"
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


@dataclass(frozen=True)
class Benchmark:
    name: str
    title: str
    family: str  # "multiple_choice" | "short_answer" | "video"
    load: Callable[[EvalOptions], Loaded]
    score: Scorer
    max_new_tokens: int = 100
    group: Callable[[Sample], str] | None = None  # rows answered together (MMBench rotations), for --limit
    choice_rules: dict[str, str] | None = None  # multiple choice: scoring pipeline -> letter rule

    def check(self, opts: EvalOptions) -> None:
        """Refuse, before anything is generated, scoring settings this benchmark cannot score with."""
        check_scoring(opts.scoring)
        if self.family == "multiple_choice":
            self.choice_rule(opts)
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
    rule, chosen_by = get_benchmark(opts.benchmark).choice_rule(opts)
    result = score_multiple_choice(loaded, predictions, rule)
    result["rules"]["scoring"] = opts.scoring
    result["rules"]["choice_extraction"] = f"{rule} (by {chosen_by})"
    if loaded.table is not None and not loaded.info.get("has_answers", True):
        path = write_mmbench_submission(loaded, predictions, out / "submission.xlsx")
        result["submission"] = path.name
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


def _mc(name: str, title: str, load: Callable[[EvalOptions], Loaded], **rules: str) -> Benchmark:
    """A multiple-choice benchmark; `rules`: pipeline -> letter rule (official: VLMEvalKit's can_infer unless
    given)."""
    choice_rules = {"official": "vlmevalkit", **rules}
    return Benchmark(name, title, "multiple_choice", load, _score_mc, 100, _mc_group, choice_rules)


BENCHMARKS: dict[str, Benchmark] = {
    b.name: b
    for b in (
        # LLaVA sends MMBench to its evaluation server, whose exact-matching stage is VLMEvalKit's can_infer
        _mc("mmbench_dev", "MMBench dev", lambda o: load_tsv(o.data, o.images), llava="vlmevalkit"),
        _mc("mmbench_test", "MMBench test", lambda o: load_tsv(o.data, o.images), llava="vlmevalkit"),
        _mc(
            "seed_image",
            "SEED-Bench (image)",
            lambda o: load_multiple_choice(o.data, o.images),
            llava="llava-seed",
        ),
        _mc("mmstar", "MMStar", lambda o: load_tsv(o.data, o.images), official="mmstar"),
        _mc("scienceqa_img", "ScienceQA-IMG", lambda o: _load_scienceqa(o), llava="llava-sqa"),
        _mc("ai2d", "AI2D", lambda o: load_tsv(o.data, o.images)),
        Benchmark(
            "textvqa_val",
            "TextVQA val",
            "short_answer",
            lambda o: load_textvqa(o.data, o.images, o.ocr, o.annotations, o.prompt),
            _short("textvqa"),
        ),
        Benchmark(
            "docvqa_val",
            "DocVQA val",
            "short_answer",
            lambda o: load_docvqa(o.data, o.images),
            _short("anls", "question_types", "split"),
        ),
        Benchmark("vqav2_val", "VQAv2 val", "short_answer", _load_vqav2_val, _short("vqa", "answer_type")),
        Benchmark(
            "vqav2_testdev",
            "VQAv2 test-dev",
            "short_answer",
            lambda o: load_vqav2(o.data, o.images),
            _score_vqav2_testdev,
        ),
        Benchmark(
            "msvd_qa",
            "MSVD-QA",
            "video",
            lambda o: load_video_qa(o.data, o.images, o.annotations),
            _score_video,
        ),
        Benchmark(
            "msrvtt_qa",
            "MSRVTT-QA",
            "video",
            lambda o: load_video_qa(o.data, o.images, o.annotations),
            _score_video,
        ),
        Benchmark(
            "short_vqa",
            "short-answer VQA",
            "short_answer",
            lambda o: load_short_vqa(o.data, o.images),
            _score_short_vqa,
        ),
    )
}


def _load_scienceqa(opts: EvalOptions) -> Loaded:
    if Path(opts.data).suffix.lower() == ".tsv":
        return load_tsv(opts.data, opts.images)
    return load_scienceqa_json(opts.data, opts.images, opts.split)


def get_benchmark(name: str) -> Benchmark:
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; available: {', '.join(BENCHMARKS)}")
    return BENCHMARKS[name]
