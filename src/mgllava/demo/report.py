"""The demo's report: per-kind table over seeds, which differences exceed twice the seed spread, the plot.

Every run's `result.json` holds its overall and per-kind accuracy, its answer counts and its stage-2 loss
curve. Rows are mean ± population std over seeds. A difference "holds" when it exceeds twice the larger of
the two rows' seed std on that column (with one seed there is no spread and nothing is claimed).
"""

from __future__ import annotations

import statistics
import textwrap
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .scenes import CHANCE, KINDS

COLUMNS = (*KINDS, "overall")
COLLAPSE_SHARE = 0.5  # one answer for at least this share of the questions: the variant "collapsed"
CLAIMS = (  # (better, worse, column): the comparisons the demo is built to show
    ("full", "fusion", "overall"),
    ("full", "objects", "overall"),
    ("fusion", "baseline", "overall"),
    ("objects", "baseline", "overall"),
    ("fusion", "baseline", "c"),
    ("objects", "baseline", "b"),
)


def _stats(values: list[float]) -> dict[str, Any]:
    return {"mean": round(statistics.mean(values), 2),
            "std": round(statistics.pstdev(values), 2) if len(values) > 1 else 0.0,
            "per_seed": [round(v, 2) for v in values]}  # fmt: skip


def summarize(results: list[dict[str, Any]], variants: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per variant (in run order): mean, std and per-seed values per kind and overall."""
    rows: dict[str, dict[str, Any]] = {}
    for result in results:
        name = result["variant"]
        row = rows.setdefault(name, {"variant": name, "title": variants[name].title,
                                     "fusion": variants[name].fusion,
                                     "object_tokens": variants[name].object_tokens,
                                     "values": {c: [] for c in COLUMNS}, "answers": {}})  # fmt: skip
        for kind in KINDS:
            row["values"][kind].append(result["kinds"].get(kind, 0.0))
        row["values"]["overall"].append(result["overall"])
        row["answers"][f"seed{result['seed']}"] = result["answers"]
    out = []
    for row in rows.values():
        values = row.pop("values")
        out.append({**row, **{c: _stats(v) for c, v in values.items()}})
    return out


def markdown(rows: list[dict[str, Any]], seeds: int) -> str:
    head = " | ".join(f"{k}: {KINDS[k].split(':')[0]}" for k in KINDS)
    lines = [f"| variant | fusion | object tokens | {head} | overall |", "|---|---|---|" + "---|" * 4]
    for r in rows:
        cells = " | ".join(f"{r[c]['mean']:.1f} ± {r[c]['std']:.1f}" for c in COLUMNS)
        lines.append(f"| {r['title']} | {r['fusion']} | {r['object_tokens']} | {cells} |")
    return "\n".join(lines) + f"\n\naccuracy (%), mean ± std over {seeds} seed(s); chance is {CHANCE:.1f}%\n"


def verdict(rows: list[dict[str, Any]]) -> list[str]:
    """A sentence per claim the demo tests, saying whether the data supports it."""
    by = {r["variant"]: r for r in rows}
    lines = []
    if "baseline" in by:
        a = by["baseline"]["a"]
        if len(a["per_seed"]) < 2:
            lines.append(
                f"baseline on kind a: {a['mean']:.1f} vs chance {CHANCE:.1f} (one seed: no spread measured)"
            )
        else:
            holds = a["mean"] - CHANCE > 2 * a["std"]
            lines.append(f"baseline on kind a: {a['mean']:.1f} vs chance {CHANCE:.1f}: {'above' if holds else 'NOT above'} "
                         f"chance by more than twice its seed std ({a['std']:.1f})")  # fmt: skip
    for better, worse, column in CLAIMS:
        if better not in by or worse not in by:
            continue
        x, y = by[better][column], by[worse][column]
        margin, spread = x["mean"] - y["mean"], max(x["std"], y["std"])
        if len(x["per_seed"]) < 2:
            lines.append(f"{better} - {worse} on {column}: {margin:+.1f} (one seed: no spread measured)")
            continue
        holds = margin > 2 * spread
        lines.append(f"{better} - {worse} on {column}: {margin:+.1f}, twice the larger seed std {2 * spread:.1f}: "
                     f"{'holds' if holds else 'does NOT hold'}")  # fmt: skip
    return lines


def collapse_note(answers: Mapping[str, int]) -> str:
    """A line naming the answer distribution when one answer dominates, else ''."""
    total = sum(answers.values())
    if not total:
        return ""
    top, count = max(answers.items(), key=lambda kv: kv[1])
    if count / total < COLLAPSE_SHARE:
        return ""
    spread = ", ".join(f"{a!r} {n}" for a, n in sorted(answers.items(), key=lambda kv: -kv[1]))
    return f"collapsed: {top!r} is {count / total:.0%} of its {total} answers ({spread})"


def plot(rows: list[dict[str, Any]], results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2))
    for i, row in enumerate(rows):
        curves = [r["stage2_loss"] for r in results if r["variant"] == row["variant"]]
        n = min(len(c) for c in curves)
        left.plot(np.mean([c[:n] for c in curves], axis=0), color=f"C{i}", label=row["title"])
    left.set(title="stage-2 training loss (mean over seeds)", xlabel="step", ylabel="loss", yscale="log")
    left.legend(fontsize=7)
    width = 0.8 / len(rows)
    for i, row in enumerate(rows):
        xs = np.arange(len(COLUMNS)) + (i - (len(rows) - 1) / 2) * width
        right.bar(xs, [row[c]["mean"] for c in COLUMNS], width, yerr=[row[c]["std"] for c in COLUMNS],
                  color=f"C{i}", capsize=3, label=row["title"])  # fmt: skip
    right.axhline(CHANCE, color="gray", linestyle=":", label=f"chance ({CHANCE:.1f}%)")
    names = [textwrap.fill(f"{k}: {KINDS[k].split(':')[0]}", 22) for k in KINDS] + ["overall"]
    right.set_xticks(range(len(COLUMNS)), names, fontsize=8)
    right.set(title="held-out accuracy per question kind", ylabel="% correct", ylim=(0, 100))
    right.legend(fontsize=7)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
