"""The model as transformers structures LLaVA: `MGLlavaModel` (towers, fusion, projectors, decoder) plus
`MGLlavaForConditionalGeneration` with a top-level `lm_head`, and folders in the flat layout of before
(`tests/model/data/tiny_state_dict_keys_v1.txt`: the tiny preset's keys as mg-llava wrote them until then)
loading into it with every key accounted for."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoModelForImageTextToText

import mgllava  # noqa: F401  (registers the Auto classes)
from mgllava.model import MGLlavaConfig, MGLlavaForConditionalGeneration, MGLlavaModel
from mgllava.model.modeling import MODULES

V1_KEYS = Path(__file__).parent / "data" / "tiny_state_dict_keys_v1.txt"


def flat_key(key: str) -> str:
    """A key of today's model written in the flat layout of before, renamed by hand (not by the key map)."""
    if key.startswith("lm_head."):
        return "language_model." + key
    if key.startswith("model.language_model."):
        return "language_model.model." + key.removeprefix("model.language_model.")
    return re.sub(rf"^model\.({'|'.join(MODULES)})\.", r"\1.", key)


def tiny(**overrides) -> MGLlavaForConditionalGeneration:
    torch.manual_seed(0)
    return MGLlavaForConditionalGeneration(MGLlavaConfig.from_preset("tiny", **overrides)).eval()


def inputs(config: MGLlavaConfig) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    low, high = config.vision_config.image_size, config.high_res_config.image_size
    rows = config.num_image_tokens + 2
    ids = torch.tensor([[1, 7, 8] + [config.image_token_id] * rows + [9, 10]])
    return {"input_ids": ids, "pixel_values": torch.randn(1, 3, low, low, generator=g),
            "high_res_pixel_values": torch.randn(1, 3, high, high, generator=g),
            "object_boxes": torch.tensor([[4.0, 4, 60, 70], [10, 20, 100, 120]]),
            "object_counts": torch.tensor([2])}  # fmt: skip


def write_flat_folder(model: MGLlavaForConditionalGeneration, folder: Path) -> list[str]:
    state = {flat_key(k): v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    model.config.save_pretrained(folder)
    return sorted(state)


def test_structure_is_llavas():
    model = tiny()
    assert [n for n, _ in model.named_children()] == ["model", "lm_head"]
    assert isinstance(model.model, MGLlavaModel) and model.base_model is model.model
    assert model.get_output_embeddings() is model.lm_head
    assert model.get_input_embeddings() is model.model.language_model.embed_tokens
    assert type(model.language_model).__name__ == "LlamaModel"  # the decoder, read through to the base
    assert model._tp_plan["lm_head"] == "colwise_gather_output"  # LLaVA's, plus the decoder's own plan
    assert model._tp_plan["model.language_model.layers.*.mlp.down_proj"] == "rowwise"
    base = AutoModel.from_config(model.config)
    assert type(base) is MGLlavaModel
    out = base(**inputs(model.config))
    assert out.last_hidden_state.shape[-1] == model.config.text_config.hidden_size


def test_parts_assigned_on_the_composite_land_in_the_base_model():
    model = tiny()
    fresh = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 64))
    model.projector = fresh
    assert model.model.projector is fresh and "projector" not in dict(model.named_children())


def test_a_flat_folder_of_before_loads_every_key_with_equal_logits(tmp_path):
    model = tiny()
    keys = write_flat_folder(model, tmp_path)
    assert keys == sorted(V1_KEYS.read_text().split())  # the folder is in the layout of before
    loaded, info = MGLlavaForConditionalGeneration.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"))
    batch = inputs(model.config)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(**batch).logits, model(**batch).logits, rtol=0, atol=0)
    auto = AutoModelForImageTextToText.from_pretrained(tmp_path)
    assert torch.equal(auto.lm_head.weight, model.lm_head.weight)
    base, info = MGLlavaModel.from_pretrained(tmp_path, output_loading_info=True)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == {"language_model.lm_head.weight"}
    assert torch.equal(base.language_model.norm.weight, model.model.language_model.norm.weight)


def test_saved_folders_keep_the_flat_layout(tmp_path):
    """`save_pretrained` reverts the key map: a folder written now loads in mg-llava of before too."""
    model = tiny(object_tokens="off")
    model.save_pretrained(tmp_path)
    keys = set(load_file(tmp_path / "model.safetensors"))
    assert keys == {flat_key(k) for k in model.state_dict()}
    assert "language_model.lm_head.weight" in keys and not any(k.startswith("model.") for k in keys)


@pytest.mark.parametrize("tie", [False, True])
def test_lm_head_is_tied_to_the_embeddings_when_the_llm_ties_them(tie, tmp_path):
    text = dict(MGLlavaConfig.from_preset("tiny").text_config.to_dict(), tie_word_embeddings=tie)
    model = tiny(text_config=text)
    shared = model.lm_head.weight is model.get_input_embeddings().weight
    assert shared == tie
    model.save_pretrained(tmp_path)
    loaded = MGLlavaForConditionalGeneration.from_pretrained(tmp_path)
    assert (loaded.lm_head.weight is loaded.get_input_embeddings().weight) == tie
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)


def _device_of(device_map: dict[str, int | str], param: str) -> int | str:
    """The device `device_map` gives a parameter: its longest module prefix's."""
    owners = [k for k in device_map if k == "" or param == k or param.startswith(k + ".")]
    return device_map[max(owners, key=len)]


def _split_blocks(model: torch.nn.Module, device_map: dict[str, int | str]) -> list[str]:
    """The modules of a `_no_split_modules` class whose parameters `device_map` spreads over devices."""
    return [
        name
        for name, module in model.named_modules()
        if type(module).__name__ in model._no_split_modules
        and len({_device_of(device_map, f"{name}.{p}") for p, _ in module.named_parameters()}) > 1
    ]


# Budgets in bytes for the tiny preset (1.7 MB): each cuts through a tower (CLIP's layers in one, the
# ConvNeXt's first stage in the other); "devices" 0-2 need not exist for the plan (accelerate warns).
SPLITTING_BUDGETS = [
    {0: 100_000, 1: 150_000, "cpu": 10**7},
    {0: 80_000, 1: 120_000, 2: 200_000, "cpu": 10**7},
]


@pytest.mark.parametrize("max_memory", SPLITTING_BUDGETS)
def test_device_map_auto_splits_the_model_but_no_tower_block(max_memory):
    from accelerate import infer_auto_device_map

    with torch.device("meta"):
        model = MGLlavaForConditionalGeneration(MGLlavaConfig.from_preset("tiny"))
    blocks = {
        "CLIPVisionEmbeddings",
        "CLIPEncoderLayer",
        "ConvNextEmbeddings",
        "ConvNextBlock",
        "LlamaDecoderLayer",
    }
    assert blocks | {"ConvGateFusion", "ObjectMixer"} <= set(model._no_split_modules)
    device_map = infer_auto_device_map(model, max_memory=max_memory,
                                       no_split_module_classes=list(model._no_split_modules))  # fmt: skip
    towers = [
        {_device_of(device_map, f"model.{tower}.{p}") for p, _ in getattr(model, tower).named_parameters()}
        for tower in ("vision_tower", "high_res_tower")
    ]
    assert any(len(devices) > 1 for devices in towers)  # the budget does cut through a tower
    assert _split_blocks(model, device_map) == []
    # the same budget with the decoder layer alone kept whole (as before) cuts a tower block in two
    decoder_only = infer_auto_device_map(
        model, max_memory=max_memory, no_split_module_classes=["LlamaDecoderLayer"]
    )
    assert _split_blocks(model, decoder_only)


def test_towers_are_pretrained_models_initialised_by_the_composite():
    """Both towers are transformers PreTrainedModels (CLIP's and ConvNeXt's); the ConvNeXt tower calls no
    `post_init` of its own, so the composite initialises it in the draw order of before (seeded models and
    the demo's tables are unchanged) - and it does initialise it: normal(0, 0.02), layer scale as set."""
    import torch
    from transformers.models.clip.modeling_clip import CLIPPreTrainedModel
    from transformers.models.convnext.modeling_convnext import ConvNextPreTrainedModel

    from mgllava import MGLlavaConfig, MGLlavaForConditionalGeneration

    config = MGLlavaConfig.from_preset("tiny")
    model = MGLlavaForConditionalGeneration(config)
    assert isinstance(model.vision_tower, CLIPPreTrainedModel) and model.vision_tower._supports_sdpa
    assert isinstance(model.high_res_tower, ConvNextPreTrainedModel)
    assert model.high_res_tower.config is config.high_res_config
    block = model.high_res_tower.encoder.stages[0].layers[0]
    assert torch.all(block.layer_scale_parameter == config.high_res_config.layer_scale_init_value)
    weights = torch.cat([p.detach().flatten() for n, p in model.high_res_tower.named_parameters() if n.endswith("weight")
                         and p.dim() > 1])  # fmt: skip
    assert abs(float(weights.std()) - 0.02) < 0.002 and abs(float(weights.mean())) < 0.002
