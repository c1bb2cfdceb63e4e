"""Decode-step attention for bf16 on the CPU with grouped-query heads: sdpa over each K/V head's queries.

    query (B, heads, 1, head_dim), key/value (B, kv_heads, L, head_dim), mask (B, 1, 1, L) bool, additive or None
    -> query as (B, kv_heads, group, head_dim), group = heads / kv_heads: one block of `group` queries per K/V head
    -> torch's scaled_dot_product_attention, not causal (every query of a block is the same position)
    -> (B, 1, heads, head_dim), as transformers' attention functions return

Why: transformers' sdpa function already packs a decode step's queries this way when it is given a mask
(`pack_gqa`), but with no mask (one row, or rows of equal length: every batch-1 step) it passes `enable_gqa`
to torch instead, and torch's CPU flash kernel then runs one query per head and reads each K/V head once per
query head. In bf16 that is 2.5-13x slower per layer at decode shapes (bench/bench_decode_attention.py, AMD
EPYC with avx512_bf16, two runs: 2.5-7.2x with 2 query heads per K/V head, 5.6-12.6x with Llama-3-8B's 4), and it made
a bf16 decode step slower than an fp32 one. Here every bf16 decode step on the CPU takes the packed form,
mask or not. (fp32 gains 1.05-1.6x from the same change; it is left on transformers' call so that the fp32
equalities with `generate` keep holding bit for bit. With as many K/V heads as query heads, as Vicuna-7B's,
there is nothing to pack: there a bf16 decode step's attention stays about 2x the fp32 one's.)

Numerics: the same kernel with the same fp32 scores and softmax; with a mask the call is the one
transformers makes (bit-identical), without one it differs from the `enable_gqa` call only in blocking
(tests/inference/test_attention.py: one or two bf16 roundings apart, the same error against fp32). Taken
only for bf16 decode steps on the CPU with more query heads than K/V heads; fp32, prompts, other devices,
one query head per K/V head (nothing to group), dropout in training and attention variants this does not
implement (logit softcapping, sinks, position biases) go to transformers' sdpa function unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from transformers.integrations.sdpa_attention import sdpa_attention_forward

GROUPED_DTYPES = (torch.bfloat16,)
# keyword arguments of attention variants this does not compute
UNSUPPORTED = ("softcap", "s_aux", "sinks", "position_bias")


def takes_grouped_path(
    module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, kwargs: dict[str, Any]
) -> bool:
    """Whether this call is a bf16 decode step on the CPU with K/V heads shared by several query heads."""
    return (
        query.shape[2] == 1
        and key.shape[1] < query.shape[1]
        and query.device.type == "cpu"
        and query.dtype in GROUPED_DTYPES
        and not (module.training and kwargs.get("dropout", 0.0))
        and all(kwargs.get(name) is None for name in UNSUPPORTED)
    )


def grouped_decode_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """One query token per row: (B, 1, heads, head_dim) and no weights, as transformers' attention functions."""
    batch, heads, _, head_dim = query.shape
    kv_heads = key.shape[1]
    grouped = query.reshape(batch, kv_heads, heads // kv_heads, head_dim)  # a group's queries as one block
    mask = attention_mask
    if mask is not None:
        mask = mask[:, :, :, : key.shape[2]]  # as transformers' sdpa function slices it
    out = F.scaled_dot_product_attention(grouped, key, value, attn_mask=mask, is_causal=False, scale=scaling)
    return out.reshape(batch, 1, heads, head_dim), None


def decode_aware_sdpa(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *args: Any,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' sdpa attention, except bf16 grouped-query decode steps on the CPU (`grouped_decode_attention`)."""
    if not args and takes_grouped_path(module, query, key, kwargs):
        return grouped_decode_attention(module, query, key, value, attention_mask, **kwargs)
    return sdpa_attention_forward(module, query, key, value, attention_mask, *args, **kwargs)
