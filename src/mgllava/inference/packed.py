"""Mixed steps: the running rows' decode tokens and chunks of new rows' prompts in one forward of the LLM.

    tokens (1, N) = [one token per decoding row: B_d] [chunk of prefilling row 1: c_1] ... [chunk of row m: c_m]
    positions (1, N): each row's own positions (a decoding row's length; a chunk's P_j .. P_j + c_j - 1)
    per layer, K/V (1, kv_heads, N, head_dim) --`PackedCache.update`--> the decoding rows' new column appended
        to the batch cache (`kv.BatchCache`, (B_d, kv_heads, L + 1, head_dim)); chunk j appended to its row's
        own cache (1, kv_heads, P_j + c_j, head_dim)
    attention (`packed_attention`): the decoding rows together over the batch cache with its padding mask (the
        call a decode step makes); each chunk alone over its own cache, causal (query i sees keys 0 .. P_j + i)
    -> the hidden state of each row's last token: logits (B_d + m, V)

Linear layers, norms and MLPs run once over all N tokens, so the weights are read once per step instead of
once more per admission forward (vLLM's chunked prefill, without its paged kernels: a decoding row keeps the
batch cache's left-padded layout and a prefilling row a contiguous cache of its own until its prompt is done).
Attention never mixes rows, so a NaN or a bad token in one row stays in that row.

transformers hook: `install` registers `mgllava_packed_<impl>` with transformers' `AttentionInterface` (and
`<impl>`'s mask function under the same name) and sets it on the LLM. A call without a `packed` argument (a
plain forward, `generate`, the static engine) goes to `<impl>` unchanged (for sdpa: `attention.decode_aware_sdpa`,
which is transformers' sdpa function but for bf16 decode steps on the CPU); a mixed step passes `packed=`
its `PackedCache` through the model's keyword arguments, which reach every attention call and cache update.
Each part of a mixed step's attention is computed by transformers' sdpa function with a 4-D boolean mask (bf16
decode rows on the CPU: `attention.decode_aware_sdpa`, the plain decode step's call), so with sdpa (the
default) a decoding row's attention is the plain decode step's call; with another
implementation (eager, flash, flex) the parts still use sdpa, whose masks those do not take in this form. A sliding window (`sliding_window` passed by Mistral-style
attention) is applied to both parts, in positions.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.cache_utils import Cache
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .attention import decode_aware_sdpa
from .kv import BatchCache

PREFIX = "mgllava_packed_"
OwnCache = list[tuple[torch.Tensor, torch.Tensor] | None]  # per layer (1, kv_heads, P, head_dim), None: empty


class PackedCache(Cache):
    """One mixed step's cache: the batch cache (decoding rows, may be None) and each chunk's own cache.
    `segments[j]` = (start, length) of chunk j in the packed sequence; the decoding rows come first."""

    def __init__(
        self,
        batch: BatchCache | None,
        lengths: torch.Tensor,
        own: list[OwnCache],
        chunks: list[int],
        past: list[int],
    ) -> None:
        super().__init__(layers=[])
        self.batch = batch
        self.decoding = int(lengths.numel())
        self.lengths = lengths  # (B_d,) tokens each decoding row has in the batch cache before this step
        self.own = own
        self.past = past  # tokens in chunk j's own cache before this step
        starts = [self.decoding]
        for n in chunks[:-1]:
            starts.append(starts[-1] + n)
        self.segments = list(zip(starts, chunks, strict=True))
        self.tokens = self.decoding + sum(chunks)
        self.last = [*range(self.decoding), *(s + n - 1 for s, n in self.segments)]  # each row's last token

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Scatter one layer's packed K/V (1, kv_heads, N, head_dim) to the batch cache and the own caches."""
        d = self.decoding
        if d:
            keys = key_states[0, :, :d].transpose(0, 1).unsqueeze(2)  # (B_d, kv_heads, 1, head_dim)
            values = value_states[0, :, :d].transpose(0, 1).unsqueeze(2)
            self.batch.layers[layer_idx].update(keys, values)
        for j, (start, n) in enumerate(self.segments):
            k, v = key_states[:, :, start : start + n], value_states[:, :, start : start + n]
            old = self.own[j][layer_idx]
            self.own[j][layer_idx] = (
                (k, v) if old is None else (torch.cat([old[0], k], 2), torch.cat([old[1], v], 2))
            )
        return key_states, value_states

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0

    def decode_mask(self, width: int, window: int | None) -> torch.Tensor | None:
        """(B_d, 1, 1, width) bool: row i sees its last `lengths[i] + 1` columns (and only the last `window`);
        None when every row sees every column (as transformers' mask then is)."""
        first = width - 1 - self.lengths  # (B_d,)
        if window is not None:
            first = first.clamp(min=width - window)
        if int(first.max()) <= 0:
            return None
        columns = torch.arange(width, device=self.lengths.device)
        return (columns >= first[:, None])[:, None, None, :]

    def chunk_mask(self, j: int, window: int | None, device: torch.device) -> torch.Tensor | None:
        """(1, 1, c, P + c) bool: query i sees keys 0 .. P + i (and the last `window` of them); None when plain
        causal attention says the same (no past, no window: sdpa's `is_causal`)."""
        past, n = self.past[j], self.segments[j][1]
        if past == 0 and window is None:
            return None
        keys = torch.arange(past + n, device=device)[None, :]
        queries = past + torch.arange(n, device=device)[:, None]
        allowed = keys <= queries
        if window is not None:
            allowed &= keys > queries - window
        return allowed[None, None]


def packed_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *args: Any,
    packed: PackedCache | None = None,
    inner: Any = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """(1, N, heads, head_dim): each part of the packed `query` (1, heads, N, head_dim) attended by `inner`."""
    window = kwargs.pop("sliding_window", None)
    layer = module.layer_idx
    parts = []
    if packed.decoding:
        keys, values = packed.batch.layers[layer].keys, packed.batch.layers[layer].values
        q = query[0, :, : packed.decoding].transpose(0, 1).unsqueeze(2)  # (B_d, heads, 1, hd)
        mask = packed.decode_mask(keys.shape[2], window)
        out, _ = inner(module, q, keys, values, mask, *args, **kwargs)  # (B_d, 1, heads, hd)
        parts.append(out.transpose(0, 1))
    for j, (start, n) in enumerate(packed.segments):
        keys, values = packed.own[j][layer]
        mask = packed.chunk_mask(j, window, query.device)
        out, _ = inner(module, query[:, :, start : start + n], keys, values, mask, *args, **kwargs)
        parts.append(out)  # (1, c_j, heads, hd)
    return torch.cat(parts, 1), None


def install(language_model: Any) -> str:
    """Make the LLM's attention implementation the packed one over its current one; returns its name."""
    current = language_model.config._attn_implementation or "sdpa"
    if current.startswith(PREFIX):
        return current
    name = PREFIX + current
    inner = decode_aware_sdpa if current == "sdpa" else ALL_ATTENTION_FUNCTIONS.get(current)

    def attention(module, query, key, value, attention_mask, *args, packed=None, **kwargs):
        if packed is None:
            own = inner if inner is not None else _eager_of(module)
            return own(module, query, key, value, attention_mask, *args, **kwargs)
        # the parts' masks are 4-D boolean, which sdpa (and only it) takes as they are
        return packed_attention(module, query, key, value, attention_mask, *args, packed=packed,
                                inner=decode_aware_sdpa, **kwargs)  # fmt: skip

    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[current])
    language_model.set_attn_implementation(name)
    return name


def _eager_of(module: torch.nn.Module) -> Any:
    """The `eager_attention_forward` of the model file that defines `module` (transformers keeps one per model)."""
    return sys.modules[type(module).__module__].eager_attention_forward
