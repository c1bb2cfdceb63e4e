"""A thread-safe LRU cache bounded by total bytes, for per-image visual rows, proposed boxes and the KV
cache of earlier turns (`prefix.PrefixCache`).

Keys are content digests (`utils.hashing.digest`), so the same image given as a path, bytes or a data URL hits the
same entry, and a conversation's images are encoded once however many turns re-send them.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import torch

from ..utils.hashing import digest

__all__ = ["LRUCache", "digest", "tensor_bytes"]

V = TypeVar("V")


def tensor_bytes(value: Any) -> int:
    return value.numel() * value.element_size() if isinstance(value, torch.Tensor) else 1024


class LRUCache(Generic[V]):
    """`get`/`put` by key; evicts least recently used entries beyond `max_bytes` (as sized by `size_of`),
    telling `on_evict(key, value)` (called under the cache's lock: keep it short, do not call back in)."""

    def __init__(
        self,
        max_bytes: int,
        size_of: Callable[[V], int] = tensor_bytes,
        on_evict: Callable[[str, V], None] | None = None,
    ) -> None:
        self.max_bytes = max_bytes
        self.size_of = size_of
        self.on_evict = on_evict
        self._items: OrderedDict[str, tuple[V, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> V | None:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return item[0]

    def peek(self, key: str) -> V | None:
        """The value under `key` without counting it as a use (or a hit)."""
        with self._lock:
            item = self._items.get(key)
            return None if item is None else item[0]

    def put(self, key: str, value: V) -> None:
        size = self.size_of(value)
        with self._lock:
            if key in self._items:
                self._bytes -= self._items.pop(key)[1]
            if size > self.max_bytes:
                if self.on_evict is not None:
                    self.on_evict(key, value)
                return
            self._items[key] = (value, size)
            self._bytes += size
            while self._bytes > self.max_bytes:
                old, (gone, dropped) = self._items.popitem(last=False)
                self._bytes -= dropped
                if self.on_evict is not None:
                    self.on_evict(old, gone)

    def pop(self, key: str) -> V | None:
        with self._lock:
            item = self._items.pop(key, None)
            if item is None:
                return None
            self._bytes -= item[1]
            return item[0]

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0

    def __len__(self) -> int:
        return len(self._items)

    @property
    def bytes(self) -> int:
        return self._bytes
