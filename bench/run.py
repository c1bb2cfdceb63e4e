"""The bench suite: run every model bench at real sizes and write `bench/results.md` (`make bench`).

Each script runs in its own process (it measures this machine's peaks itself, right before its bench),
prints its tables as it goes and hands its section and goals back as JSON; this runner adds the machine's
description, its load average before and after each script, the goals of all scripts in one table, and
writes the file atomically once every script has finished. Nothing in it is edited by hand: rerun to update.

    .venv/bin/python bench/run.py                       # the whole suite, writes bench/results.md
    .venv/bin/python bench/run.py --quick --out x.md    # small sizes: a smoke run, under a minute
    .venv/bin/python bench/run.py --only prefill decode # some of the scripts

The serving benches (bench_serve, bench_turns, bench_gap) are part of the suite: they measure the engine's scheduling
with a small model of their own. The other component benches (bench_boxes, bench_eval, bench_train) use small
models too and are run by `make bench-components`; they are not part of this file.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import verdict
from mgllava.utils.io import atomic_write_text

HERE = Path(__file__).resolve().parent
SUITE = [
    "prefill",
    "prefill_bf16",
    "object_pooling",
    "decode",
    "decode_bf16",
    "decode_attention",
    "linear",
    "scaling",
    "memory",
    "serve",
    "turns",
    "gap",
    "vllm_serve",
]
VARIANTS = {
    "prefill_bf16": ("prefill", ["--dtype", "bfloat16"]),
    "decode_bf16": ("decode", ["--dtype", "bfloat16"]),
}


def script_of(name: str) -> tuple[str, list[str]]:
    """A suite entry's script (bench/bench_<script>.py) and its extra arguments."""
    return VARIANTS.get(name, (name, []))


def label(name: str) -> str:
    script, extra = script_of(name)
    return " ".join([f"bench_{script}.py", *extra])


def git_state() -> str:
    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=HERE, capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    return commit + (" with uncommitted changes" if git("status", "--porcelain", "--", ".", "../src") else "")


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def run_script(name: str, quick: bool, folder: Path) -> tuple[dict, str, str]:
    """Run bench_<name>.py; (its record, load average before, after)."""
    out = folder / f"{name}.json"
    script, extra = script_of(name)
    argv = [
        sys.executable,
        str(HERE / f"bench_{script}.py"),
        *extra,
        "--record",
        str(out),
        *(["--quick"] if quick else []),
    ]
    before = load()
    print(f"\n=== {label(name)} (load average {before})", flush=True)
    done = subprocess.run(argv, cwd=HERE)
    after = load()
    if done.returncode != 0:
        raise SystemExit(f"{label(name)} failed (exit {done.returncode}); nothing written")
    return json.loads(out.read_text()), before, after


def machine_section(records: dict[str, dict]) -> list[str]:
    first = next(iter(records.values()))["machine"]
    flags = ", ".join(first["bf16_flags"]) or "none"
    ratios = [r["machine"]["bf16_gflops"] / r["machine"]["fp32_gflops"] for r in records.values()]
    hardware = bool(first["bf16_flags"]) and min(ratios) > 1.0
    lines = [
        "## Machine",
        "",
        f"- CPU: {first['cpu']}; {first['cores']} logical cores, {first['threads']} torch threads; "
        f"{first['memory_gib']:.1f} GiB RAM" + (f"; L3 {first['l3_mib']:.0f} MiB" if first["l3_mib"] else ""),
        f"- bf16: flags in /proc/cpuinfo: {flags}; measured bf16/fp32 matmul speed {min(ratios):.2f}x to "
        f"{max(ratios):.2f}x; bf16 hardware: {'yes' if hardware else 'no'}",
        "- Peaks, measured by each script in its own process right before its bench:",
        "",
        "| script | fp32 matmul GFLOP/s | bf16 matmul GFLOP/s | memory read GB/s | load before | load after |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in records.items():
        m = r["machine"]
        lines.append(f"| {label(name)} | {m['fp32_gflops']:.0f} | {m['bf16_gflops']:.0f} | {m['bandwidth_gbs']:.1f} | "
                     f"{r['load_before']} | {r['load_after']} |")  # fmt: skip
    return [*lines, ""]


def goals_section(records: dict[str, dict]) -> list[str]:
    lines = [
        "## Goals",
        "",
        "| script | goal | target | measured | met | why not / note |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in records.items():
        for g in r["goals"]:
            lines.append(f"| {label(name)} | {g['goal']} | {g['target']} | {g['measured']} | {verdict(g['met'])} | "
                         f"{g['note']} |")  # fmt: skip
    return [*lines, ""]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    parser.add_argument("--only", nargs="+", choices=SUITE, help="run only these scripts")
    parser.add_argument(
        "--out", help="results file (default bench/results.md; with --quick, none unless given)"
    )
    args = parser.parse_args(argv)
    out = Path(args.out) if args.out else (None if args.quick else HERE / "results.md")
    names = [n for n in SUITE if n in (args.only or SUITE)]
    start, started = time.perf_counter(), datetime.datetime.now().astimezone()
    suite_before = load()
    records: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            record, before, after = run_script(name, args.quick, Path(tmp))
            records[name] = record | {"load_before": before, "load_after": after}
    minutes = (time.perf_counter() - start) / 60
    command = (
        "bench/run.py"
        + (" --quick" if args.quick else "")
        + (f" --only {' '.join(args.only)}" if args.only else "")
    )
    lines = [
        "# Bench results",
        "",
        f"Written by `{command}` (`make bench` runs the whole suite) on {started:%Y-%m-%d %H:%M %Z}, commit "
        f"{git_state()}, in {minutes:.1f} minutes; load average {suite_before} before the suite and {load()} "
        "after it (1, 5, 15 minutes). Every number below comes from this one run; rerun to update, do not edit.",
        "",
        *machine_section(records),
        *goals_section(records),
        *[line for r in records.values() for line in ("", r["markdown"])],
    ]
    text = "\n".join(lines).rstrip() + "\n"
    if out is not None:
        atomic_write_text(out, text)
        print(f"\nwrote {out} ({minutes:.1f} minutes)")
    else:
        print(f"\n(--quick: no results file; {minutes:.1f} minutes)")


if __name__ == "__main__":
    main()
