"""One smoke test per entry point through the real `main(argv)`: chat (one-shot, REPL, video), serve (the demo's
is in demo/test_demo.py)."""

import io
import json
import subprocess
import sys
import time
from unittest import mock

import httpx
import pytest
import torch

from mgllava.cli import build_parser, main
from mgllava.convert.folder import write_folder
from mgllava.inference import Engine, GenerationSettings
from mgllava.utils.hashing import sha256_file

from .formats import write_video
from .serving import scene, tiny_parts

# -- chat and serve --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    model, processor = tiny_parts()
    write_folder(model, processor, root / "tiny")
    scene(1).save(root / "one.png")
    scene(2, (50, 90)).save(root / "two.png")
    (root / "notes.txt").write_text("not an image")
    return root


@pytest.fixture(scope="module")
def engine(folder):
    return Engine.from_pretrained(folder / "tiny")


def expected(engine, folder, turns, images, n=8):
    """The engine's answer to the last of `turns` (earlier answers taken from `turns` too)."""
    messages = []
    for k, (question, answer, attached) in enumerate(turns):
        parts = [{"type": "image"}] * attached
        messages.append({"role": "user", "content": [*parts, {"type": "text", "text": question}]})
        if k < len(turns) - 1:
            messages.append({"role": "assistant", "content": answer})
    images = [folder / name for name in images]
    return engine.chat(messages, images=images, settings=GenerationSettings(max_new_tokens=n)).text


def test_chat_prompt_answers_once(folder, engine, capsys):
    args = ["chat", "--model", str(folder / "tiny"), "--image", str(folder / "one.png"), "--max-tokens", "8"]
    assert main([*args, "--prompt", "What shape?"]) == 0
    assert capsys.readouterr().out == expected(engine, folder, [("What shape?", None, 1)], ["one.png"]) + "\n"
    assert main([*args, "--prompt", "What shape?", "--show-boxes"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "image 1 (96x64, boxes from none): tags none"
    assert main([*args[:-4], "--image", str(folder / "notes.txt"), "--prompt", "?"]) == 2
    assert "not a readable image" in capsys.readouterr().err
    # --no-pack-linear and --no-decode-kernel reach the engine (F.linear answers as the packed layers do)
    with mock.patch.object(Engine, "__init__", autospec=True, side_effect=Engine.__init__) as init:
        assert main([*args, "--prompt", "What shape?", "--no-pack-linear", "--no-decode-kernel"]) == 0
    assert init.call_args.kwargs["pack_linear"] is False and init.call_args.kwargs["decode_kernel"] is False
    assert capsys.readouterr().out == expected(engine, folder, [("What shape?", None, 1)], ["one.png"]) + "\n"


def test_chat_repl_streams_turns_and_obeys_commands(folder, engine, capsys, monkeypatch):
    lines = ["What shape?", "/boxes", f"/image {folder / 'missing.png'}", f"/image {folder / 'two.png'}",
             "And this one?", "/reset", "What shape?", "/nonsense", "/quit", "never read"]  # fmt: skip
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(lines) + "\n"))
    assert (
        main(
            ["chat", "--model", str(folder / "tiny"), "--image", str(folder / "one.png"), "--max-tokens", "8"]
        )
        == 0
    )
    out = capsys.readouterr().out
    first = expected(engine, folder, [("What shape?", None, 1)], ["one.png"])
    second = expected(
        engine, folder, [("What shape?", first, 1), ("And this one?", None, 1)], ["one.png", "two.png"]
    )
    answers = [line.split("assistant> ", 1)[1] for line in out.splitlines() if "assistant> " in line]
    assert answers == [first, second, first]  # /reset forgot the turns and the image attached by /image
    assert "image 1 (96x64, boxes from none): tags none" in out
    assert "no such file" in out and f"(image {folder / 'two.png'} attached to your next message)" in out
    assert "(conversation cleared)" in out and "unknown command /nonsense" in out


def test_chat_with_a_video(folder, tmp_path, capsys):
    write_video(tmp_path / "clip.mp4")
    args = [
        "chat",
        "--model",
        str(folder / "tiny"),
        "--video",
        str(tmp_path / "clip.mp4"),
        "--max-tokens",
        "3",
    ]
    assert main([*args, "--prompt", "What happens?", "--show-boxes"]) == 0
    out = capsys.readouterr().out
    assert out.count("video frame") == 8


def test_serve_command_answers_over_http(folder):
    command = [sys.executable, "-m", "mgllava.cli", "serve", "--model", str(folder / "tiny"), "--port", "0"]
    # --port 0 lets the OS pick; uvicorn logs the port it bound
    server = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    try:
        port = None
        deadline = time.monotonic() + 120
        while port is None and time.monotonic() < deadline:
            line = server.stderr.readline()
            if "Uvicorn running on" in line:
                port = int(line.rsplit(":", 1)[1].split()[0])
        assert port is not None, "the server did not start"
        base = f"http://127.0.0.1:{port}"
        assert httpx.get(f"{base}/v1/models").json()["data"][0]["id"] == "tiny"
        body = {"model": "tiny", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 3}
        reply = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=60).json()
        assert reply["usage"]["completion_tokens"] == 3
    finally:
        server.terminate()
        server.wait(30)


def test_serve_flags_reach_the_engine_and_uvicorn(folder, monkeypatch):
    import uvicorn

    from mgllava.inference.prefix import MIN_REUSE

    ran = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: ran.update(app=app, **kwargs))
    assert build_parser().parse_args(["serve", "--model", "x"]).prefix_min_tokens == MIN_REUSE
    flags = ["--prefix-cache-mb", "2", "--prefix-min-tokens", "48", "--max-prompt-chars", "999",
             "--max-message-chars", "500", "--shutdown-timeout-s", "3", "--body-timeout-s", "4"]  # fmt: skip
    with mock.patch.object(Engine, "__init__", autospec=True, side_effect=Engine.__init__) as init:
        assert main(["serve", "--model", str(folder / "tiny"), "--device", "cpu", *flags]) == 0
    assert init.call_args.kwargs["warm"] is False  # the batcher's worker compiles kernels, for its threads
    server = ran["app"].state.server
    engine = server.engine
    assert engine.prefixes.entries.max_bytes == 2 << 20 and engine.prefixes.min_tokens == 48
    assert (engine.max_prompt_chars, engine.max_message_chars) == (999, 500)
    assert ran["timeout_graceful_shutdown"] == 3 and server.settings.body_timeout_s == 4
    main(["serve", "--model", str(folder / "tiny"), "--device", "cpu", "--prefix-cache-mb", "0"])
    assert ran["app"].state.server.engine.prefixes is None
    threads = torch.get_num_threads()
    flags = ["--threads", "3", "--prepare-threads", "1", "--max-step-tokens", "100"]
    main(["serve", "--model", str(folder / "tiny"), "--device", "cpu", *flags])
    server = ran["app"].state.server
    assert (server.settings.threads, server.settings.prepare_threads) == (3, 1)
    assert server.engine.max_step_tokens == 100
    assert torch.get_num_threads() == threads  # the caller's thread count is restored after serving


def test_chat_proposes_boxes_with_a_detector(folder, box_models, capsys):
    """With --detector (chat and serve share `_engine`), images given without boxes get proposals."""
    args = ["chat", "--model", str(folder / "tiny"), "--image", str(folder / "one.png"), "--max-tokens", "4",
            "--detector", str(box_models["owlv2"]), "--tagger", "fixed", "--tags", "circle,square"]  # fmt: skip
    assert main([*args, "--prompt", "What shape?", "--show-boxes"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("image 1 (96x64, boxes from proposer)")
    assert main([*args[:-2], "--tagger", "sample", "--prompt", "?"]) == 2
    assert "--tagger sample" in capsys.readouterr().err


def test_chat_tags_with_clip_when_the_model_dtype_is_left_to_the_checkpoint(folder, box_models, capsys):
    """chat's `--dtype` is unset (the checkpoint's own); the CLIP tagger and OWLv2 then run in float32."""
    args = ["chat", "--model", str(folder / "tiny"), "--image", str(folder / "one.png"), "--max-tokens", "2",
            "--detector", str(box_models["owlv2"]), "--tagger", "clip", "--tagger-model", str(box_models["clip"]),
            "--tag-threshold", "0", "--prompt", "?", "--show-boxes"]  # fmt: skip
    assert main(args) == 0
    assert capsys.readouterr().out.splitlines()[0].startswith("image 1 (96x64, boxes from proposer)")


def test_chat_takes_boxes_as_json_or_from_a_box_file(folder, capsys, tmp_path):
    image = folder / "one.png"
    args = ["chat", "--model", str(folder / "tiny"), "--image", str(image), "--max-tokens", "2", "--show-boxes",
            "--prompt", "?"]  # fmt: skip
    assert main([*args, "--boxes", "[[[5, 5, 40, 30]]]"]) == 0
    out = capsys.readouterr().out
    assert "boxes from request" in out and "[5.2, 5.0, 39.8, 29.8]" in out  # as the model saw it (rounded)
    box_file = tmp_path / "boxes.jsonl"
    box_file.write_text(
        json.dumps({"id": "x", "sha256": sha256_file(image), "boxes": [[1, 2, 30, 20]]}) + "\n"
    )
    assert main([*args, "--box-file", str(box_file)]) == 0
    assert "[0.8, 2.0, 30.0, 20.0]" in capsys.readouterr().out
    assert main([*args, "--boxes", "[[oops"]) == 2
    assert "--boxes is not valid JSON" in capsys.readouterr().err
