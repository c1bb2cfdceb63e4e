"""Presets: the paper models at their real sizes (built on the meta device), `tiny` in about a second."""

import time

import pytest
import torch

from mgllava import MGLlavaConfig, MGLlavaForConditionalGeneration, MGLlavaProcessor
from mgllava.model.configuration import preset_names

VICUNA_7B = 6_738_415_616  # LlamaForCausalLM lmsys/vicuna-7b-v1.5, as published
CLIP_L_336_VISION = 303_507_456  # CLIPVisionModel of openai/clip-vit-large-patch14-336


def convnext_trunk(widths=(192, 384, 768, 1536), depths=(3, 3, 27, 3)) -> int:
    """Stem + stages of a ConvNeXt (no head), by formula."""
    total = 3 * 4 * 4 * widths[0] + widths[0] + 2 * widths[0]  # stem conv + LayerNorm
    prev = widths[0]
    for i, (d, n) in enumerate(zip(widths, depths, strict=True)):
        if i:
            total += 2 * prev + prev * d * 4 + d  # downsample LayerNorm + 2x2 conv
        total += n * (49 * d + d + 2 * d + 4 * d * d + 4 * d + 4 * d * d + d + d)  # dw, LN, pw1, pw2, gamma
        prev = d
    return total


def new_modules(llm_hidden: int, low=1024, high=1536, objects=2880) -> int:
    fusion = (high * high + high) + (high * low + low) + (low * 49 + low) + (low * low + low)
    fusion += (2 * low * (low // 2) + low // 2) + (low // 2 + 1)
    mlp = lambda d: d * llm_hidden + llm_hidden + llm_hidden * llm_hidden + llm_hidden  # noqa: E731
    return fusion + mlp(low) + mlp(objects)


def llama_like(vocab, hidden, inter, layers, heads, kv_heads) -> int:
    kv = hidden // heads * kv_heads
    per_layer = 2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * inter + 2 * hidden
    return 2 * vocab * hidden + layers * per_layer + hidden


def meta_count(name: str) -> int:
    with torch.device("meta"):
        model = MGLlavaForConditionalGeneration(MGLlavaConfig.from_preset(name))
    return sum(p.numel() for p in model.parameters())


def test_convnext_formula_matches_timm_convnext_large():
    assert (
        convnext_trunk() == 196_227_264
    )  # timm convnext_large 197,767,336 minus its 1000-class head and norm
    assert llama_like(32000, 4096, 11008, 32, 32, 32) == VICUNA_7B


def test_vicuna_7b_parameter_count():
    placeholder_row = 2 * 4096  # <image> appended to Vicuna's 32000 tokens: one embedding and one lm_head row
    expected = VICUNA_7B + placeholder_row + CLIP_L_336_VISION + convnext_trunk() + new_modules(4096)
    assert meta_count("mgllava-vicuna-7b") == expected


@pytest.mark.parametrize(
    "name, llm",
    [
        ("mgllava-vicuna-13b", llama_like(32001, 5120, 13824, 40, 40, 40)),
        ("mgllava-llama3-8b", llama_like(128257, 4096, 14336, 32, 32, 8)),
        ("mgllava-yi1.5-34b", llama_like(64001, 7168, 20480, 60, 56, 8)),
        ("mgllava-phi3-3.8b", 3_821_079_552),  # Phi-3-mini-4k-instruct, as published (fused qkv/gate_up)
    ],
)
def test_other_paper_presets(name, llm):
    hidden = MGLlavaConfig.from_preset(name).text_config.hidden_size
    assert meta_count(name) == llm + CLIP_L_336_VISION + convnext_trunk() + new_modules(hidden)


def test_paper_presets_geometry():
    for name in preset_names():
        if not name.startswith("mgllava-"):  # tiny and demo are miniatures
            continue
        config = MGLlavaConfig.from_preset(name)
        assert config.num_image_tokens == 576 and config.object_feature_dim == 2880
        assert config.high_res_config.image_size == 768


def test_tiny_builds_in_about_a_second():
    start = time.perf_counter()
    model = MGLlavaForConditionalGeneration(MGLlavaConfig.from_preset("tiny"))
    processor = MGLlavaProcessor.from_preset("tiny")
    assert time.perf_counter() - start < 10  # generous bound: a hang or a download would blow it
    assert processor.image_token_id == model.config.image_token_id


def test_paper_processor_needs_its_tokenizer_offline():
    with pytest.raises(ValueError, match=r"tokenizer .*lmsys/vicuna-7b-v1\.5.* pass tokenizer="):
        MGLlavaProcessor.from_preset("mgllava-vicuna-7b")
    tiny_tok = MGLlavaProcessor.from_preset("tiny").tokenizer
    with pytest.raises(
        ValueError, match="maps <image> to id 4 but the model config expects image_token_id 32000"
    ):
        MGLlavaProcessor.from_preset("mgllava-vicuna-7b", tokenizer=tiny_tok)
