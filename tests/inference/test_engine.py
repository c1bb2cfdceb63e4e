"""The engine and the batcher: batched == one by one, features reused across turns, streams, boxes, errors."""

import threading
from unittest import mock

import numpy as np
import pytest
import torch

from mgllava.inference import Batcher, Busy, EngineInputError, GenerationSettings
from mgllava.inference.streaming import Detokenizer

from ..serving import ShapesProposer, ask, data_url, png_bytes, scene, tiny_engine


@pytest.fixture(scope="module")
def engine():
    return tiny_engine(ShapesProposer())


def greedy(n: int) -> GenerationSettings:
    return GenerationSettings(max_new_tokens=n)


def two_turns(image_url: str) -> list[dict]:
    return [*ask("What is in the image?", image_url), {"role": "assistant", "content": "A red circle."},
            {"role": "user", "content": "Where is it?"}]  # fmt: skip


def requests():
    """A mixed bag: proposer boxes, user boxes, text only, a second turn, different max_new_tokens."""
    return [
        (ask("What shape is in the image?", data_url(scene(1))), None, greedy(6)),
        (ask("Describe it.", data_url(scene(2, (50, 90)))), [[[1, 1, 20, 20], [25, 30, 45, 50]]], greedy(9)),
        (ask("Is there a circle?"), None, greedy(4)),
        (two_turns(data_url(scene(3))), None, greedy(12)),
    ]


def test_batch_equals_requests_one_by_one_and_the_models_own_generate(engine):
    prepared = [engine.prepare(m, boxes=b, settings=s) for m, b, s in requests()]
    single = [engine.generate([p])[0] for p in prepared]
    batched = engine.generate(prepared)
    assert [r.token_ids for r in batched] == [r.token_ids for r in single]
    assert [r.text for r in batched] == [r.text for r in single]
    assert [r.completion_tokens for r in batched] == [6, 9, 4, 12]  # each row kept its own limit
    # the engine's answer is what the model's own generate gives for the processor's inputs
    messages, boxes, _ = requests()[1]
    inputs = engine.processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, boxes=boxes
    )
    with torch.no_grad():
        out = engine.model.generate(**inputs, max_new_tokens=9, do_sample=False)
    assert engine.processor.decode_answer(out[0, inputs["input_ids"].shape[1] :]) == batched[1].text


def test_batcher_batches_concurrent_requests_with_identical_answers(engine):
    prepared = [engine.prepare(m, boxes=b, settings=s) for m, b, s in requests()]
    expected = [engine.generate([p])[0].token_ids for p in prepared]
    batcher = Batcher(engine, max_batch_size=8, max_wait_s=0.5)
    try:
        jobs = [batcher.submit(p) for p in prepared]
        assert [j.future.result(60).token_ids for j in jobs] == expected
        assert batcher.batch_sizes == {4: 1}
    finally:
        batcher.close()


def test_batcher_refuses_work_when_the_queue_is_full(engine):
    prepared = engine.prepare(ask("Hi"), settings=greedy(2))
    batcher = Batcher(engine, max_batch_size=1, max_wait_s=0.0, max_queue=1)
    try:
        with engine._model_lock:  # the worker blocks inside generate on the first job
            first = batcher.submit(prepared)
            while batcher.queued:
                threading.Event().wait(0.01)
            second = batcher.submit(prepared)
            with pytest.raises(Busy) as busy:
                batcher.submit(prepared)
            assert busy.value.retry_after >= 1 and not busy.value.closed
        assert first.future.result(60).text == second.future.result(60).text
    finally:
        batcher.close()
    with pytest.raises(Busy, match="shutting down"):
        batcher.submit(prepared)


def test_image_features_are_computed_once_per_conversation(engine):
    image = scene(7)
    spy = mock.patch.object(engine.model, "get_image_features", wraps=engine.model.get_image_features)
    with spy as calls:
        first = engine.chat(ask("What is in the image?", data_url(image)), settings=greedy(5))
        assert calls.call_count == 1
        # the next turn re-sends the whole conversation, the image now as raw bytes: no encoder call
        later = [*ask("What is in the image?"), {"role": "assistant", "content": first.text},
                 {"role": "user", "content": "And the colour?"}]  # fmt: skip
        later[0]["content"].insert(0, {"type": "image"})
        engine.chat(later, images=[png_bytes(image)], settings=greedy(5))
        assert calls.call_count == 1
        engine.chat(ask("What is in the image?", data_url(scene(8))), settings=greedy(5))
        assert calls.call_count == 2
        # same pixels but other boxes -> other object rows -> encoded again
        engine.chat(ask("What is in the image?", data_url(image)), boxes=[[[0, 0, 9, 9]]], settings=greedy(5))
        assert calls.call_count == 3


def test_stream_yields_the_same_text_and_can_be_cancelled(engine):
    messages = ask("Tell me about the image.", data_url(scene(9)))
    full = engine.chat(messages, settings=greedy(24))
    stream = engine.stream(messages, settings=greedy(24))
    pieces = list(stream)
    assert len(pieces) > 1 and "".join(pieces) == full.text == stream.result.text
    long = engine.stream(messages, settings=greedy(400))
    for _ in long:
        break  # leaving the loop cancels the generation
    assert long.result.finish_reason == "cancelled" and long.result.completion_tokens < 400


def test_a_failing_consumer_loses_its_stream_not_the_batch(engine):
    prepared = [engine.prepare(ask(q), settings=greedy(5)) for q in ("One?", "Two?")]
    expected = [engine.generate([p])[0].text for p in prepared]

    def broken(piece):
        raise BrokenPipeError("the terminal went away")

    got = []
    results = engine.generate(prepared, on_text=[broken, got.append])
    assert [r.text for r in results] == expected and "".join(got) == expected[1]


def test_detokenizer_holds_back_unstable_text():
    pieces = {1: "Hello", 2: " ", 3: "wor", 4: "\ufffd", 5: "ld"}
    det = Detokenizer(lambda ids: "".join(pieces[i] for i in ids).replace("wor\ufffdld", "world"), [9], 10)
    out = [det.push(t) for t in (1, 2, 3, 4)]
    assert out == ["Hello", "", " wor", ""]  # the space waits for a non-space, the U+FFFD for its bytes
    assert det.push(5) == "ld" and det.push(9) == "" and det.done
    assert det.push(1) == ""  # nothing after the stop token


def test_boxes_from_proposer_user_and_none_are_reported_in_image_pixels(engine):
    proposer = engine.proposer.detector
    before = proposer.calls
    image = scene(10, (200, 100))
    result = engine.chat(ask("What?", data_url(image)), settings=greedy(2))
    engine.chat(ask("What now?", data_url(image)), settings=greedy(2))
    assert proposer.calls == before + 1  # proposals are cached by image content
    (used,) = result.images
    assert (used.width, used.height, used.source, used.tags) == (200, 100, "proposer", ["circle", "square"])
    expected = torch.tensor([[20.0, 10.0, 100.0, 60.0], [110.0, 30.0, 190.0, 90.0]])
    torch.testing.assert_close(used.boxes.xyxy, expected, atol=200 / 128, rtol=0)  # one model-frame pixel
    given = engine.chat(ask("What?", data_url(image)), boxes=[{"boxes": [[0, 0, 50, 50]], "labels": ["cat"]}],
                        settings=greedy(2))  # fmt: skip
    assert given.images[0].source == "request" and given.images[0].tags == ["cat"]
    none = engine.chat(ask("What?", data_url(image)), boxes=[[]], settings=greedy(2))
    assert none.images[0].source == "request" and len(none.images[0].boxes) == 0  # fallback row not reported


def test_video_frames_go_through_the_image_path(engine):
    frames = np.random.default_rng(0).integers(0, 255, (8, 48, 64, 3), dtype=np.uint8)
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What happens?"}]}]
    result = engine.chat(messages, video=frames, settings=greedy(3))
    assert len(result.video) == 8 and all(v.source == "proposer" for v in result.video)
    assert result.prompt_tokens > 8 * engine.model.config.num_image_tokens


@pytest.mark.parametrize(
    "kwargs, code, param",
    [
        (dict(messages=ask("What?", "data:image/png;base64,@@@")), "invalid_image", "messages[0].content"),
        (dict(messages=ask("What?", "data:image/png;base64,aGVsbG8=")), "invalid_image", "messages[0]"),
        (dict(messages=ask("What?", data_url(scene(1, (200, 200))))), "image_too_large", "messages[0]"),
        (dict(messages=ask("What?", data_url(scene(1))), boxes=[None, None]), "invalid_request", "boxes"),
        (dict(messages=ask("What?", data_url(scene(1))), boxes=[[[1, 2, 3]]]), "invalid_boxes", "boxes[0]"),
        (dict(messages=ask("What?"), settings=greedy(2047)), "context_length_exceeded", "max_tokens"),
        (dict(messages=[{"role": "robot", "content": "hi"}]), "invalid_request", "messages"),
        (dict(messages=ask("What?"), video="/no/such/video.mp4"), "invalid_video", "video"),
    ],
)
def test_bad_input_is_an_engine_input_error_naming_it(kwargs, code, param):
    small = tiny_engine(max_image_pixels=150 * 150)
    with pytest.raises(EngineInputError) as err:
        small.prepare(**kwargs)
    assert (err.value.code, err.value.param) == (code, param)


def test_generation_settings_are_validated():
    for bad in (dict(max_new_tokens=0), dict(temperature=-1.0), dict(top_p=0.0)):
        with pytest.raises(EngineInputError):
            GenerationSettings(**bad)
    assert GenerationSettings(temperature=0.7, seed=1).batch_key() is None
    assert GenerationSettings().batch_key() == GenerationSettings(max_new_tokens=3).batch_key()


def test_from_pretrained_passes_device_map_and_max_memory_through(tiny_folder):
    from transformers import AutoModelForImageTextToText

    from mgllava.inference import Engine

    load = AutoModelForImageTextToText.from_pretrained
    with mock.patch.object(AutoModelForImageTextToText, "from_pretrained", wraps=load) as spy:
        engine = Engine.from_pretrained(
            tiny_folder, device="meta", device_map={"": "cpu"}, max_memory={"cpu": "2GB"}
        )
    assert spy.call_args.kwargs["device_map"] == {"": "cpu"}
    assert spy.call_args.kwargs["max_memory"] == {"cpu": "2GB"}
    # the model stays where the map put it (`device` is not applied on top)
    assert {p.device.type for p in engine.model.parameters()} == {"cpu"}


def test_a_model_without_the_high_res_branch_gets_no_high_res_tensor():
    """The engine aligns the processor with its model: a processor made for the full model (as a folder saved
    before `use_high_res` existed loads) makes no 768-px tensor for a model without the branch, and the
    answer is the model's own generate on the full processor's inputs (same low-res tensor)."""
    from mgllava import MGLlavaConfig, MGLlavaForConditionalGeneration, MGLlavaProcessor
    from mgllava.inference import Engine

    torch.manual_seed(0)
    config = MGLlavaConfig.from_preset("tiny", fusion="none", object_tokens="off")
    model = MGLlavaForConditionalGeneration(config).eval()
    processor = MGLlavaProcessor.for_config(config, MGLlavaProcessor.from_preset("tiny").tokenizer, "vicuna")
    processor.image_processor.use_high_res = True  # as a folder saved before the setting loads
    messages = ask("What shape?", data_url(scene(4)))
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True
    )
    assert (
        inputs.pop("high_res_pixel_values").shape[-1] == config.high_res_config.image_size
    )  # made, and of no use to this model
    engine = Engine(model, processor)
    prepared = engine.prepare(messages, settings=GenerationSettings(max_new_tokens=5))
    assert [sorted(f.tensors) for f in prepared.frames] == [["pixel_values"]]
    assert torch.equal(prepared.frames[0].tensors["pixel_values"], inputs["pixel_values"])
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert engine.generate([prepared])[0].token_ids == out[0, inputs["input_ids"].shape[1] :].tolist()
