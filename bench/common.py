"""Shared helpers of the bench scripts: this machine, timing, memory, and the record each script writes.

- `measure_machine()`: the CPU (model, cores, bf16 flags in /proc/cpuinfo) and its measured peaks, in the
  calling process and right before its bench: fp32 and bf16 matmul GFLOP/s (best of square matmuls, torch's
  and oneDNN's with a packed weight) and the memory read bandwidth (a matrix-vector product over a matrix at
  least twice the L3 cache, so that it comes from DRAM).
  bf16 hardware is judged from the flags (avx512_bf16, amx_bf16) and from the measured bf16/fp32 ratio.
- `interleave()`: rounds of ours and the peer in alternating order, best and median of each.
- `peak_rss_during()`: the peak resident memory a call adds (Linux /proc: VmHWM after a reset).
- `Record`: the script's markdown section (printed as it is built) and its goals, written with
  `--record PATH` as JSON for `bench/run.py`, which assembles `bench/results.md`.

Every number a script prints comes from its own run; nothing is copied from a previous one.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from mgllava.inference.linear import PackedLinear, packing_unavailable

BF16_FLAGS = ("avx512_bf16", "amx_bf16")
GIB = 2**30


# -- the machine ------------------------------------------------------------------------------------------
def cpu_info() -> dict[str, object]:
    """CPU model, logical cores and bf16 flags from /proc/cpuinfo (the platform's name where it is missing)."""
    model, flags = "", set()
    path = Path("/proc/cpuinfo")
    if path.exists():
        for line in path.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and not model:
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    model = model or platform.processor() or platform.machine()
    return {"cpu": model, "cores": os.cpu_count() or 1, "bf16_flags": [f for f in BF16_FLAGS if f in flags]}


def l3_bytes() -> int | None:
    """Size of the last-level cache, from sysfs (None when not published)."""
    sizes = []
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (index / "size").read_text().strip()
        except OSError:
            continue
        unit = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
        sizes.append(int(text.rstrip("KMG")) * unit)
    return max(sizes) if sizes else None


def total_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def available_memory_bytes() -> int:
    """MemAvailable from /proc/meminfo (free memory when it is not published)."""
    path = Path("/proc/meminfo")
    if path.exists():
        for line in path.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def timeit(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> float:
    """Median wall-clock seconds of `fn()` over `repeats` runs after `warmup` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def best_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def matmul_peak(dtype: torch.dtype = torch.float32, n: int = 2048, repeats: int = 5) -> float:
    """Measured GFLOP/s of an n x n matmul in `dtype` (the roofline ratios are read against), best of `repeats`
    and of two kernels: torch's matmul and oneDNN with a packed weight (`inference.linear`, what the engine
    serves with). On AMD CPUs torch's fp32 matmul (MKL) runs at about half oneDNN's rate, so a peak taken from
    it alone would flatter every share of it."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    seconds = best_seconds(lambda: a @ b, repeats)
    if packing_unavailable() is None:
        layer = nn.Linear(n, n, bias=False, dtype=dtype)
        with torch.no_grad():
            layer.weight.copy_(b.t())
        packed = PackedLinear(layer)
        with torch.no_grad():
            seconds = min(seconds, best_seconds(lambda: packed(a), repeats))
    return 2 * n**3 / seconds / 1e9


def read_bandwidth(nbytes: int, repeats: int = 3) -> float:
    """Measured GB/s of a matrix-vector product over an fp32 matrix of `nbytes` (one streaming read, the
    access pattern of a decode step; it reads faster than a plain sum)."""
    matrix, vector = torch.ones(max(nbytes // (4 * 4096), 1), 4096), torch.ones(4096)
    return matrix.numel() * 4 / best_seconds(lambda: torch.mv(matrix, vector), repeats) / 1e9


@dataclass
class Machine:
    cpu: str
    cores: int
    threads: int
    bf16_flags: list[str]
    memory_gib: float
    l3_mib: float | None
    fp32_gflops: float
    bf16_gflops: float
    bandwidth_gbs: float
    load: list[float] = field(default_factory=list)

    @property
    def bf16_ratio(self) -> float:
        return self.bf16_gflops / self.fp32_gflops

    @property
    def bf16_hardware(self) -> bool:
        """bf16 matmul units: the CPU says so and bf16 matmul measures faster than fp32."""
        return bool(self.bf16_flags) and self.bf16_ratio > 1.0

    def peak(self, dtype: torch.dtype) -> float:
        return self.bf16_gflops if dtype == torch.bfloat16 else self.fp32_gflops

    def describe(self) -> str:
        flags = ", ".join(self.bf16_flags) or "none"
        verdict = "yes" if self.bf16_hardware else "no"
        if bool(self.bf16_flags) != (self.bf16_ratio > 1.0):
            verdict += " (the flags and the measured ratio disagree)"
        l3 = f", L3 {self.l3_mib:.0f} MiB" if self.l3_mib else ""
        return (
            f"{self.cpu}, {self.cores} logical cores ({self.threads} torch threads), "
            f"{self.memory_gib:.1f} GiB RAM{l3}; bf16 flags: {flags}; bf16 hardware: {verdict}"
        )

    def peaks(self) -> str:
        return (
            f"measured in this run: fp32 matmul {self.fp32_gflops:.0f} GFLOP/s, bf16 matmul "
            f"{self.bf16_gflops:.0f} GFLOP/s ({self.bf16_ratio:.2f}x fp32), memory read {self.bandwidth_gbs:.1f} GB/s; "
            f"load average {' '.join(f'{x:.2f}' for x in self.load)}"
        )


def measure_machine(quick: bool = False, child: bool = False) -> Machine:
    """This machine, its peaks measured now (2048 matmuls and 1 GiB or 2x L3 read; smaller if quick).
    `child`: measured in a child process, so that this process's main thread starts no OpenMP team (the
    serving benches: a team the main thread ever started slows a model thread's small oneDNN calls about 2x,
    docs/server.md, "Threads")."""
    if child:
        code = ("import dataclasses, json; from common import measure_machine; "
                f"print(json.dumps(dataclasses.asdict(measure_machine({quick!r}))))")  # fmt: skip
        done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parent,
                              capture_output=True, text=True, check=True)  # fmt: skip
        return Machine(**json.loads(done.stdout.strip().splitlines()[-1]))
    info = cpu_info()
    l3 = l3_bytes()
    n, repeats = (512, 3) if quick else (2048, 5)
    buffer = 64 * 2**20 if quick else min(max(2 * (l3 or 0), GIB), available_memory_bytes() // 4)
    return Machine(
        cpu=str(info["cpu"]),
        cores=int(info["cores"]),
        threads=torch.get_num_threads(),
        bf16_flags=list(info["bf16_flags"]),
        memory_gib=total_memory_bytes() / GIB,
        l3_mib=l3 / 2**20 if l3 else None,
        fp32_gflops=matmul_peak(torch.float32, n, repeats),
        bf16_gflops=matmul_peak(torch.bfloat16, n, repeats),
        bandwidth_gbs=read_bandwidth(buffer),
        load=list(os.getloadavg()),
    )


# -- timing -----------------------------------------------------------------------------------------------
@dataclass
class Timing:
    seconds: list[float]

    @property
    def best(self) -> float:
        return min(self.seconds)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


def interleave(fns: dict[str, Callable[[], object]], rounds: int, warmup: bool = True) -> dict[str, Timing]:
    """Time each function once per round, the order reversed every other round (A B, B A, ...), so that
    drift in the machine's load hits all alike. One untimed warm-up call each first, unless `warmup=False`."""
    if warmup:
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(rounds):
        for name in names if r % 2 == 0 else reversed(names):
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    return {name: Timing(seconds) for name, seconds in times.items()}


# -- memory -----------------------------------------------------------------------------------------------
def _status_kib(key: str) -> int:
    path = Path("/proc/self/status")
    if not path.exists():
        raise RuntimeError("memory benches read /proc/self/status (Linux); this system has none")
    for line in path.read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {key}")


def rss_bytes() -> int:
    return _status_kib("VmRSS") * 1024


def peak_rss_bytes() -> int:
    return _status_kib("VmHWM") * 1024


def reset_peak_rss() -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to /proc/self/clear_refs)."""
    Path("/proc/self/clear_refs").write_text("5")


def peak_rss_during(fn: Callable[[], object]) -> int:
    """Bytes of resident memory `fn()` adds at its peak over the RSS before it. Exact only when freed memory
    goes back to the system: run it in a process started with MALLOC_MMAP_THRESHOLD_ set low (`child_env`)."""
    reset_peak_rss()
    before = rss_bytes()
    fn()
    return peak_rss_bytes() - before


def child_env() -> dict[str, str]:
    """Environment for a memory-measuring child: every allocation over 64 KiB its own mapping, returned to the
    system when freed, so that VmHWM sees each call's own peak and no memory kept by an earlier call."""
    return os.environ | {"MALLOC_MMAP_THRESHOLD_": str(64 * 1024), "MALLOC_TRIM_THRESHOLD_": str(64 * 1024)}


# -- the record -------------------------------------------------------------------------------------------
@dataclass
class Goal:
    goal: str
    target: str
    measured: str
    met: bool | None  # None: not judged (a --quick run measures small models, not the real one)
    note: str = ""


class Record:
    """A script's results: markdown lines (printed as they come) and goals, saved as JSON for bench/run.py."""

    def __init__(self, title: str, quick: bool) -> None:
        self.title = title + (" (--quick: small sizes, not the real model)" if quick else "")
        self.quick = quick
        self.lines: list[str] = []
        self.goals: list[Goal] = []
        self.machine_data: dict[str, object] = {}
        self.values: dict[str, object] = {}  # the key numbers, for tests and tools reading the JSON
        self.started = time.perf_counter()
        self.line(f"## {self.title}")
        self.line()

    def line(self, text: str = "") -> None:
        print(text, flush=True)
        self.lines.append(text)

    def table(self, header: list[str], rows: list[list[object]]) -> None:
        self.line("| " + " | ".join(header) + " |")
        self.line("|" + "|".join("---" for _ in header) + "|")
        for row in rows:
            self.line("| " + " | ".join(str(c) for c in row) + " |")
        self.line()

    def machine(self, machine: Machine) -> None:
        self.machine_data = asdict(machine)
        self.line(f"Machine: {machine.describe()}; {machine.peaks()}.")
        self.line()

    def goal(self, goal: str, target: str, measured: str, met: bool, note: str = "") -> None:
        """A goal of the issue, judged on this run's numbers (not judged with --quick)."""
        if self.quick:
            self.goals.append(Goal(goal, target, measured, None, "not judged: --quick runs small models"))
            return
        load = self.machine_data.get("load") or [0.0]
        cores = self.machine_data.get("cores") or 1
        if not met and load[0] > 0.5 * cores:
            note += f" (load average {load[0]:.2f} on {cores} cores when this bench started: other work shared it)"
        self.goals.append(Goal(goal, target, measured, met, note))

    def finish(self, path: str | None) -> None:
        """Print the goals table and, when `path` is given, write the record there as JSON."""
        if self.goals:
            self.line("Goals:")
            self.line()
            self.table(
                ["goal", "target", "measured", "met", "why not / note"],
                [[g.goal, g.target, g.measured, verdict(g.met), g.note] for g in self.goals],
            )
        seconds = time.perf_counter() - self.started
        self.line(f"_({seconds:.0f} s)_")
        if path:
            data = {"title": self.title, "markdown": "\n".join(self.lines), "goals": [asdict(g) for g in self.goals],
                    "machine": self.machine_data, "values": self.values, "seconds": seconds}  # fmt: skip
            Path(path).write_text(json.dumps(data, indent=1))


def verdict(met: bool | None) -> str:
    return "n/a" if met is None else "yes" if met else "**no**"


def arguments(description: str) -> argparse.ArgumentParser:
    """A parser with the options every bench script takes: --quick and --record."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run in seconds")
    parser.add_argument("--record", help="write the results as JSON here (bench/run.py collects them)")
    return parser


def gflops(flops: float, seconds: float) -> float:
    return flops / seconds / 1e9


def pct(x: float) -> str:
    return f"{x:.0%}"


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f}" if seconds < 10 else f"{seconds * 1e3:.0f}"
