"""Token streams: per-row incremental text, and (for the static engine) per-row limits and cancellation.

Each request's text goes through one `TextStream` (a `Detokenizer` plus the caller's callback; a failing
callback loses its stream, not the batch). The continuous engine pushes each row's token to its stream as
it is chosen. The static engine runs transformers' `generate`, which hands its streamer one token per row
per step, `put(tokens (B,))`, after a first `put(prompt (B, L))`: `BatchStreamer` splits those over the
rows' streams, and `RowLimits` (a `StoppingCriteria`) ends each row at its own `max_new_tokens` or when
its caller cancels, so requests with different limits share one `generate`.

A `Detokenizer` emits only text that will not change: the answer is `decode(ids).strip()` up to the
template's stop token (what `MGLlavaProcessor.decode_answer` returns), so trailing whitespace and a
trailing incomplete UTF-8 sequence (U+FFFD) are held back until more text follows. The concatenation of
the emitted pieces equals the final answer whenever decoding a prefix of the ids gives a prefix of the
text (true of byte-level BPE, and of SentencePiece where its byte-fallback pieces form characters);
otherwise it emits what it safely can. It decodes a window of the last few ids per token, not the whole
answer, and emits the same pieces as decoding the whole answer at every token did (tested on random ids of
both kinds of tokenizer, tests/inference/test_streaming.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers import StoppingCriteria
from transformers.generation.streamers import BaseStreamer

logger = logging.getLogger(__name__)

TextCallback = Callable[[str], None]


class Detokenizer:
    """Incremental answer text of one sequence; `push` returns the new text (possibly empty).

    Each push decodes only a window of ids, `ids[prefix:]`, and takes its text past that of
    `ids[prefix:read]` (as vLLM's incremental detokenizer does); the window moves on
    (`prefix, read = read, len(ids)`) once it has new text that does not end in an incomplete UTF-8 sequence
    (U+FFFD), so a window always starts on a character boundary with a token that has text, and that first
    token's text (where a SentencePiece word start loses its space) is never taken. The work per token is that
    of its window, not of the whole answer.
    """

    def __init__(self, decode: Callable[[list[int]], str], stop_ids: Sequence[int], limit: int) -> None:
        self.decode = decode  # ids -> text, special tokens skipped
        self.stop_ids = set(stop_ids)
        self.limit = limit
        self.emitted: list[str] = []  # the pieces delivered so far, over every run (`restart`)
        self.done = False
        self._reset()

    def _reset(self) -> None:
        self.ids: list[int] = []
        self.prefix = self.read = 0  # window ids[prefix:], of which ids[prefix:read] are read
        self.held = ""  # text of ids[:read] not yet emitted
        self.ahead = 0  # characters of the unread text already emitted (then `held` is empty)
        self.started = False  # a non-space character was emitted in this run
        self.replay = ""  # text delivered by an earlier run, emitted again only past its end
        self.diverged = False

    def restart(self) -> None:
        """Decode from the first token again without re-sending what was delivered: the new run's text is
        emitted only past it (nothing more if the new run's text differs from it)."""
        self._reset()
        self.replay = "".join(self.emitted)
        self.done = False

    def push(self, token: int) -> str:
        if self.done:
            return ""
        if token in self.stop_ids:
            self.done = True
            return ""
        self.ids.append(token)
        self.done = len(self.ids) >= self.limit
        unread = self._unread()
        rest = self.held + unread[self.ahead :]
        delta, consumed = self._stable_part(rest)
        if unread and not unread.endswith("\ufffd"):  # new text ending on a character boundary: read
            self.held, self.ahead = rest[consumed:], 0
            self.prefix, self.read = self.read, len(self.ids)
        elif consumed <= len(self.held):
            self.held = self.held[consumed:]
        else:
            self.ahead += consumed - len(self.held)
            self.held = ""
        return self._deliver(delta)

    def _unread(self) -> str:
        """The text of the window `ids[prefix:]` past that of `ids[prefix:read]`. A tokenizer whose text of the
        window does not extend that of its read part (clean-up of spaces across tokens) gets the whole answer
        decoded again for this token."""
        window = self.decode(self.ids[self.prefix :])
        read = self.decode(self.ids[self.prefix : self.read]) if self.read > self.prefix else ""
        if not window.startswith(read) and self.prefix > 0:
            window = self.decode(self.ids)
            read = self.decode(self.ids[: self.read])
        return window[len(read) :]

    def _stable_part(self, rest: str) -> tuple[str, int]:
        """The part of `rest` (the text past what was emitted) that will not change, and how many characters
        of `rest` it uses up: the answer is `text.strip()`, so trailing spaces (and a trailing U+FFFD) wait,
        and leading spaces are dropped."""
        stable = rest.rstrip("\ufffd")
        if self.started:
            delta = stable.rstrip()
            return delta, len(delta)
        delta = stable.strip()
        self.started = bool(delta)
        return delta, len(stable) - len(stable.lstrip()) + len(delta)

    def _deliver(self, delta: str) -> str:
        """Emit `delta` of this run, past the text an earlier run already delivered."""
        if self.replay:
            n = min(len(delta), len(self.replay))
            if delta[:n] != self.replay[:n]:
                self.diverged = True
                logger.warning("a retried answer differs from the text already sent: %r", self.replay[:n])
            self.replay, delta = self.replay[n:], delta[n:]
        if self.diverged or not delta:
            return ""
        self.emitted.append(delta)
        return delta

    def finish(self, final: str) -> str:
        """The rest of the answer once generation ended (`final` is the full answer text)."""
        self.done = True
        emitted = "".join(self.emitted)
        if not final.startswith(emitted):
            if len(final) >= len(emitted):
                logger.warning("decoded text changed under the stream: %r -> %r", emitted, final)
            return ""
        delta = final[len(emitted) :]
        if delta:
            self.emitted.append(delta)
        return delta


class TextStream:
    """One answer's text as its tokens arrive, handed to `callback` (None: nobody listens)."""

    def __init__(self, detokenizer: Detokenizer, callback: TextCallback | None) -> None:
        self.detokenizer = detokenizer
        self.callback = callback

    def push(self, token: int) -> None:
        self._deliver(self.detokenizer.push(token))

    def restart(self) -> None:
        """Decode the answer again from its first token (a retry) without re-sending the text already
        delivered: the new text is emitted only past it."""
        self.detokenizer.restart()

    def finish(self, text: str) -> None:
        """The answer ended as `text`: send whatever of it the stream still held back."""
        self._deliver(self.detokenizer.finish(text))

    def _deliver(self, delta: str) -> None:
        """A failing consumer (a closed pipe, a gone event loop) loses its stream, not the whole batch."""
        if not delta or self.callback is None:
            return
        try:
            self.callback(delta)
        except Exception:
            logger.exception("a text callback failed; its stream is dropped")
            self.callback = None


class BatchStreamer(BaseStreamer):
    """Routes each row's new tokens out of `generate` to the row's `TextStream`."""

    def __init__(self, streams: list[TextStream]) -> None:
        self.streams = streams
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() first hands over the prompt (B, L)
            self.prompt_seen = True
            return
        for stream, token in zip(self.streams, value.reshape(-1).tolist(), strict=True):
            stream.push(int(token))

    def end(self) -> None:
        """Nothing to flush here: the engine calls each stream's `finish` with the row's final text."""


class RowLimits(StoppingCriteria):
    """Row i is done once it generated `limits[i]` tokens or `cancelled[i]()` says so."""

    def __init__(
        self, prompt_length: int, limits: list[int], cancelled: list[Callable[[], bool] | None]
    ) -> None:
        self.prompt_length = prompt_length
        self.limits = torch.tensor(limits, dtype=torch.long)
        self.cancelled = cancelled

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        generated = input_ids.shape[1] - self.prompt_length
        done = generated >= self.limits
        stop = torch.tensor([bool(c is not None and c()) for c in self.cancelled], dtype=torch.bool)
        return (done | stop).to(input_ids.device)
