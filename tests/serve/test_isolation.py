"""The server's failure boundaries, tried as an outside client would (httpx, raw sockets, the `openai`
client): one bad request fails alone while its batch-mates are answered, a dead worker is reported at once,
the keep-alive connection survives an error, stalled uploads time out, text is bounded before tokenising,
and every parameter is honoured or refused by name."""

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from mgllava.inference import GenerationSettings
from mgllava.inference.decoding import RunningBatch
from mgllava.serve import ServerSettings, create_app
from mgllava.serve.background import serve_in_thread

from ..serving import ask, data_url, scene, tiny_engine

SETTINGS = dict(model_name="tiny", max_tokens=16, max_in_flight=8, body_timeout_s=1.0, shutdown_timeout_s=2.0)


@pytest.fixture(scope="module")
def engine():
    return tiny_engine(max_prompt_chars=2000)


@pytest.fixture(scope="module")
def base(engine):
    with serve_in_thread(create_app(engine, ServerSettings(**SETTINGS))) as url:
        yield url


def body(text: str = "What is it?", image: bool = True, **extra) -> dict:
    messages = ask(text, data_url(scene(len(text))) if image else None)
    return {"model": "tiny", "messages": messages, "max_tokens": 6, **extra}


def post(base: str, payload: dict, client: httpx.Client | None = None) -> httpx.Response:
    return (client or httpx).post(f"{base}/v1/chat/completions", json=payload, timeout=60)


def alone(engine, payload: dict) -> str:
    settings = GenerationSettings(max_new_tokens=payload["max_tokens"])
    return engine.chat(payload["messages"], settings=settings).text


def test_a_tiny_temperature_beside_seven_requests_answers_all_eight(base, engine):
    payloads = [body(f"Question number {k}?") for k in range(7)]
    payloads.insert(3, body("Question number tiny?", temperature=1e-300, seed=5))
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda p: post(base, p), payloads))
    assert [r.status_code for r in replies] == [200] * 8, [r.text for r in replies]
    texts = [r.json()["choices"][0]["message"]["content"] for r in replies]
    assert texts == [alone(engine, p) for p in payloads]  # below 1e-5 the temperature is greedy


def test_a_request_that_fails_while_generated_gets_500_and_its_batch_mates_their_answers(
    base, engine, monkeypatch
):
    choose = RunningBatch._choose

    def poisoned(self, row, scores, greedy):
        if "POISON" in engine.decode(row.prepared.input_ids):
            raise RuntimeError("injected sampling fault")
        return choose(self, row, scores, greedy)

    monkeypatch.setattr(RunningBatch, "_choose", poisoned)
    payloads = [body(f"Fine question {k}?") for k in range(5)]
    payloads.insert(2, body("POISON question?"))
    stream = {**body("POISON streamed?"), "stream": True}
    with ThreadPoolExecutor(7) as pool:
        streamed = pool.submit(lambda: httpx.post(f"{base}/v1/chat/completions", json=stream, timeout=60))
        replies = list(pool.map(lambda p: post(base, p), payloads))
    bad = replies.pop(2)
    assert bad.status_code == 500
    error = bad.json()["error"]
    assert error["code"] == "generation_failed" and "injected sampling fault" in error["message"]
    assert [r.json()["choices"][0]["message"]["content"] for r in replies] == [
        alone(engine, p) for k, p in enumerate(payloads) if k != 2
    ]
    events = streamed.result().text
    assert "generation_failed" in events and "[DONE]" not in events
    assert httpx.get(f"{base}/health").status_code == 200


def test_seeds_over_the_whole_range_answer_and_others_are_refused_by_name(base):
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
    messages = ask("Hello")
    for seed in (2**64 - 1, -1):
        reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=3, temperature=1.0,
                                               seed=seed)  # fmt: skip
        assert reply.choices[0].finish_reason in ("stop", "length")
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="tiny", messages=messages, max_tokens=3, seed=2**64)
    assert refused.value.body["param"] == "seed" and "seed" in refused.value.body["message"]


def raw_exchange(base: str, requests: list[bytes]) -> list[bytes]:
    """Send each request on ONE keep-alive connection after the previous answer; the raw answers."""
    host, port = base.removeprefix("http://").split(":")
    answers = []
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        reader = sock.makefile("rb")
        for request in requests:
            sock.sendall(request)
            head = b""
            while not head.endswith(b"\r\n\r\n"):
                head += reader.read(1)
            length = int(
                next(
                    line.split(b":")[1]
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length")
                )
            )
            answers.append(head + reader.read(length))
    return answers


def http_post(payload: bytes) -> bytes:
    return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % len(payload) + payload)  # fmt: skip


def test_the_keep_alive_connection_survives_a_500(base, engine, monkeypatch):
    prepare = type(engine).prepare

    def broken(self, messages, *args, **kwargs):
        if "BUG" in str(messages):
            raise KeyError("injected bug")
        return prepare(self, messages, *args, **kwargs)

    monkeypatch.setattr(type(engine), "prepare", broken)
    bug = http_post(json.dumps(body("BUG here", image=False)).encode())
    fine = http_post(json.dumps(body("Fine here", image=False)).encode())
    first, second = raw_exchange(base, [bug, fine])
    assert (
        first.startswith(b"HTTP/1.1 500")
        and b"internal_error" in first
        and b"connection: close" not in first.lower()
    )
    assert second.startswith(b"HTTP/1.1 200"), second[:200]


def test_stalled_uploads_time_out_and_a_normal_request_is_answered_within_the_body_timeout(base):
    host, port = base.removeprefix("http://").split(":")
    stalled = []
    for _ in range(SETTINGS["max_in_flight"]):
        sock = socket.create_connection((host, int(port)), timeout=30)
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n{")  # fmt: skip
        stalled.append(sock)
    time.sleep(0.2)
    start = time.monotonic()
    refused = post(base, body("Normal?", image=False))
    assert refused.status_code == 429  # every slot is held by a stalled upload...
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=4)  # retries 429s
    reply = client.chat.completions.create(model="tiny", messages=ask("Normal?"), max_tokens=3)
    assert reply.choices[0].message.content is not None
    assert time.monotonic() - start < SETTINGS["body_timeout_s"] + 10  # ...for the body timeout at most
    for sock in stalled:
        answer = sock.recv(4096)
        assert answer.startswith(b"HTTP/1.1 408") and b"--body-timeout-s" in answer, answer[:200]
        sock.close()


def test_text_is_bounded_before_it_is_tokenised(base, engine, monkeypatch):
    calls = []
    encode = engine.processor.apply_chat_template
    monkeypatch.setattr(
        engine.processor, "apply_chat_template", lambda *a, **k: calls.append(1) or encode(*a, **k)
    )
    reply = post(base, body("x" * 2001, image=False))
    assert reply.status_code == 400 and calls == []
    error = reply.json()["error"]
    assert error["code"] == "prompt_too_long" and "--max-message-chars" in error["message"]
    assert error["param"] == "messages[0].content"
    split = {"model": "tiny", "max_tokens": 3, "messages": [
        {"role": "user", "content": "y" * 1500}, {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "z" * 1500}]}  # fmt: skip
    reply = post(base, split)
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "messages" and calls == []


def test_decoding_never_waits_for_a_prompt_being_tokenised(engine):
    """Preparation holds its tokenizer's lock while it tokenises; a decode step must not need it."""
    prepared = engine.prepare(ask("Count slowly."), settings=GenerationSettings(max_new_tokens=8))
    with engine._text_lock:  # a long tokenisation in another request
        done = threading.Event()
        worker = threading.Thread(target=lambda: (engine.generate([prepared]), done.set()))
        worker.start()
        assert done.wait(60), "the answer waited for the preparation lock"
    worker.join()


@pytest.mark.parametrize(
    "extra, status, code, param",
    [
        (dict(response_format={"type": "text"}), 200, None, None),
        (dict(response_format={"type": "json_object"}), 400, "unsupported_parameter", "response_format"),
        (dict(modalities=["text", "audio"]), 400, "unsupported_parameter", "modalities"),
        (dict(prediction={"type": "content", "content": "x"}), 400, "unsupported_parameter", "prediction"),
        (dict(logprobs=True), 400, "unsupported_parameter", "logprobs"),
        (
            dict(tools=[{"type": "function", "function": {"name": "f"}}]),
            400,
            "unsupported_parameter",
            "tools",
        ),
        (dict(stop=["\n"]), 400, "unsupported_parameter", "stop"),
        (dict(not_an_openai_field=1), 400, "unsupported_parameter", "not_an_openai_field"),
        (dict(user="someone", metadata={"a": "b"}, store=False), 200, None, None),
        (dict(logit_bias={"abc": 1}), 400, "invalid_request", "logit_bias"),
        (dict(logit_bias={"5": 101}), 400, "invalid_request", "logit_bias"),
        (dict(frequency_penalty=2.5), 400, "invalid_request", "frequency_penalty"),
    ],
)
def test_parameters_are_honoured_or_refused_by_name(base, extra, status, code, param):
    reply = post(base, body("Parameters?", image=False, **extra))
    assert reply.status_code == status, reply.text
    if code is not None:
        error = reply.json()["error"]
        assert error["code"] == code and error["param"] == param, error


def test_penalties_and_logit_bias_change_the_answer_as_the_engine_does(base, engine):
    extra = dict(frequency_penalty=1.5, presence_penalty=0.5, logit_bias={"5": 3.0})
    reply = post(base, body("Penalties?", image=False, max_tokens=10, **extra))
    settings = GenerationSettings(
        max_new_tokens=10, frequency_penalty=1.5, presence_penalty=0.5, logit_bias=((5, 3.0),)
    )
    assert (
        reply.json()["choices"][0]["message"]["content"]
        == engine.chat(body("Penalties?", image=False)["messages"], settings=settings).text
    )
    forced = post(base, body("Forced?", image=False, max_tokens=4, logit_bias={"9": 100}))
    assert forced.json()["usage"]["completion_tokens"] == 4
    assert forced.json()["choices"][0]["message"]["content"] == engine.decode([9, 9, 9, 9]).strip()


@pytest.mark.parametrize(
    "messages, param, fragment",
    [
        (ask("Look: <image> here"), "messages[0].content[0].text", "literal tag '<image>'"),
        ([{"role": "user", "content": "a <video> tag"}], "messages[0].content", "literal tag '<video>'"),
        (
            [
                {
                    "role": "system",
                    "content": [{"type": "image_url", "image_url": {"url": data_url(scene(1))}}],
                },
                {"role": "user", "content": "Hi"},
            ],
            "messages[0].content[0]",
            "user messages only",
        ),
        ([{"role": "user", "content": ""}], "messages[0].content", "has no content"),
        ([{"role": "system", "content": "Be brief."}], "messages", "no user message"),
    ],
)
def test_messages_the_engine_would_misread_are_refused_clearly(base, messages, param, fragment):
    reply = post(base, {"model": "tiny", "messages": messages, "max_tokens": 3})
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == param and fragment in error["message"], error


def test_an_invalid_image_is_described_without_python_reprs(base):
    payload = body("What?", image=False)
    payload["messages"][0]["content"].insert(
        0, {"type": "image_url", "image_url": {"url": "data:image/png;base64,aGVsbG8gd29ybGQ="}}
    )
    reply = post(base, payload)
    assert reply.status_code == 400
    message = reply.json()["error"]["message"]
    assert "0x" not in message and "object at" not in message and "not a readable image" in message


def test_a_dead_worker_is_reported_and_every_request_gets_503_at_once(engine, monkeypatch):
    class Crash(BaseException):
        pass

    def dying(self):
        raise Crash("injected: the worker's loop broke")

    with serve_in_thread(create_app(engine, ServerSettings(**SETTINGS))) as url:
        assert httpx.get(f"{url}/health").status_code == 200
        monkeypatch.setattr(RunningBatch, "step", dying)
        first = post(url, body("Anyone?", image=False))
        assert first.status_code == 503 and first.json()["error"]["code"] == "unavailable"
        health = httpx.get(f"{url}/health")
        assert health.status_code == 503 and health.json()["status"] == "unavailable"
        start = time.monotonic()
        later = post(url, body("Still there?", image=False))
        assert later.status_code == 503 and time.monotonic() - start < 5
        assert "worker stopped" in later.json()["error"]["message"]
