"""Prefix reuse across turns: the KV cache of finished requests, reused by later prompts that extend them.

    content: the sequence's token ids, each visual placeholder replaced by a negative id derived from its
             image's content key (`content_ids`), so that equal content means equal text and equal images
    finished row (content C, K/V for C) --put--> entry;  prompt P --lookup--> (entry, m): P[:m] == C[:m]

A conversation's later turn re-sends the whole conversation, so its prompt starts with the earlier prompt
(image rows included) and, up to re-tokenization of the answer text, the earlier answer: the longest common
prefix with a cached entry is reused and only the rest is prefilled. The match never covers the whole
prompt (its last token is prefilled, to give the first new token's logits).

Entries hold one (1, kv_heads, n, head_dim) key and value tensor per layer, on the model's device. They are
bounded by bytes (LRU, as the feature cache). An entry that is a prefix of a newly stored one is dropped
(every prompt it matches, the longer entry matches at least as far). Lookup scans the entries (they are
few: the byte bound holds a handful of conversations per GiB at paper sizes) with one vector compare each.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from .cache import LRUCache, digest

KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values (1, kv_heads, n, head_dim)


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

    @property
    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for pair in self.kv for t in pair)


class PrefixCache:
    """`lookup` the longest cached prefix of a prompt; `put` a finished sequence's KV cache."""

    def __init__(self, max_bytes: int) -> None:
        self.entries: LRUCache[PrefixEntry] = LRUCache(max_bytes, size_of=lambda e: e.bytes)
        self.hits = 0
        self.misses = 0
        self.reused_tokens = 0  # prompt tokens whose K/V came from an entry

    def lookup(self, prompt: torch.Tensor) -> tuple[PrefixEntry | None, int]:
        """The entry sharing the longest prefix with `prompt` (at most all but its last token), and that
        prefix's length; (None, 0) when none shares a token."""
        best, best_key, length = None, None, 0
        for key, entry in self.entries.items():
            m = min(common_prefix(prompt, entry.content), prompt.numel() - 1)
            if m > length:
                best, best_key, length = entry, key, m
        if best_key is None:
            self.misses += 1
            return None, 0
        self.entries.get(best_key)  # mark it recently used
        self.hits += 1
        self.reused_tokens += length
        return best, length

    def put(self, content: torch.Tensor, kv: KV) -> None:
        """Keep `kv` (K/V for every token of `content`); drop entries that `content` extends."""
        if content.numel() == 0:
            return
        for key, entry in self.entries.items():
            if entry.content.numel() <= content.numel() and common_prefix(entry.content, content) == len(
                entry.content
            ):
                self.entries.pop(key)
        self.entries.put(digest(content), PrefixEntry(content, kv))

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def bytes(self) -> int:
        return self.entries.bytes
