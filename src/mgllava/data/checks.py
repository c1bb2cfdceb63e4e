"""`mgllava check-data`: find every sample that would fail or mislead training, before training.

For each sample of a training config's data: the record is well formed; its images/videos exist, stay under
their root and decode; `<image>`/`<video>` tags match the record's files; boxes are present in the box file
(when one is given) and sane; at least one supervised token survives truncation (visual rows are never cut;
truncated samples are counted); the chat template round-trips (every answer is found again in the decoded
supervised tokens). Writes `check_summary.json` and `bad_samples.jsonl` (id, index, reasons) atomically;
training leaves the bad samples out with `data.skip=<dir>/bad_samples.jsonl`.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ..utils.io import atomic_write_json, atomic_write_text
from .dataset import LlavaDataset, Sample, SampleError
from .templates import IGNORE_INDEX


@dataclass
class SampleCheck:
    index: int
    id: str
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _round_trip(dataset: LlavaDataset, sample: Sample, encoded: dict[str, Any]) -> list[str]:
    supervised = [
        t for t, lab in zip(encoded["input_ids"], encoded["labels"], strict=True) if lab != IGNORE_INDEX
    ]
    decoded = dataset.processor.tokenizer.decode(supervised, skip_special_tokens=True)
    answers = [str(m.get("value", m.get("content", ""))).strip() for m in dataset.messages(sample)
               if m.get("from", m.get("role")) in ("gpt", "assistant")]  # fmt: skip
    lost = [a for a in answers if a and " ".join(a.split()) not in " ".join(decoded.split())]
    if lost and not encoded["truncated"]:
        return [
            f"chat template does not round-trip: answer {lost[0][:40]!r} not found in the supervised tokens"
        ]
    return []


class _Checks(torch.utils.data.Dataset):
    def __init__(self, dataset: LlavaDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> SampleCheck:
        sample = self.dataset.samples[index]
        check = SampleCheck(index, sample.id)
        try:
            encoded = self.dataset.encode(sample)
        except SampleError as err:
            check.errors.append(str(err).removeprefix(f"{sample.id}: "))
            return check
        check.warnings += encoded["box_problems"]
        if encoded["truncated"]:
            check.warnings.append(f"text truncated by {encoded['truncated']} tokens (visual rows kept)")
        check.errors += _round_trip(self.dataset, sample, encoded)
        return check


def _reason(message: str) -> str:
    """A category for the summary: the message without its specifics."""
    return message.split(":")[0].split(" (")[0][:80]


def check_dataset(
    dataset: LlavaDataset, out_dir: str | Path, max_bad_fraction: float, workers: int = 0
) -> dict:
    loader = torch.utils.data.DataLoader(_Checks(dataset), batch_size=None, num_workers=workers)
    errors, warnings, bad = Counter(), Counter(), []
    for check in tqdm(loader, total=len(dataset), desc="check-data", unit="sample"):
        errors.update(_reason(e) for e in check.errors)
        warnings.update(_reason(w) for w in check.warnings)
        if check.errors:
            bad.append({"index": check.index, "id": check.id, "reasons": check.errors})
    n = len(dataset)
    fraction = len(bad) / n if n else 0.0
    summary = {
        "samples": n, "bad": len(bad), "bad_fraction": fraction, "max_bad_fraction": max_bad_fraction,
        "passed": fraction <= max_bad_fraction and n > 0, "errors": dict(errors), "warnings": dict(warnings),
    }  # fmt: skip
    out = Path(out_dir)
    atomic_write_text(out / "bad_samples.jsonl", "".join(json.dumps(b) + "\n" for b in bad))
    atomic_write_json(out / "check_summary.json", summary)
    return summary


def format_summary(summary: dict) -> str:
    lines = [f"{summary['samples']} samples, {summary['bad']} bad ({summary['bad_fraction']:.2%}, "
             f"limit {summary['max_bad_fraction']:.2%}): {'PASS' if summary['passed'] else 'FAIL'}"]  # fmt: skip
    for title, counts in (("errors (sample left out)", summary["errors"]), ("warnings", summary["warnings"])):
        if counts:
            lines.append(f"{title}:")
            lines += [f"  {n:>7}  {reason}" for reason, n in sorted(counts.items(), key=lambda kv: -kv[1])]
    return "\n".join(lines)


def exit_code(summary: dict) -> int:
    return 0 if summary["passed"] and not math.isnan(summary["bad_fraction"]) else 1
