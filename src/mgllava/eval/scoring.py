"""The scoring pipelines `--scoring` chooses, and small helpers shared by the scorers.

Harnesses that report "the same" benchmark disagree because they normalise answers, read option letters and
count judge failures differently. A pipeline names one harness's choices; every results file says which
pipeline made its number (docs/scoring.md has the per-benchmark table and each rule's source).

| pipeline | VQAv2 accuracy | VQAv2 upload | multiple choice letter | GPT judge failures |
|---|---|---|---|---|
| official | vqaEval.py | the answer as generated | VLMEvalKit can_infer; MMStar's rule | asked again; no score until every question has a verdict |
| llava | EvalAI processor, then vqaEval.py | EvalAI-processed | LLaVA's SQA / SEED rules; can_infer for MMBench | as official |
| lmms-eval | both sides always normalised | normalised | (not implemented: pass --choice-rule) | counted as "no", score 0 |

TextVQA (M4C soft score) and DocVQA (ANLS) are the same in all three.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

from .metrics import (
    evalai_normalize,
    judge_summary_lmms_eval,
    judge_summary_official,
    lmms_eval_normalize,
    vqa_accuracy,
    vqa_accuracy_llava,
    vqa_accuracy_lmms_eval,
)

DEFAULT_SCORING = "official"
SCORING: dict[str, str] = {
    "official": "the benchmarks' own scripts: VQAv2 vqaEval.py (GT-Vision-Lab/VQA master), TextVQA M4C accuracy, "
    "DocVQA ANLS (RRC), multiple choice VLMEvalKit can_infer (MMStar: MMStar's rule), GPT judge as "
    "Video-ChatGPT/Video-LLaVA count it",
    "llava": "LLaVA's scripts: VQAv2 answers through the EvalAI answer processor before vqaEval.py "
    "(convert_vqav2_for_submission.py), TextVQA eval_textvqa.py, ScienceQA eval_science_qa.py, SEED "
    "convert_seed_for_submission.py; otherwise as official",
    "lmms-eval": "lmms-eval's task utils: VQAv2 punctuation and digit/article steps on both sides always, "
    "TextVQA and DocVQA as official, GPT judge failures counted as 'no' with score 0",
}

VQA_ACCURACY: dict[str, Callable[[str, Sequence[str]], float]] = {
    "official": vqa_accuracy,
    "llava": vqa_accuracy_llava,
    "lmms-eval": vqa_accuracy_lmms_eval,
}
VQA_RULES = {
    "official": "vqaEval.py: strip; if the answers are not all identical, processPunctuation + "
    "processDigitArticle on the prediction and every answer, else neither; mean over leave-one-out "
    "subsets of min(1, matches/3)",
    "llava": "prediction through the EvalAI answer processor (LLaVA convert_vqav2_for_submission.py), then "
    "vqaEval.py",
    "lmms-eval": "lmms-eval vqav2 utils: punctuation and digit/article steps on the prediction and every "
    "answer always, then the leave-one-out mean",
}
_UPLOAD: dict[str, Callable[[str], str]] = {
    "official": lambda text: text,
    "llava": evalai_normalize,
    "lmms-eval": lmms_eval_normalize,
}
UPLOAD_RULES = {
    "official": "answers as generated (the evaluation server normalises them)",
    "llava": "answers through the EvalAI answer processor (LLaVA convert_vqav2_for_submission.py)",
    "lmms-eval": "answers after lmms-eval's punctuation and digit/article steps",
}
JUDGE_SUMMARY: dict[str, Callable[[Sequence[str | None]], dict[str, Any]]] = {
    "official": judge_summary_official,
    "llava": judge_summary_official,
    "lmms-eval": judge_summary_lmms_eval,
}
_OFFICIAL_JUDGE = (
    "Video-ChatGPT evaluate_activitynet_qa.py / Video-LLaVA eval_video_qa.py: reply read with "
    "ast.literal_eval; unreadable replies and failed requests asked again, no score until every question "
    "has a verdict; yes / (yes + no) ('yes' substring first); mean int(score) over every verdict"
)
JUDGE_RULES = {
    "official": _OFFICIAL_JUDGE,
    "llava": "as official (LLaVA has no video script; Video-LLaVA's is the LLaVA-family one): "
    + _OFFICIAL_JUDGE,
    "lmms-eval": "lmms-eval activitynetqa utils: the reply's first {...} read with ast.literal_eval; a failed "
    "request or unreadable reply counts as 'no' with score 0; yes / (yes + no); mean score over every question",
}


def check_scoring(name: str) -> str:
    if name not in SCORING:
        raise ValueError(f"unknown scoring pipeline {name!r}; available: {', '.join(SCORING)}")
    return name


def upload_answer(scoring: str, text: str) -> str:
    """A VQAv2 answer as the pipeline writes it into the EvalAI upload file."""
    return _UPLOAD[check_scoring(scoring)](text)


def percent(value: float) -> float:
    """A fraction in [0, 1] as a percentage, rounded so that results files compare byte for byte."""
    return round(100.0 * value, 4)


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def mean_percent(values: list[float]) -> float | None:
    """The mean as a percentage; None when nothing was scored (never a 0 that looks like a result)."""
    return percent(mean(values)) if values else None


def by_category(items: Iterable[tuple[str | None, float]]) -> dict[str, dict[str, float | int]]:
    """{category: {"score": percent, "n": count}} over (category, value) pairs; None categories are skipped."""
    groups: dict[str, list[float]] = {}
    for category, value in items:
        if category is not None:
            groups.setdefault(str(category), []).append(value)
    return {name: {"score": percent(mean(vals)), "n": len(vals)} for name, vals in sorted(groups.items())}


def macro_percent(items: Iterable[tuple[str | None, float]]) -> float | None:
    """The mean over categories of each category's mean (every category weighs the same), as a percentage;
    None when no item has a category."""
    groups: dict[str, list[float]] = {}
    for category, value in items:
        if category is not None:
            groups.setdefault(str(category), []).append(value)
    return percent(mean([mean(v) for v in groups.values()])) if groups else None
