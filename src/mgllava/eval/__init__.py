"""Evaluation on the paper's benchmarks with the official scoring rules (docs/design.md sections 9 and 12).

Read in this order: `samples` (what a loader returns), `multiple_choice` / `short_answer` / `video_qa`
(one module per benchmark family: formats, prompts, scoring), `metrics` (the official rules as pure
functions), `scoring` (the pipelines `--scoring` chooses: official, llava, lmms-eval), `judge` (the GPT
judge for video QA), `benchmarks` (the registry), `runner` (sharded, batched,
resumable generation and the results), `report`, `easy_vqa` (a real public set), `cli`.
"""

from .benchmarks import BENCHMARKS, EvalOptions
from .runner import run_eval

__all__ = ["BENCHMARKS", "EvalOptions", "run_eval"]
