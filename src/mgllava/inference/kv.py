"""The running batch's KV cache: transformers' `Cache` of `SlotLayer`s, `DynamicLayer`s that change in place.

    storage (row capacity, kv_heads, column capacity, head_dim)
    keys / values = storage[:rows, :, start:end]      (B, kv_heads, L, head_dim), what attention reads

Row i's tokens fill the last `length_i` columns of the window (left padding). transformers' `DynamicLayer`
concatenates the whole cache with each new column (a full copy per layer per decode step), and rebuilding a
`DynamicCache` whenever a request joins or leaves copies it again; at 32 rows of ~200 tokens, avoiding those
copies took a steady-state run of 96 requests on this project's CPU bench from 86 s to 63 s. A `SlotLayer`
instead
- appends a decode step's column in place (`update`), into spare columns;
- takes new rows (`add_rows`) into spare rows, right-aligned in the window (which widens to the left when
  a new row is longer);
- removes rows (`remove_rows`) by moving the last rows into the gaps (one row copied per removed row);
- forgets leading columns that are padding in every row by moving `start` (`drop_front`).
Storage is reallocated (an amortized copy) only when rows or columns run out. Padding columns hold zeros:
storage is zero-filled when allocated, and a joining row's padding, like the columns a wider window adds
to the rows already there, is zeroed, because those slots may hold a departed row's stale K/V. The padding
mask removes them from attention, but only finite values can be removed: attention computes 0 x NaN = NaN
for a masked column, so one failed row's NaN K/V left in storage would poison the row that next takes its
slot. A failed decode step is undone with `truncate` (the columns it appended are forgotten).
Everything else (masks, `get_seq_length`, the attention's view of `keys`/`values`) is the `DynamicLayer`
contract, so the model's own forward runs on it unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicLayer

HEADROOM = 64  # spare columns at least, when storage is (re)allocated


def _spare(n: int) -> int:
    return max(HEADROOM, n // 4)


class SlotLayer(DynamicLayer):
    def __init__(self) -> None:
        super().__init__()
        self._keys: torch.Tensor | None = None
        self._values: torch.Tensor | None = None
        self.rows = 0
        self.start = self.end = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device, self.is_initialized = key_states.device, True

    # -- storage --------------------------------------------------------------------------------------------
    def _view(self) -> None:
        self.keys = self._keys[: self.rows, :, self.start : self.end]
        self.values = self._values[: self.rows, :, self.start : self.end]

    def _relayout(self, like: torch.Tensor, rows: int, columns: int, offset: int) -> None:
        """New zeroed storage for at least `rows` rows and `columns` columns; the window moves to column
        `offset` (> 0: room for a wider window on its left)."""
        shape = (rows + rows // 2, like.shape[1], columns + _spare(columns), like.shape[3])
        keys, values = like.new_zeros(shape), like.new_zeros(shape)
        width = self.end - self.start
        if self._keys is not None and self.rows:
            keys[: self.rows, :, offset : offset + width] = self.keys
            values[: self.rows, :, offset : offset + width] = self.values
        self._keys, self._values = keys, values
        self.start, self.end = offset, offset + width
        self._view()

    # -- what the model calls -------------------------------------------------------------------------------
    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append columns (every row gets one each)."""
        if self._keys is None:
            self.lazy_initialization(key_states, value_states)
            self.rows = key_states.shape[0]
            self._relayout(key_states, self.rows, key_states.shape[2], 0)
        if key_states.shape[0] != self.rows:
            raise ValueError(f"the cache holds {self.rows} rows but the step brings {key_states.shape[0]}")
        n = key_states.shape[2]
        if self.end + n > self._keys.shape[2]:
            self._relayout(key_states, self.rows, self.end - self.start + n, 0)
        self._keys[: self.rows, :, self.end : self.end + n] = key_states
        self._values[: self.rows, :, self.end : self.end + n] = value_states
        self.end += n
        self._view()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.end - self.start

    # -- what the running batch calls -----------------------------------------------------------------------
    def add_rows(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Append rows (k, kv_heads, n, head_dim), right-aligned: their last column is the window's last."""
        k, n = keys.shape[0], keys.shape[2]
        if self._keys is None:
            self.lazy_initialization(keys, values)
            self._relayout(keys, k, n, 0)
        width = max(self.end - self.start, n)
        if self.rows + k > self._keys.shape[0] or self.end - width < 0:
            self._relayout(keys, self.rows + k, width, width - (self.end - self.start))
        start = min(self.start, self.end - n)
        for storage, new in ((self._keys, keys), (self._values, values)):
            storage[: self.rows, :, start : self.start] = 0  # the columns a wider window adds
            storage[self.rows : self.rows + k, :, start : self.end - n] = 0  # the new rows' padding
            storage[self.rows : self.rows + k, :, self.end - n : self.end] = new
        self.start = start
        self.rows += k
        self._view()

    def move_row(self, source: int, target: int) -> None:
        self._keys[target, :, self.start : self.end] = self._keys[source, :, self.start : self.end]
        self._values[target, :, self.start : self.end] = self._values[source, :, self.start : self.end]

    def drop_front(self, columns: int) -> None:
        """Forget the first `columns` columns of the window."""
        self.start = min(self.end, self.start + columns)
        self._view()

    # -- the rest of the DynamicLayer contract --------------------------------------------------------------
    def crop(self, tokens_to_remove: int) -> None:
        """Forget the last `-tokens_to_remove` columns (transformers' convention: a negative count)."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative number of columns to remove, got {tokens_to_remove}")
        if self._keys is not None:
            self.end = max(self.start, self.end + tokens_to_remove)
            self._view()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self._keys is not None:
            keys, values = self.keys[indices], self.values[indices]
            self.rows = 0
            self.start = self.end
            self.add_rows(keys, values)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self._keys is not None:
            self.batch_select_indices(torch.arange(self.rows, device=self.device).repeat_interleave(repeats))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx)

    def reset(self) -> None:
        self._keys = self._values = self.keys = self.values = None
        self.rows = self.start = self.end = 0
        self.is_initialized = False


class BatchCache(Cache):
    """The running batch's cache: rows join (`add_rows`) and leave (`remove_rows`), and leading columns that
    are padding in every row are dropped (`drop_front`), without rebuilding the whole cache."""

    def __init__(self, num_layers: int) -> None:
        super().__init__(layers=[SlotLayer() for _ in range(num_layers)])

    @property
    def rows(self) -> int:
        return self.layers[0].rows

    @property
    def columns(self) -> int:
        return self.layers[0].get_seq_length()

    def add_rows(self, other: Cache) -> None:
        """Append `other`'s rows (any `Cache` with one `keys`/`values` per layer, e.g. a prefill's). All or
        nothing: if a layer fails (out of memory while growing), the layers that took the rows give them up."""
        before = [(layer.rows, layer.start) for layer in self.layers]
        try:
            for mine, theirs in zip(self.layers, other.layers, strict=True):
                mine.add_rows(theirs.keys, theirs.values)
        except BaseException:
            for layer, (rows, start) in zip(self.layers, before, strict=True):
                if layer._keys is not None:
                    layer.rows, layer.start = rows, start
                    layer._view()
            raise

    def truncate(self, columns: int) -> None:
        """Forget every column after the first `columns` of the window (undoes a failed step's appends)."""
        for layer in self.layers:
            if layer._keys is not None:
                layer.end = min(layer.end, layer.start + columns)
                layer._view()

    def remove_rows(self, removed: list[int]) -> list[int]:
        """Remove rows, moving the last rows into the gaps; returns the old index of each remaining row."""
        order = list(range(self.rows))
        for i in sorted(set(removed), reverse=True):
            last = len(order) - 1
            if i != last:
                for layer in self.layers:
                    layer.move_row(last, i)
                order[i] = order[last]
            order.pop()
        for layer in self.layers:
            layer.rows = len(order)
            layer._view()
        return order

    def drop_front(self, columns: int) -> None:
        for layer in self.layers:
            layer.drop_front(columns)
