"""The OpenAI route for harnesses (docs/harnesses.md): a request shaped as lmms-eval's `openai_compatible`
model sends it, through the `openai` client, to a tiny server on loopback whose boxes come from a box file
server-side (`mgllava serve --box-file`, looked up by the content hash of the image bytes the request carries)."""

import argparse
import base64
import json

import openai
import pytest

from mgllava.boxes import Boxes
from mgllava.boxes.cli import proposer_from_args
from mgllava.boxes.files import BoxRecord
from mgllava.inference import Engine, GenerationSettings
from mgllava.serve import ServerSettings, create_app
from mgllava.serve.background import serve_in_thread
from mgllava.utils.hashing import sha256_bytes

from ..serving import png_bytes, scene, tiny_parts


@pytest.fixture(scope="module")
def images():
    return png_bytes(scene(1)), png_bytes(scene(2, (64, 80)))


@pytest.fixture(scope="module")
def engine(images, tmp_path_factory):
    """The engine `mgllava serve --box-file boxes.jsonl` builds: the box file behind the one proposer type."""
    record = BoxRecord(image="first.png", sha256=sha256_bytes(images[0]),
                       boxes=Boxes([[5, 5, 40, 30]], [0.9], ["ball"], (96, 64)))  # fmt: skip
    box_file = tmp_path_factory.mktemp("serve_boxes") / "boxes.jsonl"
    box_file.write_text(json.dumps(record.to_json()) + "\n")
    options = argparse.Namespace(box_file=str(box_file), detector=None, tagger="clip")
    return Engine(*tiny_parts(), proposer_from_args(options, "cpu"))


@pytest.fixture(scope="module")
def client(engine):
    with serve_in_thread(create_app(engine, ServerSettings(model_name="tiny"))) as base:
        yield openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)


def lmms_eval_payload(image: bytes, text: str) -> dict:
    """What lmms-eval's openai_compatible model sends for a generate_until task: the images, then the text."""
    url = "data:image/png;base64," + base64.b64encode(image).decode()
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}]
    return {
        "model": "tiny",
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 6,
        "temperature": 0,
    }


def test_a_harness_request_is_answered_as_the_engine_answers_with_the_box_files_boxes(client, engine, images):
    question = "What is this?\nAnswer the question using a single word or phrase."
    reply = client.chat.completions.create(**lmms_eval_payload(images[0], question))
    expected = engine.chat([{"role": "user", "content": "<image>\n" + question}], images=[images[0]],
                           settings=GenerationSettings(max_new_tokens=6))  # fmt: skip
    assert reply.choices[0].message.content == expected.text and expected.text
    (used,) = reply.model_extra["mgllava"]["images"]
    assert (used["source"], used["labels"]) == ("box_file", ["ball"])
    assert [round(v) for v in used["boxes"][0]] == [5, 5, 40, 30]
    other = client.chat.completions.create(**lmms_eval_payload(images[1], question))
    assert (
        other.model_extra["mgllava"]["images"][0]["source"] == "missing"
    )  # not in the file: said, not hidden
