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
text (true of byte-level BPE and SentencePiece tokenizers); otherwise it emits what it safely can.
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


def _stable(text: str) -> str:
    return text.rstrip("\ufffd").strip()


class Detokenizer:
    """Incremental answer text of one sequence; `push` returns the new text (possibly empty)."""

    def __init__(self, decode: Callable[[list[int]], str], stop_ids: Sequence[int], limit: int) -> None:
        self.decode = decode  # ids -> text, special tokens skipped
        self.stop_ids = set(stop_ids)
        self.limit = limit
        self.ids: list[int] = []
        self.emitted = ""
        self.done = False

    def push(self, token: int) -> str:
        if self.done:
            return ""
        if token in self.stop_ids:
            self.done = True
            return ""
        self.ids.append(token)
        self.done = len(self.ids) >= self.limit
        return self._advance(_stable(self.decode(self.ids)))

    def finish(self, final: str) -> str:
        """The rest of the answer once generation ended (`final` is the full answer text)."""
        self.done = True
        return self._advance(final)

    def _advance(self, text: str) -> str:
        if not text.startswith(self.emitted):
            if len(text) >= len(self.emitted):
                logger.warning("decoded text changed under the stream: %r -> %r", self.emitted, text)
            return ""
        delta = text[len(self.emitted) :]
        self.emitted = text
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
        self.detokenizer.ids, self.detokenizer.done = [], False

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
