"""Memory: peak resident memory of loading and running each model preset, against its weight bytes.

Every preset of `mgllava/configs/models` is built on the meta device in bf16 (no memory), its weight bytes
counted, and judged to fit when its weights plus an allowance for activations and the runtime
(`--allowance-gib`, 2) stay under `--budget-gib` (20) and under the memory available right now. Each preset
that fits runs in its own process: materialise random weights (`materialise`), then one `generate` of 2
tokens after one image at the preset's resolutions, `--boxes` boxes and 40 text tokens. That process reports
its resident memory after imports, its peak while loading and its peak while running (VmHWM, Linux).
The others are listed with the reason they were skipped.

    .venv/bin/python bench/bench_memory.py [--quick] [--budget-gib 20] [--presets ...] [--record out.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import PreTrainedModel

from common import (
    GIB,
    Record,
    arguments,
    available_memory_bytes,
    measure_machine,
    peak_rss_bytes,
    reset_peak_rss,
    rss_bytes,
)
from flops import PrefillShape
from mgllava import MGLlavaConfig, MGLlavaForConditionalGeneration
from mgllava.model.configuration import preset_names
from models import prefill_inputs

DTYPE = torch.bfloat16


def on_meta(config: MGLlavaConfig) -> MGLlavaForConditionalGeneration:
    with torch.device("meta"):
        return MGLlavaForConditionalGeneration(config).to(DTYPE)


def materialise(model: torch.nn.Module, seed: int = 0) -> None:
    """Give a meta-device model random weights in CPU memory: every parameter is written (so resident) with a
    tiled block of N(0, 0.02) values - a memory-speed fill, where `init_weights`' per-tensor RNG costs ~5 ns
    per weight (80 s for 8B) - and every module holding buffers (rotary frequencies, position ids) gets them
    from its own PreTrainedModel's `_init_weights`, as `init_weights` would."""
    model.to_empty(device="cpu")
    block = torch.randn(1 << 20, generator=torch.Generator().manual_seed(seed)) * 0.02
    with torch.no_grad():
        for p in model.parameters():
            flat, size = p.view(-1), block.numel()
            whole, tail = divmod(flat.numel(), size)
            if whole:
                flat[: whole * size].view(whole, size).copy_(block.to(p.dtype).expand(whole, size))
            if tail:
                flat[whole * size :].copy_(block[:tail])

    def walk(module: torch.nn.Module, owner: PreTrainedModel) -> None:
        owner = module if isinstance(module, PreTrainedModel) else owner
        for sub in module.children():
            walk(sub, owner)
        if next(module.buffers(recurse=False), None) is not None:
            owner._init_weights(module)

    walk(model, model)


def weight_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def child(name: str, boxes: int) -> None:
    """Load and run one preset; print its memory and times as JSON (run in a fresh process)."""
    config = MGLlavaConfig.from_preset(name)
    baseline = rss_bytes()
    reset_peak_rss()
    start = time.perf_counter()
    model = on_meta(config)
    materialise(model)
    model.eval()
    load_s = time.perf_counter() - start
    loaded, load_peak = rss_bytes(), peak_rss_bytes()
    reset_peak_rss()
    batch, _ = prefill_inputs(config, PrefillShape(1, boxes, 40))
    batch = {k: v.to(DTYPE) if v.is_floating_point() else v for k, v in batch.items()}
    batch["object_boxes"] = batch["object_boxes"].float()
    model.generation_config.pad_token_id = config.text_config.pad_token_id
    start = time.perf_counter()
    with torch.inference_mode():
        model.generate(**batch, max_new_tokens=2, min_new_tokens=2, do_sample=False)
    run_s = time.perf_counter() - start
    print(json.dumps({"weights": weight_bytes(model), "baseline": baseline, "loaded": loaded, "load_peak": load_peak,
                      "run_peak": peak_rss_bytes(), "load_s": load_s, "run_s": run_s,
                      "tokens": int(batch["input_ids"].shape[1])}))  # fmt: skip


def run_child(name: str, boxes: int) -> dict:
    argv = [sys.executable, str(Path(__file__).resolve()), "--child", name, "--boxes", str(boxes)]
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"preset {name}: the child process failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if abs(n) >= GIB / 4 else f"{n / 2**20:.0f} MiB"


def main(argv: list[str] | None = None) -> None:
    parser = arguments(__doc__.splitlines()[0])
    parser.add_argument("--budget-gib", type=float, default=20.0)
    parser.add_argument(
        "--allowance-gib", type=float, default=2.0, help="activations and runtime on top of weights"
    )
    parser.add_argument("--presets", nargs="+", default=None, help="default: all (--quick: tiny and demo)")
    parser.add_argument("--boxes", type=int, default=10)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child, args.boxes)
        return
    names = args.presets or preset_names()
    unknown = sorted(set(names) - set(preset_names()))
    if unknown:
        parser.error(f"unknown presets {unknown}; available: {', '.join(preset_names())}")
    record = Record("Memory: peak RSS of loading and running each preset (bf16, random weights)", args.quick)
    machine = measure_machine(args.quick)
    record.machine(machine)
    record.line(f"A preset fits when its bf16 weights plus {args.allowance_gib:.0f} GiB (activations of one image, the "
                f"runtime) stay under {args.budget_gib:.0f} GiB and under the memory available when it is reached. "
                f"Each runs in its own process: build on the meta device, materialise random weights, then "
                f"`generate` 2 tokens after one image, {args.boxes} boxes and 40 text tokens.")  # fmt: skip
    record.line()
    rows, skipped = [], []
    for name in names:
        weights = weight_bytes(on_meta(MGLlavaConfig.from_preset(name)))
        need = weights + args.allowance_gib * GIB
        available = available_memory_bytes()
        if args.quick and name not in ("tiny", "demo"):
            skipped.append([name, gib(weights), "--quick runs only tiny and demo"])
        elif need > args.budget_gib * GIB:
            skipped.append([name, gib(weights), f"needs ~{gib(need)} > the {args.budget_gib:.0f} GiB budget"])
        elif need > available:
            skipped.append([name, gib(weights), f"needs ~{gib(need)}, only {gib(available)} available now"])
        else:
            m = run_child(name, args.boxes)
            record.values[name] = m
            over = m["run_peak"] - m["baseline"] - m["weights"]
            rows.append([name, gib(m["weights"]), gib(m["baseline"]), gib(m["load_peak"]), gib(m["run_peak"]),
                         f"{m['run_peak'] / m['weights']:.2f}x", gib(over), f"{m['load_s']:.1f}",
                         f"{m['run_s']:.1f}"])  # fmt: skip
    record.table(["preset", "weights", "RSS after imports", "peak loading", "peak running", "peak / weights",
                  "peak - imports - weights", "load s", "run s"], rows)  # fmt: skip
    record.values["skipped"] = [row[0] for row in skipped]
    if skipped:
        record.line("Skipped:")
        record.line()
        record.table(["preset", "weights", "why"], skipped)
    record.finish(args.record)


if __name__ == "__main__":
    main()
