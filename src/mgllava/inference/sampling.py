"""Choosing a row's next token: OpenAI's penalties and logit bias, a finite-logits check, greedy or a draw.

    logits (V,) float32 --check: no NaN or +inf, else `NonFiniteLogits` (this row fails alone)
        --suppress (the generation config's suppressed tokens: -inf)
        --penalize: mu[j] - c[j] * frequency_penalty - (c[j] > 0) * presence_penalty + logit_bias[j]
                    (c[j]: how often token j was generated so far in this answer; OpenAI's formula)
        --greedy: argmax | sampled: temperature, top-k, top-p (transformers' warpers, as `generate`) and a
                  draw from the row's own `torch.Generator(seed)` (or torch's global one without a seed)

Temperatures in (0, `MIN_TEMPERATURE`) decode greedily: dividing float32 logits by a temperature near 0
overflows to inf and the softmax to NaN (`temperature: 1e-300` failed whole batches before), while the
distribution it approximates is the argmax (ties aside). From `MIN_TEMPERATURE` on, logits up to 3e33 stay
finite after the division, so sampling is well defined for any finite logits.

The static engine applies the same rules through `RowRules`, a `LogitsProcessor` for `generate`: per row,
the penalties (counted over the tokens after the prompt) and the finite check, which raises
`NonFiniteLogits` naming the row so that the engine can retry the batch one request at a time.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

if TYPE_CHECKING:
    from .requests import GenerationSettings

MIN_TEMPERATURE = 1e-5
DEFAULT_TOP_K = 50  # transformers' `generate` default when the generation config sets none


class NonFiniteLogits(RuntimeError):
    """The model gave NaN or infinite logits for a row: that request fails (the others are unaffected)."""

    def __init__(self, row: int | None = None) -> None:
        where = "" if row is None else f" (row {row} of its batch)"
        super().__init__(
            f"the model produced non-finite (NaN or infinite) logits for this request{where}; "
            "the model's weights or its inputs overflow in this dtype"
        )
        self.row = row


def penalize(
    scores: torch.Tensor, generated: Sequence[int] | torch.Tensor, settings: GenerationSettings
) -> torch.Tensor:
    """`scores` (V,) after suppression, with OpenAI's frequency and presence penalties over `generated` (the
    answer's tokens so far) and the request's logit bias. Returns `scores` itself when nothing applies."""
    if settings.penalized and len(generated):
        ids = torch.as_tensor(generated, dtype=torch.long, device=scores.device)
        counts = torch.bincount(ids, minlength=scores.numel())[: scores.numel()].to(scores.dtype)
        scores = (
            scores
            - counts * settings.frequency_penalty
            - (counts > 0).to(scores.dtype) * settings.presence_penalty
        )
    if settings.logit_bias:
        ids = torch.tensor([t for t, _ in settings.logit_bias], dtype=torch.long, device=scores.device)
        bias = torch.tensor([b for _, b in settings.logit_bias], dtype=scores.dtype, device=scores.device)
        scores = scores.index_add(0, ids, bias)
    return scores


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
        """`scores`: (1, V) float32 after suppression and penalties."""
        probs = self.warpers(None, scores).softmax(dim=-1)
        return int(torch.multinomial(probs, num_samples=1, generator=self.generator))


def check_finite(scores: torch.Tensor) -> list[bool]:
    """Per row of (k, V) scores: usable, i.e. no NaN, no +inf, and some token not at -inf (suppression writes
    -inf, so the check holds before and after it)."""
    bad = (torch.isnan(scores) | torch.isposinf(scores)).any(dim=-1)
    return (~bad & (scores > float("-inf")).any(dim=-1)).tolist()


class RowRules(LogitsProcessor):
    """For `generate` (the static engine): row i's penalties and logit bias (`settings[i]`, over the tokens
    after the prompt of width `prompt_length`), and the finite check of every row."""

    def __init__(self, prompt_length: int, settings: Sequence[GenerationSettings]) -> None:
        self.prompt_length = prompt_length
        self.settings = list(settings)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        for i, finite in enumerate(check_finite(scores)):
            if not finite:
                raise NonFiniteLogits(i)
        if not any(s.penalized or s.logit_bias for s in self.settings):
            return scores
        rows = [
            penalize(scores[i], input_ids[i, self.prompt_length :], s) for i, s in enumerate(self.settings)
        ]
        return torch.stack(rows)
