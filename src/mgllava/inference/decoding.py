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
from transformers import SuppressTokensLogitsProcessor
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPooling

from .kv import BatchCache
from .prefix import KV, PrefixEntry, content_ids
from .requests import ChatResult, Prepared, failed
from .sampling import DEFAULT_TOP_K, NonFiniteLogits, Sampler, check_finite, penalize
from .streaming import Detokenizer, TextCallback, TextStream

if TYPE_CHECKING:
    from .engine import Engine

logger = logging.getLogger(__name__)


@dataclass
class Request:
    """One request for the running batch; `owner` is the caller's handle, given back with its result."""

    prepared: Prepared
    on_text: TextCallback | None = None
    cancelled: Callable[[], bool] | None = None
    owner: Any = None


@dataclass(eq=False)
class Row:
    request: Request
    content: torch.Tensor  # the prompt's content ids (`prefix.content_ids`)
    stream: TextStream
    sampler: Sampler | None  # None: greedy
    generated: list[int] = field(default_factory=list)
    extends: str | None = None  # the prefix-cache entry whose K/V it started from
    length: int = 0  # tokens whose K/V are in the cache: the prompt and all generated tokens but the last
    reason: str | None = None  # why it finished: "stop", "length", "cancelled" or "error"
    error: Exception | None = None  # why it failed (reason "error"): handed to its caller alone

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
                out.append((request.owner, failed(err)))
        for row in rows:
            if row.request.cancelled is not None and row.request.cancelled():
                row.reason = "cancelled"
                out.append(self._result(row))
        with self.engine._model_lock, torch.no_grad():
            parts = self._prefill([row for row in rows if row.reason is None], out)
            for part in parts:
                self._accept(part.rows, part.logits)
                try:
                    self._join(part)
                except Exception as err:  # the batch cache is unchanged (`BatchCache.add_rows`)
                    logger.exception("%d prefilled requests could not join the running batch", len(part.rows))
                    out += [(row.request.owner, failed(err)) for row in part.rows]
            return out + self._release()

    def _row(self, request: Request) -> Row:
        engine, prepared = self.engine, request.prepared
        settings = prepared.settings
        detokenizer = Detokenizer(engine.decode, engine.processor.stop_token_ids, settings.max_new_tokens)
        content = content_ids(prepared.input_ids, prepared.frames, engine.model.config.image_token_id)
        sampler = Sampler(settings, self.top_k, self.device) if settings.sampled else None
        return Row(request, content, TextStream(detokenizer, request.on_text), sampler)

    def _prefill(self, rows: list[Row], failures: list[tuple[Any, Exception]]) -> list[Prefilled]:
        """Rows without a cached prefix in one left-padded forward, the others one by one. A row that fails
        goes to `failures` (when the shared forward fails, each of its rows is retried alone to find which)."""
        fresh, parts = [], []
        for row in rows:
            entry, reused, row.extends = (
                self.engine.prefixes.lookup(row.content) if self.engine.prefixes else (None, 0, None)
            )
            if entry is None:
                fresh.append(row)
            else:
                parts += self._attempt(failures, [row], self._prefill_after, row, entry, reused)
        if len(fresh) > 1:
            try:
                return [self._prefill_fresh(fresh), *parts]
            except Exception:
                logger.exception("the prefill of %d requests failed; retrying them one by one", len(fresh))
        for row in fresh:
            parts += self._attempt(failures, [row], self._prefill_fresh, [row])
        return parts

    @staticmethod
    def _attempt(
        failures: list, rows: list[Row], prefill: Callable[..., Prefilled], *args: Any
    ) -> list[Prefilled]:
        try:
            return [prefill(*args)]
        except Exception as err:  # handed to the request's caller
            logger.warning("the prefill of a request failed: %s", err)
            failures += [(row.request.owner, failed(err)) for row in rows]
            return []

    def _prefill_fresh(self, rows: list[Row]) -> Prefilled:
        ids, mask = self.engine.left_pad([r.prepared.input_ids for r in rows])  # (k, L)
        visual = self.engine.visual_rows([f for r in rows for f in r.prepared.frames])
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # per row 0.. over its real tokens
        cache, logits = self._forward(rows, ids, mask, position_ids, DynamicCache(), visual)
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
        cache, logits = self._forward([row], new, mask, position_ids, cache, visual)
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
        rows: list[Row],
        ids: torch.Tensor,
        mask: torch.Tensor,
        position_ids: torch.Tensor,
        cache: Cache,
        visual: list[torch.Tensor] | None = None,
    ) -> tuple[Cache, torch.Tensor]:
        """One forward of the composite model for `rows` (it splices `visual` at the placeholders of `ids`):
        the grown cache and the last position's logits (k, V)."""
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
    def step(self) -> list[tuple[Any, ChatResult | Exception]]:
        """One decode step over every running row; returns the (owner, result) of rows that finished (the
        ones cancelled since the last step first) and (owner, error) of rows that failed. A failed batched
        forward is undone and each row is stepped alone, so only a row whose own step fails fails. Any other
        error leaves the batch in an unknown state: the caller must `abort` it."""
        with self.engine._model_lock, torch.no_grad():
            for row in self.rows:
                if row.request.cancelled is not None and row.request.cancelled():
                    row.reason = "cancelled"
            finished = self._release()
            if not self.rows:
                return finished
            self._accept(self.rows, self._decode())
            return finished + self._release()

    def _decode(self) -> torch.Tensor:
        """Every row's next-token logits (B, V), its new K/V column appended to the cache."""
        tokens = torch.tensor([[r.generated[-1]] for r in self.rows], dtype=torch.long, device=self.device)
        lengths = torch.tensor([r.length for r in self.rows], dtype=torch.long, device=self.device)
        columns = self.columns
        width = columns + 1
        mask = torch.arange(width, device=self.device) >= (width - 1 - lengths)[:, None]  # (B, L + 1)
        try:
            _, logits = self._forward(self.rows, tokens, mask.long(), lengths[:, None], self.cache)
        except Exception as err:
            logger.warning("a decode step over %d rows failed (%s); stepping each alone", len(self.rows), err)
            self.cache.truncate(columns)  # forget what the failed forward appended
            logits = self._decode_alone(columns)
        for row in self.rows:
            row.length += 1
        return logits

    def _decode_alone(self, columns: int) -> torch.Tensor:
        """Each row's step on its own (its cache columns only): (B, V) logits, zeros for a row that fails
        (marked failed); the rows' new columns are appended to the batch cache together."""
        logits, new = [], []
        for i, row in enumerate(self.rows):
            first = columns - row.length
            own = [(x.keys[i : i + 1, :, first:], x.values[i : i + 1, :, first:]) for x in self.cache.layers]
            token = torch.tensor([[row.generated[-1]]], dtype=torch.long, device=self.device)
            mask = torch.ones((1, row.length + 1), dtype=torch.long, device=self.device)
            position = torch.tensor([[row.length]], dtype=torch.long, device=self.device)
            try:
                cache, out = self._forward([row], token, mask, position, DynamicCache(ddp_cache_data=own))
                new.append([(x.keys[:, :, -1:], x.values[:, :, -1:]) for x in cache.layers])
                logits.append(out)
            except Exception as err:
                self._fail(row, err)
                new.append([(torch.zeros_like(k[:, :, -1:]), torch.zeros_like(v[:, :, -1:])) for k, v in own])
                logits.append(None)
        width = next((x.shape[-1] for x in logits if x is not None), 1)
        dtype = next((x.dtype for x in logits if x is not None), torch.float32)
        for layer, columns_of_rows in zip(self.cache.layers, zip(*new, strict=True), strict=True):
            layer.update(
                torch.cat([k for k, _ in columns_of_rows]), torch.cat([v for _, v in columns_of_rows])
            )
        rows = [
            x if x is not None else torch.zeros((1, width), dtype=dtype, device=self.device) for x in logits
        ]
        return torch.cat(rows)

    def _accept(self, rows: list[Row], logits: torch.Tensor) -> None:
        """Choose each row's next token from its (V,) logits; stream it; mark the rows that are done. A row
        whose logits are not finite, or whose choice or text fails, fails alone."""
        usable = check_finite(logits)
        scores = self.suppress(None, logits.float())  # (k, V)
        greedy = scores.argmax(dim=-1).tolist()
        for i, row in enumerate(rows):
            if row.error is not None:
                continue
            try:
                if not usable[i]:
                    raise NonFiniteLogits()
                self._push(row, self._choose(row, scores[i], greedy[i]))
            except Exception as err:
                self._fail(row, err)

    def _choose(self, row: Row, scores: torch.Tensor, greedy: int) -> int:
        settings = row.prepared.settings
        if settings.penalized or settings.logit_bias:
            scores = penalize(scores, row.generated, settings)
            greedy = int(scores.argmax())
        return greedy if row.sampler is None else row.sampler(scores[None])

    def _push(self, row: Row, token: int) -> None:
        row.generated.append(token)
        row.stream.push(token)
        if token in self.stop_ids:
            row.reason = "stop"
        elif len(row.generated) >= row.prepared.settings.max_new_tokens:
            row.reason = "length"

    @staticmethod
    def _fail(row: Row, err: Exception) -> None:
        logger.error("a request failed while decoding (its batch goes on): %s", err)
        row.error, row.reason = failed(err), "error"

    def _release(self) -> list[tuple[Any, ChatResult]]:
        """Finished rows leave: their K/V to the prefix cache, their cache rows and all-padding columns go."""
        done = [i for i, row in enumerate(self.rows) if row.reason is not None]
        if not done:
            return []
        results = [self._finish(i) for i in done]
        order = self.cache.remove_rows(done)
        self.rows = [self.rows[i] for i in order]
        if not self.rows:
            self.cache = None  # an idle batch holds no storage
            return results
        self.cache.drop_front(self.columns - max(r.length for r in self.rows))
        return results

    def _finish(self, i: int) -> tuple[Any, ChatResult | Exception]:
        """Row i's (owner, result), its K/V kept for reuse; a failed row's (owner, error). A failing prefix
        cache loses its entry, not the answer; a failing answer (its text) fails this row alone."""
        row = self.rows[i]
        if row.error is not None:
            return row.request.owner, row.error
        try:
            self._remember(i)
        except Exception:
            logger.exception("the prefix cache could not keep a finished request (its answer stands)")
        try:
            return self._result(row)
        except Exception as err:
            return row.request.owner, failed(err)

    def _remember(self, i: int) -> None:
        """Store row i's K/V (its prompt and all generated tokens but the last) in the prefix cache."""
        row, prefixes = self.rows[i], self.engine.prefixes
        if prefixes is None:
            return
        first = self.columns - row.length
        per_token = sum(x.keys[i, :, 0].numel() * x.keys.element_size() * 2 for x in self.cache.layers)
        if not prefixes.fits(row.length * per_token):  # measured before anything is copied
            if row.extends is not None:
                prefixes.drop(row.extends)
            return
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
