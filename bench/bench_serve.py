"""Server throughput and latency: continuous versus static scheduling, under 1, 4, 16 and 64 concurrent clients.

A small random MG-LLaVA (CLIP 112 px -> 64 image tokens, ConvNeXt at 256 px, an 8-layer 512-wide Llama of
27M parameters, the packaged tiny tokenizer, vicuna template; one decode step is about 16 ms at batch 1 and
57 ms at batch 32 on one core) behind the real app and uvicorn on 127.0.0.1. One model, two engines:
`Engine(scheduling="static")` (the earlier engine: one `generate` per batch of up to `--batch` requests
gathered in a 10 ms window) and `Engine(scheduling="continuous")` (up to `--batch` running rows; a request's
prompt is computed in chunks inside the next steps, `--max-step-tokens` per step, and it leaves when done),
each behind its own server.

Each client sends `--requests` streamed chat completions one after another, each with its own image (so the
feature cache flatters neither mode) and a `max_tokens` drawn per request from {8, 16, 32, 64, 128} (the
same draws for both modes): random weights rarely emit the stop token, so `max_tokens` stands in for the
varying answer lengths of real use. At each concurrency level the two servers are loaded in turn, A B B A,
so that drift in the machine's load hits both alike. Prints requests/s, generated tokens/s, p50/p95
latency and p50/p95 time to first token per mode, the continuous/static ratios, whether the two modes gave
the same (greedy) answers, the load average during each level, and the goal at 16 clients (at least 2x the
requests/s at a lower p95) with by how much it was met or missed.
Clients run in this process (threads) and share the CPU with the server, as a sidecar would. As in
`mgllava serve`, the main thread keeps one OpenMP thread and the machine's peaks are measured in a child
process (docs/server.md, "Threads"); the two servers' model threads (`--threads` each, default the cores)
both keep an OpenMP team, so each runs beside the other's idle team, which slows small oneDNN calls: the
ratio compares like with like, the absolute rates understate one `mgllava serve`.

    .venv/bin/python bench/bench_serve.py [--quick] [--clients 1,4,16,64] [--requests 4] [--batch 64] [--threads 1]
        [--max-step-tokens 512]

`--quick` is a smoke run (1, 4 and 16 clients, 2 requests each). The last lines are ours (continuous), the
peer (static) and their ratio at each level.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import random
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import httpx
import torch
from PIL import Image

from common import Record, measure_machine
from mgllava import MGLlavaConfig, MGLlavaForConditionalGeneration, MGLlavaProcessor
from mgllava.inference import Engine
from mgllava.serve import ServerSettings, create_app
from mgllava.serve.background import serve_in_thread
from mgllava.utils.threads import available_cores, set_threads

VISION = dict(model_type="clip_vision_model", hidden_size=128, intermediate_size=512, num_hidden_layers=4,
              num_attention_heads=4, patch_size=14, image_size=112)  # fmt: skip
HIGH = dict(model_type="convnext", hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 2, 1], image_size=256)
TEXT = dict(model_type="llama", vocab_size=2048, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
            num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048, bos_token_id=1,
            eos_token_id=2, pad_token_id=3)  # fmt: skip
LENGTHS = (8, 16, 32, 64, 128)
MODES = ("static", "continuous")
WHY_NOT = (
    "at this model size a decode step costs more per row than its FLOPs (many small matmuls, Python per layer), "
    "so keeping more rows busy gains less than the static engine's idle rows lose (most continuous steps run "
    "few rows: the step sizes above); what would close it: a decode step with a lower fixed cost (fewer, larger "
    "kernels per layer: fused norms and rotary, a compiled step), not built or measured yet; see docs/server.md"
)


def build_model() -> tuple[MGLlavaForConditionalGeneration, MGLlavaProcessor]:
    torch.manual_seed(0)
    config = MGLlavaConfig(vision_config=VISION, high_res_config=HIGH, text_config=TEXT, image_token_id=4)
    model = MGLlavaForConditionalGeneration(config).eval()
    tokenizer = MGLlavaProcessor.from_preset("tiny").tokenizer
    return model, MGLlavaProcessor.for_config(config, tokenizer, template="vicuna")


def image_url(seed: int) -> str:
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 255, (96, 128, 3), generator=g, dtype=torch.uint8).numpy()
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def body(seed: int) -> dict:
    content = [{"type": "image_url", "image_url": {"url": image_url(seed)}},
               {"type": "text", "text": f"Describe picture number {seed}."}]  # fmt: skip
    return {"model": "bench", "messages": [{"role": "user", "content": content}], "stream": True,
            "stream_options": {"include_usage": True}, "max_tokens": random.Random(seed).choice(LENGTHS)}  # fmt: skip


def ask(http: httpx.Client, base: str, request: dict) -> dict:
    """One streamed completion: latency, time to first text, completion tokens, the text."""
    start = time.perf_counter()
    first, pieces, tokens = None, [], 0
    with http.stream("POST", f"{base}/v1/chat/completions", json=request) as reply:
        reply.raise_for_status()
        for line in reply.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk["choices"]:
                if choice["delta"].get("content"):
                    first = first or time.perf_counter()
                    pieces.append(choice["delta"]["content"])
    end = time.perf_counter()
    return {"latency": end - start, "ttft": (first or end) - start, "tokens": tokens, "text": "".join(pieces)}


def closed_loop(
    clients: int,
    requests: int,
    send: Callable[[httpx.Client, int], dict],
    offset: int = 0,
    timeout: float = 600,
) -> tuple[dict[int, dict], float]:
    """`clients` threads each send `requests` requests in turn (seeds offset + c * requests + r), each through
    `send(http, seed)`: {seed: its record}, wall seconds."""
    seeds = [[offset + c * requests + r for r in range(requests)] for c in range(clients)]

    def client(mine: list[int]) -> list[tuple[int, dict]]:
        with httpx.Client(timeout=timeout) as http:
            return [(seed, send(http, seed)) for seed in mine]

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        done = dict(item for items in pool.map(client, seeds) for item in items)
    return done, time.perf_counter() - start


def load(base: str, clients: int, requests: int, offset: int) -> tuple[dict[int, dict], float]:
    """`clients` threads each send `requests` streamed requests in turn: {seed: record}, wall seconds."""
    return closed_loop(clients, requests, lambda http, seed: ask(http, base, body(seed)), offset)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summary(runs: list[tuple[dict[int, dict], float]]) -> dict[str, float]:
    done = [record for records, _ in runs for record in records.values()]
    wall = sum(seconds for _, seconds in runs)
    latencies, ttfts = [r["latency"] for r in done], [r["ttft"] for r in done]
    return {
        "rps": len(done) / wall,
        "tps": sum(r["tokens"] for r in done) / wall,
        "p50": statistics.median(latencies),
        "p95": percentile(latencies, 0.95),
        "ttft50": statistics.median(ttfts),
        "ttft95": percentile(ttfts, 0.95),
    }


def make_app(engine: Engine, batch: int, threads: int | None = None):
    settings = ServerSettings(model_name="bench", max_batch_size=batch, batch_window_s=0.01, max_in_flight=256,
                              max_queue=256, max_tokens=max(LENGTHS), threads=threads)  # fmt: skip
    return create_app(engine, settings)


def run(engines: dict[str, Engine], clients_list: list[int], requests: int, batch: int) -> dict:
    """Both servers up at once (one model, never generating together: each loads in turn); at each level
    they are loaded A B B A. Returns per mode and level the summary, the answers and the load average."""
    apps = {name: make_app(engine, batch) for name, engine in engines.items()}
    results: dict = {name: {} for name in apps}
    with serve_in_thread(apps["static"]) as static, serve_in_thread(apps["continuous"]) as continuous:
        bases = {"static": static, "continuous": continuous}
        for base in bases.values():
            load(base, 1, 1, offset=10_000_000)  # warm-up
        for clients in clients_list:
            runs: dict[str, list] = {name: [] for name in bases}
            load_before = os.getloadavg()[0]
            for k, name in enumerate(["static", "continuous", "continuous", "static"]):
                engines[name].features.clear()
                offset = clients * 100_000 + (k % 2) * 10_000  # A B B A: the second pair repeats the first
                runs[name].append(load(bases[name], clients, requests, offset))
            for name in bases:
                results[name][clients] = summary(runs[name])
            same = [runs["static"][i][0][s]["text"] == runs["continuous"][1 - i][0][s]["text"]
                    for i in range(2) for s in runs["static"][i][0]]  # fmt: skip
            results.setdefault("same", {})[clients] = (sum(same), len(same))
            results.setdefault("load", {})[clients] = (load_before, os.getloadavg()[0])
    for name, app in apps.items():
        batcher = app.state.server.batcher
        results.setdefault("sizes", {})[name] = dict(sorted(batcher.batch_sizes.items()))
        results.setdefault("steps", {})[name] = dict(sorted(batcher.step_sizes.items()))
    return results


def report(results: dict, clients_list: list[int], say=print) -> tuple[float, float] | None:
    """Print (through `say`) the table, the ratios and the goal; (speed-up, p95 ratio) at 16 clients."""
    say(f"  {'clients':>7} {'mode':>10} {'req/s':>7} {'tok/s':>7} {'p50 s':>7} {'p95 s':>7} "
          f"{'ttft50':>7} {'ttft95':>7}   load avg (1 min) before/after")  # fmt: skip
    for clients in clients_list:
        for name in MODES:
            r = results[name][clients]
            say(f"  {clients:>7} {name:>10} {r['rps']:7.2f} {r['tps']:7.1f} {r['p50']:7.2f} {r['p95']:7.2f} "
                  f"{r['ttft50']:7.2f} {r['ttft95']:7.2f}")  # fmt: skip
        c, s = results["continuous"][clients], results["static"][clients]
        same, total = results["same"][clients]
        before, after = results["load"][clients]
        say(f"  {clients:>7} {'ratio':>10} {c['rps'] / s['rps']:6.2f}x {c['tps'] / s['tps']:6.2f}x "
              f"{c['p50'] / s['p50']:6.2f}x {c['p95'] / s['p95']:6.2f}x {c['ttft50'] / s['ttft50']:6.2f}x "
              f"{c['ttft95'] / s['ttft95']:6.2f}x   {before:.1f}/{after:.1f}  (continuous / static; "
              f"same answers {same}/{total})")  # fmt: skip
    if 1 in clients_list:
        say(
            "  (1 client: nothing to batch; both engines run one forward per token, so the ratio is 1 up to noise)"
        )
    say(f"  requests started together (size: count): {results['sizes']}")
    say(f"  continuous decode steps by running rows (rows: steps): {results['steps']['continuous']}")
    goal = None
    if 16 in clients_list:
        c, s = results["continuous"][16], results["static"][16]
        speedup, p95 = c["rps"] / s["rps"], c["p95"] / s["p95"]
        met = speedup >= 2 and p95 < 1
        goal = (speedup, p95)
        say(f"  goal at 16 clients (>= 2x req/s at a lower p95): {'met' if met else 'MISSED'}: "
              f"{speedup:.2f}x req/s ({speedup / 2:.0%} of the 2x goal), p95 {p95:.2f}x of static")  # fmt: skip
    for clients in clients_list:
        c, s = results["continuous"][clients], results["static"][clients]
        say(f"  {clients} clients: ours (continuous) {c['rps']:.2f} req/s, p95 {c['p95']:.2f} s; peer (static) "
              f"{s['rps']:.2f} req/s, p95 {s['p95']:.2f} s; ratio {c['rps'] / s['rps']:.2f}x req/s, "
              f"{c['p95'] / s['p95']:.2f}x p95")  # fmt: skip
    return goal


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--quick", action="store_true", help="a smoke run: 1, 4 and 16 clients, 2 requests each"
    )
    parser.add_argument("--clients", default=None, help="comma-separated concurrency levels (1,4,16,64)")
    parser.add_argument("--requests", type=int, default=None, help="requests per client (4)")
    parser.add_argument("--batch", type=int, default=64, help="max_batch_size of both servers")
    parser.add_argument(
        "--max-step-tokens", type=int, default=None, help="the continuous engine's step budget"
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="the model threads' threads (default: cores)"
    )
    parser.add_argument("--record", help="write the results as JSON here (bench/run.py collects them)")
    args = parser.parse_args(argv)
    # as `mgllava serve`: only the model threads start OpenMP teams (docs/server.md, "Threads")
    set_threads(1)
    clients = args.clients or ("1,4,16" if args.quick else "1,4,16,64")
    args.requests = args.requests or (2 if args.quick else 4)
    clients_list = [int(c) for c in clients.split(",")]
    record = Record("Serving: continuous vs static batching", args.quick)
    record.machine(measure_machine(args.quick, child=True))
    model, processor = build_model()
    budget = {"max_step_tokens": args.max_step_tokens} if args.max_step_tokens else {}
    engines = {"static": Engine(model, processor, scheduling="static"),
               "continuous": Engine(model, processor, scheduling="continuous", **budget)}  # fmt: skip
    n_params = sum(p.numel() for p in model.parameters())
    lines = [f"server bench: {n_params / 1e6:.1f}M-parameter MG-LLaVA (64 image tokens, 27M-parameter LLM), "
             f"max_tokens from {LENGTHS}, {args.requests} requests per client, max_batch_size {args.batch}, "
             f"float32, model threads with {args.threads or available_cores()} threads on {os.cpu_count()} cores"]  # fmt: skip
    print(lines[0], flush=True)
    goal = report(run(engines, clients_list, args.requests, args.batch), clients_list, say=_collect(lines))
    record.lines += ["```", *lines, "```", ""]
    if goal is not None:
        speedup, p95 = goal
        record.values |= {"speedup_16": speedup, "p95_ratio_16": p95}
        met = speedup >= 2 and p95 < 1
        record.goal("requests/s at 16 clients vs the static engine, at a lower p95", ">= 2x, p95 < 1x",
                    f"{speedup:.2f}x, p95 {p95:.2f}x", met, "" if met else WHY_NOT)  # fmt: skip
    record.finish(args.record)


def _collect(lines: list[str]):
    def say(text: str) -> None:
        print(text, flush=True)
        lines.append(text)

    return say


if __name__ == "__main__":
    main()
