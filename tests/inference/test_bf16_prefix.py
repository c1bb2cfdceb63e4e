"""Prefix reuse in bf16: a second turn that reuses the first turn's K/V (bf16, computed in a batch of one)
answers as recomputing the whole conversation does. Exact equality cannot be promised in bf16 (the reused
rows were computed by another GEMM shape than a full prefill's), so the greedy agreement rate is tested, with
the bound of the other bf16 equivalence tests (test_decoding.GREEDY_BF16)."""

import torch

from mgllava.inference.prefix import content_ids

from ..serving import ask, data_url, scene, tiny_parts
from .test_decoding import GREEDY_BF16, QUESTION, agreement, greedy, solo, three_engines


def test_bf16_second_turns_from_reused_prefixes_agree_with_recomputation():
    model, processor = tiny_parts()
    engines = three_engines(model.to(torch.bfloat16), processor)
    engine, recompute = engines["continuous"], engines["recompute"]
    reused, recomputed = [], []
    for seed in (21, 22, 23, 24):
        url = data_url(scene(seed))
        first = engine.chat(ask(QUESTION, url), settings=greedy(10))
        turn = [*ask(QUESTION, url), {"role": "assistant", "content": first.text},
                {"role": "user", "content": "Where is it?"}]  # fmt: skip
        prepared = engine.prepare(turn, settings=greedy(10))
        hits = engine.prefixes.hits
        reused.append(solo(engine, prepared))
        assert engine.prefixes.hits == hits + 1  # the first turn's K/V were reused
        recomputed.append(solo(recompute, prepared))
    entry, _, _ = engine.prefixes.lookup(
        content_ids(prepared.input_ids, prepared.frames, processor.image_token_id)
    )
    assert entry.kv[0][0].dtype == torch.bfloat16  # the cache holds the model's dtype
    assert agreement(reused, recomputed) >= GREEDY_BF16
