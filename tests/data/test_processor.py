"""Processor: raw text path, placeholder expansion, truncation, padding, images inside messages."""

import base64
import io

import pytest
import torch
from PIL import Image

from mgllava import MGLlavaProcessor
from mgllava.data.templates import IGNORE_INDEX


@pytest.fixture(scope="module")
def processor():
    return MGLlavaProcessor.from_preset("tiny")


def image(color=(200, 0, 0), size=(40, 30)):
    return Image.new("RGB", size, color)


def test_raw_text_expands_each_image_tag(processor):
    out = processor(
        text="USER: <image>\nWhat? ASSISTANT:", images=[image()], boxes=[[[0, 0, 10, 10], [20, 10, 40, 30]]]
    )
    ids = out["input_ids"][0].tolist()
    tok = processor.tokenizer
    assert ids[0] == tok.bos_token_id
    first = ids.index(processor.image_token_id)
    assert ids[first : first + 18] == [processor.image_token_id] * 18  # 16 image rows + 2 objects, contiguous
    assert processor.image_token_id not in ids[first + 18 :]
    assert tok.decode(ids[first + 18 :]) == "\nWhat? ASSISTANT:"
    assert tok.decode(ids[1:first]) == "USER: "


def test_raw_text_equals_chat_template_for_one_turn(processor):
    messages = [{"role": "user", "content": "<image>\nWhat?"}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt.startswith(
        processor.tokenizer.bos_token
    )  # the chat template writes BOS, as HF templates do
    a = processor(text=prompt, images=[image()], add_special_tokens=False)
    b = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, images=[image()]
    )
    assert torch.equal(a["input_ids"], b["input_ids"])


def test_left_and_right_padding_with_real_masks(processor):
    texts = ["short", "a much longer piece of text here"]
    left = processor(text=texts)
    right = processor(text=texts, padding_side="right")
    n_short = int(left["attention_mask"][0].sum())
    assert left["attention_mask"][0, -n_short:].all() and not left["attention_mask"][0, :-n_short].any()
    assert right["attention_mask"][0, :n_short].all() and not right["attention_mask"][0, n_short:].any()
    assert (left["input_ids"][0, :-n_short] == processor.pad_token_id).all()


def test_options_merge_as_transformers_processors_do(processor):
    texts, images = ["<image>\nshort", "a much longer piece of text here"], [image()]
    flat = processor(text=texts, images=images, padding_side="right", add_special_tokens=False)
    nested = processor(
        text=texts, images=images, text_kwargs={"padding_side": "right", "add_special_tokens": False}
    )
    assert flat.keys() == nested.keys() and all(torch.equal(flat[k], nested[k]) for k in flat)
    assert flat["input_ids"][0, 0] != processor.tokenizer.bos_token_id and flat["attention_mask"][1, -1] == 0
    with pytest.raises(ValueError, match="passed two times"):
        processor(text=texts, padding_side="left", text_kwargs={"padding_side": "right"})
    with pytest.raises(
        ValueError, match=r"does not support the text option\(s\) \['max_length', 'padding'\]"
    ):
        processor(text=texts, padding="max_length", max_length=64)


def test_over_long_text_is_an_error_or_truncated_keeping_visual_rows(processor, caplog):
    processor = MGLlavaProcessor.from_preset("tiny", max_length=40)
    long_answer = " ".join(["word"] * 60)
    conv = [{"role": "user", "content": "<image>\nTell me."}, {"role": "assistant", "content": long_answer}]
    encoded = processor.encode_conversation(conv, images=[image()], boxes=[[[0, 0, 5, 5]]])
    assert len(encoded["input_ids"]) == 40 and encoded["truncated"] > 0
    assert encoded["input_ids"].count(processor.image_token_id) == 17  # visual rows never cut
    assert any(lab != IGNORE_INDEX for lab in encoded["labels"])  # still some supervised text
    assert "truncated" in caplog.text
    with pytest.raises(ValueError, match=r"exceeds max_length 40; pass truncation=True"):
        processor(text="USER: <image> " + long_answer, images=[image()])
    tiny = MGLlavaProcessor.from_preset("tiny", max_length=10)
    with pytest.raises(ValueError, match="17 visual rows"):
        tiny.encode_conversation(conv, images=[image()], boxes=[[[0, 0, 5, 5]]])


def test_images_inside_messages_paths_and_data_urls(processor, tmp_path):
    path = tmp_path / "a.png"
    image((0, 200, 0)).save(path)
    buf = io.BytesIO()
    image((0, 0, 200)).save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image", "path": str(path)},
                {"type": "text", "text": "and"},
                {"type": "image_url", "image_url": {"url": url}},
            ],
        }
    ]
    out = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert out["pixel_values"].shape[0] == 2
    assert out["pixel_values"][0, 1].mean() > out["pixel_values"][1, 1].mean()  # green first, blue second


@pytest.mark.parametrize(
    "part, match",
    [
        ({"type": "image_url", "image_url": {"url": "http://example.com/x.png"}}, "not fetched"),
        ({"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}, "not valid base64"),
        ({"type": "image_url", "image_url": {"url": "data:image/png,rawbytes"}}, "base64-encoded"),
        ({"type": "image"}, "image part without an image"),
    ],
)
def test_bad_image_parts_are_named(processor, part, match):
    with pytest.raises(ValueError, match=match):
        processor.apply_chat_template(
            [{"role": "user", "content": [part]}], tokenize=True, add_generation_prompt=True
        )


def test_boxes_without_images_are_an_error(processor):
    with pytest.raises(ValueError, match="boxes for 1 images but 0 images"):
        processor(text="hi", images=[], boxes=[[[0, 0, 1, 1]]])


def test_decode_answer_stops_at_the_stop_token(processor):
    tok = processor.tokenizer
    ids = (
        tok.encode("A red circle", add_special_tokens=False)
        + [tok.eos_token_id]
        + tok.encode("junk", add_special_tokens=False)
    )
    assert processor.decode_answer(ids) == "A red circle"
