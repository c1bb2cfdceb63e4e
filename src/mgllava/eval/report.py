"""Results of one evaluation: the JSON record and its markdown table.

`results.json` says what was scored, by which scoring pipeline (`scoring`: its name and what it does) and by
which rules, the score and per-category scores, and accounts for
every sample: answered and scored, invalid in the input (with the reason), failed (image or video unreadable,
prompt too long; with the reason), not answered yet (`missing`), or without ground truth. Its numbers are
percentages rounded to 4 decimals; it holds no timings, so identical answers give an identical file.
When more samples failed than `--max-failed-samples` allows, `score` is null and `score_refused` says why
(runner.py); a benchmark file that repeats an id names the renamed copies (`info.renamed_duplicates`).
"""

from __future__ import annotations

from typing import Any

from .samples import Loaded
from .scoring import SCORING

_STANDARD = {"metric", "score", "scored", "rules", "categories", "no_ground_truth", "per_sample", "extracted"}


def build_results(
    bench: Any,
    opts: Any,
    loaded: Loaded,
    records: dict[str, dict[str, Any]],
    scored: dict[str, Any],
    max_new_tokens: int,
) -> dict[str, Any]:
    keys = [s.key for s in loaded.samples]
    failed = [
        {"id": k, "reason": records[k].get("error", "")}
        for k in keys
        if k in records and "prediction" not in records[k]
    ]
    missing = [k for k in keys if k not in records]
    predicted = sum(1 for k in keys if "prediction" in records.get(k, {}))
    results: dict[str, Any] = {
        "benchmark": bench.name,
        "title": bench.title,
        "model": opts.model,
        "data": opts.data,
        "metric": scored["metric"],
        "score": scored["score"],
        "scoring": {"pipeline": opts.scoring, "description": SCORING[opts.scoring]},
        "counts": {
            "samples": len(keys),
            "invalid": len(loaded.issues),
            "predicted": predicted,
            "failed": len(failed),
            "missing": len(missing),
            "scored": scored["scored"],
            "no_ground_truth": len(scored["no_ground_truth"]),
        },
        "rules": {
            **scored["rules"],
            "decoding": "greedy, no system prompt",
            "max_new_tokens": max_new_tokens,
            "boxes": opts.boxes or "none given (zero-box fallback)",
        },
        "categories": scored["categories"],
        "invalid": [issue.to_json() for issue in loaded.issues],
        "failed": failed,
        "missing": missing,
        "no_ground_truth": scored["no_ground_truth"],
        "info": loaded.info,
    }
    results.update({k: v for k, v in scored.items() if k not in _STANDARD})
    return results


def _score(value: Any) -> str:
    return "-" if value is None else f"{value:.2f}"


def _judge_line(summary: dict[str, Any]) -> str:
    text = f"accuracy {_score(summary['accuracy'])}"
    if "average_score" in summary:
        text += f", mean score {_score(summary['average_score'])}"
    text += f" ({summary['judged']} judged"
    if summary.get("unusable"):
        text += f", {summary['unusable']} verdicts without a usable score or pred"
    if summary.get("counted_as_no"):
        text += f", {summary['counted_as_no']} failures counted as 'no' with score 0"
    if summary.get("missing"):
        text += (
            f"; no score: {summary['missing']} questions without a readable verdict, which the official "
            "scripts would keep asking about - run again to ask again"
        )
    return text + ")"


def render_markdown(results: dict[str, Any]) -> str:
    counts = results["counts"]
    lines = [
        f"# {results['title']}: {results['metric']} {_score(results['score'])}",
        "",
        "| | |",
        "|---|---|",
        f"| benchmark | `{results['benchmark']}` |",
        f"| model | `{results['model']}` |",
        f"| score | **{_score(results['score'])}** ({results['metric']}, {counts['scored']} scored) |",
        f"| scoring pipeline | `{results['scoring']['pipeline']}`: {results['scoring']['description']} |",
    ]
    if results.get("score_refused"):
        lines.append(f"| score withheld | {results['score_refused'].replace('|', '/')} |")
    for qid, keys in results["info"].get("renamed_duplicates", {}).items():
        lines.append(f"| repeated id `{qid}` | its questions were answered and scored as {', '.join(keys)} |")
    if results.get("vanilla_accuracy"):
        v = results["vanilla_accuracy"]
        lines.append(f"| vanilla accuracy (unrotated rows only) | {_score(v['score'])} ({v['n']} rows) |")
    for column, value in results.get("macro_accuracy", {}).items():
        lines.append(f"| macro accuracy over {column} | {_score(value)} (every {column} weighs the same) |")
    for name, rule in results["rules"].items():
        lines.append(f"| {name} | {str(rule).replace('|', '/')} |")
    lines.append(
        f"| samples | {counts['samples']}: {counts['predicted']} answered, {counts['failed']} failed, "
        f"{counts['missing']} not answered, {counts['invalid']} invalid in the input, "
        f"{counts['no_ground_truth']} without ground truth |"
    )
    if results.get("boxes"):
        b = results["boxes"]
        rules = ", ".join(f"{n} by {rule}" for rule, n in sorted(b["found"].items())) or "none found"
        lines.append(
            f"| boxes found | {b['looked_up'] - b['missing']} of {b['looked_up']} in `{b['box_file']}` ({rules}); "
            f"{b['missing']} without boxes (zero-box fallback) |"
        )
    for judge, summary in results.get("judges", {}).items():
        lines.append(f"| judge `{judge}` | {_judge_line(summary)} |")
    if "unparsed_predictions" in results:
        lines.append(
            f"| answers with no option letter | {results['unparsed_predictions']} (scored as wrong) |"
        )
    if results.get("incomplete_questions"):
        lines.append(
            f"| questions not scored | {len(results['incomplete_questions'])} (a row invalid or not answered) |"
        )
    if results.get("submission"):
        lines.append(f"| submission file | `{results['submission']}` |")
    for group, table in results["categories"].items():
        lines += ["", f"## by {group}", "", f"| {group} | score | n |", "|---|---:|---:|"]
        lines += [f"| {name} | {row['score']:.2f} | {row['n']} |" for name, row in table.items()]
    if results.get("boxes", {}).get("missing"):
        lines += ["", f"## Samples without boxes ({results['boxes']['missing']}, first shown)", ""]
        lines += [f"- {example}" for example in results["boxes"]["missing_examples"]]
    for title, key in (("Invalid input", "invalid"), ("Failed samples", "failed")):
        if results[key]:
            lines += ["", f"## {title} ({len(results[key])})", ""]
            lines += [f"- `{item['id']}`: {item['reason']}" for item in results[key][:50]]
            if len(results[key]) > 50:
                lines.append(f"- ... {len(results[key]) - 50} more in results.json")
    return "\n".join(lines) + "\n"
