"""The incremental Detokenizer emits, piece for piece, what re-decoding the whole answer at every token did:
on random token sequences of the tiny byte-level BPE tokenizer (special tokens, bytes that form no character,
multi-byte characters cut between tokens) and of a SentencePiece tokenizer with byte fallback; it decodes
windows, never the whole answer; `restart` resumes past the text already delivered."""

from __future__ import annotations

import logging
import random

import pytest
from transformers import AutoTokenizer

from mgllava import MGLlavaProcessor
from mgllava.inference.streaming import Detokenizer, TextStream

from ..convert.test_sentencepiece_folder import write_vicuna_like_folder

STOP = 2  # </s> in both tokenizers
TEXTS = [
    "Hello world",
    "café ☃ naïve 日本語 🙂",
    "  leading, trailing  ",
    "a\n\nb",
    "x🙂🙂y",
    "double  spaces",
]


class WholeAnswerDetokenizer:
    """The Detokenizer as it was: `decode(ids).rstrip(U+FFFD).strip()` at every token, emitting its growth."""

    def __init__(self, decode, stop_ids, limit):
        self.decode, self.stop_ids, self.limit = decode, set(stop_ids), limit
        self.ids, self.emitted, self.done = [], "", False

    def push(self, token):
        if self.done:
            return ""
        if token in self.stop_ids:
            self.done = True
            return ""
        self.ids.append(token)
        self.done = len(self.ids) >= self.limit
        return self._advance(self.decode(self.ids).rstrip("\ufffd").strip())

    def finish(self, final):
        self.done = True
        return self._advance(final)

    def _advance(self, text):
        if not text.startswith(self.emitted):
            return ""
        delta, self.emitted = text[len(self.emitted) :], text
        return delta


@pytest.fixture(scope="module")
def byte_level():
    return MGLlavaProcessor.from_preset("tiny").tokenizer


@pytest.fixture(scope="module")
def sentencepiece(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sp")
    write_vicuna_like_folder(folder)
    return AutoTokenizer.from_pretrained(folder)


class CountingDecode:
    """The tokenizer's decode (special tokens skipped), recording how many ids each call decoded."""

    def __init__(self, tokenizer):
        self.tokenizer, self.sizes = tokenizer, []

    def __call__(self, ids):
        self.sizes.append(len(ids))
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def pieces(detokenizer, ids, final):
    return [detokenizer.push(t) for t in ids] + [detokenizer.finish(final)]


def sequences(tokenizer, seed, count=60):
    """Random ids (special tokens included), then the texts' encodings, some with random ids spliced in.

    Byte-level BPE: ids over the whole vocabulary, so bytes that form no character too. SentencePiece: its
    byte-fallback pieces (`<0x..>`) only as the texts encode them, since a run of bytes that is not UTF-8
    decodes to one U+FFFD per byte, which a later byte can change (decoding a prefix of such ids then does
    not give a prefix of the text, and neither detokenizer promises anything there)."""
    rng = random.Random(seed)
    vocab = [i for i in range(len(tokenizer)) if not tokenizer.convert_ids_to_tokens(i).startswith("<0x")]
    out = [[rng.choice(vocab) for _ in range(rng.randrange(1, 40))] for _ in range(count)]
    for text in TEXTS:
        ids = tokenizer.encode(text, add_special_tokens=False)
        out.append(ids)
        cut = rng.randrange(len(ids) + 1)
        out.append(ids[:cut] + [rng.choice(vocab) for _ in range(3)] + ids[cut:])
    return out


@pytest.mark.parametrize("kind", ["byte_level", "sentencepiece"])
def test_pieces_equal_those_of_decoding_the_whole_answer_at_every_token(kind, request):
    tokenizer = request.getfixturevalue(kind)
    decode = CountingDecode(tokenizer)
    for ids in sequences(tokenizer, seed=len(kind)):
        limit = len(ids) + 1
        final = decode(ids[: ids.index(STOP)] if STOP in ids else ids).strip()
        old = pieces(WholeAnswerDetokenizer(decode, [STOP], limit), ids, final)
        new = pieces(Detokenizer(decode, [STOP], limit), ids, final)
        assert new == old, ids
        assert "".join(new) == final or "\ufffd" in final, ids


def test_multi_byte_characters_split_over_tokens_are_held_until_complete(byte_level):
    # characters outside the tiny tokenizer's corpus are byte tokens: each arrives in 2 to 4 tokens
    by_byte = [t for c in "é☃🙂" for t in byte_level.encode(c, add_special_tokens=False)]
    assert len(by_byte) > 3
    det = Detokenizer(lambda i: byte_level.decode(i, skip_special_tokens=True), [STOP], 100)
    out = [det.push(t) for t in by_byte]
    assert "".join(out) == "é☃🙂" and all(p in ("", "é", "☃", "🙂") for p in out)


def test_each_token_decodes_a_window_not_the_whole_answer(byte_level):
    ids = byte_level.encode("The quick brown fox jumps over the lazy dog. " * 8, add_special_tokens=False)
    decode = CountingDecode(byte_level)
    det = Detokenizer(decode, [STOP], len(ids) + 1)
    text = "".join(det.push(t) for t in ids)
    assert text == byte_level.decode(ids).strip()
    assert len(ids) > 100 and max(decode.sizes) <= 3  # the whole answer would be up to len(ids)


def test_restart_emits_only_past_the_text_already_delivered(byte_level, caplog):
    decode = lambda ids: byte_level.decode(ids, skip_special_tokens=True)  # noqa: E731
    ids = byte_level.encode("one two three four", add_special_tokens=False)
    got = []
    stream = TextStream(Detokenizer(decode, [STOP], 100), got.append)
    for t in ids[:4]:
        stream.push(t)
    sent = "".join(got)
    stream.restart()  # the retry produces the same answer from its first token
    for t in ids:
        stream.push(t)
    stream.finish(decode(ids).strip())
    assert sent and "".join(got) == "one two three four"
    diverging = TextStream(Detokenizer(decode, [STOP], 100), got.append)
    diverging.push(ids[0])
    before = len(got)
    diverging.restart()
    with caplog.at_level(logging.WARNING):
        for t in byte_level.encode("zebra", add_special_tokens=False):
            diverging.push(t)
    assert len(got) == before and "differs" in caplog.text  # nothing of a different retried answer is sent
