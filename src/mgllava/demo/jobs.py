"""The demo's runs in parallel worker processes: resumable per (variant, seed), with one progress bar.

Each run is stage 1 -> stage 2 -> evaluation in a worker process of its own with ONE torch thread. The
demo's models are so small that torch's intra-op threads mostly wait on each other (on a busy machine
they spin: 2 threads took 15x the CPU time of 1 for the same step), so two single-threaded runs side by
side use two cores far better than one run on two threads. Workers fork from a forkserver that has
imported torch and mgllava once (about 5 s of CPU per import, saved on every run after the first).

A run is done when its `result.json` exists; a rerun skips it. An interrupted run resumes inside its
stages: the trainer from its last checkpoint, the evaluation from the answers already written (both
write atomically or append whole lines). Ctrl-C stops the workers and says how to resume.

Progress: one bar over every run's training steps plus its evaluation (16 answers count as one step),
read from the files the trainer and the evaluation write as they go; a line per finished run.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ..utils.io import read_jsonl

ANSWERS_PER_STEP = 16  # progress weight of evaluation answers against training steps
POLL_SECONDS = 1.0


class RunFailed(RuntimeError):
    """A worker exited with an error; names the run and shows the end of its log."""


@dataclass(frozen=True)
class Job:
    """One (variant, seed) run: where it lives and how much work each part is."""

    name: str  # "<variant>/seed<k>"
    root: Path
    stage_steps: tuple[int, ...]
    questions: int
    args: tuple[Any, ...]  # passed to the work function in the worker
    needs: tuple[Path, ...] = ()  # files that must exist before the job starts (what other jobs make)
    work: Callable[..., Any] | None = None  # run instead of the runner's work function

    @property
    def result(self) -> Path:
        return self.root / "result.json"

    @property
    def log(self) -> Path:
        return self.root / "log.txt"

    @property
    def total(self) -> float:
        return sum(self.stage_steps) + self.questions / ANSWERS_PER_STEP

    def done_units(self) -> float:
        """Work finished so far, from the trainer's metrics and the evaluation's answer files."""
        if self.result.is_file():
            return self.total
        units = 0.0
        for k, stage in enumerate(("stage1", "stage2")):
            if (self.root / stage / "final").is_dir():
                units += self.stage_steps[k]
            else:
                units += _last_step(self.root / stage / "metrics.jsonl")
                return units
        answers = sum(_lines(p) for p in (self.root / "eval" / "shards").glob("*.jsonl"))
        return units + min(answers, self.questions) / ANSWERS_PER_STEP

    def status(self) -> str:
        for k, stage in enumerate(("stage1", "stage2")):
            if not (self.root / stage / "final").is_dir():
                return f"{self.name} stage {k + 1} {_last_step(self.root / stage / 'metrics.jsonl')}/{self.stage_steps[k]}"
        answers = sum(_lines(p) for p in (self.root / "eval" / "shards").glob("*.jsonl"))
        return f"{self.name} eval {min(answers, self.questions)}/{self.questions}"


@dataclass(frozen=True)
class TowerJob(Job):
    """One tower's pretraining (`pretrain.train_tower`): done when its weights file exists; progress is the
    last step in `<tower>.progress.jsonl`."""

    tower: str = ""

    @property
    def result(self) -> Path:
        return self.root / f"{self.tower}.safetensors"

    @property
    def log(self) -> Path:
        return self.root / f"{self.tower}.log.txt"

    def done_units(self) -> float:
        return self.total if self.result.is_file() else _last_step(self.root / f"{self.tower}.progress.jsonl")

    def status(self) -> str:
        return f"{self.name} {int(self.done_units())}/{self.stage_steps[0]}"


def _lines(path: Path) -> int:
    try:
        with path.open("rb") as handle:
            return sum(1 for line in handle if line.endswith(b"\n"))
    except FileNotFoundError:
        return 0


def _last_step(path: Path) -> int:
    records = list(read_jsonl(path, allow_torn_tail=True)) if path.is_file() else []
    return int(records[-1]["step"]) if records else 0


def _worker(work: Callable[..., Any], job: Job) -> None:
    """Worker entry: one torch thread, output into the run's log, then the work."""
    import logging

    import torch

    torch.set_num_threads(1)
    job.root.mkdir(parents=True, exist_ok=True)
    log = os.open(job.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    sys.stdout = os.fdopen(1, "w", buffering=1)
    sys.stderr = os.fdopen(2, "w", buffering=1)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", force=True)
    work(*job.args)


def run_jobs(
    jobs: list[Job],
    work: Callable[..., Any],
    workers: int,
    on_done: Callable[[Job], str],
    say: Callable[[str], None],
    preload: str,
) -> None:
    """Run every job not yet done, at most `workers` at a time, each once the files it `needs` exist (in list
    order among the ready ones); `on_done(job)` gives the line said as each finishes (at once for the jobs
    found done)."""
    todo = [j for j in jobs if not j.result.is_file()]
    for job in jobs:
        if job.result.is_file():
            say(on_done(job))
    if not todo:
        return
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([preload])
    running: dict[str, tuple[Job, multiprocessing.process.BaseProcess]] = {}
    bar = tqdm(total=round(sum(j.total for j in jobs)), unit="step", desc="demo", dynamic_ncols=True)
    try:
        while todo or running:
            while len(running) < workers and (job := _next_ready(todo, running)) is not None:
                todo.remove(job)
                process = context.Process(target=_worker, args=(job.work or work, job), name=job.name)
                process.start()
                running[job.name] = (job, process)
            time.sleep(POLL_SECONDS)
            for name, (job, process) in list(running.items()):
                if process.is_alive():
                    continue
                process.join()
                del running[name]
                if process.exitcode != 0 or not job.result.is_file():
                    raise RunFailed(f"run {name} failed (exit code {process.exitcode}); the end of {job.log}:\n"
                                    + _tail(job.log))  # fmt: skip
                bar.write(on_done(job))
            bar.n = round(sum(j.done_units() for j in jobs))
            bar.set_postfix_str(", ".join(job.status() for job, _ in running.values()), refresh=False)
            bar.refresh()
    finally:
        for _, process in running.values():  # only our own workers, by handle
            process.terminate()
        for _, process in running.values():
            process.join()
        bar.close()


def _next_ready(todo: list[Job], running: dict[str, Any]) -> Job | None:
    """The first job whose needed files exist; refuses a wait that nothing running can end."""
    ready = next((j for j in todo if all(p.is_file() for p in j.needs)), None)
    if ready is None and todo and not running:
        missing = sorted({str(p) for j in todo for p in j.needs if not p.is_file()})
        raise RunFailed(
            f"runs {', '.join(j.name for j in todo)} wait for files no job makes: {', '.join(missing)}"
        )
    return ready


def _tail(path: Path, lines: int = 25) -> str:
    if not path.is_file():
        return "(no log)"
    text = path.read_text(errors="replace").replace("\r", "\n")
    return "\n".join([line for line in text.splitlines() if line.strip()][-lines:])
