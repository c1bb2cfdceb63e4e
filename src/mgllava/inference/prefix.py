"""Prefix reuse across turns: the KV cache of finished requests, reused by later prompts that extend them.

    content: the sequence's token ids, each visual placeholder replaced by a negative id derived from its
             image's content key (`content_ids`), so that equal content means equal text and equal images
    finished row (content C, K/V for C) --put--> entry;  prompt P --lookup--> (entry, m): P[:m] == C[:m]

A conversation's later turn re-sends the whole conversation, so its prompt starts with the earlier prompt
(image rows included) and, up to re-tokenization of the answer text, the earlier answer: the longest common
prefix with a cached entry is reused and only the rest is prefilled. The match never covers the whole
prompt (its last token is prefilled, to give the first new token's logits), and matches shorter than
`min_tokens` (`MIN_REUSE` unless set) are not reused: such rows are prefilled with the other new ones in one batched forward.
A row that reuses a prefix is prefilled alone (an extra forward, which streams all the weights once), so a
match must save more than that costs; and every prompt shares its chat template's system prompt with every
other (vicuna's is ~40 Llama tokens, 62 of the tiny test tokenizer's), which must not count as a match. At
128 tokens a second turn that shares an image (576 rows at the paper's sizes) is always reused, and a new
conversation never is merely for its template.

Finding the entry: every entry is indexed by the digests of its content's first 1, 2, ... blocks of `BLOCK`
tokens (each digest chains the previous); a lookup walks the prompt's block digests to the deepest one
shared with an entry and measures the exact common prefix of the entries indexed there (those sharing the
most blocks; usually one), so its cost does not grow with the number of entries.
Entries hold one (1, kv_heads, n, head_dim) key and value tensor per layer, on the model's device, and are
bounded by bytes (LRU, as the feature cache). An entry that a newer one extended (the newer sequence reused
its prefix) is dropped: what remains of it is an answer's tail that the next turn re-tokenized differently.
Used by the thread that holds the engine's model lock.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from ..utils.hashing import chained, digest
from .cache import LRUCache

KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values (1, kv_heads, n, head_dim)
BLOCK = 16  # tokens per indexed block
MIN_REUSE = 8 * BLOCK  # shorter common prefixes are recomputed (batched with the other new rows)


class Visual(Protocol):
    key: str  # content digest of the image's tensors and boxes
    rows: int  # its visual rows (placeholder tokens)


def content_ids(input_ids: Sequence[int], frames: Sequence[Visual], placeholder: int) -> torch.Tensor:
    """(n,) int64 on the CPU: `input_ids` with image j's placeholder run replaced by a negative id of its key."""
    content = torch.tensor(list(input_ids), dtype=torch.long)
    where = (content == placeholder).nonzero().flatten()
    if sum(f.rows for f in frames) != where.numel():
        raise ValueError(
            f"the prompt has {where.numel()} placeholder tokens but its images have "
            f"{sum(f.rows for f in frames)} visual rows"
        )
    start = 0
    for frame in frames:
        content[where[start : start + frame.rows]] = -1 - int(frame.key[:15], 16)
        start += frame.rows
    return content


def common_prefix(a: torch.Tensor, b: torch.Tensor) -> int:
    n = min(a.numel(), b.numel())
    differ = (a[:n] != b[:n]).nonzero()
    return int(differ[0]) if differ.numel() else n


@dataclass
class PrefixEntry:
    content: torch.Tensor  # (n,) int64, CPU
    kv: KV
    blocks: list[str]  # `_chain(content)`

    @property
    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for pair in self.kv for t in pair)


class PrefixCache:
    """`lookup` the longest cached prefix of a prompt; `put` a finished sequence's KV cache."""

    def __init__(self, max_bytes: int, min_tokens: int = MIN_REUSE) -> None:
        if min_tokens < BLOCK:
            raise ValueError(f"min_tokens must be >= {BLOCK} (entries are found by blocks of {BLOCK} tokens), "
                             f"got {min_tokens}")  # fmt: skip
        self.min_tokens = min_tokens
        self.entries: LRUCache[PrefixEntry] = LRUCache(
            max_bytes, size_of=lambda e: e.bytes, on_evict=self._forget
        )
        self._index: dict[str, set[str]] = {}  # block-chain digest -> keys of the entries starting with it
        self.hits = 0
        self.misses = 0
        self.reused_tokens = 0  # prompt tokens whose K/V came from an entry

    def lookup(self, prompt: torch.Tensor) -> tuple[PrefixEntry | None, int, str | None]:
        """The entry sharing the longest prefix with `prompt` (at most all but its last token), that prefix's
        length and the entry's key; (None, 0, None) when none shares `min_tokens` tokens."""
        candidates: set[str] = set()
        for block in _chain(prompt[: prompt.numel() - 1]):
            keys = self._index.get(block)
            if not keys:
                break
            candidates = keys
        key, length = None, 0
        for candidate in sorted(candidates):  # they share as many blocks; one may extend further
            entry = self.entries.peek(candidate)
            m = min(common_prefix(prompt, entry.content), prompt.numel() - 1) if entry is not None else 0
            if m > length:
                key, length = candidate, m
        entry = self.entries.get(key) if key is not None else None  # marks it recently used
        if entry is None or length < self.min_tokens:
            self.misses += 1
            return None, 0, None
        self.hits += 1
        self.reused_tokens += length
        return entry, length, key

    def fits(self, nbytes: int) -> bool:
        """Whether an entry of `nbytes` can be kept at all (checked before its K/V are copied)."""
        return nbytes <= self.entries.max_bytes

    def put(self, content: torch.Tensor, kv: KV, extends: str | None = None) -> None:
        """Keep `kv` (K/V for every token of `content`); drop the entry `extends` whose prefix it reused."""
        if extends is not None:
            self.drop(extends)
        if content.numel() < self.min_tokens:
            return
        key = digest(content)
        entry = PrefixEntry(content, kv, _chain(content))
        for block in entry.blocks:  # before the put, which may refuse the entry (and forget it)
            self._index.setdefault(block, set()).add(key)
        self.entries.put(key, entry)

    def drop(self, key: str) -> None:
        entry = self.entries.pop(key)
        if entry is not None:
            self._forget(key, entry)

    def clear(self) -> None:
        self.entries.clear()
        self._index.clear()

    def _forget(self, key: str, entry: PrefixEntry) -> None:
        for block in entry.blocks:
            keys = self._index.get(block)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self._index[block]

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def bytes(self) -> int:
        return self.entries.bytes


def _chain(content: torch.Tensor) -> list[str]:
    """Digests of the first 1, 2, ... full blocks of `content`, each chaining the one before."""
    return chained(content.numpy().tobytes(), BLOCK * content.element_size())
