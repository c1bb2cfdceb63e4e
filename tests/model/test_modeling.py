"""The composite model: generation equivalences, save/load, counts, dtypes, attention backends, training."""

from unittest import mock

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor, TextIteratorStreamer

from mgllava import MGLlavaConfig, MGLlavaForConditionalGeneration, MGLlavaProcessor
from mgllava.convert.folder import configure_generation, write_folder
from mgllava.model import modeling

from ..serving import scene


def ask(text: str, image: bool = True) -> list[dict]:
    content = [{"type": "image"}] if image else []
    return [{"role": "user", "content": [*content, {"type": "text", "text": text}]}]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = MGLlavaForConditionalGeneration(MGLlavaConfig.from_preset("tiny")).eval()
    processor = MGLlavaProcessor.from_preset("tiny")
    configure_generation(model, processor)
    return model, processor


def encode(processor, conversations, images=None, boxes=None, **kw):
    return processor.apply_chat_template(
        conversations,
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        images=images,
        boxes=boxes,
        **kw,
    )


def greedy(model, inputs, n=8):
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[:, inputs["input_ids"].shape[1] :]


def test_kv_cache_decode_equals_full_recompute(tiny):
    model, processor = tiny
    inputs = encode(
        processor, ask("What shape is in the image?"), [scene(1)], [[[5, 5, 40, 30], [50, 10, 90, 60]]]
    )
    new = greedy(model, inputs, n=10)
    full_ids = torch.cat([inputs["input_ids"], new], dim=1)
    with torch.no_grad():
        logits = model(
            input_ids=full_ids,
            attention_mask=torch.ones_like(full_ids),
            pixel_values=inputs["pixel_values"],
            high_res_pixel_values=inputs["high_res_pixel_values"],
            object_boxes=inputs["object_boxes"],
            object_counts=inputs["object_counts"],
            use_cache=False,
        ).logits
    start = inputs["input_ids"].shape[1] - 1
    recomputed = logits[0, start : start + new.shape[1]].argmax(-1)
    assert recomputed.tolist() == new[0].tolist()


def test_batch_equals_samples_one_by_one(tiny):
    model, processor = tiny
    samples = [
        (ask("What shape is in the image?"), [scene(2)], [[[0, 0, 50, 40]]]),
        (
            ask("Describe the image briefly."),
            [scene(3, (50, 90))],
            [[[1, 1, 20, 20], [25, 30, 45, 50], [2, 60, 20, 85]]],
        ),
        (ask("Is there a circle?", image=False), [], []),
        (ask("What color is the shape?"), [scene(4)], [None]),  # no boxes: the zero-box fallback row
    ]
    single = [greedy(model, encode(processor, conv, imgs, bxs))[0].tolist() for conv, imgs, bxs in samples]
    batch_inputs = encode(
        processor,
        [s[0] for s in samples],
        images=[i for s in samples for i in s[1]],
        boxes=[b for s in samples for b in s[2]],
    )
    assert batch_inputs["object_counts"].tolist() == [1, 3, 1]
    assert greedy(model, batch_inputs).tolist() == single


def test_several_images_in_one_conversation(tiny):
    model, processor = tiny
    conv = [{"role": "user", "content": "First <image> then <image> - same shape?"}]
    inputs = encode(processor, conv, [scene(5), scene(6)], [[[0, 0, 10, 10]], [[1, 1, 30, 30], [2, 2, 9, 9]]])
    n_rows = 2 * model.config.num_image_tokens + 3
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == n_rows
    assert greedy(model, inputs, n=3).shape == (1, 3)


def test_placeholder_count_mismatch_names_both_counts_and_text_alone_warns(tiny):
    model, processor = tiny
    inputs = encode(processor, ask("What?"), [scene(7)], [[[0, 0, 10, 10]]])
    ids = inputs["input_ids"].clone()
    ids[0, (ids[0] == model.config.image_token_id).nonzero()[0]] = 5  # one placeholder too few
    args = {k: v for k, v in inputs.items() if k not in ("input_ids", "labels")}
    with pytest.raises(ValueError, match=r"16 image placeholder tokens but the images give 17 visual rows"):
        model(input_ids=ids, **args)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    with mock.patch.object(modeling.logger, "warning_once") as warn, torch.no_grad():
        text_only = model(input_ids=ids, attention_mask=mask).logits  # as LLaVA: the placeholder's own row
        embedded = model(inputs_embeds=model.get_input_embeddings()(ids), attention_mask=mask).logits
    assert "17 image placeholder tokens but no images were given" in warn.call_args.args[0]
    assert torch.equal(text_only, embedded)


def test_more_image_tags_than_images_is_an_error(tiny):
    _, processor = tiny
    with pytest.raises(ValueError, match="2 <image> tags but 1 images"):
        encode(processor, [{"role": "user", "content": "<image> and <image>"}], [scene(8)])
    with pytest.raises(ValueError, match="1 <image> tags but 0 images"):
        processor(text="USER: <image> hi", images=[])


def test_save_then_load_gives_identical_logits(tiny, tmp_path):
    model, processor = tiny
    folder = write_folder(model, processor, tmp_path / "m")
    loaded = AutoModelForImageTextToText.from_pretrained(folder).eval()
    processor2 = AutoProcessor.from_pretrained(folder)
    conv, images, boxes = ask("What?"), [scene(9)], [[[3, 3, 33, 33]]]
    a, b = encode(processor, conv, images, boxes), encode(processor2, conv, images, boxes)
    assert all(torch.equal(a[k], b[k]) for k in a)
    with torch.no_grad():
        assert torch.equal(model(**a).logits, loaded(**b).logits)
    assert loaded.generation_config.suppress_tokens == [model.config.image_token_id]


def test_loss_with_labels_only_on_answers(tiny):
    model, processor = tiny
    conv = [*ask("What shape?"), {"role": "assistant", "content": "A circle"}]
    batch = encode(processor, conv, [scene(10)], [[[0, 0, 20, 20]]])
    batch = processor.apply_chat_template(
        conv, tokenize=True, return_dict=True, images=[scene(10)], boxes=[[[0, 0, 20, 20]]]
    )
    labels = batch["labels"]
    assert (labels[batch["input_ids"] == model.config.image_token_id] == -100).all()
    supervised = processor.tokenizer.decode(labels[labels != -100])
    assert supervised == "A circle</s>"
    out = model(**batch)
    assert out.loss is not None and torch.isfinite(out.loss)


def test_text_only_sample_has_no_visual_rows(tiny):
    model, processor = tiny
    inputs = encode(processor, ask("Hello there", image=False))
    assert "pixel_values" not in inputs
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 0
    assert greedy(model, inputs, n=4).shape == (1, 4)


def test_streaming_yields_the_same_text(tiny):
    model, processor = tiny
    inputs = encode(processor, ask("What?"), [scene(11)])
    streamer = TextIteratorStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False, streamer=streamer)
    streamed = "".join(streamer)
    assert streamed == processor.tokenizer.decode(
        out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_forward_and_generate(tiny, tmp_path, dtype):
    model, processor = tiny
    folder = write_folder(model, processor, tmp_path / "m")
    half = AutoModelForImageTextToText.from_pretrained(folder, dtype=dtype).eval()
    assert {p.dtype for p in half.parameters()} == {dtype}
    inputs = encode(processor, ask("What?"), [scene(12)], [[[0, 0, 30, 30]]])
    with torch.no_grad():
        ref = model(**inputs).logits
        low = half(**inputs).logits.float()
    assert torch.isfinite(low).all()
    assert (low - ref).abs().max() < 0.05 * ref.abs().max()
    assert greedy(half, inputs, n=3).shape == (1, 3)


def test_attn_implementation_reaches_the_llm_and_backends_agree(tiny, tmp_path):
    model, processor = tiny
    folder = write_folder(model, processor, tmp_path / "m")
    eager = AutoModelForImageTextToText.from_pretrained(folder, attn_implementation="eager").eval()
    sdpa = AutoModelForImageTextToText.from_pretrained(folder, attn_implementation="sdpa").eval()
    assert eager.language_model.config._attn_implementation == "eager"
    assert sdpa.language_model.config._attn_implementation == "sdpa"
    inputs = encode(processor, [ask("a?"), ask("longer question here?")], [scene(13), scene(14)])
    real = inputs["attention_mask"].bool()  # left-padding rows attend to nothing: backends differ there only
    with torch.no_grad():
        torch.testing.assert_close(
            eager(**inputs).logits[real], sdpa(**inputs).logits[real], atol=1e-4, rtol=1e-4
        )


def test_device_map_loading(tiny, tmp_path):
    model, processor = tiny
    folder = write_folder(model, processor, tmp_path / "m")
    loaded = AutoModelForImageTextToText.from_pretrained(folder, device_map="cpu")
    assert {p.device.type for p in loaded.parameters()} == {"cpu"}
    inputs = encode(processor, ask("What?"), [scene(17)])
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, model(**inputs).logits)


def test_gradient_checkpointing_gives_the_same_gradients(tiny):
    model, processor = tiny
    conv = [*ask("What shape?"), {"role": "assistant", "content": "A circle"}]
    batch = processor.apply_chat_template(
        conv, tokenize=True, return_dict=True, images=[scene(15)], boxes=[[[0, 0, 20, 20]]]
    )

    def grads(checkpointing: bool):
        torch.manual_seed(0)
        m = MGLlavaForConditionalGeneration(model.config)
        m.load_state_dict(model.state_dict())
        m.train()
        if checkpointing:
            m.activation_checkpointing_enable()
        m(**batch).loss.backward()
        return {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    plain, ckpt = grads(False), grads(True)
    assert plain.keys() == ckpt.keys() and any(k.startswith("model.fusion.") for k in plain)
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], atol=1e-6, rtol=1e-5)


def test_object_tokens_off_and_fusion_none_build_the_llava_baseline():
    config = MGLlavaConfig.from_preset("tiny", fusion="none", object_tokens="off")
    model = MGLlavaForConditionalGeneration(config).eval()
    assert model.high_res_tower is None and model.box_projector is None
    processor = MGLlavaProcessor.for_config(
        config, MGLlavaProcessor.from_preset("tiny").tokenizer, template="vicuna"
    )
    inputs = encode(processor, ask("What?"), [scene(16)], [[[0, 0, 10, 10]]])
    assert (
        "object_boxes" not in inputs and "high_res_pixel_values" not in inputs
    )  # no work for absent branches
    with_high = MGLlavaProcessor.from_preset("tiny")  # the same low-res tensor, made with the high-res one
    assert torch.equal(
        encode(with_high, ask("What?"), [scene(16)], None)["pixel_values"], inputs["pixel_values"]
    )
    assert int((inputs["input_ids"] == config.image_token_id).sum()) == config.num_image_tokens
    assert greedy(model, inputs, n=2).shape == (1, 2)


def test_config_refuses_mismatched_grids_and_unknown_variants():
    with pytest.raises(ValueError, match=r"low-res grid 4x4 .* differs from high-res grid 8x8"):
        MGLlavaConfig.from_preset(
            "tiny",
            high_res_config={
                "model_type": "convnext",
                "hidden_sizes": [8, 16, 24, 32],
                "depths": [1, 1, 1, 1],
                "image_size": 256,
            },
        )
    with pytest.raises(ValueError, match="fusion='sideways' is not one of none, conv_gate"):
        MGLlavaConfig.from_preset("tiny", fusion="sideways")
    with pytest.raises(ValueError, match="unknown preset 'nope'"):
        MGLlavaConfig.from_preset("nope")


def test_model_built_on_meta_and_materialised_initialises_every_tensor():
    config = MGLlavaConfig.from_preset("tiny")
    with torch.device("meta"):
        model = MGLlavaForConditionalGeneration(config)
    model.to_empty(device="cpu")
    for t in [*model.parameters(), *model.buffers()]:
        t.data.fill_(float("nan") if t.is_floating_point() else -7)  # what uninitialised memory may hold
    model.init_weights()
    left = [name for name, t in [*model.named_parameters(), *model.named_buffers()]
            if (t.isnan() if t.is_floating_point() else t == -7).any()]  # fmt: skip
    assert left == []
    scale = model.high_res_tower.encoder.stages[0].layers[0].layer_scale_parameter
    assert torch.equal(scale, torch.full_like(scale, config.high_res_config.layer_scale_init_value))


def test_placeholder_rows_get_no_gradient_and_its_column_is_not_in_the_loss(tiny):
    model, processor = tiny
    trained = MGLlavaForConditionalGeneration(model.config)
    trained.load_state_dict(model.state_dict())
    trained.train()
    image_id = model.config.image_token_id
    conv = [*ask("What shape?"), {"role": "assistant", "content": "A circle"}]
    batch = processor.apply_chat_template(
        conv, tokenize=True, return_dict=True, images=[scene(18)], boxes=[[[0, 0, 20, 20]]]
    )
    out = trained(**batch)
    real = [i for i in range(out.logits.shape[-1]) if i != image_id]
    plain = torch.nn.functional.cross_entropy(out.logits[0, :-1, real], batch["labels"][0, 1:].clone().apply_(
        lambda t: real.index(t) if t != -100 else t), ignore_index=-100)  # fmt: skip
    torch.testing.assert_close(out.loss, plain, atol=1e-6, rtol=0)  # over the LLM's own columns
    text = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}  # placeholders, no images
    (out.loss + trained(**text).loss).backward()
    embed, head = trained.get_input_embeddings().weight.grad, trained.get_output_embeddings().weight.grad
    assert not embed[image_id].any() and not head[image_id].any()
    assert embed[batch["input_ids"][0, 0]].any() and head[real].any()  # the other rows do learn


def test_greedy_generation_never_emits_the_placeholder(tiny):
    model, processor = tiny
    fresh = MGLlavaForConditionalGeneration(model.config).eval()  # no configure_generation: its own default
    fresh.load_state_dict(model.state_dict())
    inputs = encode(processor, ask("What?"), [scene(19)], [[[0, 0, 10, 10]]])
    captured = {}  # the last position's input to the LM head: the placeholder row along it wins there
    hook = fresh.get_output_embeddings().register_forward_hook(
        lambda m, args, out: captured.update(h=args[0][0, -1].detach())
    )
    with torch.no_grad():
        fresh(**inputs)
        hook.remove()
        fresh.get_output_embeddings().weight[model.config.image_token_id] = 100 * captured["h"]
        assert fresh(**inputs).logits[0, -1].argmax() == model.config.image_token_id  # it would win
    assert fresh.generation_config.suppress_tokens == [model.config.image_token_id]
    assert model.config.image_token_id not in greedy(fresh, inputs, n=6)[0].tolist()
