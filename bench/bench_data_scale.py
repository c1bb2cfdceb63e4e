"""Training data at the paper's scale: per-rank memory and time to the first batch over 1.2M samples.

Writes (once; `--data` reuses it) a synthetic LLaVA JSON list of `--samples` records (1 in 10 text-only,
conversations of 1 to 3 turns with answers from a few words to a few hundred) over 64 small images, and our
JSONL box file with 3 to 8 boxes for every image sample. Then starts `--ranks` processes at once, each doing
what a training rank does before its first step, in a gloo process group as the trainer runs it:
`scan_share` (the ranks scan the data and box files between them, largest first, keeping the scans under
the cache folder), a barrier, `load_samples` (every rank maps every scan), `StepBatches` (the length-grouped order of the epoch, balanced across ranks) and a DataLoader with
`--workers` forked workers, up to its first collated micro-batch (tiny processor: the data path, not the
model). Each rank reports its RSS before and after the index, its peak, its workers' RSS and the seconds
to the first batch. Twice: with an empty cache (a first run) and again (every later run and stage).

`--baseline N` also measures the previous way (every record parsed into a list of dicts and the whole box
file parsed into `BoxIndex`, per rank) on the first N samples in one process, for comparison.

    .venv/bin/python bench/bench_data_scale.py [--samples 1200000] [--ranks 2] [--workers 2] [--baseline 120000]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
WORDS = ("the", "a", "red", "circle", "square", "left", "of", "image", "shows", "small", "large", "near")
GOAL_MB, GOAL_S = 1024, 30.0


def rss_mb(pid: int | str = "self") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def private_mb(pid: int) -> float:
    """Memory only this process holds (what a forked worker has copied or made), from smaps_rollup."""
    total = 0
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith(("Private_Clean:", "Private_Dirty:")):
            total += int(line.split()[1])
    return total / 1024


def peak_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _conversation(rng: random.Random, image: bool) -> list[dict[str, str]]:
    turns = []
    for t in range(rng.choice((1, 1, 2, 3))):
        question = " ".join(rng.choices(WORDS, k=rng.randint(4, 20))) + "?"
        if image and t == 0:
            question = "<image>\n" + question
        answer = " ".join(rng.choices(WORDS, k=rng.choice((3, 12, 40, 200))))
        turns += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    return turns


def write_data(root: Path, n: int) -> dict[str, Path]:
    """The synthetic set, streamed to disk (the writer never holds it)."""
    from tests import synth

    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    for k in range(64):
        synth.scene(images / f"{k}.png", list(synth.COLORS)[k % 4], synth.SHAPES[k % 2], k)
    rng = random.Random(0)
    data, boxes = root / "data.json", root / "boxes.jsonl"
    with data.open("w") as records, boxes.open("w") as box_file:
        records.write("[\n")
        for i in range(n):
            image = i % 10 != 0
            record = {"id": f"r{i}", "conversations": _conversation(rng, image)}
            if image:
                record["image"] = f"{i % 64}.png"
                count = rng.randint(3, 8)
                xyxy = [
                    [x := rng.randint(0, 40), y := rng.randint(0, 30), x + 20, y + 20] for _ in range(count)
                ]
                box_file.write(json.dumps({"id": f"r{i}", "image": record["image"], "frame": [96, 64],
                                           "boxes": xyxy, "scores": [0.5] * count,
                                           "labels": rng.choices(WORDS, k=count)}) + "\n")  # fmt: skip
            records.write(("" if i == 0 else ",\n") + json.dumps(record))
        records.write("\n]\n")
    return {"data": data, "images": images, "boxes": boxes}


def rank_job(root: Path, rank: int, world: int, workers: int) -> dict[str, float]:
    """One rank's path to its first batch; returns its measurements."""
    start = time.perf_counter()
    import torch

    torch.set_num_threads(1)
    from mgllava.config import load_config
    from mgllava.data.dataset import LlavaDataset, SafeDataset, load_samples, scan_share
    from mgllava.train.config import TrainConfig
    from mgllava.train.sampler import StepBatches, make_plan
    from mgllava.train.setup import build_processor

    source = f"data.sources=[{{path: {root / 'data.json'}, image_root: {root / 'images'}, boxes: {root / 'boxes.jsonl'}}}]"
    config = load_config(TrainConfig, "tiny-stage2", [source, "init_from=null", "stage.requires_init=false",
                                                      "stage.global_batch_size=128", "stage.per_device_batch_size=4",
                                                      "stage.length_grouped=true"])  # fmt: skip
    processor = build_processor(config)
    from mgllava.utils import dist

    dist.init()
    imported, before = time.perf_counter(), rss_mb()
    scan_share(config.data, root / "cache", rank, world)  # as the trainer: each rank scans its share
    dist.barrier()
    samples = load_samples(config.data, config.seed, root / "cache")
    indexed, after = time.perf_counter(), rss_mb()
    plan = make_plan(config, len(samples), world)
    dataset = SafeDataset(LlavaDataset(samples, processor))
    batches = StepBatches(samples, config, plan, rank, 0)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=workers,
                                         collate_fn=lambda items: processor.collate(items, padding_side="right"))  # fmt: skip
    iterator = iter(loader)
    batch = next(iterator)
    first = time.perf_counter()
    children = [int(p) for p in Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").read_text().split()]
    worker_private = [private_mb(p) for p in children]
    del iterator
    dist.cleanup()
    return {
        "rank": rank, "samples": len(samples), "batch_rows": int(batch["input_ids"].shape[0]),
        "rss_before_index_mb": before, "rss_after_index_mb": after, "index_mb": after - before,
        "rss_at_first_batch_mb": rss_mb(), "peak_rss_mb": peak_mb(), "worker_private_mb": worker_private,
        "index_s": indexed - imported, "first_batch_s": first - imported, "first_batch_from_start_s": first - start,
    }  # fmt: skip


def baseline(root: Path, n: int) -> dict[str, float]:
    """The previous way on the first `n` records: a list of parsed dicts and the whole box file parsed."""
    from mgllava.utils.records import _json_list_spans

    small = root / f"first{n}"
    small.mkdir(exist_ok=True)
    records = [record for _, _, record in itertools.islice(_json_list_spans(root / "data.json"), n)]
    (small / "data.json").write_text(json.dumps(records))
    ids = {r["id"] for r in records}
    with (root / "boxes.jsonl").open() as src, (small / "boxes.jsonl").open("w") as dst:
        dst.writelines(line for line in src if json.loads(line)["id"] in ids)
    del records
    script = (
        "import sys, time, json; sys.path.insert(0, {src!r}); from bench_data_scale import rss_mb;"
        "from mgllava.data.dataset import read_records; from mgllava.boxes.files import BoxIndex;"
        "b = rss_mb(); t = time.perf_counter(); r = read_records({data!r}); i = BoxIndex.load({boxes!r});"
        "print(json.dumps({{'index_mb': rss_mb() - b, 'index_s': time.perf_counter() - t}}))"
    ).format(src=str(Path(__file__).parent), data=str(small / "data.json"), boxes=str(small / "boxes.jsonl"))
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, env=_env()
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": f"{ROOT / 'src'}:{ROOT}"}


def run_ranks(args: argparse.Namespace) -> list[dict]:
    command = [sys.executable, __file__, "--samples", str(args.samples), "--ranks", str(args.ranks),
               "--workers", str(args.workers), "--data", str(args.data), "--rank-job"]  # fmt: skip
    port = str(_free_port())
    procs = [subprocess.Popen([*command, str(r)], stdout=subprocess.PIPE, text=True,
                              env={**_env(), "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(args.ranks),
                                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port})
             for r in range(args.ranks)]  # fmt: skip
    results = []
    for proc in procs:
        out, _ = proc.communicate()
        if proc.returncode:
            raise SystemExit(f"a rank failed (exit {proc.returncode})")
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def table(results: list[dict]) -> None:
    print("| rank | RSS before index MB | index MB (RSS after - before) | RSS at first batch MB | peak RSS MB | "
          "workers' private MB | index s | first batch s |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        workers = ", ".join(f"{w:.0f}" for w in r["worker_private_mb"])
        print(f"| {r['rank']} | {r['rss_before_index_mb']:.0f} | {r['index_mb']:.0f} | {r['rss_at_first_batch_mb']:.0f} | "
              f"{r['peak_rss_mb']:.0f} | {workers} | {r['index_s']:.1f} | {r['first_batch_s']:.1f} |")  # fmt: skip
    worst_mb, worst_s = max(r["index_mb"] for r in results), max(r["first_batch_s"] for r in results)
    print(f"\ngoal: index < {GOAL_MB} MB per rank: {worst_mb:.0f} MB ({'met' if worst_mb < GOAL_MB else 'MISSED'}); "
          f"first batch < {GOAL_S:.0f} s: {worst_s:.1f} s ({'met' if worst_s < GOAL_S else 'MISSED'})")  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--samples", type=int, default=1_200_000)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--data", type=Path, default=Path("/tmp/mgllava-data-scale"))
    parser.add_argument("--baseline", type=int, default=0, help="also measure the previous way on N samples")
    parser.add_argument("--rank-job", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    root = args.data / str(args.samples)
    if args.rank_job is not None:
        print(json.dumps(rank_job(root, args.rank_job, args.ranks, args.workers)))
        return 0
    if not (root / "boxes.jsonl").is_file():
        t = time.perf_counter()
        write_data(root, args.samples)
        print(f"wrote {args.samples} samples in {time.perf_counter() - t:.0f} s: data "
              f"{(root / 'data.json').stat().st_size / 2**20:.0f} MiB, boxes {(root / 'boxes.jsonl').stat().st_size / 2**20:.0f} MiB")  # fmt: skip
    shutil.rmtree(root / "cache", ignore_errors=True)
    for run in ("first run (empty cache)", "second run (kept scan)"):
        results = run_ranks(args)
        print(f"\n{run}: {args.samples} samples, {args.ranks} ranks started together, {args.workers} DataLoader "
              f"workers each, {os.cpu_count()} cores; load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}\n")  # fmt: skip
        table(results)
    if args.baseline:
        base = baseline(root, args.baseline)
        scale = args.samples / args.baseline
        print(f"\nprevious way (parsed dicts + whole BoxIndex), one process, first {args.baseline} samples: "
              f"{base['index_mb']:.0f} MB in {base['index_s']:.1f} s; x{scale:.0f} linearly: "
              f"~{base['index_mb'] * scale / 1024:.1f} GB and ~{base['index_s'] * scale:.0f} s per rank (an extrapolation)")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
