"""bf16 grouped-query decode attention on the CPU (`inference.attention`): transformers' sdpa call up to bf16's
output rounding, taken only where it applies, and an engine that uses it answers as one on sdpa does."""

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from mgllava.inference import Engine, attention
from mgllava.inference.attention import decode_aware_sdpa, grouped_decode_attention, takes_grouped_path

from ..serving import ShapesProposer, tiny_parts
from .test_decoding import agreement, solo, workload


class Heads(torch.nn.Module):
    def __init__(self, groups: int) -> None:
        super().__init__()
        self.num_key_value_groups = groups
        self.eval()


def decode_inputs(dtype=torch.bfloat16, batch=5, heads=8, kv_heads=2, length=37, head_dim=32, seed=0):
    """q (B, heads, 1, d), k/v (B, kv_heads, L, d), a left-padding bool mask (B, 1, 1, L): row i skips 3i columns."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, h, n, head_dim, generator=g).to(dtype)
               for h, n in ((heads, 1), (kv_heads, length), (kv_heads, length)))  # fmt: skip
    mask = torch.ones(batch, 1, 1, length, dtype=torch.bool)
    for row in range(batch):
        mask[row, ..., : 3 * row] = False
    return q, k, v, mask


def additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(mask.shape, dtype=dtype).masked_fill(~mask, torch.finfo(dtype).min)


def bf16_ulps(x: torch.Tensor, y: torch.Tensor) -> float:
    """The largest |x - y| in units of bf16's spacing at |y| (2^-7 relative; at least 2^-14 absolute)."""
    spacing = 2.0**-7 * y.float().abs().clamp(min=2.0**-7)
    return ((x.float() - y.float()).abs() / spacing).max().item()


@pytest.mark.parametrize(
    ("heads", "kv_heads", "head_dim"), [(8, 1, 32), (8, 2, 32), (8, 4, 32), (32, 8, 128)]
)
@pytest.mark.parametrize("mask_kind", ["bool", "additive", "none"])
def test_grouped_decode_attention_is_transformers_sdpa_to_bf16_rounding(heads, kv_heads, head_dim, mask_kind):
    q, k, v, mask = decode_inputs(heads=heads, kv_heads=kv_heads, head_dim=head_dim, length=300)
    mask = {"bool": mask, "additive": additive(mask, q.dtype), "none": None}[mask_kind]
    layer = Heads(heads // kv_heads)
    ours, _ = grouped_decode_attention(layer, q, k, v, mask, scaling=0.17)
    theirs, _ = sdpa_attention_forward(layer, q, k, v, mask, scaling=0.17)
    assert ours.shape == theirs.shape == (5, 1, heads, head_dim) and ours.dtype == torch.bfloat16
    if mask_kind != "none":  # transformers packs the queries as we do (`pack_gqa`): the same call
        assert torch.equal(ours, theirs)
    assert (
        bf16_ulps(ours, theirs) <= 2
    )  # without a mask it passes enable_gqa: the same arithmetic, blocked otherwise
    reference_mask = mask.float() if mask_kind == "additive" else mask
    reference, _ = sdpa_attention_forward(
        layer, q.float(), k.float(), v.float(), reference_mask, scaling=0.17
    )
    bound = 2.0**-8 * v.float().abs().max()  # the output is a convex combination of V's rows
    assert (ours.float() - reference).abs().max() <= bound


def test_only_bf16_grouped_query_decode_steps_on_the_cpu_take_the_grouped_path():
    module = Heads(4)
    q, k = torch.zeros(2, 8, 1, 16, dtype=torch.bfloat16), torch.zeros(2, 2, 9, 16, dtype=torch.bfloat16)
    assert takes_grouped_path(module, q, k, {})
    assert not takes_grouped_path(module, q.float(), k.float(), {})  # fp32: sdpa
    assert not takes_grouped_path(module, q.expand(-1, -1, 3, -1), k, {})  # a prompt
    assert not takes_grouped_path(
        module, q, torch.zeros(2, 8, 9, 16, dtype=torch.bfloat16), {}
    )  # one query head per K/V head
    assert not takes_grouped_path(module, q.to("meta"), k.to("meta"), {})  # not the CPU
    assert not takes_grouped_path(module, q, k, {"softcap": 30.0})
    module.train()
    assert not takes_grouped_path(module, q, k, {"dropout": 0.1})


def test_decode_aware_sdpa_leaves_prompts_and_float32_to_sdpa():
    q, k, v, mask = decode_inputs(dtype=torch.float32)
    prompt = (q.bfloat16().expand(-1, -1, 3, -1), k.bfloat16(), v.bfloat16(), None)
    for query, keys, values, m in ((q, k, v, mask), prompt):
        ours, _ = decode_aware_sdpa(Heads(4), query, keys, values, m)
        expected, _ = sdpa_attention_forward(Heads(4), query, keys, values, m)
        assert torch.equal(ours, expected)


@pytest.mark.parametrize("scheduling", ["static", "continuous"])
def test_a_bf16_engine_decodes_through_the_grouped_path_and_answers_as_on_sdpa(monkeypatch, scheduling):
    model, processor = tiny_parts()
    text = model.config.text_config
    assert text.num_key_value_heads < text.num_attention_heads  # the tiny preset has grouped-query heads
    engine = Engine(model.to(torch.bfloat16), processor, ShapesProposer(), scheduling=scheduling)
    prepared = workload(engine)
    calls = []
    real = attention.grouped_decode_attention
    monkeypatch.setattr(
        attention, "grouped_decode_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw)
    )
    grouped = [solo(engine, p) for p in prepared]
    assert len(calls) >= sum(len(a) - 1 for a in grouped) * text.num_hidden_layers
    monkeypatch.setattr(attention, "takes_grouped_path", lambda *a: False)
    on_sdpa = [solo(engine, p) for p in prepared]
    assert agreement(grouped, on_sdpa) == 1.0
