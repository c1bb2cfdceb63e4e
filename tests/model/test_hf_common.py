"""The behaviours transformers' common model tests check (`ModelTesterMixin`, `GenerationTesterMixin`,
`ConfigTester`, as `tests/models/llava/test_modeling_llava.py` uses them), written here for MG-LLaVA on the
`tiny` preset: config defaults and round-trips, dict and tuple outputs, `inputs_embeds` with images, hidden
states and attentions of every part, save/load, eager vs SDPA, gradient checkpointing, `generate` from
embeddings, batched vs single.

`MGLlavaModelTester` builds the inputs as the processor would: per sample `[BOS][576 + n image rows as
placeholders][text]` (here 16 + n), pixels for both towers, and the boxes with their per-image counts.
"""

from __future__ import annotations

import json
from unittest import mock

import pytest
import torch
from transformers import AutoConfig, AutoModelForImageTextToText

from mgllava import MGLlavaConfig, MGLlavaForConditionalGeneration

ATOL = 1e-5


class MGLlavaModelTester:
    """Config and inputs for the common tests: `batch_size` samples of one image each, `boxes` object boxes
    per image, `text_length` random text tokens after the image's placeholders."""

    def __init__(self, batch_size: int = 2, boxes: int = 2, text_length: int = 7, seed: int = 0) -> None:
        self.batch_size, self.boxes, self.text_length, self.seed = batch_size, boxes, text_length, seed

    def get_config(self, **overrides) -> MGLlavaConfig:
        return MGLlavaConfig.from_preset("tiny", **overrides)

    def visual_rows(self, config: MGLlavaConfig) -> int:
        return config.num_image_tokens + self.boxes

    def prepare_config_and_inputs_for_common(self, **overrides) -> tuple[MGLlavaConfig, dict]:
        config = self.get_config(**overrides)
        g = torch.Generator().manual_seed(self.seed)
        b, text = self.batch_size, config.text_config
        words = torch.randint(config.image_token_id + 1, text.vocab_size, (b, self.text_length), generator=g)
        placeholders = torch.full((b, self.visual_rows(config)), config.image_token_id)
        input_ids = torch.cat([torch.full((b, 1), text.bos_token_id), placeholders, words], 1)
        low, high = config.vision_config.image_size, config.high_res_config.image_size
        corners = torch.randint(0, high // 2, (b * self.boxes, 2), generator=g).float()
        sizes = torch.randint(4, high // 2, (b * self.boxes, 2), generator=g).float()
        inputs = {
            "input_ids": input_ids,
            "attention_mask": torch.ones_like(input_ids),
            "pixel_values": torch.randn(b, 3, low, low, generator=g),
            "high_res_pixel_values": torch.randn(b, 3, high, high, generator=g),
            "object_boxes": torch.cat([corners, corners + sizes], 1),
            "object_counts": torch.full((b,), self.boxes),
        }
        return config, inputs

    def image_inputs(self, inputs: dict) -> dict:
        return {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask", "labels")}

    def build(self, config: MGLlavaConfig, **load) -> MGLlavaForConditionalGeneration:
        torch.manual_seed(self.seed)
        if load:
            config._attn_implementation = load.pop("attn_implementation")
        return MGLlavaForConditionalGeneration(config).eval()


@pytest.fixture(scope="module")
def tester() -> MGLlavaModelTester:
    return MGLlavaModelTester()


@pytest.fixture(scope="module")
def model_and_inputs(tester):
    config, inputs = tester.prepare_config_and_inputs_for_common()
    return tester.build(config), inputs


def without_name(d: dict) -> dict:
    return {k: v for k, v in d.items() if k != "_name_or_path"}


# -- config (ConfigTester) ------------------------------------------------------------------------------------
def test_config_without_arguments_builds_the_paper_shapes():
    config = MGLlavaConfig()
    assert 0 <= config.image_token_id < config.text_config.vocab_size
    assert (config.num_image_tokens, config.object_feature_dim) == (576, 2880)
    with torch.device("meta"):
        model = MGLlavaForConditionalGeneration(config)
    assert model.get_input_embeddings().weight.shape[0] == config.text_config.vocab_size


@pytest.mark.parametrize(
    "make", [MGLlavaConfig, lambda: MGLlavaConfig.from_preset("tiny")], ids=["default", "tiny"]
)
def test_config_round_trips(make, tmp_path):
    config = make()
    as_dict = config.to_dict()
    assert MGLlavaConfig.from_dict(as_dict).to_dict() == as_dict
    assert MGLlavaConfig(**as_dict).to_dict() == as_dict
    assert json.loads(config.to_json_string()) == json.loads(
        MGLlavaConfig.from_dict(as_dict).to_json_string()
    )
    config.save_pretrained(tmp_path)
    for loaded in (MGLlavaConfig.from_pretrained(tmp_path), AutoConfig.from_pretrained(tmp_path)):
        assert type(loaded) is MGLlavaConfig and without_name(loaded.to_dict()) == without_name(as_dict)


def test_config_common_kwargs_are_kept(tmp_path):
    common = {
        "return_dict": False,
        "output_hidden_states": True,
        "output_attentions": True,
        "dtype": "float16",
    }
    config = MGLlavaConfig.from_preset("tiny", **common)
    config.save_pretrained(tmp_path)
    loaded = MGLlavaConfig.from_pretrained(tmp_path)
    for key, value in common.items():
        assert str(getattr(loaded, key)).removeprefix("torch.") == str(value), key


# -- outputs (ModelTesterMixin) --------------------------------------------------------------------------------
def test_dict_and_tuple_outputs_agree(tester, model_and_inputs):
    model, inputs = model_and_inputs
    labels = inputs["input_ids"].masked_fill(inputs["input_ids"] == model.config.image_token_id, -100)
    with torch.no_grad():
        as_dict = model(**inputs, labels=labels)
        as_tuple = model(**inputs, labels=labels, return_dict=False)
        features = model.get_image_features(**tester.image_inputs(inputs), return_dict=False)
    assert isinstance(as_tuple, tuple)
    assert torch.equal(as_tuple[0], as_dict.loss) and torch.equal(as_tuple[1], as_dict.logits)
    assert len(as_tuple) == len(as_dict.to_tuple())
    assert isinstance(features, tuple) and torch.equal(features[0], as_dict.image_outputs.last_hidden_state)
    assert features[0].shape == (tester.batch_size, 1 + model.config.num_image_tokens,
                                 model.config.vision_config.hidden_size)  # fmt: skip
    model.config.return_dict = False
    try:
        with torch.no_grad():
            assert isinstance(model(**inputs), tuple)
    finally:
        model.config.return_dict = True


def test_inputs_embeds_with_images_equal_input_ids(tester, model_and_inputs):
    model, inputs = model_and_inputs
    embeds = model.get_input_embeddings()(inputs["input_ids"])
    with torch.no_grad():
        from_ids = model(**inputs).logits
        from_embeds = model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"],
                            **tester.image_inputs(inputs)).logits  # fmt: skip
    assert torch.equal(from_ids, from_embeds)
    one_short = embeds.clone()
    one_short[0, 1] = model.get_input_embeddings().weight[5]
    rows = 2 * tester.visual_rows(model.config)
    with pytest.raises(
        ValueError, match=f"{rows - 1} image placeholder tokens but the images give {rows} visual"
    ):
        model(inputs_embeds=one_short, **tester.image_inputs(inputs))


def test_hidden_states_and_attentions_of_every_part(tester):
    config, inputs = tester.prepare_config_and_inputs_for_common()
    model = tester.build(config, attn_implementation="eager")
    with torch.no_grad():
        plain = model(**inputs)
        out = model(**inputs, output_hidden_states=True, output_attentions=True)
    text, vision = config.text_config, config.vision_config
    b, t = inputs["input_ids"].shape
    assert plain.hidden_states is None and plain.attentions is None
    assert plain.image_outputs.hidden_states is None and plain.image_outputs.high_res_hidden_states is None
    assert [h.shape for h in out.hidden_states] == [(b, t, text.hidden_size)] * (text.num_hidden_layers + 1)
    assert [a.shape for a in out.attentions] == [(b, text.num_attention_heads, t, t)] * text.num_hidden_layers
    image, patches = out.image_outputs, config.num_image_tokens + 1  # CLIP keeps CLS
    assert [h.shape for h in image.hidden_states] == [(b, patches, vision.hidden_size)] * (
        vision.num_hidden_layers + 1
    )
    assert [a.shape for a in image.attentions] == [(b, vision.num_attention_heads, patches, patches)] * (
        vision.num_hidden_layers
    )
    strides = [4, 8, 16, 32]
    high = config.high_res_config
    assert [s.shape for s in image.high_res_hidden_states] == [
        (b, c, high.image_size // s, high.image_size // s)
        for c, s in zip(high.hidden_sizes, strides, strict=True)
    ]
    assert torch.equal(out.logits, plain.logits)
    with torch.no_grad():  # the image rows come from CLIP's feature layer and the ConvNeXt stages
        low = image.hidden_states[config.vision_feature_layer][:, 1:]
        fused = model.fusion(low, list(image.high_res_hidden_states))
        rows = model.projector(fused)
        # CLIP at the feature layer, CLS included, equal to what running only the layers up to it gives
        assert torch.equal(image.last_hidden_state, image.hidden_states[config.vision_feature_layer])
        assert torch.equal(plain.image_outputs.last_hidden_state, image.last_hidden_state)
        for i, visual in enumerate(image.pooler_output):
            assert torch.equal(visual[: config.num_image_tokens], rows[i])


def test_save_then_load_gives_equal_logits(model_and_inputs, tmp_path):
    model, inputs = model_and_inputs
    model.save_pretrained(tmp_path)
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    assert type(loaded) is MGLlavaForConditionalGeneration
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, model(**inputs).logits)


@pytest.mark.parametrize("with_images", [True, False], ids=["images", "text_with_placeholders"])
def test_eager_matches_sdpa(tester, with_images):
    config, inputs = tester.prepare_config_and_inputs_for_common()
    inputs["attention_mask"][1, :3] = 0  # left padding in the second sample
    if not with_images:
        inputs = {k: inputs[k] for k in ("input_ids", "attention_mask")}  # as the library's test feeds it
    eager = tester.build(config, attn_implementation="eager")
    sdpa = tester.build(tester.get_config(), attn_implementation="sdpa")
    assert sdpa.language_model.config._attn_implementation == "sdpa"
    real = inputs["attention_mask"].bool()
    with torch.no_grad():
        torch.testing.assert_close(
            eager(**inputs).logits[real], sdpa(**inputs).logits[real], atol=ATOL, rtol=ATOL
        )


def test_gradient_checkpointing_gives_the_same_gradients(tester):
    config, inputs = tester.prepare_config_and_inputs_for_common()
    labels = inputs["input_ids"].masked_fill(inputs["input_ids"] == config.image_token_id, -100)

    def gradients(checkpointing: bool) -> dict[str, torch.Tensor]:
        model = tester.build(tester.get_config()).train()
        if checkpointing:
            model.activation_checkpointing_enable()
            assert model.is_activation_checkpointing
        model(**inputs, labels=labels).loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    plain, checkpointed = gradients(False), gradients(True)
    assert plain.keys() == checkpointed.keys() and any(k.startswith("model.projector.") for k in plain)
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, atol=1e-6, rtol=1e-5, msg=name)


# -- generation (GenerationTesterMixin) ------------------------------------------------------------------------
def greedy(model, n: int = 5, **inputs) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)


def test_generate_from_embeddings_equals_from_ids(tester, model_and_inputs):
    model, inputs = model_and_inputs
    from_ids = greedy(model, **inputs)[:, inputs["input_ids"].shape[1] :]
    embeds = model.get_input_embeddings()(inputs["input_ids"])
    base = model.base_model  # generate encodes through the base model, as for LLaVA
    with mock.patch.object(base, "get_image_features", wraps=base.get_image_features) as encode:
        from_embeds = greedy(model, inputs_embeds=embeds, attention_mask=inputs["attention_mask"],
                             **tester.image_inputs(inputs))  # fmt: skip
    assert encode.call_count == 1  # the images were encoded once, before prefill, and spliced in
    assert torch.equal(from_embeds, from_ids)


def test_batched_equals_one_by_one(tester, model_and_inputs):
    model, inputs = model_and_inputs
    boxes = inputs["object_counts"].tolist()
    starts = [sum(boxes[:i]) for i in range(len(boxes))]
    with torch.no_grad():
        batched = model(**inputs).logits
    for i, (start, n) in enumerate(zip(starts, boxes, strict=True)):
        one = {k: inputs[k][i : i + 1] for k in ("input_ids", "attention_mask", "pixel_values",
                                                  "high_res_pixel_values", "object_counts")}  # fmt: skip
        one["object_boxes"] = inputs["object_boxes"][start : start + n]
        with torch.no_grad():
            torch.testing.assert_close(model(**one).logits, batched[i : i + 1], atol=ATOL, rtol=ATOL)
        assert torch.equal(greedy(model, **one), greedy(model, **inputs)[i : i + 1])


def test_image_features_without_boxes_have_no_object_rows(tester, model_and_inputs):
    model, inputs = model_and_inputs
    images = {k: inputs[k] for k in ("pixel_values", "high_res_pixel_values")}
    with torch.no_grad():
        plain = model.get_image_features(**images)
        none = model.get_image_features(
            **images,
            object_boxes=torch.zeros(0, 4),
            object_counts=torch.zeros(tester.batch_size, dtype=torch.long),
        )
    assert [r.shape[0] for r in plain.pooler_output] == [model.config.num_image_tokens] * tester.batch_size
    assert all(torch.equal(a, b) for a, b in zip(plain.pooler_output, none.pooler_output, strict=True))
    with pytest.raises(ValueError, match="object_boxes and object_counts go together"):
        model.get_image_features(**images, object_boxes=inputs["object_boxes"])


@pytest.mark.parametrize("chunk", [1, 5, 10_000])
@pytest.mark.parametrize("items", [None, 37])
def test_chunked_loss_equals_the_plain_loss_and_its_gradients(tester, chunk, items):
    config, inputs = tester.prepare_config_and_inputs_for_common()
    model = tester.build(config).train()
    labels = inputs["input_ids"].masked_fill(inputs["input_ids"] == config.image_token_id, -100)
    labels[0, -3:] = -100  # a row whose last tokens are not supervised
    extra = {} if items is None else {"num_items_in_batch": torch.tensor(items)}

    def loss_and_grads(**chunking):
        model.zero_grad()
        out = model(**inputs, labels=labels, **extra, **chunking)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return out, grads

    plain, plain_grads = loss_and_grads()
    chunked, chunked_grads = loss_and_grads(loss_chunk_tokens=chunk)
    assert chunked.logits is None and plain.logits is not None
    torch.testing.assert_close(chunked.loss, plain.loss, rtol=1e-6, atol=1e-6)
    assert chunked_grads.keys() == plain_grads.keys() and "lm_head.weight" in chunked_grads
    for name, grad in plain_grads.items():
        # the same sums in another order (per chunk, then across chunks): float32 rounding apart
        torch.testing.assert_close(
            chunked_grads[name], grad, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}"
        )
    with pytest.raises(ValueError, match="loss_chunk_tokens must be >= 1"):
        model(**inputs, labels=labels, loss_chunk_tokens=0)
