"""Sharded training memory: per-rank peak RSS of a 2-rank gloo FSDP2 run against one process, and the plan.

The model is big enough to matter: the Vicuna-7B width (4096 wide, MLP 11008, vocabulary 32001) cut to
`--layers` LLM layers, with the full towers (CLIP ViT-L/14 at 336 px, ConvNeXt-L at 768 px), random weights,
stage 2 (the LLM and the new modules train; towers frozen), fp32, gradient checkpointing, one sample per
micro-batch and a global batch of 2 (one process accumulates 2; two ranks take 1 each), 2 steps on the
synthetic shapes set. Each run goes through the real `mgllava train` (`main(argv)`), under torchrun for 2
ranks; every process reports its own peak RSS (VmHWM) and its RSS before the model is built (the Python,
torch and transformers runtime). Beside it, `mgllava train --plan`'s prediction for the same config and
world size (made for GPU memory: it has no runtime, so the runtime measured here is added to it).

Goal (issue 21, item 4): each rank's peak at most 0.6x the one-process peak; the plan within 20% of the
measured peak.

    .venv/bin/python bench/bench_sharded_memory.py [--layers 2]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TEXT = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32,
        "num_key_value_heads": 32, "vocab_size": 32001, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5}  # fmt: skip
GOAL_RATIO, GOAL_PLAN = 0.6, 0.2


def hwm_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def overrides(data: dict, out: Path, layers: int) -> list[str]:
    """The run's config: the tiny preset (its packaged tokenizer: the hub is not needed) with the 7B preset's
    towers and the Vicuna-7B-wide LLM cut to `layers` layers."""
    from tests import synth

    from mgllava import MGLlavaConfig

    seven = MGLlavaConfig.from_preset("mgllava-vicuna-7b")
    model = {"vision_config": seven.vision_config.to_dict(), "high_res_config": seven.high_res_config.to_dict(),
             "text_config": {**TEXT, "num_hidden_layers": layers}}  # fmt: skip
    return [synth.source_override(data), f"output_dir={out}", "init_from=null", "stage.requires_init=false",
            f"model_overrides={_yaml_json(model)}", "precision=fp32", "gradient_checkpointing=true",
            "stage.per_device_batch_size=1", "stage.global_batch_size=2", "max_steps=2", "save_every=1000",
            "data.num_workers=0"]  # fmt: skip


def _yaml_json(obj: dict) -> str:
    """JSON that YAML reads back with the same types: YAML wants a dot in a float's mantissa (1.0e-05)."""
    return re.sub(r"(?<![\d.])(\d+)e([-+]\d+)", r"\1.0e\2", json.dumps(obj))


def job(args: argparse.Namespace) -> None:
    """One process of a run: its runtime RSS, then the real training, then its peak, written as JSON."""
    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 2) // int(os.environ.get("WORLD_SIZE", 1))))
    import mgllava.train.trainer  # noqa: F401 - the runtime, before any model exists
    from mgllava.cli import main

    runtime = rss_mb()
    data = json.loads(Path(args.job_data).read_text())
    code = main(
        [
            "train",
            "tiny-stage2",
            *overrides({k: Path(v) for k, v in data.items()}, Path(args.job_out), args.layers),
        ]
    )
    rank = int(os.environ.get("RANK", 0))
    Path(args.job_out, f"memory-rank{rank}.json").write_text(
        json.dumps({"code": code, "runtime_mb": runtime, "peak_mb": hwm_mb()})
    )


def run(world: int, data_file: Path, out: Path, layers: int) -> list[dict]:
    command = [__file__, "--layers", str(layers), "--job-data", str(data_file), "--job-out", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": f"{ROOT / 'src'}:{ROOT}"}
    if world == 1:
        subprocess.run([sys.executable, *command], env=env, check=True)
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world),
                        "--master_port", str(port), *command], env=env, check=True)  # fmt: skip
    return [json.loads((out / f"memory-rank{r}.json").read_text()) for r in range(world)]


def predicted(data: dict, out: Path, layers: int, world: int) -> float:
    from mgllava.config import load_config
    from mgllava.train.config import TrainConfig
    from mgllava.train.plan import plan

    config = load_config(TrainConfig, "tiny-stage2", overrides(data, out, layers))
    sample_tokens = 700  # 576 image rows + boxes + the question and answer: the synthetic set's length
    config.max_length = sample_tokens
    return plan(config, world, 1000, "bench").peak / 2**20


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--job-data", help=argparse.SUPPRESS)
    parser.add_argument("--job-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.job_out:
        job(args)
        return 0
    from tests import synth

    root = Path(tempfile.mkdtemp(prefix="sharded-memory-"))
    data = synth.write_dataset(root / "data", n=8, text_only=0)
    data_file = root / "data.json.paths"
    data_file.write_text(json.dumps({k: str(v) for k, v in data.items()}))
    one = run(1, data_file, root / "one", args.layers)[0]
    two = run(2, data_file, root / "two", args.layers)
    print(f"\nVicuna-7B width, {args.layers} LLM layers, full towers, stage 2, fp32, checkpointing; load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}\n")  # fmt: skip
    print(
        "| run | rank | runtime RSS MB | peak RSS MB | peak / one-process peak | plan + runtime MB | plan error |"
    )
    print("|---|---|---|---|---|---|---|")
    rows = [("one process", 0, one, 1)] + [("2 ranks, FSDP2 (gloo)", r, m, 2) for r, m in enumerate(two)]
    worst_ratio, worst_plan = 0.0, 0.0
    for name, rank, m, world in rows:
        plan_mb = predicted(data, root / "plan", args.layers, world) + m["runtime_mb"]
        ratio, error = m["peak_mb"] / one["peak_mb"], plan_mb / m["peak_mb"] - 1
        worst_plan = max(worst_plan, abs(error))
        if world == 2:
            worst_ratio = max(worst_ratio, ratio)
        print(
            f"| {name} | {rank} | {m['runtime_mb']:.0f} | {m['peak_mb']:.0f} | {ratio:.2f}x | {plan_mb:.0f} | {error:+.0%} |"
        )
    print(f"\ngoal: per-rank peak <= {GOAL_RATIO}x one process: {worst_ratio:.2f}x "
          f"({'met' if worst_ratio <= GOAL_RATIO else 'MISSED'}); plan within {GOAL_PLAN:.0%}: worst {worst_plan:.0%} "
          f"({'met' if worst_plan <= GOAL_PLAN else 'MISSED'})")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
