"""The Jinja chat templates saved with the processor: what a plain transformers user renders, against the
Python encoding (`encode_turns`, pieces tokenised separately with BOS re-added per turn) token for token."""

from __future__ import annotations

import pytest
from transformers import AutoProcessor, ProcessorMixin

import mgllava  # noqa: F401  (registers AutoProcessor)
from mgllava.data.processor import MGLlavaProcessor
from mgllava.data.templates import (
    IMAGE_MARKER,
    TEMPLATES,
    encode_turns,
    get_template,
    jinja_chat_template,
    to_turns,
)

CONVERSATIONS = {
    "image_two_turns_llava_style": [
        {"from": "human", "value": "What is it?\n<image>"},
        {"from": "gpt", "value": "A cat"},
        {"from": "human", "value": "Color?"},
        {"from": "gpt", "value": "Red"},
    ],
    "system_image_parts_open_question": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe."}]},
        {"role": "assistant", "content": "A dog."},
        {"role": "user", "content": "More?"},
    ],
    "text_only_three_turns": [
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Why?"},
        {"role": "user", "content": " Tell me."},
        {"role": "assistant", "content": "Because."},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "See you."},
    ],
}
CASES = [(t, c, g) for t in sorted(TEMPLATES) for c in sorted(CONVERSATIONS) for g in (False, True)]


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, MGLlavaProcessor]:
    """Per template: the processor saved and loaded back through AutoProcessor, as a user gets it."""
    out = {}
    for name in TEMPLATES:
        folder = tmp_path_factory.mktemp(name)
        MGLlavaProcessor.from_preset("tiny", template=name).save_pretrained(folder)
        assert (folder / "chat_template.jinja").is_file()
        out[name] = AutoProcessor.from_pretrained(folder)
    return out


def python_ids(processor: MGLlavaProcessor, name: str, conv: list[dict], generation: bool) -> list[int]:
    system, turns = to_turns(conv)
    turns = turns if generation else [t for t in turns if t.output is not None]
    ids, _ = encode_turns(processor.tokenizer, get_template(name), turns, system)
    return [processor.image_token_id if i == IMAGE_MARKER else i for i in ids]


def split_header_newlines(tokens: list[str]) -> list[str]:
    """llama3_chat's one divergence: the header's "\\n\\n" that the reference tokenises at the end of the
    prompt piece is one token ("ĊĊ"); followed by the answer in one text, this byte-level tokenizer's
    pre-tokenizer splits it in two ("Ċ", "Ċ"). Before `<image>` (a special token, split off first) it stays
    one token either way."""
    out = []
    for k, token in enumerate(tokens):
        inner = (
            0 < k < len(tokens) - 1 and tokens[k - 1] == "<|end_header_id|>" and tokens[k + 1] != "<image>"
        )
        out += ["Ċ", "Ċ"] if token == "ĊĊ" and inner else [token]
    return out


@pytest.mark.parametrize(("name", "conv", "generation"), CASES)
def test_jinja_text_tokenised_once_equals_the_python_encoding(saved, name, conv, generation):
    processor = saved[name]
    messages = CONVERSATIONS[conv]
    assert processor.chat_template == jinja_chat_template(get_template(name))
    text = ProcessorMixin.apply_chat_template(
        processor, messages, tokenize=False, add_generation_prompt=generation
    )
    assert processor.apply_chat_template(messages, add_generation_prompt=generation) == text  # our override
    tok = processor.tokenizer
    once = tok.convert_ids_to_tokens(tok(text, add_special_tokens=False).input_ids)
    pieces = tok.convert_ids_to_tokens(python_ids(processor, name, messages, generation))
    if name == "llama3_chat":
        assert once != pieces and once == split_header_newlines(pieces)
    else:
        assert once == pieces
    assert tok.decode(tok.convert_tokens_to_ids(once)) == tok.decode(tok.convert_tokens_to_ids(pieces))


def test_open_question_is_rendered_only_with_the_generation_prompt(saved):
    processor = saved["vicuna"]
    messages = CONVERSATIONS["system_image_parts_open_question"]
    assert processor.apply_chat_template(messages).endswith("ASSISTANT:A dog.</s>\n")
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt.startswith("<s>A chat between") and prompt.endswith("</s>\n<s>USER: More? ASSISTANT:")
    assert "Be brief.\n USER: <image>\nDescribe. ASSISTANT:" in prompt


def test_a_named_template_or_bad_messages_render_as_before(saved):
    processor = saved["vicuna"]
    messages = CONVERSATIONS["image_two_turns_llava_style"]
    qwen = processor.apply_chat_template(messages, chat_template="qwen_chat")
    assert qwen.startswith("<s><|im_start|>user\n<image>\nWhat is it?<|im_end|>")
    with pytest.raises(ValueError, match="unknown role"):
        processor.apply_chat_template([{"role": "robot", "content": "hi"}])
