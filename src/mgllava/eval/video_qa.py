"""Video QA benchmarks: MSVD-QA and MSRVTT-QA in Video-ChatGPT's question/answer JSON.

Format (Video-ChatGPT / Video-LLaVA `test_q.json` + `test_a.json`): `--data` is a list of
`{"video_name", "question_id", "question"}`, `--annotations` a list of `{"question_id", "answer", ...}`.
Answers are matched by `question_id` (the reference pairs the two lists by position; an answer file without
ids is paired by position too, and the results say so). Videos are looked up under `--images` as
`<video_name>` or `<video_name>.<ext>` for the usual extensions; boxes by `video_name`, the key of the
reference's video box files (their `video` without its extension; docs/benchmarks.md).

Prompt (the reference's `VideoObjectLLaVAProxyEvalDataset`): `<video>\\n{question}`, 8 frames, greedy,
at most 100 new tokens (the reference model's `evaluate_max_tokens` default; its 13B config sets 50 for every
benchmark, so pass `--max-new-tokens 50` to reproduce the 13B model's runs).

Scores: the rule judge (`metrics.rule_judge`, reported as `rule_contains_v1`) always; Video-ChatGPT's GPT
judge (`judge.GptJudge`) when an endpoint is given - its accuracy and mean 0-5 score are reported under
`gpt_judge:<model>`, and it is the headline metric then. Judge failures count as the `--scoring` pipeline
counts them (`scoring.JUDGE_RULES`): under official (and llava), a question without a readable verdict leaves
the judge without a score - the official scripts keep asking until every question has one - and the results
list those questions; under lmms-eval it counts as "no" with score 0.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..data.templates import VIDEO_TOKEN
from .judge import GptJudge, JudgeItem, run_judge
from .metrics import (
    RULE_JUDGE,
    RULE_JUDGE_DESCRIPTION,
    JudgeReplyError,
    read_judge_reply,
    read_judge_reply_lmms_eval,
    rule_judge,
)
from .samples import Issue, Loaded, Sample, media_path, read_json, tag_in_text
from .scoring import DEFAULT_SCORING, JUDGE_RULES, JUDGE_SUMMARY, check_scoring, mean_percent, percent

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".mov", ".webm")


def find_video(path: str) -> str:
    """`path` itself, or `path` plus the first extension that exists; FileNotFoundError naming the tries."""
    candidates = [path, *(path + ext for ext in VIDEO_EXTENSIONS)]
    for candidate in candidates:
        if Path(candidate).is_file():
            return candidate
    raise FileNotFoundError(f"video {path!r} not found (tried {', '.join(VIDEO_EXTENSIONS)})")


def load_video_qa(
    path: str | Path, videos_dir: str | None = None, annotations: str | Path | None = None
) -> Loaded:
    questions = read_json(path, "video questions file")
    if not isinstance(questions, list):
        raise ValueError(f"video questions file {path}: expected a list of questions")
    answers, paired = _answers(annotations, len(questions))
    samples, issues, seen = [], [], set()
    for n, q in enumerate(questions):
        if not isinstance(q, dict) or not all(k in q for k in ("video_name", "question_id", "question")):
            issues.append(Issue(f"question {n}", "needs video_name, question_id and question"))
            continue
        key = str(q["question_id"])
        if key in seen:
            issues.append(Issue(key, f"question {n}: question_id appears twice"))
            continue
        seen.add(key)
        if tag_in_text(str(q["question"])):
            issues.append(Issue(key, tag_in_text(str(q["question"]))))
            continue
        answer = answers.get(key) if paired == "question_id" else answers.get(str(n))
        name = str(q["video_name"])
        samples.append(
            Sample(
                key=key,
                prompt=f"{VIDEO_TOKEN}\n{q['question']}",
                video=media_path(videos_dir, name),
                box_id=name,  # the reference: the box file's `video` without its extension == `video_name`
                alt_box_ids=(Path(name).stem,),
                answers=[answer] if isinstance(answer, str) else None,
                meta={"question": str(q["question"]), "video_name": name},
            )
        )
    info = {
        "format": "Video-ChatGPT QA JSON",
        "answers_paired_by": paired,
        "box_ids": "`video_name` (the box file's `video` without its extension)",
    }
    return Loaded(samples, issues, info)


def _answers(path: str | Path | None, count: int) -> tuple[dict[str, Any], str]:
    if path is None:
        return {}, "none given"
    data = read_json(path, "video answers file")
    if not isinstance(data, list):
        raise ValueError(f"video answers file {path}: expected a list of answers")
    if data and all(isinstance(a, dict) and "question_id" in a for a in data):
        return {str(a["question_id"]): a.get("answer") for a in data}, "question_id"
    if len(data) != count:
        raise ValueError(
            f"video answers file {path}: answers carry no question_id and their number ({len(data)}) differs "
            f"from the questions' ({count}), so they cannot be paired"
        )
    return {str(n): a.get("answer") if isinstance(a, dict) else None for n, a in enumerate(data)}, "position"


def score_video_qa(
    loaded: Loaded,
    predictions: dict[str, str],
    judge: GptJudge | None = None,
    out_dir: str | Path = ".",
    scoring: str = DEFAULT_SCORING,
) -> dict[str, Any]:
    """Rule judge always; GPT judge when configured (headline metric then), counted as `scoring` counts."""
    check_scoring(scoring)
    gradable = [s for s in loaded.samples if s.key in predictions and s.answers]
    no_gt = [s.key for s in loaded.samples if s.key in predictions and not s.answers]
    rule = {s.key: rule_judge(predictions[s.key], s.answers[0]) for s in gradable}
    judges: dict[str, Any] = {
        RULE_JUDGE: {
            "accuracy": mean_percent([float(v) for v in rule.values()]),
            "judged": len(rule),
            "rule": RULE_JUDGE_DESCRIPTION,
        }
    }
    result: dict[str, Any] = {
        "metric": f"{RULE_JUDGE}_accuracy",
        "score": judges[RULE_JUDGE]["accuracy"],
        "scored": len(rule),
        "rules": {"judge": RULE_JUDGE_DESCRIPTION},
        "categories": {},
        "no_ground_truth": no_gt,
        "judges": judges,
    }
    if judge is not None:
        items = [JudgeItem(s.key, s.meta["question"], s.answers[0], predictions[s.key]) for s in gradable]
        records = run_judge(judge, items, out_dir, reask_unreadable=scoring != "lmms-eval")
        replies = [records.get(i.key, {}).get("reply") for i in items]
        summary = JUDGE_SUMMARY[scoring](replies)
        failed = _judge_failures(items, records, scoring)
        judges[judge.name] = {
            **summary,
            "accuracy": percent(summary["accuracy"]) if summary["accuracy"] is not None else None,
            "url": judge.base_url,
            "failed": failed,
            "rule": JUDGE_RULES[scoring],
        }
        result.update(
            metric=f"{judge.name}_accuracy",
            score=judges[judge.name]["accuracy"],
            scored=summary["judged"] if summary["complete"] else 0,
            rules={"judge": JUDGE_RULES[scoring], "scoring": scoring},
        )
    return result


def _judge_failures(
    items: list[JudgeItem], records: dict[str, dict[str, Any]], scoring: str
) -> list[dict[str, str]]:
    """Questions without a verdict the pipeline can read, with the reason (official: they keep the judge
    from a score; lmms-eval: they were counted as "no" with score 0)."""
    read = read_judge_reply_lmms_eval if scoring == "lmms-eval" else read_judge_reply
    counted = " (counted as 'no', score 0)" if scoring == "lmms-eval" else ""
    failed = []
    for item in items:
        record = records.get(item.key) or {}
        if "reply" not in record:
            reason = record.get("error", "not judged")
        else:
            try:
                read(record["reply"])
                continue
            except JudgeReplyError:
                reason = f"reply that cannot be read: {str(record['reply'])[:200]!r}"
        failed.append({"id": item.key, "reason": reason + counted})
    return failed
