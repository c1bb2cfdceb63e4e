"""How likely a continuation is after a prepared prompt: the model's log-probabilities of the continuation's
tokens, with the image's visual rows in the prompt (the scoring half of a harness's `loglikelihood`).

    [(Prepared prompt ids (T_i, placeholders for the visual rows), continuation ids (M_i)), ...]
        --`Engine.visual_rows`: from the feature cache, or encoded once per image (rows (576 + n, H) each)
        --left-pad prompt + continuation to (B, W), positions from the mask, keep the last max(M_i) + 1 logits-->
        log_softmax at the positions before each continuation token (B, M_i, V) --> sum, mean, greedy?

The distribution is over the LLM's own vocabulary, as the reference's: the `<image>` placeholder's column is
masked out before the log_softmax (`mask_placeholder`), so it takes no probability and is never the greedy token.

A continuation is tokenised on its own (`add_special_tokens=False`), as an answer is in training and in the
reference's encoding (docs/design.md section 6.3), and appended to the generation prompt (which ends with the
template's assistant prefix). Padding is on the left with real attention masks and position ids counted
from the first real token, so a batch scores what each request scores alone (to float tolerance).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from ..inference import Engine, Prepared
from ..model.modeling import mask_placeholder


@dataclass(frozen=True)
class ContinuationScore:
    logprob: float  # sum over the continuation's tokens of log p(token | everything before it)
    tokens: int  # the continuation's token count
    greedy: bool  # every continuation token is the argmax at its position

    @property
    def mean_nll(self) -> float:
        """The mean negative log-likelihood per token (the LM loss over the continuation)."""
        return -self.logprob / self.tokens


def score_continuations(
    engine: Engine, batch: Sequence[tuple[Prepared, Sequence[int]]]
) -> list[ContinuationScore]:
    """The scores of each (prompt, continuation ids) pair, in one forward over the batch."""
    if not batch:
        return []
    if any(len(cont) == 0 for _, cont in batch):
        raise ValueError("a continuation to score must have at least one token")
    for prepared, cont in batch:
        engine.check_length(prepared.input_ids, len(cont), bool(prepared.video))
    sequences = [list(p.input_ids) + list(cont) for p, cont in batch]
    ids, mask = engine.left_pad(sequences)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    keep = max(len(cont) for _, cont in batch) + 1  # the logits before each continuation token
    with torch.no_grad():
        rows = engine.visual_rows([frame for p, _ in batch for frame in p.frames])
        extra = (
            {"mm_encoder_outputs": {"image": BaseModelOutputWithPooling(pooler_output=rows)}} if rows else {}
        )
        logits = engine.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            logits_to_keep=keep,
            **extra,
        ).logits  # (B, keep, V): positions width - keep .. width - 1
    scores, image_id = [], engine.model.config.image_token_id
    for i, (_, cont) in enumerate(batch):
        m = len(cont)
        before = mask_placeholder(logits[i, keep - 1 - m : keep - 1], image_id).log_softmax(-1)  # (m, V)
        target = torch.tensor(list(cont), device=before.device)
        logprob = before.gather(-1, target[:, None]).sum().item()
        greedy = bool((before.argmax(-1) == target).all())
        scores.append(ContinuationScore(logprob, m, greedy))
    return scores
