"""Continuous batching: one running batch of requests, advanced one token per step, that requests join and
leave between steps.

    admit(requests):  prefill the new rows (without a cached prefix: together, left-padded, their visual rows
                      spliced at the placeholders by the model's forward; extending a cached prefix: each
                      alone, only its new tokens) -> each row's first token -> their K/V are written into
                      the running cache's spare rows, right-aligned (a longer prompt widens it to the left).
                      A request that cannot start fails alone (a failed shared prefill is retried row by row)
    step():           one decode step over all rows: tokens (B, 1), per-row positions (B, 1), padding mask
                      (B, L + 1) -> each row's next token -> finished rows leave at once
    finished rows:    stop token, `max_new_tokens` or cancelled; their K/V go to the prefix cache, their rows
                      leave the cache and the columns that are padding in every remaining row are dropped, so
                      the cache grows and shrinks with its requests

Cache layout: `kv.BatchCache`, a transformers `Cache` of `DynamicLayer`s that change in place (rows join and
leave, columns are appended and dropped without rebuilding it), each (B, kv_heads, L, head_dim).
Row i's tokens fill its last `length_i` columns (left padding), position p at column L - length_i + p, so
sliding-window masks (index differences) stay right. Greedy rows pick the argmax of the float32 logits after
the generation config's suppressed tokens, as `generate` does: the same tokens as running the request alone.

Sampling (temperature > 0): temperature, top-k (the generation config's, or `generate`'s default 50) and
top-p filter the row's logits, as `generate` does, and the token is drawn from their softmax. A row with a
seed draws from its own `torch.Generator(seed)`, so its answer depends only on the request (prompt, settings,
seed), not on what else shares the batch, and equals what the static engine's `torch.manual_seed(seed)` plus
`generate` alone gives (same logits up to float rounding of the batched matmuls). A row without a seed draws
from torch's global generator.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from transformers import (
    LogitsProcessorList,
    SuppressTokensLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPooling

from .kv import BatchCache
from .prefix import KV, PrefixEntry, content_ids
from .streaming import Detokenizer, TextCallback, TextStream

if TYPE_CHECKING:
    from .engine import ChatResult, Engine, GenerationSettings, Prepared

logger = logging.getLogger(__name__)

DEFAULT_TOP_K = 50  # transformers' `generate` default when the generation config sets none


@dataclass
class Request:
    """One request for the running batch; `owner` is the caller's handle, given back with its result."""

    prepared: Prepared
    on_text: TextCallback | None = None
    cancelled: Callable[[], bool] | None = None
    owner: Any = None


class Sampler:
    """Temperature, top-k and top-p filtering and a draw, for one sampled row."""

    def __init__(self, settings: GenerationSettings, top_k: int, device: torch.device) -> None:
        warpers: list[Any] = []
        if settings.temperature != 1.0:
            warpers.append(TemperatureLogitsWarper(settings.temperature))
        if top_k:
            warpers.append(TopKLogitsWarper(top_k))
        if settings.top_p < 1.0:
            warpers.append(TopPLogitsWarper(settings.top_p))
        self.warpers = LogitsProcessorList(warpers)
        self.generator = None
        if settings.seed is not None:
            self.generator = torch.Generator(device=device).manual_seed(settings.seed)

    def __call__(self, scores: torch.Tensor) -> int:
        """`scores`: (1, V) float32 after suppression."""
        probs = self.warpers(None, scores).softmax(dim=-1)
        return int(torch.multinomial(probs, num_samples=1, generator=self.generator))


@dataclass(eq=False)
class Row:
    request: Request
    content: torch.Tensor  # the prompt's content ids (`prefix.content_ids`)
    stream: TextStream
    sampler: Sampler | None  # None: greedy
    generated: list[int] = field(default_factory=list)
    extends: str | None = None  # the prefix-cache entry whose K/V it started from
    length: int = 0  # tokens whose K/V are in the cache: the prompt and all generated tokens but the last
    reason: str | None = None  # why it finished: "stop", "length" or "cancelled"

    @property
    def prepared(self) -> Prepared:
        return self.request.prepared


@dataclass
class Prefilled:
    """New rows after their prefill, not yet joined: their cache (k rows) and last logits (k, V)."""

    rows: list[Row]
    cache: Cache
    logits: torch.Tensor


class RunningBatch:
    """The rows being decoded together and their batched KV cache. Not thread-safe: one owner thread calls
    `admit` and `step` (each takes the engine's model lock for its duration)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.model = engine.model
        self.device = engine.model.device
        self.stop_ids = set(engine.processor.stop_token_ids)
        gen = engine.model.generation_config
        self.suppress = SuppressTokensLogitsProcessor(list(gen.suppress_tokens or []), device=self.device)
        self.top_k = gen.top_k if gen.top_k is not None else DEFAULT_TOP_K
        self.rows: list[Row] = []
        self.cache: BatchCache | None = None
        self.prefilled_tokens = 0  # prompt tokens computed (the others came from the prefix cache)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def columns(self) -> int:
        return 0 if self.cache is None else self.cache.columns

    # -- admitting ------------------------------------------------------------------------------------------
    def admit(self, requests: Sequence[Request]) -> list[tuple[Any, ChatResult | Exception]]:
        """Prefill `requests` and add them to the batch. Returns (owner, result) for the requests that ended
        already (cancelled before they started, a stop token first, `max_new_tokens` 1) and (owner, error)
        for those that could not start (each fails alone; the running rows are untouched)."""
        out: list[tuple[Any, ChatResult | Exception]] = []
        rows = []
        for request in requests:
            try:
                rows.append(self._row(request))
            except Exception as err:  # handed to the request's caller
                out.append((request.owner, err))
        for row in rows:
            if row.request.cancelled is not None and row.request.cancelled():
                row.reason = "cancelled"
                out.append(self._result(row))
        with self.engine._model_lock, torch.no_grad():
            parts = self._prefill([row for row in rows if row.reason is None], out)
            for part in parts:
                self._accept(part.rows, part.logits)
                self._join(part)
            return out + self._release()

    def _row(self, request: Request) -> Row:
        engine, prepared = self.engine, request.prepared
        settings = prepared.settings
        detokenizer = Detokenizer(engine.decode, engine.processor.stop_token_ids, settings.max_new_tokens)
        content = content_ids(prepared.input_ids, prepared.frames, engine.model.config.image_token_id)
        sampler = Sampler(settings, self.top_k, self.device) if settings.sampled else None
        return Row(request, content, TextStream(detokenizer, request.on_text), sampler)

    def _prefill(self, rows: list[Row], failed: list[tuple[Any, Exception]]) -> list[Prefilled]:
        """Rows without a cached prefix in one left-padded forward, the others one by one. A row that fails
        goes to `failed` (when the shared forward fails, each of its rows is retried alone to find which)."""
        fresh, parts = [], []
        for row in rows:
            entry, reused, row.extends = (
                self.engine.prefixes.lookup(row.content) if self.engine.prefixes else (None, 0, None)
            )
            if entry is None:
                fresh.append(row)
            else:
                parts += self._attempt(failed, [row], self._prefill_after, row, entry, reused)
        if len(fresh) > 1:
            try:
                return [self._prefill_fresh(fresh), *parts]
            except Exception:
                logger.exception("the prefill of %d requests failed; retrying them one by one", len(fresh))
        for row in fresh:
            parts += self._attempt(failed, [row], self._prefill_fresh, [row])
        return parts

    @staticmethod
    def _attempt(
        failed: list, rows: list[Row], prefill: Callable[..., Prefilled], *args: Any
    ) -> list[Prefilled]:
        try:
            return [prefill(*args)]
        except Exception as err:  # handed to the request's caller
            failed += [(row.request.owner, err) for row in rows]
            return []

    def _prefill_fresh(self, rows: list[Row]) -> Prefilled:
        ids, mask = self.engine.left_pad([r.prepared.input_ids for r in rows])  # (k, L)
        visual = self.engine.visual_rows([f for r in rows for f in r.prepared.frames])
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # per row 0.. over its real tokens
        cache, logits = self._forward(ids, mask, position_ids, DynamicCache(), visual)
        for row in rows:
            row.length = len(row.prepared.input_ids)
        self.prefilled_tokens += sum(r.length for r in rows)
        return Prefilled(rows, cache, logits)

    def _prefill_after(self, row: Row, entry: PrefixEntry, reused: int) -> Prefilled:
        """Prefill `row` after the first `reused` tokens of `entry` (its K/V copied, the entry kept)."""
        ids = row.prepared.input_ids
        cache = DynamicCache(ddp_cache_data=[(k[:, :, :reused], v[:, :, :reused]) for k, v in entry.kv])
        visual = self._visual_rows_after(row.prepared, reused)
        n = len(ids)
        new = torch.tensor([ids[reused:]], dtype=torch.long, device=self.device)  # (1, n - reused)
        mask = torch.ones((1, n), dtype=torch.long, device=self.device)
        position_ids = torch.arange(reused, n, device=self.device).unsqueeze(0)
        cache, logits = self._forward(new, mask, position_ids, cache, visual)
        row.length = n
        self.prefilled_tokens += n - reused
        return Prefilled([row], cache, logits)

    def _visual_rows_after(self, prepared: Prepared, reused: int) -> list[torch.Tensor]:
        """The visual rows of the placeholders after the first `reused` tokens (an image may be cut). Images
        wholly inside the prefix are not encoded; their cached features are marked used, so that a live
        conversation's features outlive its (larger, earlier evicted) prefix entries."""
        covered = sum(1 for t in prepared.input_ids[:reused] if t == self.model.config.image_token_id)
        needed, skip, start = [], [], 0
        for frame in prepared.frames:
            if start + frame.rows <= covered:
                self.engine.features.get(frame.key)
            else:
                needed.append(frame)
                skip.append(max(0, covered - start))
            start += frame.rows
        rows = self.engine.visual_rows(needed)
        return [r[k:] for r, k in zip(rows, skip, strict=True)]

    def _forward(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor,
        position_ids: torch.Tensor,
        cache: Cache,
        visual: list[torch.Tensor] | None = None,
    ) -> tuple[Cache, torch.Tensor]:
        """One forward of the composite model (it splices `visual` at the placeholders of `ids`): the grown
        cache and the last position's logits (k, V)."""
        image = {"image": BaseModelOutputWithPooling(pooler_output=visual)} if visual else None
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
            mm_encoder_outputs=image,
        )
        return out.cache, out.logits[:, -1]

    def _join(self, part: Prefilled) -> None:
        """Append the prefilled rows to the batch (right-aligned in the batch cache's window)."""
        if self.cache is None:
            self.cache = BatchCache(len(part.cache.layers))
        self.cache.add_rows(part.cache)
        self.rows += part.rows

    # -- decoding -------------------------------------------------------------------------------------------
    def step(self) -> list[tuple[Any, ChatResult]]:
        """One decode step over every running row; returns the (owner, result) of rows that finished (the
        ones cancelled since the last step first). On an error the batch is in an unknown state: `abort`."""
        with self.engine._model_lock, torch.no_grad():
            for row in self.rows:
                if row.request.cancelled is not None and row.request.cancelled():
                    row.reason = "cancelled"
            finished = self._release()
            if not self.rows:
                return finished
            tokens = torch.tensor(
                [[r.generated[-1]] for r in self.rows], dtype=torch.long, device=self.device
            )
            lengths = torch.tensor([r.length for r in self.rows], dtype=torch.long, device=self.device)
            width = self.columns + 1
            mask = torch.arange(width, device=self.device) >= (width - 1 - lengths)[:, None]  # (B, L + 1)
            _, logits = self._forward(tokens, mask.long(), lengths[:, None], self.cache)
            for row in self.rows:
                row.length += 1
            self._accept(self.rows, logits)
            return finished + self._release()

    def _accept(self, rows: list[Row], logits: torch.Tensor) -> None:
        """Choose each row's next token from its (V,) logits; stream it; mark the rows that are done."""
        scores = self.suppress(None, logits.float())  # (k, V)
        tokens = scores.argmax(dim=-1).tolist()
        for i, row in enumerate(rows):
            token = tokens[i] if row.sampler is None else row.sampler(scores[i : i + 1])
            row.generated.append(token)
            row.stream.push(token)
            if token in self.stop_ids:
                row.reason = "stop"
            elif len(row.generated) >= row.prepared.settings.max_new_tokens:
                row.reason = "length"

    def _release(self) -> list[tuple[Any, ChatResult]]:
        """Finished rows leave: their K/V to the prefix cache, their cache rows and all-padding columns go."""
        done = [i for i, row in enumerate(self.rows) if row.reason is not None]
        if not done:
            return []
        results = []
        for i in done:
            self._remember(i)
            results.append(self._result(self.rows[i]))
        order = self.cache.remove_rows(done)
        self.rows = [self.rows[i] for i in order]
        if not self.rows:
            self.cache = None  # an idle batch holds no storage
            return results
        self.cache.drop_front(self.columns - max(r.length for r in self.rows))
        return results

    def _remember(self, i: int) -> None:
        """Store row i's K/V (its prompt and all generated tokens but the last) in the prefix cache."""
        row, prefixes = self.rows[i], self.engine.prefixes
        if prefixes is None:
            return
        first = self.columns - row.length
        kv: KV = [
            (x.keys[i : i + 1, :, first:].clone(), x.values[i : i + 1, :, first:].clone())
            for x in self.cache.layers
        ]
        content = torch.cat([row.content, torch.tensor(row.generated[:-1], dtype=torch.long)])
        prefixes.put(content, kv, extends=row.extends)

    def _result(self, row: Row) -> tuple[Any, ChatResult]:
        return row.request.owner, self.engine.answer(row.prepared, row.generated, row.stream, row.reason)

    def abort(self) -> list[Any]:
        """Drop every row (after a failed step); returns their owners."""
        owners = [row.request.owner for row in self.rows]
        self.rows, self.cache = [], None
        return owners
