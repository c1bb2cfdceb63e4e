"""Decode-step attention for bf16 on the CPU: a compiled kernel that reads the cache in place where it pays,
else torch's flash kernel over grouped query blocks.

    query (B, heads, 1, head_dim), key/value (B, kv_heads, L, head_dim) (the batch cache's strided views or
    contiguous tensors), mask (B, 1, 1, L) bool or None
    -> query as (B, kv_heads, group, head_dim), group = heads / kv_heads: one block of `group` queries per K/V head
    kernel (`DecodeKernel`, on layers an engine enabled, where `kernel_pays`): scores = sum over head_dim of
        query x key in float32, x scaling, -inf where the mask is False, float32 softmax, sum over L of
        probabilities x value in float32; written in plain torch and compiled by `torch.compile` (inductor's
        C++), which fuses it into loops that read the bf16 K/V where they lie
    fallback (`grouped_decode_attention`): torch's `scaled_dot_product_attention` over the grouped blocks
    -> (B, 1, heads, head_dim), as transformers' attention functions return

Why: torch's CPU flash kernel is slow for bf16 at one query per row, slowest with one query head per K/V head.
At Vicuna-7B's 32/32 heads of 128 (bench/bench_decode_attention.py, bench/decode-kernel-results.md; AMD EPYC,
2 cores, avx512_bf16): 59 ms a layer at 16 rows x 1000 keys in bf16, against 23 ms in fp32, so a bf16 decode
step's attention cost 2.5x an fp32 one's. The kernel takes 14 ms there (4.2x; 2.4-4.7x over 1-64 rows and
100-2000 keys; 1.2-1.8x faster than fp32, except at one row of 100 keys). With grouped heads the flash
kernel's blocks of queries hold their own: from 16 rows the kernel gains 1.26-1.55x at the serving bench's
8/4 heads of 64 and 0.97-1.17x at Llama-3-8B's 32/8, and below 8 rows it loses (its compiled call costs about
25 us more), hence `kernel_pays`. Two bf16 matmuls (transformers' eager attention) would be as fast on
contiguous K/V, but the batch cache's views are strided (`kv.SlotLayer` keeps spare columns), torch's bf16
matmul copies them first, and a serving step came out slower than on the flash kernel; they also round the
scores to bf16.
Without a mask, transformers passes `enable_gqa` to torch, whose flash kernel then reads each K/V head once per
query head (2.7-9.8x slower than grouped blocks): the fallback groups the queries, mask or not.

Numerics: both keep the scores and the softmax in float32; the kernel also the probabilities x V (the flash
kernel rounds the probabilities to bf16 first). Against an fp32 model its mean error is at most the flash
kernel's (tests/inference/test_attention.py). A row's output does not depend on the rows beside it. fp32
stays on transformers' sdpa call, so fp32 answers stay bit-identical to `generate`'s; prompts, other devices
and dtypes, additive masks (the kernel: the fallback or sdpa), dropout in training and attention variants
these do not implement (logit softcapping, sinks, position biases) go to transformers' sdpa function unchanged.

Compiling: `enable_decode_kernel` (the engine calls it for a bf16 model on the CPU) compiles the graphs a
server needs before the first request (one row, if it pays, and several; contiguous K/V, strided ones, strided
from storage offset 0: 3-6 graphs, 10-30 s on 2 cores the first time, about 5 s once inductor's on-disk cache
holds them) and checks them against the fallback, or with `compile=False` only marks the layers, which
take the fallback until `warm_decode_kernel` has compiled and checked them; a torch without inductor or a
machine without a C++ compiler leaves the layers on the fallback, with the reason logged. dynamo keys graphs on the calling
thread's intra-op thread count, so a model thread with another count compiles them again
(`warm_decode_kernel`, which the batcher's worker runs before its first request); the code itself reads the
OpenMP team's size when it runs (`cpp.dynamic_threads`). A call that fails later (a graph that fails to
compile) turns the kernel off for the process and is answered by the fallback.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from transformers.integrations.sdpa_attention import sdpa_attention_forward

logger = logging.getLogger(__name__)

DECODE_DTYPES = (torch.bfloat16,)
KERNEL_MIN_ROWS = 8  # with grouped query heads, the kernel from this many rows (`kernel_pays`)
KERNEL_MIN_KEYS = 1 << 17  # with one query head per K/V head, from this many keys x K/V heads x head dims
# graphs a process may compile: per model up to 6 (one row or more; contiguous K/V, strided, strided from
# storage offset 0); past dynamo's default limit (8) a call is retried under this one
GRAPH_LIMIT = 64
# dynamic shapes; the OpenMP team's size read when a call runs (inductor otherwise writes the thread count
# of the compiling thread into the code: an engine built under one thread, as `mgllava serve` builds it,
# would decode on one core)
COMPILE = {"dynamic": True, "fullgraph": True, "options": {"cpp.dynamic_threads": True}}
# set True on an attention layer whose bf16 decode steps take the kernel (`enable_decode_kernel`)
KERNEL_FLAG = "mgllava_decode_kernel"
PENDING = "pending"  # KERNEL_FLAG's value on layers whose kernel is to be compiled by `warm_decode_kernel`
# keyword arguments of attention variants this does not compute
UNSUPPORTED = ("softcap", "s_aux", "sinks", "position_bias")


def takes_decode_path(
    module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, kwargs: dict[str, Any]
) -> bool:
    """Whether this call is a bf16 decode step on the CPU that this module computes (kernel or fallback)."""
    return (
        query.shape[2] == 1
        and query.shape[1] % key.shape[1] == 0
        and query.device.type == "cpu"
        and query.dtype in DECODE_DTYPES
        and not (module.training and kwargs.get("dropout", 0.0))
        and all(kwargs.get(name) is None for name in UNSUPPORTED)
    )


def _uncompiled() -> None:
    """The kernels' forms are only ever run compiled: as written their products are (B, heads, L, d) float32
    tensors, so where dynamo would run them uncompiled (past its recompile limit) they refuse."""
    if not torch.compiler.is_compiling():
        raise RuntimeError(
            "the decode attention kernel would run uncompiled (past dynamo's recompile limit?)"
        )


def _attend_grouped(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor, scale: torch.Tensor
) -> torch.Tensor:
    """(B, kv_heads, group, d) over (B, kv_heads, L, d) with a (B, 1, 1, L) bool mask -> (B, kv_heads, group, d);
    `scale` a 0-d float32 tensor (a float would be compiled in as a constant: one graph per head size)."""
    _uncompiled()
    scores = (query.float().unsqueeze(-2) * key.float().unsqueeze(2)).sum(-1) * scale
    probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
    return (probs.unsqueeze(-1) * value.float().unsqueeze(2)).sum(-2).to(query.dtype)


def _attend_single(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor, scale: torch.Tensor
) -> torch.Tensor:
    """One query head per K/V head: (B, heads, d) over (B, heads, L, d) with a (B, 1, L) bool mask -> (B, heads, d).
    A function of its own, so its graphs are dynamo's first for their code (graphs compiled after the grouped
    form's for the same code ran at half the speed)."""
    _uncompiled()
    scores = (query.float().unsqueeze(-2) * key.float()).sum(-1) * scale
    probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
    return (probs.unsqueeze(-1) * value.float()).sum(-2).to(query.dtype)


class DecodeKernel:
    """`_attend_grouped` and `_attend_single` compiled once per process (dynamic shapes: a graph serves every
    row count above one and every length); `failed` says why it is off, None while it is on."""

    def __init__(self) -> None:
        self._compiled: dict[bool, Any] = {}
        self._scales: dict[float, torch.Tensor] = {}
        self.failed: str | None = None

    def __call__(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor, scale: float
    ) -> torch.Tensor:
        """query (B, kv_heads, group, d), key/value (B, kv_heads, L, d), mask (B, 1, 1, L) -> like query."""
        single = query.shape[2] == 1
        compiled = self._compiled.get(single)
        if compiled is None:
            form = _attend_single if single else _attend_grouped
            compiled = self._compiled[single] = torch.compile(form, **COMPILE)
        scales = self._scales.get(scale)
        if scales is None:
            scales = self._scales[scale] = torch.tensor(scale, dtype=torch.float32)
        if single:
            query, mask = query.squeeze(2), mask.squeeze(2)
        # one grad mode, and detached (not views: no guards on their bases): fewer graphs
        args = (query.detach(), key.detach(), value.detach(), mask.detach(), scales)
        with torch.no_grad():
            try:
                out = compiled(*args)
            except torch._dynamo.exc.FailOnRecompileLimitHit:  # several models in one process: more graphs
                with torch._dynamo.config.patch(recompile_limit=GRAPH_LIMIT):
                    out = compiled(*args)
        return out.unsqueeze(2) if single else out

    def turn_off(self, err: BaseException) -> None:
        if self.failed is None:
            self.failed = f"{type(err).__name__}: {err}".splitlines()[0][:300]
            logger.warning("bf16 decode attention kernel off, torch's flash kernel instead (%s)", self.failed)


KERNEL = DecodeKernel()


def group_queries(query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """(B, heads, 1, d) -> (B, kv_heads, group, d): each K/V head's query heads as one block of queries."""
    batch, heads, _, head_dim = query.shape
    return query.reshape(batch, key.shape[1], heads // key.shape[1], head_dim)


def kernel_decode_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """One query token per row through `KERNEL`: (B, 1, heads, head_dim) and no weights."""
    batch, heads, _, head_dim = query.shape
    length = key.shape[2]
    grouped = group_queries(query, key).contiguous()  # one layout for every call: fewer graphs
    if attention_mask is None:
        mask = torch.ones(batch, 1, 1, length, dtype=torch.bool, device=query.device)
    else:  # as transformers' sdpa function slices it; one layout for every call (fewer graphs)
        mask = attention_mask[:, :, :, :length].expand(batch, 1, 1, length).contiguous()
    scale = head_dim**-0.5 if scaling is None else scaling
    return KERNEL(grouped, key, value, mask, scale).reshape(batch, 1, heads, head_dim), None


def grouped_decode_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """One query token per row through torch's sdpa over grouped query blocks: (B, 1, heads, head_dim)."""
    batch, heads, _, head_dim = query.shape
    grouped = group_queries(query, key)
    mask = attention_mask
    if mask is not None:
        mask = mask[:, :, :, : key.shape[2]]  # as transformers' sdpa function slices it
    out = F.scaled_dot_product_attention(grouped, key, value, attn_mask=mask, is_causal=False, scale=scaling)
    return out.reshape(batch, 1, heads, head_dim), None


def kernel_pays(rows: int, group: int, keys: int) -> bool:
    """Where the kernel beats the flash kernel (bench/decode-kernel-results.md): with one query head per K/V
    head from `KERNEL_MIN_KEYS` keys (over all rows, K/V heads and head dims; 2.4-4.7x at Vicuna-7B's heads,
    and at 8 heads of 64 it loses below about that many), with grouped heads from `KERNEL_MIN_ROWS` rows
    (0.97-1.55x with a padding mask at 16-64 rows; below 8 rows the flash kernel's blocks of grouped queries
    and the compiled call's fixed cost, about 25 us, make it lose by up to 1.4x)."""
    return keys >= KERNEL_MIN_KEYS if group == 1 else rows >= KERNEL_MIN_ROWS


def _kernel_takes(
    module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None
) -> bool:
    shaped = mask is None or (mask.dtype == torch.bool and mask.dim() == 4 and mask.shape[1:3] == (1, 1))
    return (
        getattr(module, KERNEL_FLAG, False) is True  # not PENDING: compiled and checked
        and KERNEL.failed is None
        and shaped
        and kernel_pays(query.shape[0], query.shape[1] // key.shape[1], key.numel())
    )


def decode_aware_sdpa(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *args: Any,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' sdpa attention, except bf16 decode steps on the CPU (the kernel, else grouped blocks)."""
    if args or not takes_decode_path(module, query, key, kwargs):
        return sdpa_attention_forward(module, query, key, value, attention_mask, *args, **kwargs)
    if _kernel_takes(module, query, key, attention_mask):
        try:
            return kernel_decode_attention(module, query, key, value, attention_mask, **kwargs)
        except Exception as err:  # compiling failed: this call and the rest take the fallback
            KERNEL.turn_off(err)
    if key.shape[1] < query.shape[1]:
        return grouped_decode_attention(module, query, key, value, attention_mask, **kwargs)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)  # nothing to group


def attention_layers(language_model: torch.nn.Module) -> list[torch.nn.Module]:
    """The LLM's attention layers (transformers' attention modules: those with `num_key_value_groups`)."""
    return [
        m for m in language_model.modules() if hasattr(m, "num_key_value_groups") and hasattr(m, "head_dim")
    ]


def enable_decode_kernel(language_model: torch.nn.Module, compile: bool = True) -> str | None:
    """Compile `KERNEL` for this bf16 CPU model's head layout and turn it on for its attention layers; returns
    None, or why the layers stay on the fallback (logged when the model qualified but the kernel did not
    compile). `compile=False`: only check that the model qualifies and mark its layers; the first
    `warm_decode_kernel` (called by the thread that will run the model) compiles, checks and turns the kernel
    on, and until then the layers take the fallback."""
    layers = attention_layers(language_model)
    if not layers:
        return "no transformers attention layers (modules with num_key_value_groups and head_dim) found"
    probe = layers[0]
    if any(p.device.type != "cpu" or p.dtype not in DECODE_DTYPES for p in language_model.parameters()):
        return "the model is not all bf16 on the CPU"
    reason = KERNEL.failed or (None if not compile else _warm_up(probe, language_model.config))
    if reason is not None:
        logger.warning("bf16 decode attention: torch's flash kernel (%s)", reason)
        return reason
    for layer in layers:
        setattr(layer, KERNEL_FLAG, True if compile else PENDING)
    return None


def warm_decode_kernel(language_model: torch.nn.Module) -> None:
    """Compile the kernel's graphs for the calling thread, if `enable_decode_kernel` turned it on (or marked it
    pending) for this model: dynamo keys graphs on the thread's intra-op thread count, so a model thread whose
    count differs from the thread that loaded the model would compile them again at its first steps, seconds
    each, while requests wait. Graphs that disagree or fail to compile turn the kernel off (logged); pending
    layers are turned on once their graphs check."""
    layers = [m for m in attention_layers(language_model) if getattr(m, KERNEL_FLAG, False)]
    if layers and KERNEL.failed is None:
        reason = _warm_up(layers[0], language_model.config)
        if reason is not None:
            KERNEL.turn_off(RuntimeError(reason))
            return
        for layer in layers:
            setattr(layer, KERNEL_FLAG, True)


def decode_kernel_on(language_model: torch.nn.Module) -> bool:
    """Whether this model's decode steps take the kernel now (on for its layers, not turned off since)."""
    return KERNEL.failed is None and any(
        getattr(m, KERNEL_FLAG, False) is True for m in attention_layers(language_model)
    )


def _warm_up(layer: torch.nn.Module, config: Any) -> str | None:
    """Compile the graphs a server needs (one row and several, as `kernel_pays` takes them; contiguous and
    strided K/V) and check each against the fallback; the reason it failed, or None."""
    heads, head_dim = config.num_attention_heads, layer.head_dim
    kv_heads = heads // layer.num_key_value_groups
    several = max(KERNEL_MIN_ROWS, 2)  # every count above one row shares a graph
    counts = [1, several] if layer.num_key_value_groups == 1 else [several]
    g = torch.Generator().manual_seed(0)
    windows = {"contiguous": None, "strided": 3, "strided from offset 0": 0}  # K/V: first column in storage
    for rows, (layout, first) in ((n, w) for n in counts for w in windows.items()):
        q = torch.randn(rows, heads, 1, head_dim, generator=g).to(torch.bfloat16)
        store = [
            torch.randn(rows + 1, kv_heads, 16, head_dim, generator=g).to(torch.bfloat16) for _ in range(2)
        ]
        k, v = (
            t[:rows, :, :9].contiguous() if first is None else t[:rows, :, first : first + 9] for t in store
        )
        mask = torch.ones(rows, 1, 1, 9, dtype=torch.bool)
        mask[-1, ..., :4] = False
        try:
            with torch.no_grad():
                ours, _ = kernel_decode_attention(layer, q, k, v, mask)
        except Exception as err:
            KERNEL.turn_off(err)
            return KERNEL.failed
        expected, _ = grouped_decode_attention(layer, q, k, v, mask)
        if not torch.allclose(ours.float(), expected.float(), rtol=2.0**-6, atol=2.0**-6):
            return f"the compiled kernel disagrees with torch's flash kernel ({rows} rows, {layout} K/V)"
    return None
