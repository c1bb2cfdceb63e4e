"""Continuous batching: one running batch of requests, advanced one step at a time, that requests join and
leave between steps.

    admit(requests):  new rows wait for their prompts to be computed; each starts from the longest cached
                      prefix of its prompt (`prefix.PrefixCache`: the entry's K/V become its own cache) or empty
    step():           one forward over every decoding row's next token (B_d) and, within the step's token
                      budget (`max_step_tokens` less B_d, at least `MIN_CHUNK`), the next chunk of each waiting
                      row's prompt, oldest first (`packed`: a mixed step); a row's images are encoded when its
                      first chunk is planned and their rows spliced at the placeholders of the chunk that holds
                      them (a chunk may cut an image). A row whose prompt is done gets its first token and its
                      K/V join the batch cache's spare rows, right-aligned (a longer prompt widens it to the
                      left). With no prompt waiting, a step is a plain decode step: tokens (B, 1), per-row
                      positions (B, 1), padding mask (B, L + 1)
    finished rows:    stop token, `max_new_tokens` or cancelled; their K/V go to the prefix cache, their rows
                      leave the cache and the columns that are padding in every remaining row are dropped, so
                      the cache grows and shrinks with its requests

Prompts are never computed in a forward of their own (the earlier admission forward): the rows decoding
when a request arrives wait for one step, whose cost the budget bounds, not for its whole prefill.
Failures: a failed mixed or decode forward is undone (the batch cache's new column, the chunks' K/V) and
each row is stepped alone (the decoding rows one by one, each chunk in a forward of its own), so only a row
whose own step fails fails; a chunk whose logits are not finite fails its row at once.

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
from .packed import OwnCache, PackedCache
from .prefix import KV, content_ids
from .requests import ChatResult, Prepared, failed
from .sampling import DEFAULT_TOP_K, NonFiniteLogits, Sampler, check_finite, penalize
from .streaming import Detokenizer, TextCallback, TextStream

if TYPE_CHECKING:
    from .engine import Engine

logger = logging.getLogger(__name__)
MAX_STEP_TOKENS = 512  # tokens per step (decoding rows' one each, then prefill chunks): the engine's default
MIN_CHUNK = 16  # prefill tokens a step computes at least while rows wait, however many rows decode
PACKED_MASK = torch.ones(
    (1, 1, 1, 1), dtype=torch.bool
)  # a mixed step's placeholder: `packed` masks each part


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
    own: OwnCache | None = None  # while its prompt is computed: its own K/V per layer (None: none yet)
    visual: torch.Tensor | None = None  # while prefilling: visual rows of its placeholders from `visual_from`
    visual_from: int = 0

    @property
    def prepared(self) -> Prepared:
        return self.request.prepared


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
        self.layers = engine.model.config.get_text_config().num_hidden_layers
        self.max_step_tokens = engine.max_step_tokens
        self.rows: list[Row] = []  # decoding, in the batch cache's row order
        self.waiting: list[Row] = []  # prefilling, oldest first
        self.cache: BatchCache | None = None
        self.prefilled_tokens = 0  # prompt tokens computed (the others came from the prefix cache)

    def __len__(self) -> int:
        return len(self.rows) + len(self.waiting)

    @property
    def columns(self) -> int:
        return 0 if self.cache is None else self.cache.columns

    # -- admitting ------------------------------------------------------------------------------------------
    def admit(self, requests: Sequence[Request]) -> list[tuple[Any, ChatResult | Exception]]:
        """Add `requests` to the batch as prefilling rows (their prompts are computed by the next steps).
        Returns (owner, result) for the requests that ended already (cancelled before they started) and
        (owner, error) for those that could not start (each fails alone; the running rows are untouched)."""
        out: list[tuple[Any, ChatResult | Exception]] = []
        with self.engine._model_lock:
            for request in requests:
                try:
                    row = self._row(request)
                    if request.cancelled is not None and request.cancelled():
                        row.reason = "cancelled"
                        out.append(self._result(row))
                        continue
                    self._start(row)
                except Exception as err:  # handed to the request's caller
                    out.append((request.owner, failed(err)))
                    continue
                self.waiting.append(row)
        return out

    def _row(self, request: Request) -> Row:
        engine, prepared = self.engine, request.prepared
        settings = prepared.settings
        detokenizer = Detokenizer(engine.decode, engine.processor.stop_token_ids, settings.max_new_tokens)
        content = content_ids(prepared.input_ids, prepared.frames, engine.model.config.image_token_id)
        sampler = Sampler(settings, self.top_k, self.device) if settings.sampled else None
        return Row(request, content, TextStream(detokenizer, request.on_text), sampler)

    def _start(self, row: Row) -> None:
        """The row's own cache: the K/V of the longest cached prefix of its prompt (copied views), or empty."""
        prefixes = self.engine.prefixes
        entry, reused, row.extends = prefixes.lookup(row.content) if prefixes else (None, 0, None)
        row.own = (
            [(k[:, :, :reused], v[:, :, :reused]) for k, v in entry.kv] if entry else [None] * self.layers
        )
        row.length = reused

    def _plan(self) -> list[tuple[Row, int]]:
        """The prefilling rows that compute a chunk this step, oldest first, and their chunk sizes: the step's
        token budget less one token per decoding row (at least `MIN_CHUNK`)."""
        budget = max(self.max_step_tokens - len(self.rows), MIN_CHUNK)
        plan = []
        for row in self.waiting:
            if budget <= 0:
                break
            n = min(len(row.prepared.input_ids) - row.length, budget)
            plan.append((row, n))
            budget -= n
        return plan

    def _encode(self, plan: list[tuple[Row, int]]) -> list[tuple[Row, int]]:
        """Encode the images of the rows starting this step (together; then each alone if that fails, so a
        row whose image fails fails alone); returns the plan without the failed rows."""
        starting = [row for row, _ in plan if row.visual is None and row.prepared.frames]
        if len(starting) > 1:
            try:
                self.engine.visual_rows([f for row in starting for f in row.prepared.frames])
            except Exception:
                logger.exception(
                    "encoding the images of %d requests failed; encoding each alone", len(starting)
                )
        for row in starting:
            try:
                row.visual_from, row.visual = self._visual_rows_after(row.prepared, row.length)
            except Exception as err:
                self._fail(row, err)
        return [(row, n) for row, n in plan if row.error is None]

    def _visual_rows_after(self, prepared: Prepared, reused: int) -> tuple[int, torch.Tensor]:
        """The visual rows of the placeholders after the first `reused` tokens (an image may be cut), with the
        index of the first one. Images wholly inside the prefix are not encoded; their cached features are
        marked used, so that a live conversation's features outlive its (larger, earlier evicted) prefix
        entries."""
        covered = sum(1 for t in prepared.input_ids[:reused] if t == self.model.config.image_token_id)
        needed, skip, start = [], [], 0
        for frame in prepared.frames:
            if start + frame.rows <= covered:
                self.engine.features.get(frame.key)
            else:
                needed.append(frame)
                skip.append(max(0, covered - start))
            start += frame.rows
        rows = [r[k:] for r, k in zip(self.engine.visual_rows(needed), skip, strict=True)]
        return covered, (torch.cat(rows) if rows else torch.empty(0))

    def _chunk(self, row: Row, n: int) -> tuple[list[int], list[torch.Tensor]]:
        """The next `n` prompt ids of a prefilling row and the visual rows of the placeholders among them."""
        ids = row.prepared.input_ids[row.length : row.length + n]
        before = int((row.content[: row.length] < 0).sum()) - row.visual_from  # placeholders already computed
        inside = int((row.content[row.length : row.length + n] < 0).sum())
        return ids, ([row.visual[before : before + inside]] if inside else [])

    def _forward(
        self,
        rows: list[Row],
        ids: torch.Tensor,
        mask: torch.Tensor | None,
        position_ids: torch.Tensor,
        cache: Cache,
        visual: list[torch.Tensor] | None = None,
    ) -> tuple[Cache, torch.Tensor]:
        """One forward of the composite model for `rows` (it splices `visual` at the placeholders of `ids`):
        the grown cache and each row's last-position logits (k, V). A `PackedCache` makes it a mixed step
        (`packed`): ids (1, N), logits at each row's last token."""
        image = {"image": BaseModelOutputWithPooling(pooler_output=visual)} if visual else None
        packed = isinstance(cache, PackedCache)
        extra = {"packed": cache} if packed else {}
        out = self.model(
            input_ids=ids,
            attention_mask=PACKED_MASK if packed else mask,  # 4-D: transformers builds no mask of its own
            position_ids=position_ids,
            cache=cache,
            use_cache=True,
            logits_to_keep=torch.tensor(cache.last, device=self.device) if packed else 1,
            mm_encoder_outputs=image,
            **extra,
        )
        return out.cache, out.logits[0] if packed else out.logits[:, -1]

    def _join(self, row: Row) -> None:
        """Append a row whose prompt is computed to the decoding rows (right-aligned in the batch cache's
        window); its own cache is let go."""
        if self.cache is None:
            self.cache = BatchCache(self.layers)
        self.cache.add_rows(DynamicCache(ddp_cache_data=row.own))
        row.own = row.visual = None
        self.rows.append(row)

    # -- stepping -------------------------------------------------------------------------------------------
    def step(self) -> list[tuple[Any, ChatResult | Exception]]:
        """One step: every decoding row's next token and, within the step's token budget, the next chunk of
        the prefilling rows' prompts, in one forward (`packed`); a row whose prompt is done gets its first
        token and joins the decoding rows. Returns the (owner, result) of rows that finished (the ones
        cancelled since the last step first) and (owner, error) of rows that failed. A failed forward is
        undone and each row is stepped alone, so only a row whose own step fails fails. Any other error
        leaves the batch in an unknown state: the caller must `abort` it."""
        with self.engine._model_lock, torch.no_grad():
            for row in [*self.rows, *self.waiting]:
                if row.request.cancelled is not None and row.request.cancelled():
                    row.reason = "cancelled"
            finished = self._release() + self._settle_waiting()
            plan = self._encode(self._plan())
            finished += self._settle_waiting()
            if plan:
                self._mixed(plan)
                finished += self._settle_waiting()
                for row, _ in plan:
                    if row in self.waiting and row.length == len(row.prepared.input_ids):
                        self.waiting.remove(row)
                        self._start_decoding(row, finished)
            elif self.rows:
                self._accept(self.rows, self._decode())
            return finished + self._release()

    def _settle_waiting(self) -> list[tuple[Any, ChatResult | Exception]]:
        """Prefilling rows that were cancelled or failed leave (their own caches with them)."""
        done = [row for row in self.waiting if row.reason is not None]
        self.waiting = [row for row in self.waiting if row.reason is None]
        return [
            (row.request.owner, row.error) if row.error is not None else self._result(row) for row in done
        ]

    def _start_decoding(self, row: Row, finished: list) -> None:
        """A row whose prompt is done (its first token chosen) joins the batch cache; if that fails (out of
        memory while growing), it fails alone and the batch cache is unchanged (`BatchCache.add_rows`)."""
        try:
            self._join(row)
        except Exception as err:
            logger.exception("a prefilled request could not join the running batch")
            finished.append((row.request.owner, failed(err)))

    def _mixed(self, plan: list[tuple[Row, int]]) -> None:
        """One packed forward: the decoding rows' tokens and the plan's chunks (`packed`). Chooses the next
        token of every decoding row and of every row whose prompt this step finished; a prefilling row whose
        chunk gives non-finite logits fails now."""
        decoding, columns = self.rows, self.columns
        chunks = [self._chunk(row, n) for row, n in plan]
        ids = [r.generated[-1] for r in decoding] + [t for c, _ in chunks for t in c]
        positions = [r.length for r in decoding] + [p for r, n in plan for p in range(r.length, r.length + n)]
        lengths = torch.tensor([r.length for r in decoding], dtype=torch.long, device=self.device)
        before = [list(row.own) for row, _ in plan]
        cache = PackedCache(self.cache, lengths, [r.own for r, _ in plan], [n for _, n in plan],
                            [r.length for r, _ in plan])  # fmt: skip
        try:
            _, logits = self._forward(
                decoding + [r for r, _ in plan],
                torch.tensor([ids], dtype=torch.long, device=self.device),
                None,
                torch.tensor([positions], dtype=torch.long, device=self.device),
                cache,
                [v for _, visual in chunks for v in visual],
            )
        except Exception as err:
            logger.warning("a mixed step over %d rows failed (%s); stepping each alone", len(cache.last), err)
            if self.cache is not None:
                self.cache.truncate(columns)  # forget what the failed forward appended
            for (row, _), own in zip(plan, before, strict=True):
                row.own = own
            logits = self._mixed_alone(plan, chunks, columns)
        for row in decoding:
            row.length += 1
        if decoding:
            self._accept(decoding, logits[: len(decoding)])
        for j, (row, n) in enumerate(plan):
            row.length += n
            self.prefilled_tokens += n
            if row.error is not None:
                continue
            if row.length == len(row.prepared.input_ids):
                self._accept([row], logits[len(decoding) + j : len(decoding) + j + 1])
            elif not bool(check_finite(logits[len(decoding) + j : len(decoding) + j + 1])[0]):
                self._fail(row, NonFiniteLogits())

    def _mixed_alone(self, plan: list[tuple[Row, int]], chunks: list, columns: int) -> torch.Tensor:
        """After a failed mixed step: the decoding rows' step alone (`_decode_alone`), then each chunk in a
        forward of its own; (B_d + m, V) logits, zeros for a row that failed (marked failed)."""
        logits = [self._decode_alone(columns)] if self.rows else []
        for (row, n), (ids, visual) in zip(plan, chunks, strict=True):
            past = [x for x in row.own if x is not None]
            mask = torch.ones((1, row.length + n), dtype=torch.long, device=self.device)
            positions = torch.arange(row.length, row.length + n, device=self.device)[None]
            try:
                cache, out = self._forward([row], torch.tensor([ids], device=self.device), mask, positions,
                                           DynamicCache(ddp_cache_data=past or None), visual)  # fmt: skip
                row.own = [(x.keys, x.values) for x in cache.layers]
            except Exception as err:
                self._fail(row, err)
                out = None
            logits.append(out)
        width = next((x.shape[-1] for x in logits if x is not None), 1)
        dtype = next((x.dtype for x in logits if x is not None), torch.float32)
        return torch.cat(
            [x if x is not None else torch.zeros((1, width), dtype=dtype, device=self.device) for x in logits]
        )

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
        owners = [row.request.owner for row in [*self.rows, *self.waiting]]
        self.rows, self.waiting, self.cache = [], [], None
        return owners
