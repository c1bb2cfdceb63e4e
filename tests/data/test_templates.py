"""Chat templates: exact reference token sequences (hand-written expectations) and labels."""

import pytest

from mgllava.data.processor import MGLlavaProcessor
from mgllava.data.templates import IGNORE_INDEX, IMAGE_MARKER, encode_turns, get_template, to_turns

CONVERSATION = [
    {"from": "human", "value": "What is it?\n<image>"},
    {"from": "gpt", "value": "A cat"},
    {"from": "human", "value": "Color?"},
    {"from": "gpt", "value": "Red"},
]
Q1 = [
    "Ċ",
    "What",
    "Ġis",
    "Ġit",
    "?",
]  # "\nWhat is it?" after the image (moved to the front, as the reference)
A1, A2 = ["A", "Ġc", "at"], ["R", "ed"]
EXPECTED = {
    "vicuna": (
        ["<s>", "USER", ":", "Ġ", "IMG", *Q1, "ĠASSISTANT", ":", *A1, "</s>", "Ċ"]
        + ["<s>", "USER", ":", "ĠC", "ol", "or", "?", "ĠASSISTANT", ":", *A2, "</s>", "Ċ"],
        [*A1, "</s>", *A2, "</s>"],
    ),
    "phi3_chat": (
        ["<s>", "<|user|>", "IMG", *Q1, "<|end|>", "Ċ", "<|assistant|>", "Ċ", *A1, "<|end|>", "Ċ"]
        + ["<|user|>", "C", "ol", "or", "?", "<|end|>", "Ċ", "<|assistant|>", "Ċ", *A2, "<|end|>", "Ċ"],
        [*A1, "<|end|>", *A2, "<|end|>"],
    ),
    "llama3_chat": (
        ["<s>", "<|start_header_id|>", "us", "er", "<|end_header_id|>", "ĊĊ", "IMG", *Q1, "<|eot_id|>"]
        + ["<|start_header_id|>", "a", "ss", "i", "stant", "<|end_header_id|>", "ĊĊ", *A1, "<|eot_id|>"]
        + [
            "<|start_header_id|>",
            "us",
            "er",
            "<|end_header_id|>",
            "Ċ",
            "Ċ",
            "C",
            "ol",
            "or",
            "?",
            "<|eot_id|>",
        ]
        + ["<|start_header_id|>", "a", "ss", "i", "stant", "<|end_header_id|>", "ĊĊ", *A2, "<|eot_id|>"],
        [*A1, "<|eot_id|>", *A2, "<|eot_id|>"],
    ),
    "qwen_chat": (
        ["<s>", "<|im_start|>", "us", "er", "Ċ", "IMG", *Q1, "<|im_end|>", "Ċ"]
        + ["<|im_start|>", "a", "ss", "i", "stant", "Ċ", *A1, "<|im_end|>", "Ċ"]
        + ["<|im_start|>", "us", "er", "Ċ", "C", "ol", "or", "?", "<|im_end|>", "Ċ"]
        + ["<|im_start|>", "a", "ss", "i", "stant", "Ċ", *A2, "<|im_end|>", "Ċ"],
        [*A1, "<|im_end|>", *A2, "<|im_end|>"],
    ),
}


@pytest.fixture(scope="module")
def tokenizer():
    return MGLlavaProcessor.from_preset("tiny").tokenizer


def _tokens(tokenizer, ids):
    return ["IMG" if i == IMAGE_MARKER else tokenizer.convert_ids_to_tokens(i) for i in ids]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_template_ids_match_hand_written(tokenizer, name):
    system, turns = to_turns(CONVERSATION)
    ids, labels = encode_turns(tokenizer, get_template(name), turns, system)
    expected_tokens, supervised = EXPECTED[name]
    assert _tokens(tokenizer, ids) == expected_tokens
    assert [
        t for t, lab in zip(_tokens(tokenizer, ids), labels, strict=True) if lab != IGNORE_INDEX
    ] == supervised
    assert all(lab in (IGNORE_INDEX, i) for i, lab in zip(ids, labels, strict=True))


def test_generation_prompt_ends_with_assistant_header(tokenizer):
    _, turns = to_turns([{"role": "user", "content": "Hi"}])
    ids, labels = encode_turns(tokenizer, get_template("vicuna"), turns)
    assert _tokens(tokenizer, ids) == ["<s>", "USER", ":", "ĠH", "i", "ĠASSISTANT", ":"]
    assert set(labels) == {IGNORE_INDEX}


def test_hf_content_parts_equal_llava_strings(tokenizer):
    hf = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    llava = [{"from": "human", "value": "What is it?\n<image>"}]
    assert to_turns(hf) == to_turns(llava)


def test_several_images_keep_their_places():
    _, turns = to_turns([{"role": "user", "content": "Left <image> right <image> same?"}])
    assert turns[0].input == "Left <image> right <image> same?"


def test_consecutive_user_messages_join_and_leading_answer_is_skipped():
    system, turns = to_turns(
        [
            {"from": "gpt", "value": "ignored"},
            {"from": "system", "value": "Be brief."},
            {"from": "human", "value": "a"},
            {"from": "human", "value": "b"},
            {"from": "gpt", "value": "c"},
        ]
    )
    assert system == "Be brief."
    assert [(t.input, t.output) for t in turns] == [("ab", "c")]


@pytest.mark.parametrize(
    "messages, match",
    [
        ([], "non-empty"),
        ([{"role": "robot", "content": "x"}], "unknown role"),
        ([{"role": "user", "content": [{"type": "audio"}]}], "unsupported content part"),
        ([{"role": "assistant", "content": "x"}], "no user message"),
    ],
)
def test_malformed_conversations_are_named(messages, match):
    with pytest.raises(ValueError, match=match):
        to_turns(messages)


def test_stop_tokens_per_template(tokenizer):
    processor = MGLlavaProcessor.from_preset("tiny")
    assert processor.stop_token_ids == [tokenizer.eos_token_id]
    processor.template = "qwen_chat"
    assert processor.stop_token_ids == tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
