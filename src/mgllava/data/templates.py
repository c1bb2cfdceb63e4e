"""Chat templates and conversation encoding, token for token as the reference (docs/design.md section 6).

Each turn is encoded as ``[BOS] + enc(INSTRUCTION.format(input)) + enc(output + SUFFIX) [+ EOS] [+ enc(SEP)]``
with every piece tokenised separately (`add_special_tokens=False`) and the instruction split at each
`<image>` / `<video>` (pieces tokenised separately, a marker between them). BOS opens the first turn and
every turn after an EOS; loss is on output, suffix and EOS only. Templates without a suffix (vicuna) end
each answer with EOS; the others end it with their suffix token, which is also the stop token.

Messages may be LLaVA style (`{"from": "human"|"gpt"|"system", "value": str}`) or HF/OpenAI style
(`{"role": "user"|"assistant"|"system", "content": str | [{"type": "text"|"image", ...}]}`). As in the
reference (`llava_map_fn`), a message holding one `<image>` has it moved to its start as `<image>\\n`, and
consecutive user messages are joined. A message with several images keeps them where they are.

`jinja_chat_template` writes each template as a Jinja chat template (the processor's `chat_template`, saved
as `chat_template.jinja`) with `bos_token`/`eos_token` where `encode_turns` puts BOS/EOS; `encode_turns` stays
the one source of ids, since a single tokenisation of that text can differ from the reference's pieces
(docs/design.md section 6.6 says where).

phi3_chat follows the reference's own XTuner copy (`xtuner/utils/templates.py` of PhoenixZ810/MG-LLaVA, which
its Phi-3 configs use): no newline after ``<|user|>`` or ``<|system|>``. Upstream XTuner and Phi-3's own chat
format have one; the released MG-LLaVA Phi-3 checkpoint was trained without it (docs/design.md section 13).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

IGNORE_INDEX = -100
IMAGE_MARKER = -200  # stands for one image inside encoded text; the processor expands it into visual rows
VIDEO_MARKER = -201  # one video: the processor expands it into the rows of each of its frames, in order
IMAGE_TOKEN = "<image>"
VIDEO_TOKEN = "<video>"
_MARKERS = {IMAGE_TOKEN: IMAGE_MARKER, VIDEO_TOKEN: VIDEO_MARKER}
_TAGS = re.compile("(<image>|<video>)")


@dataclass(frozen=True)
class ChatTemplate:
    name: str
    instruction: str
    system: str = "{system}"
    suffix: str = ""
    suffix_as_eos: bool = False
    sep: str = ""
    stop_words: tuple[str, ...] = ()


TEMPLATES: dict[str, ChatTemplate] = {
    t.name: t
    for t in (
        ChatTemplate(
            "vicuna",
            instruction="USER: {input} ASSISTANT:",
            system=(
                "A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                "helpful, detailed, and polite answers to the user's questions. {system}\n "
            ),
            sep="\n",
        ),
        ChatTemplate(
            "phi3_chat",
            instruction="<|user|>{input}<|end|>\n<|assistant|>\n",
            system="<|system|>{system}<|end|>\n",
            suffix="<|end|>",
            suffix_as_eos=True,
            sep="\n",
            stop_words=("<|end|>",),
        ),
        ChatTemplate(
            "llama3_chat",
            instruction=(
                "<|start_header_id|>user<|end_header_id|>\n\n{input}<|eot_id|>"
                "<|start_header_id|>assistant<|end_header_id|>\n\n"
            ),
            system="<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>",
            suffix="<|eot_id|>",
            suffix_as_eos=True,
            stop_words=("<|eot_id|>",),
        ),
        ChatTemplate(
            "qwen_chat",
            instruction="<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n",
            system="<|im_start|>system\n{system}<|im_end|>\n",
            suffix="<|im_end|>",
            suffix_as_eos=True,
            sep="\n",
            stop_words=("<|im_end|>", "<|endoftext|>"),
        ),
    )
}


def get_template(name: str) -> ChatTemplate:
    if name not in TEMPLATES:
        raise ValueError(f"unknown chat template {name!r}; available: {', '.join(TEMPLATES)}")
    return TEMPLATES[name]


@dataclass
class Turn:
    input: str
    output: str | None  # None: the turn the model is asked to answer


def _content_text(content: Any, where: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                parts.append(str(part.get("text", "")))
            elif kind in ("image", "image_url"):
                parts.append(IMAGE_TOKEN)
            elif kind == "video":
                parts.append(VIDEO_TOKEN)
            else:
                raise ValueError(f"{where}: unsupported content part {part!r} (expected type text or image)")
        return "".join(parts)
    raise ValueError(f"{where}: content must be a string or a list of parts, got {type(content).__name__}")


def _role(message: dict[str, Any], where: str) -> str:
    role = message.get("role", message.get("from"))
    mapping = {
        "user": "user",
        "human": "user",
        "assistant": "assistant",
        "gpt": "assistant",
        "system": "system",
    }
    if role not in mapping:
        raise ValueError(f"{where}: unknown role {role!r} (expected user/human, assistant/gpt or system)")
    return mapping[role]


def _image_first(text: str) -> str:
    """The reference's normalisation: a lone `<image>` (or `<video>`) moves to the front, then a newline."""
    tags = _TAGS.findall(text)
    if len(tags) != 1:
        return text
    return (tags[0] + "\n" + text.replace(tags[0], "").strip()).strip()


def to_turns(messages: list[dict[str, Any]]) -> tuple[str | None, list[Turn]]:
    """Messages -> (system text or None, turns). A trailing user message becomes a turn to answer."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("a conversation must be a non-empty list of messages")
    system, turns, pending = None, [], ""
    for i, message in enumerate(messages):
        where = f"message {i}"
        if not isinstance(message, dict):
            raise ValueError(f"{where}: expected a dict, got {type(message).__name__}")
        role = _role(message, where)
        text = _content_text(message.get("content", message.get("value")), where)
        if role == "system":
            system = text
        elif role == "user":
            pending += _image_first(text)
        elif pending or turns:  # an answer with no question before it is skipped, as in the reference
            turns.append(Turn(pending, text))
            pending = ""
    if pending:
        turns.append(Turn(pending, None))
    if not turns:
        raise ValueError("the conversation has no user message")
    return system, turns


def encode_with_markers(tokenizer: Any, text: str) -> list[int]:
    """Tokenise the pieces between `<image>`/`<video>` tags separately (the reference's rule), a marker per tag."""
    ids: list[int] = []
    for piece in _TAGS.split(text):
        if piece in _MARKERS:
            ids.append(_MARKERS[piece])
        elif piece:
            ids.extend(tokenizer.encode(piece, add_special_tokens=False))
    return ids


def encode_turns(
    tokenizer: Any, template: ChatTemplate, turns: list[Turn], system: str | None = None
) -> tuple[list[int], list[int]]:
    """(input_ids, labels) with one `IMAGE_MARKER` per `<image>`; exact reference token sequence."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id]
    ids: list[int] = []
    labels: list[int] = []
    needs_bos = True
    for k, turn in enumerate(turns):
        text = template.instruction.format(input=turn.input)
        if k == 0 and system:
            text = template.system.format(system=system) + text
        if needs_bos:
            ids += bos
            labels += [IGNORE_INDEX] * len(bos)
        prompt = encode_with_markers(tokenizer, text)
        ids += prompt
        labels += [IGNORE_INDEX] * len(prompt)
        if turn.output is None:
            break
        answer = tokenizer.encode(turn.output + template.suffix, add_special_tokens=False)
        ids += answer
        labels += answer
        needs_bos = not template.suffix_as_eos
        if needs_bos:
            ids += eos
            labels += eos
        if template.sep:
            sep = tokenizer.encode(template.sep, add_special_tokens=False)
            ids += sep
            labels += [IGNORE_INDEX] * len(sep)
    return ids, labels


_MARKER = re.compile(r"<\|[^|<>]+\|>")


def template_markers(template: ChatTemplate) -> list[str]:
    """The chat markers a template writes (`<|user|>`, `<|eot_id|>`, ...), each meant to be one token."""
    text = template.system + template.instruction + template.suffix + "".join(template.stop_words)
    return list(dict.fromkeys(_MARKER.findall(text)))


def check_tokenizer(tokenizer: Any, template: ChatTemplate) -> None:
    """Refuse a tokenizer that cannot encode `template` as its LLM was trained: every chat marker must be one
    token of it (a tokenizer without them would split `<|user|>` into pieces and the model would see text it
    never saw in training), and a template that ends answers with EOS needs an EOS token."""
    split = [m for m in template_markers(template) if not _is_one_token(tokenizer, m)]
    if split:
        raise ValueError(
            f"chat template {template.name!r} does not match this tokenizer: {', '.join(split)} "
            f"{'is not a token' if len(split) == 1 else 'are not tokens'} of it; use the template of the LLM "
            f"the tokenizer belongs to ({', '.join(TEMPLATES)})"
        )
    if not template.suffix_as_eos and tokenizer.eos_token_id is None:
        raise ValueError(
            f"chat template {template.name!r} ends each answer with EOS but the tokenizer has none"
        )


def _is_one_token(tokenizer: Any, text: str) -> bool:
    ids = tokenizer.encode(text, add_special_tokens=False)
    return len(ids) == 1 and ids[0] != tokenizer.unk_token_id


def stop_token_ids(tokenizer: Any, template: ChatTemplate) -> list[int]:
    """Token ids that end an answer: the template's stop words, else the tokenizer's EOS."""
    if not template.stop_words:
        return [tokenizer.eos_token_id]
    ids = []
    for word in template.stop_words:
        token_id = tokenizer.convert_tokens_to_ids(word)
        if token_id is None or token_id == tokenizer.unk_token_id:
            raise ValueError(f"template {template.name}: stop word {word!r} is not a token of this tokenizer")
        ids.append(token_id)
    return ids


def _literal(text: str) -> str:
    """A Jinja string literal holding `text` (JSON's escapes are Jinja's)."""
    return json.dumps(text)


def _halves(pattern: str, field: str) -> tuple[str, str]:
    before, after = pattern.split("{" + field + "}")
    return _literal(before), _literal(after)


# `to_turns` in Jinja: roles and content parts as `_role`/`_content_text` read them, a lone `<image>` (or
# `<video>`) moved to the front with a newline, consecutive user messages joined, an answer with no question
# skipped; then `ns.turns` holds [input, output] pairs and `ns.pending` the question left to answer.
_JINJA_TURNS = (
    "{%- set ns = namespace(system='', turns=[], pending='') -%}"
    "{%- for message in messages -%}"
    "{%- set role = message['role'] if message['role'] is defined else message['from'] -%}"
    "{%- set content = message['content'] if message['content'] is defined else message['value'] -%}"
    "{%- set part_text = namespace(text='') -%}"
    "{%- if content is string -%}{%- set part_text.text = content -%}"
    "{%- elif content is not none -%}{%- for part in content -%}"
    "{%- if part['type'] == 'text' -%}{%- set part_text.text = part_text.text + part['text'] -%}"
    "{%- elif part['type'] in ['image', 'image_url'] -%}{%- set part_text.text = part_text.text + '<image>' -%}"
    "{%- elif part['type'] == 'video' -%}{%- set part_text.text = part_text.text + '<video>' -%}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{%- set text = part_text.text -%}"
    "{%- if role == 'system' -%}{%- set ns.system = text -%}"
    "{%- elif role in ['user', 'human'] -%}"
    "{%- if text.count('<image>') + text.count('<video>') == 1 -%}"
    "{%- set tag = '<image>' if '<image>' in text else '<video>' -%}"
    "{%- set text = (tag + '\\n' + text.replace(tag, '').strip()).strip() -%}"
    "{%- endif -%}"
    "{%- set ns.pending = ns.pending + text -%}"
    "{%- elif ns.pending or ns.turns -%}"
    "{%- set ns.turns = ns.turns + [[ns.pending, text]] -%}{%- set ns.pending = '' -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if not ns.turns and not ns.pending -%}{{ raise_exception('the conversation has no user message') }}"
    "{%- endif -%}"
    "{%- set turns = ns.turns + ([[ns.pending, none]] if ns.pending and add_generation_prompt else []) -%}"
)


def jinja_chat_template(template: ChatTemplate) -> str:
    """`template` as a Jinja chat template (`processor.chat_template`, saved as `chat_template.jinja`): the text
    whose pieces `encode_turns` tokenises, with `bos_token` and `eos_token` written where it puts BOS and EOS,
    so that one tokenisation of it (`add_special_tokens=False`) gives the same ids wherever the tokenizer does
    not merge across the piece boundaries (docs/design.md section 6.6). A trailing question is rendered only
    with `add_generation_prompt`, as `apply_chat_template(tokenize=False)` always did."""
    sys_pre, sys_post = _halves(template.system, "system")
    ins_pre, ins_post = _halves(template.instruction, "input")
    eos = "" if template.suffix_as_eos else "{{- eos_token -}}"
    after_answer = "false" if template.suffix_as_eos else "true"
    return (
        _JINJA_TURNS + "{%- set state = namespace(bos=true) -%}"
        "{%- for turn in turns -%}"
        "{%- if state.bos and bos_token is defined and bos_token -%}{{- bos_token -}}{%- endif -%}"
        f"{{%- if loop.first and ns.system -%}}{{{{- {sys_pre} + ns.system + {sys_post} -}}}}{{%- endif -%}}"
        f"{{{{- {ins_pre} + turn[0] + {ins_post} -}}}}"
        "{%- if turn[1] is not none -%}"
        f"{{{{- turn[1] + {_literal(template.suffix)} -}}}}{eos}{{{{- {_literal(template.sep)} -}}}}"
        "{%- endif -%}"
        f"{{%- set state.bos = {after_answer} -%}}"
        "{%- endfor -%}"
    )
