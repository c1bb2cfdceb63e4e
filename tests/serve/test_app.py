"""The server over real HTTP on 127.0.0.1, with the `openai` client and httpx: answers, errors, limits."""

import concurrent.futures
import http.server
import io
import re
import threading

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from mgllava.cli import build_parser, server_settings
from mgllava.inference import Engine, GenerationSettings
from mgllava.serve import ServerSettings, create_app
from mgllava.serve.background import serve_in_thread
from mgllava.serve.limits import decoded_pixels, image_header, json_items

from ..serving import (
    ShapesProposer,
    ask,
    bytes_url,
    data_url,
    png_bytes,
    png_claiming,
    scene,
    tiny_engine,
    tiny_parts,
)

LIMITS = dict(model_name="tiny", max_tokens=64, max_body_bytes=400_000, max_images=2, max_boxes_per_image=5,
              max_boxes_per_request=8, max_box_pairs=30, max_request_pixels=100_000)  # fmt: skip


@pytest.fixture(scope="module")
def engine():
    return tiny_engine(ShapesProposer(), max_image_pixels=300 * 300)


@pytest.fixture(scope="module")
def base(engine):
    with serve_in_thread(create_app(engine, ServerSettings(**LIMITS))) as url:
        yield url


@pytest.fixture(scope="module")
def client(base):
    return openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)


def post(base: str, **body) -> httpx.Response:
    return httpx.post(
        f"{base}/v1/chat/completions", json={"model": "tiny", "max_tokens": 4, **body}, timeout=60
    )


def test_answers_equal_the_engines_streamed_or_not(client, engine):
    messages = ask("What shape is in the image?", data_url(scene(1)))
    expected = engine.chat(messages, settings=GenerationSettings(max_new_tokens=16))
    reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=16)
    assert reply.choices[0].message.content == expected.text
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 16
    assert reply.usage.prompt_tokens == expected.prompt_tokens
    (image,) = reply.model_extra["mgllava"]["images"]
    assert (
        image["tags"] == ["circle", "square"] and len(image["boxes"]) == 2 and image["source"] == "proposer"
    )

    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=16, stream=True,
                                                 stream_options={"include_usage": True}))  # fmt: skip
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected.text and len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1
    assert chunks[0].model_extra["mgllava"]["images"][0]["tags"] == ["circle", "square"]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 16


def test_top_p_zero_keeps_the_most_likely_token_alone(client, engine):
    """OpenAI's top_p range includes 0: the nucleus is the top token, so sampling at any temperature is greedy."""
    messages = ask("What shape is in the image?", data_url(scene(2)))
    expected = engine.chat(messages, settings=GenerationSettings(max_new_tokens=8))
    for seed in (1, 2):
        reply = client.chat.completions.create(
            model="tiny", messages=messages, max_tokens=8, temperature=1.5, top_p=0, seed=seed
        )
        assert reply.choices[0].message.content == expected.text


def test_user_boxes_through_the_extension_field(client):
    messages = ask("What is here?", data_url(scene(2, (120, 80))))
    reply = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=2,
        extra_body={"mgllava": {"boxes": [{"boxes": [[10, 10, 60, 40]], "labels": ["cat"], "scores": [0.5]}]}},
    )  # fmt: skip
    (image,) = reply.model_extra["mgllava"]["images"]
    assert (image["source"], image["labels"], image["scores"]) == ("request", ["cat"], [0.5])


def test_a_conversation_reuses_its_image_features(client, engine):
    url = data_url(scene(3))
    first = client.chat.completions.create(model="tiny", messages=ask("What?", url), max_tokens=3)
    hits = engine.features.hits
    history = [*ask("What?", url), {"role": "assistant", "content": first.choices[0].message.content},
               {"role": "user", "content": "And then?"}]  # fmt: skip
    client.chat.completions.create(model="tiny", messages=history, max_tokens=3)
    assert engine.features.hits == hits + 1


@pytest.mark.parametrize(
    "body, status, code",
    [
        (dict(messages=ask("What?", "data:image/png;base64,@@not-base64@@")), 400, "invalid_image"),
        (dict(messages=ask("What?", "data:text/plain;base64,aGVsbG8gd29ybGQ=")), 400, "invalid_image"),
        (dict(messages=ask("What?", data_url(scene(1, (400, 300))))), 413, "image_too_large"),
        (dict(model="gpt-4o", messages=ask("What?")), 404, "model_not_found"),
        (dict(messages=ask("What?"), max_tokens=65), 400, "max_tokens_too_large"),
        (dict(messages=ask("What?"), max_tokens=0), 400, "invalid_request"),
        (
            dict(messages=ask("What?", "http://169.254.169.254/latest/meta-data")),
            400,
            "image_url_not_allowed",
        ),
        (dict(messages=ask("What?", "/etc/passwd")), 400, "invalid_image_url"),
        (dict(messages=[]), 400, "invalid_request"),
        (dict(messages=[{"role": "tool", "content": "x"}]), 400, "invalid_request"),
        (dict(messages=ask("What?"), n=2), 400, "unsupported_parameter"),
        (dict(messages=ask("What?"), mgllava={"boxes": [[[1, 2, 3, 4]]]}), 400, "invalid_request"),
        (
            dict(messages=ask("What?", data_url(scene(1))), mgllava={"boxes": [[[1, 2, 3]]]}),
            400,
            "invalid_request",
        ),
    ],
)
def test_bad_requests_get_openai_errors_with_fitting_status(base, body, status, code):
    response = post(base, **body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["message"] and error["type"] == "invalid_request_error"


def boxes(n: int) -> list[list[float]]:
    return [[2.0 * k, 1.0, 2.0 * k + 1, 2.0] for k in range(n)]


def tga_url() -> str:
    buf = io.BytesIO()
    scene(1).save(buf, "TGA")
    return bytes_url(buf.getvalue(), "image/x-tga")


def two(text: str, first: str, second: str) -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": u}} for u in (first, second)]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


def names_a_serve_flag(message: str) -> bool:
    """The message names a flag that `mgllava serve` accepts (so the operator can act on it)."""
    flags = re.findall(r"\((--[a-z-]+)\)", message)
    for flag in flags:
        build_parser().parse_args(["serve", "--model", "m", flag, "1"])  # SystemExit if it does not exist
    return bool(flags)


SCENE = data_url(scene(1))  # 96 x 64: 6144 pixels + a 96^2 canvas = 15360 decoded pixels


@pytest.mark.parametrize(
    "body, status, code",
    [
        (dict(messages=[*two("A", SCENE, SCENE), *ask("B", SCENE)]), 400, "too_many_images"),
        (dict(messages=ask("What?", SCENE), mgllava={"boxes": [boxes(6)]}), 400, "too_many_boxes"),
        (dict(messages=two("What?", SCENE, SCENE), mgllava={"boxes": [boxes(5), boxes(4)]}), 400, "too_many_boxes"),
        (dict(messages=two("What?", SCENE, SCENE), mgllava={"boxes": [boxes(5), boxes(3)]}), 400,
         "box_budget_exceeded"),
        (dict(messages=ask("What?", bytes_url(png_claiming(1000, 1000)))), 413, "image_too_large"),
        (dict(messages=ask("What?", bytes_url(png_claiming(50_000, 50_000)))), 413, "image_too_large"),
        (dict(messages=two("What?", SCENE, bytes_url(png_claiming(300, 300)))), 413, "too_many_pixels"),
        (dict(messages=ask("What?", data_url(Image.new("RGB", (4000, 1))))), 413, "too_many_pixels"),
        (dict(messages=ask("What?", data_url(Image.fromarray(np.full((190, 190), 9, dtype=np.uint16))))), 413,
         "too_many_pixels"),  # 36100 pixels, but 16-bit ones count 3x
        (dict(messages=ask("What?"), junk=[[]] * 70_000), 413, "request_too_large"),
        (dict(messages=ask("What?"), max_tokens=65), 400, "max_tokens_too_large"),
    ],
)  # fmt: skip
def test_each_limit_refuses_naming_itself_and_its_flag(base, body, status, code):
    response = post(base, **body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and names_a_serve_flag(error["message"]), error


def test_pixel_limits_read_headers_and_count_canvases():
    claimed = png_claiming(9000, 7000)
    assert image_header(claimed, "x") == (9000, 7000, "RGB")  # its pixel data could not be decoded
    grey16 = io.BytesIO()
    Image.fromarray(np.full((30, 20), 40_000, dtype=np.uint16)).save(grey16, "PNG")
    assert image_header(grey16.getvalue(), "x").mode.startswith("I")
    assert decoded_pixels(20, 20, "I;16") == 3 * 400 and decoded_pixels(20, 20, "RGBA") == 400
    assert decoded_pixels(96, 64) == 96 * 64 + 96 * 96 and decoded_pixels(50, 50) == 2500
    assert decoded_pixels(65536, 1) == 65536 + 65536**2  # a thin strip pads onto a huge square
    assert json_items(b'{"a": [1, 2], "b": "x,[{"}') == 7  # commas and brackets in strings count too


def test_limits_leave_valid_requests_alone(base, engine):
    """At the limits exactly (5 boxes, 8 in all, 5^2 + 2^2 + ... within 30 pairs, 2 images) requests pass."""
    reply = post(
        base, messages=two("What?", SCENE, data_url(scene(2))), mgllava={"boxes": [boxes(5), boxes(2)]}
    )
    assert reply.status_code == 200, reply.text
    expected = engine.chat(two("What?", SCENE, data_url(scene(2))), boxes=[boxes(5), boxes(2)],
                           settings=GenerationSettings(max_new_tokens=4))  # fmt: skip
    assert reply.json()["choices"][0]["message"]["content"] == expected.text
    assert [len(i["boxes"]) for i in reply.json()["mgllava"]["images"]] == [5, 2]


def test_unserved_formats_and_garbage_are_400(base):
    for url in (tga_url(), "data:image/png;base64,aGVsbG8=", "data:image/png,notbase64"):
        response = post(base, messages=ask("What?", url))
        assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_image", url


class GatedEngine(Engine):
    """The real engine, counting how many requests are inside `prepare` at once."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.inside, self.most = 0, 0
        self._count = threading.Lock()

    def prepare(self, *args, **kwargs):
        with self._count:
            self.inside += 1
            self.most = max(self.most, self.inside)
        try:
            threading.Event().wait(0.05)  # long enough for the burst's other requests to arrive
            return super().prepare(*args, **kwargs)
        finally:
            with self._count:
                self.inside -= 1


def test_at_most_max_preparing_requests_decode_at_once():
    engine = GatedEngine(*tiny_parts())
    app = create_app(engine, ServerSettings(model_name="tiny", max_preparing=2))
    with serve_in_thread(app) as url, concurrent.futures.ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda k: post(url, messages=ask(f"Q{k}?", data_url(scene(k)))), range(8)))
        assert [r.status_code for r in replies] == [200] * 8
        assert engine.most == 2
        assert httpx.get(f"{url}/health").json()["preparing"] == 0


def test_serve_flags_become_settings():
    args = build_parser().parse_args(["serve", "--model", "/models/mg-7b"])
    assert server_settings(args) == ServerSettings(
        model_name="mg-7b"
    )  # the flags' defaults are the settings'
    args = build_parser().parse_args(
        ["serve", "--model", "m", "--max-images", "3", "--max-boxes-per-image", "10", "--max-boxes-per-request", "20",
         "--max-box-pairs", "99", "--max-request-pixels", "1000", "--max-json-items", "500", "--max-preparing", "1",
         "--allow-image-urls", "--image-url-allow", "10.0.0.0/8", "--image-url-allow", "images.internal",
         "--image-url-timeout-s", "2.5", "--image-url-max-mb", "0.5"]
    )  # fmt: skip
    settings = server_settings(args)
    assert (settings.max_images, settings.max_boxes_per_image, settings.max_boxes_per_request,
            settings.max_box_pairs, settings.max_request_pixels, settings.max_json_items, settings.max_preparing) == (
        3, 10, 20, 99, 1000, 500, 1)  # fmt: skip
    assert settings.image_url_allow == ("10.0.0.0/8", "images.internal") and settings.allow_image_urls
    assert (settings.image_url_timeout_s, settings.image_url_max_bytes) == (2.5, 1 << 19)
    with pytest.raises(ValueError, match="without --allow-image-urls"):
        server_settings(build_parser().parse_args(["serve", "--model", "m", "--image-url-allow", "10.0.0.1"]))
    with pytest.raises(ValueError, match="--max-box-pairs"):
        server_settings(build_parser().parse_args(["serve", "--model", "m", "--max-box-pairs", "0"]))
    with pytest.raises(ValueError, match="neither a hostname nor an IP network"):
        server_settings(build_parser().parse_args(["serve", "--model", "m", "--allow-image-urls",
                                                   "--image-url-allow", "10.0.0.0/99"]))  # fmt: skip


def test_default_image_limit_is_what_the_context_holds(engine):
    server = create_app(engine, ServerSettings(model_name="tiny")).state.server
    assert server.limits.max_images == engine.context_length // (engine.processor.num_image_tokens + 1)
    assert server.limits.max_json_items == 65536 + 8 * 1024


def test_bad_requests_through_the_openai_client(client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=ask("What?"), max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="at most 64"):
        client.chat.completions.create(model="tiny", messages=ask("What?"), max_tokens=1000)
    with pytest.raises(openai.BadRequestError, match="not a readable image"):
        client.chat.completions.create(model="tiny", messages=ask("What?", "data:image/png;base64,aGVsbG8="))


def test_body_limits_and_malformed_bodies(base):
    big = httpx.post(f"{base}/v1/chat/completions", content=b"x" * 500_000,
                     headers={"content-type": "application/json"})  # fmt: skip
    assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"
    chunked = httpx.post(f"{base}/v1/chat/completions", content=iter([b"x" * 100_000] * 5),
                         headers={"content-type": "application/json"})  # fmt: skip
    assert chunked.status_code == 413 and chunked.json()["error"]["code"] == "request_too_large"
    broken = httpx.post(
        f"{base}/v1/chat/completions", content=b"{nope", headers={"content-type": "application/json"}
    )
    assert broken.status_code == 400 and "not valid JSON" in broken.json()["error"]["message"]
    assert httpx.get(f"{base}/v2/whatever").json()["error"]["code"] == "not_found"


def test_models_health_and_page(base, client):
    assert [m.id for m in client.models.list()] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"
    assert httpx.get(f"{base}/v1/models/other").status_code == 404
    health = httpx.get(f"{base}/health").json()
    assert health["status"] == "ok" and health["model"] == "tiny"
    page = httpx.get(f"{base}/")
    assert page.status_code == 200 and "<title>MG-LLaVA</title>" in page.text
    assert httpx.get(f"{base}/static/app.js").status_code == 200


def test_fifty_concurrent_requests_are_answered_or_refused_and_none_lost(engine):
    prompts = [ask(f"Question {k}?", data_url(scene(20 + k))) for k in range(5)]
    expected = [engine.chat(p, settings=GenerationSettings(max_new_tokens=6)).text for p in prompts]
    settings = ServerSettings(model_name="tiny", max_in_flight=10, max_batch_size=4, batch_window_s=0.05)
    app = create_app(engine, settings)
    with serve_in_thread(app) as url, httpx.Client(timeout=120) as http:

        def one(k: int) -> tuple[int, httpx.Response]:
            body = {"model": "tiny", "messages": prompts[k % 5], "max_tokens": 6}
            return k, http.post(f"{url}/v1/chat/completions", json=body)

        with concurrent.futures.ThreadPoolExecutor(50) as pool:
            answers = list(pool.map(one, range(50)))
        assert len(answers) == 50
        statuses = [r.status_code for _, r in answers]
        assert set(statuses) <= {200, 429, 503} and statuses.count(200) >= 10, statuses
        for k, response in answers:
            if response.status_code == 200:
                assert response.json()["choices"][0]["message"]["content"] == expected[k % 5]
            else:
                assert int(response.headers["Retry-After"]) >= 1
                assert response.json()["error"]["code"] in ("rate_limit_exceeded", "overloaded")
        assert max(app.state.server.batcher.batch_sizes) > 1  # concurrent requests shared a generate
        assert http.get(f"{url}/health").json() == {
            "status": "ok",
            "model": "tiny",
            "in_flight": 0,
            "preparing": 0,
            "queued": 0,
            "running": 0,
        }
        again = http.post(
            f"{url}/v1/chat/completions", json={"model": "tiny", "messages": prompts[0], "max_tokens": 6}
        )
        assert again.json()["choices"][0]["message"]["content"] == expected[0]


def test_a_client_leaving_mid_stream_frees_its_slot(base):
    body = {"model": "tiny", "messages": ask("Talk.", data_url(scene(4))), "max_tokens": 64, "stream": True}
    with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        next(response.iter_lines())
    for _ in range(200):
        if httpx.get(f"{base}/health").json()["in_flight"] == 0:
            break
        threading.Event().wait(0.05)
    assert httpx.get(f"{base}/health").json()["in_flight"] == 0
    assert post(base, messages=ask("Still there?")).status_code == 200


class _OneImage(http.server.BaseHTTPRequestHandler):
    payload = png_bytes(scene(5))

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.end_headers()
        self.wfile.write(self.payload)

    def log_message(self, *args):
        pass


def test_image_urls_are_fetched_only_when_the_operator_allows(engine, base):
    images = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _OneImage)
    threading.Thread(target=images.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{images.server_address[1]}/cat.png"
    try:
        assert post(base, messages=ask("What?", url)).json()["error"]["code"] == "image_url_not_allowed"
        loopback = ServerSettings(model_name="tiny", allow_image_urls=True, image_url_allow=("127.0.0.1",))
        open_app = create_app(engine, loopback)  # loopback is refused unless allow-listed (test_serve_fetch)
        with serve_in_thread(open_app) as open_base:
            reply = post(open_base, messages=ask("What?", url))
            assert reply.status_code == 200, reply.text
            expected = engine.chat(
                ask("What?", data_url(scene(5))), settings=GenerationSettings(max_new_tokens=4)
            )
            assert reply.json()["choices"][0]["message"]["content"] == expected.text
            missing = post(
                open_base, messages=ask("What?", url.replace(":" + str(images.server_address[1]), ":9"))
            )
            assert missing.status_code == 400 and missing.json()["error"]["code"] == "invalid_image_url"
    finally:
        images.shutdown()


def test_a_full_queue_answers_503_and_frees_the_slot(engine):
    app = create_app(
        engine, ServerSettings(model_name="tiny", max_batch_size=1, batch_window_s=0.0, max_queue=1)
    )
    with serve_in_thread(app) as url, concurrent.futures.ThreadPoolExecutor(2) as pool:
        with engine._model_lock:  # the worker blocks inside generate on the first request
            first = pool.submit(post, url, messages=ask("One?"))
            while app.state.server.batcher.running < 1:
                threading.Event().wait(0.01)
            second = pool.submit(post, url, messages=ask("Two?"))
            while app.state.server.batcher.queued < 1:
                threading.Event().wait(0.01)
            refused = post(url, messages=ask("Three?"))
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "overloaded"
        assert int(refused.headers["Retry-After"]) >= 1
        assert first.result().status_code == 200 and second.result().status_code == 200
        assert httpx.get(f"{url}/health").json()["in_flight"] == 0


def test_a_full_server_answers_429_before_reading_the_body(engine):
    """Admission comes before the body is read: a refused body is never parsed (this one is not even JSON),
    and the client, still sending 8 MB, gets its 429 rather than a reset connection."""
    app = create_app(engine, ServerSettings(model_name="tiny", max_in_flight=1, max_batch_size=1))
    unparsable = b'{"model": "tiny", "messages": [' + b" " * (8 << 20)
    with serve_in_thread(app) as url, concurrent.futures.ThreadPoolExecutor(1) as pool:
        with engine._model_lock:  # the first request holds the only slot inside generate
            first = pool.submit(post, url, messages=ask("One?"))
            while app.state.server.batcher.running < 1:
                threading.Event().wait(0.01)
            refused = httpx.post(f"{url}/v1/chat/completions", content=unparsable, timeout=60)
        assert refused.status_code == 429 and refused.json()["error"]["code"] == "rate_limit_exceeded"
        assert "--max-in-flight" in refused.json()["error"]["message"]
        assert first.result().status_code == 200


def test_the_model_thread_has_its_threads_and_preparation_one(monkeypatch):
    """`threads` is the model thread's intra-op count and `prepare_threads` that of request preparation, each
    seen from inside the engine's own calls (the count is per thread under OpenMP)."""
    import torch

    from mgllava.inference.decoding import RunningBatch

    seen: dict[str, set[int]] = {"prepare": set(), "step": set()}
    prepare, step = Engine.prepare, RunningBatch.step

    def counting_prepare(self, *args, **kwargs):
        seen["prepare"].add(torch.get_num_threads())
        return prepare(self, *args, **kwargs)

    def counting_step(self):
        seen["step"].add(torch.get_num_threads())
        return step(self)

    monkeypatch.setattr(Engine, "prepare", counting_prepare)
    monkeypatch.setattr(RunningBatch, "step", counting_step)
    caller = torch.get_num_threads()
    settings = ServerSettings(**LIMITS, threads=3, prepare_threads=1)
    with serve_in_thread(create_app(tiny_engine(), settings)) as url:
        reply = post(url, messages=ask("What shape?", data_url(scene(2))))
    assert reply.status_code == 200, reply.text
    assert seen == {"prepare": {1}, "step": {3}}
    assert torch.get_num_threads() == caller  # the test's own thread is untouched
    with pytest.raises(ValueError, match="prepare_threads"):
        ServerSettings(prepare_threads=0)
