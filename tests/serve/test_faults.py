"""Fault and load suite: the server on 127.0.0.1 with a tiny random model under bursts of 32 and 64 concurrent
requests mixing valid ones, hostile ones that hit every limit, and clients that leave mid-stream or
mid-upload. Checked: every valid request is answered, with the answer it gets alone; every hostile one gets
its 4xx; `/health` answers throughout; peak RSS (sampled with psutil every 5 ms) stays under
`RSS_ALLOWANCE_MB` above the warmed-up size; nothing is left in flight after.

The fast test runs a 32-burst against the app in this process (uvicorn on a thread); the slow ones run the
real `mgllava serve` command in a subprocess, whose RSS is the server's alone. `MGLLAVA_FAULT_REPORT=path`
appends what was measured as JSON lines (docs/server.md quotes them).
"""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
import pytest
import torch
from PIL import Image

from mgllava.cli import build_parser, server_settings
from mgllava.convert.folder import write_folder
from mgllava.inference.decoding import RunningBatch
from mgllava.serve import create_app
from mgllava.serve.background import serve_in_thread

from ..serving import bytes_url, data_url, png_bytes, png_claiming, scene, tiny_engine, tiny_parts

# Small limits, so that every one can be hit with small bodies (flags are what an operator would type).
FLAGS = ["--model-name", "tiny", "--max-in-flight", "64", "--max-queue", "64", "--max-batch-size", "8", "--batch-window-ms", "20",
         "--max-tokens", "8", "--max-body-mb", "1", "--max-images", "2", "--max-boxes-per-image", "8",
         "--max-boxes-per-request", "12", "--max-box-pairs", "70", "--max-image-pixels", "250000",
         "--max-request-pixels", "600000", "--max-preparing", "2", "--allow-image-urls"]  # fmt: skip
# docs/server.md's bound for these flags: in flight x 2 x body (the raw bytes and the parsed strings) +
# preparing x request pixels x 6.1 bytes (bench/bench_serve_limits.py) + 100 MB of threads and allocator slack
RSS_ALLOWANCE_MB = round(64 * 2 * 1 + 2 * 600_000 * 6.1 / 2**20 + 100)
MAX_TOKENS = 6


@pytest.fixture(scope="module")
def in_process():
    """(base URL, this process) of the app configured by FLAGS, on a uvicorn thread."""
    args = build_parser().parse_args(["serve", "--model", "unused", *FLAGS])
    engine = tiny_engine(max_image_pixels=args.max_image_pixels)
    with serve_in_thread(create_app(engine, server_settings(args))) as base:
        yield base, psutil.Process()


def start_server(root: Path, *flags: str) -> tuple[subprocess.Popen, str, object]:
    """`python -m mgllava.cli serve` on a free loopback port: (process, base URL, its log file)."""
    if not (root / "tiny").exists():
        write_folder(*tiny_parts(), root / "tiny")
    log = (root / "server.log").open("w+")
    command = [sys.executable, "-m", "mgllava.cli", "serve", "--model", str(root / "tiny"), "--device", "cpu",
               "--port", "0", *flags]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log, text=True)
    port, deadline = None, time.monotonic() + 180
    while port is None and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.2)
        for line in Path(log.name).read_text().splitlines():
            if "Uvicorn running on" in line:
                port = int(line.rsplit(":", 1)[1].split()[0])
    assert port is not None, Path(log.name).read_text()[-3000:]
    return process, f"http://127.0.0.1:{port}", log


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(base URL, psutil.Process) of `python -m mgllava.cli serve` on a free loopback port."""
    process, base, log = start_server(tmp_path_factory.mktemp("faults"), *FLAGS)
    try:
        yield base, psutil.Process(process.pid)
    finally:
        process.terminate()
        process.wait(30)
        log.close()


@pytest.mark.slow
def test_sigterm_stops_the_server_within_twice_the_shutdown_timeout_with_streams_in_flight(tmp_path):
    shutdown = 2.0
    process, base, log = start_server(tmp_path, "--model-name", "tiny", "--max-tokens", "400",
                                      "--shutdown-timeout-s", str(shutdown))  # fmt: skip
    started, outcomes = threading.Barrier(5), []

    def stream(k: int) -> None:
        body = {**chat(f"Tell a long story {k}."), "max_tokens": 400, "stream": True}
        try:
            with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=60) as response:
                lines = response.iter_lines()
                next(lines)
                started.wait(30)
                outcomes.append(sum(1 for _ in lines))
        except httpx.HTTPError as err:  # the server went away mid-stream: an ended stream, not a hang
            outcomes.append(type(err).__name__)

    threads = [threading.Thread(target=stream, args=(k,)) for k in range(4)]
    try:
        for thread in threads:
            thread.start()
        started.wait(60)
        stopping = time.monotonic()
        process.send_signal(signal.SIGTERM)
        process.wait(2 * shutdown + 15)  # raises if it hangs
        took = time.monotonic() - stopping
        for thread in threads:
            thread.join(30)
        assert took < 2 * shutdown + 15 and len(outcomes) == 4, (took, outcomes)
        assert not any(thread.is_alive() for thread in threads)  # no client left hanging
    finally:
        if process.poll() is None:
            process.kill()
        log.close()


def chat(text: str, *urls: str, **extra) -> dict:
    parts = [{"type": "image_url", "image_url": {"url": url}} for url in urls]
    content = [*parts, {"type": "text", "text": text}]
    return {
        "model": "tiny",
        "messages": [{"role": "user", "content": content}],
        "max_tokens": MAX_TOKENS,
        **extra,
    }


def boxes(n: int, labels: bool = False) -> list:
    xyxy = [[3.0 * k, 2.0, 3.0 * k + 2, 9.0] for k in range(n)]
    return {"boxes": xyxy, "labels": [f"thing{k % 3}" for k in range(n)]} if labels else xyxy


def png_url(size: tuple[int, int], seed: int = 0) -> str:
    return data_url(scene(seed, size))


def noise_url(size: tuple[int, int], seed: int) -> str:
    """Random pixels: a PNG that does not compress, so its request is heavy (about 480 kB at 400 x 300)."""
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=g, dtype=torch.uint8).numpy()
    return data_url(Image.fromarray(pixels))


def truncated_png() -> str:
    data = png_bytes(scene(9, (200, 150)))
    return bytes_url(data[: len(data) // 2])


def valid_requests() -> list[dict]:
    """Distinct valid requests; `stream` ones are compared with the same request answered unstreamed."""
    return [
        chat("Hello there."),
        chat("What shape is it?", png_url((96, 64), 11)),
        chat("Name the boxes.", png_url((120, 80), 12), mgllava={"boxes": [boxes(3, labels=True)]}),
        chat("Compare them.", png_url((64, 96), 13), png_url((80, 80), 14)),
        chat("Heavy, near the pixel limit.", noise_url((400, 300), 15)),  # 120000 + 160000 canvas pixels
        chat("At the box limit.", png_url((300, 200), 16), mgllava={"boxes": [boxes(8)]}),
        chat(
            "Two images, ten boxes, 68 pairs.",
            png_url((90, 60), 17),
            png_url((60, 90), 18),
            mgllava={"boxes": [boxes(8), boxes(2)]},
        ),
        chat("A seeded sample.", temperature=0.8, seed=3),
    ]


def hostile_requests(base: str) -> list[tuple[str, bytes | dict, int, str]]:
    """(name, body, expected status, expected code): one per limit, and malformed inputs."""
    junk = {**chat("x"), "junk": [[]] * 70_000}  # 70k arrays in 210 kB: over --max-json-items (65632)
    flood = (
        b'{"model":"tiny","messages":[],"mgllava":{"boxes":[[' + b"[0,0,1,1]," * 100_000 + b"[0,0,1,1]]]}}"
    )
    return [
        ("images", chat("Three?", *[png_url((32, 32), k) for k in range(3)]), 400, "too_many_images"),
        ("boxes per image", chat("Boxes?", png_url((96, 64)), mgllava={"boxes": [boxes(9)]}), 400, "too_many_boxes"),
        ("boxes per request", chat("Boxes?", png_url((96, 64)), png_url((64, 96)),
                                   mgllava={"boxes": [boxes(7), boxes(7)]}), 400, "too_many_boxes"),
        ("box pairs", chat("Pairs?", png_url((96, 64)), png_url((64, 96)), mgllava={"boxes": [boxes(8), boxes(4)]}),
         400, "box_budget_exceeded"),
        ("image pixels", chat("Big?", bytes_url(png_claiming(1000, 1000))), 413, "image_too_large"),
        ("pixel bomb", chat("Bomb?", bytes_url(png_claiming(100_000, 100_000))), 413, "image_too_large"),
        ("request pixels", chat("Both?", bytes_url(png_claiming(500, 400)), bytes_url(png_claiming(400, 500))),
         413, "too_many_pixels"),
        ("thin strip", chat("Strip?", data_url(Image.new("RGB", (20_000, 1)))), 413, "too_many_pixels"),
        ("json items", junk, 413, "request_too_large"),
        ("box flood", flood, 413, "request_too_large"),
        ("body bytes", {**chat("x"), "pad": "x" * (1 << 20)}, 413, "request_too_large"),
        ("max_tokens", {**chat("x"), "max_tokens": 9}, 400, "max_tokens_too_large"),
        ("loopback url", chat("Self?", f"{base}/health"), 400, "image_url_forbidden"),
        ("metadata url", chat("Meta?", "http://169.254.169.254/latest/meta-data/"), 400, "image_url_forbidden"),
        ("file url", chat("File?", "file:///etc/passwd"), 400, "invalid_image_url"),
        ("garbage base64", chat("B64?", "data:image/png;base64,@@@"), 400, "invalid_image"),
        ("truncated png", chat("Cut?", truncated_png()), 400, "invalid_image"),
        ("context", chat("word " * 50_000), 400, "prompt_too_long"),  # over the characters per message
        ("negative max_tokens", {**chat("x"), "max_tokens": -5}, 400, "invalid_request"),
        ("no messages", {**chat("x"), "messages": []}, 400, "invalid_request"),
        ("wrong model", {**chat("x"), "model": "gpt-4o"}, 404, "model_not_found"),
        ("not json", b"{nope", 400, "invalid_request"),
    ]  # fmt: skip


def send(http: httpx.Client, base: str, body: bytes | dict) -> httpx.Response:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return http.post(f"{base}/v1/chat/completions", content=raw, headers={"content-type": "application/json"})


def streamed_text(http: httpx.Client, base: str, body: dict) -> tuple[int, str]:
    text = []
    with http.stream("POST", f"{base}/v1/chat/completions", json={**body, "stream": True}) as response:
        if response.status_code != 200:
            return response.status_code, response.read().decode()
        for line in response.iter_lines():
            if line.startswith("data: {"):
                event = json.loads(line[6:])
                if "error" in event:  # generation failed after the stream began
                    return 500, event
                text += [c["delta"].get("content") or "" for c in event["choices"]]
    return 200, "".join(text)


def leave_mid_stream(http: httpx.Client, base: str, body: dict) -> None:
    with http.stream(
        "POST", f"{base}/v1/chat/completions", json={**body, "stream": True, "max_tokens": 8}
    ) as r:
        next(r.iter_lines())  # the first event, then the client goes away


def leave_mid_upload(base: str) -> None:
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100000\r\n\r\n" + b'{"model": "tiny", "messages": [')  # fmt: skip


class Sampler:
    """Peak RSS of a process and /health latencies, sampled on background threads while a burst runs."""

    def __init__(self, process: psutil.Process, base: str) -> None:
        self.process, self.base = process, base
        self.peak = process.memory_info().rss
        self.health: list[tuple[int, float]] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._rss), threading.Thread(target=self._health)]

    def _rss(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def _health(self) -> None:
        with httpx.Client(timeout=10) as http:
            while not self._stop.wait(0.05):
                start = time.perf_counter()
                status = http.get(f"{self.base}/health").status_code
                self.health.append((status, time.perf_counter() - start))

    def __enter__(self) -> "Sampler":
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()


def one_by_one(base: str) -> list[str]:
    """Each valid request answered alone (unstreamed), before any burst; also warms the server up."""
    with httpx.Client(timeout=120) as http:
        answers = []
        for body in valid_requests():
            response = send(http, base, body)
            assert response.status_code == 200, response.text
            answers.append(response.json()["choices"][0]["message"]["content"])
    return answers


@pytest.fixture(scope="module")
def alone(server):
    return one_by_one(server[0])


def quiet(base: str, timeout_s: float = 60) -> dict:
    """/health once nothing is in flight (disconnected clients' rows end at their next step)."""
    deadline = time.monotonic() + timeout_s
    while True:
        health = httpx.get(f"{base}/health", timeout=10).json()
        if health["in_flight"] == 0 or time.monotonic() > deadline:
            return health
        time.sleep(0.1)


def burst(
    base: str,
    process: psutil.Process,
    alone: list[str],
    size: int,
    where: str,
    faulty: frozenset[int] = frozenset(),
) -> None:
    """`faulty`: the valid requests (by index) that a test made fail while generated: they must get 500
    `generation_failed` (streamed: an error event), and every other request its answer alone."""
    valid, hostile = valid_requests(), hostile_requests(base)
    leaving = size // 8
    n_hostile = size // 2 - leaving  # 32: the first 12 (every limit); 64: all 22 and two again
    n_valid = size - leaving - n_hostile
    jobs = [("valid", k % len(valid)) for k in range(n_valid)] + [
        ("hostile", k % len(hostile)) for k in range(n_hostile)
    ]
    jobs += [("leave-stream", k) if k % 2 == 0 else ("leave-upload", k) for k in range(leaving)]
    assert size < 64 or {k for kind, k in jobs if kind == "hostile"} == set(
        range(len(hostile))
    )  # every limit
    rss_before = process.memory_info().rss
    start = threading.Barrier(len(jobs))
    limits = httpx.Limits(max_connections=len(jobs) + 4)

    with httpx.Client(timeout=120, limits=limits) as http, Sampler(process, base) as sampler:

        def run(job):
            kind, k = job
            start.wait()
            if kind == "valid":
                if k % 2:  # odd ones stream
                    return streamed_text(http, base, valid[k])
                response = send(http, base, valid[k])
                return response.status_code, response.json()
            if kind == "hostile":
                response = send(http, base, hostile[k][1])
                return response.status_code, response.json()
            if kind == "leave-stream":
                return leave_mid_stream(http, base, valid[1])
            return leave_mid_upload(base)

        began = time.perf_counter()
        with ThreadPoolExecutor(len(jobs)) as pool:
            results = list(pool.map(run, jobs))
        seconds = time.perf_counter() - began
        after = quiet(base)

    for (kind, k), result in zip(jobs, results, strict=True):
        if kind == "valid" and k in faulty:
            status, answer = result
            assert status == 500 and answer["error"]["code"] == "generation_failed", (k, answer)
        elif kind == "valid":
            status, answer = result
            assert status == 200, (k, answer)
            text = answer if isinstance(answer, str) else answer["choices"][0]["message"]["content"]
            assert text == alone[k], (k, text, alone[k])
        elif kind == "hostile":
            name, _, status, code = hostile[k]
            assert result[0] == status and result[1]["error"]["code"] == code, (name, result)
    assert process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    assert after["status"] == "ok" and after["in_flight"] == after["preparing"] == after["queued"] == 0, after
    statuses = [status for status, _ in sampler.health]
    assert statuses and set(statuses) == {200}, statuses  # /health answered every time it was asked
    grown_mb = (sampler.peak - rss_before) / 2**20
    assert grown_mb < RSS_ALLOWANCE_MB, grown_mb
    latencies = sorted(latency for _, latency in sampler.health)
    report = {"server": where, "burst": size, "valid": n_valid, "hostile": n_hostile, "leaving": leaving, "seconds": round(seconds, 2),
              "rss_before_mb": round(rss_before / 2**20), "rss_peak_mb": round(sampler.peak / 2**20),
              "rss_grown_mb": round(grown_mb, 1), "health_polls": len(latencies),
              "health_p50_ms": round(1000 * latencies[len(latencies) // 2], 1),
              "health_max_ms": round(1000 * latencies[-1], 1)}  # fmt: skip
    print(json.dumps(report))
    if os.environ.get("MGLLAVA_FAULT_REPORT"):
        with open(os.environ["MGLLAVA_FAULT_REPORT"], "a") as out:
            out.write(json.dumps(report) + "\n")


def test_a_burst_of_32_in_process(in_process):
    base, process = in_process
    burst(base, process, one_by_one(base), 32, "in-process")


@pytest.mark.parametrize("point", ["decode", "nan_logits", "sample"])
def test_a_burst_of_32_with_a_faulty_request_in_process(in_process, monkeypatch, point):
    """One valid request ("What shape is it?", streamed, and repeated in the burst) fails at `point` every time
    it runs; the burst's other requests, /health and the memory bound hold as without the fault."""
    base, process = in_process
    alone = one_by_one(base)
    make_row, forward, choose = RunningBatch._row, RunningBatch._forward, RunningBatch._choose

    def row(self, request):
        made = make_row(self, request)
        made.faulty = "What shape is it?" in self.engine.decode(made.prepared.input_ids)
        return made

    def faulty_forward(self, rows, ids, *args, **kwargs):
        hit = [i for i, r in enumerate(rows) if r.faulty]
        if hit and ids.shape[1] == 1 and point == "decode":
            raise RuntimeError("injected decode fault")
        cache, logits = forward(self, rows, ids, *args, **kwargs)
        if hit and point == "nan_logits":
            logits = logits.clone()
            logits[hit] = float("nan")
        return cache, logits

    def faulty_choose(self, r, scores, greedy):
        if r.faulty and point == "sample":
            raise RuntimeError("injected sampling fault")
        return choose(self, r, scores, greedy)

    monkeypatch.setattr(RunningBatch, "_row", row)
    monkeypatch.setattr(RunningBatch, "_forward", faulty_forward)
    monkeypatch.setattr(RunningBatch, "_choose", faulty_choose)
    burst(base, process, alone, 32, f"in-process, {point} fault", faulty=frozenset({1}))


@pytest.mark.slow
@pytest.mark.parametrize("size", [32, 64])
def test_bursts_against_the_serve_command(server, alone, size):
    base, process = server
    burst(base, process, alone, size, "subprocess")
