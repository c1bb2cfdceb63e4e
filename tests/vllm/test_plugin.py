"""The vLLM plugin (`mgllava.vllm`) against our engine on a tiny random model: greedy answers equal, in fp32 and
bf16, for 0, 1 and many boxes, two images, a multi-turn conversation, the same image under other boxes; token
log-probabilities equal our model's; bad box input refused naming the field. Runs in the vLLM venv
(`make test-vllm`); skipped where vLLM is not installed (the main venv)."""

from __future__ import annotations

import argparse
import math

import pytest
import torch

pytest.importorskip("vllm")

from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt

from mgllava.inference import Engine, GenerationSettings

from ..serving import scene
from .conftest import collapse_placeholders, llm_options

pytestmark = pytest.mark.vllm

NEW_TOKENS = 12
BF16_TIE = 0.03  # logits this close are a tie in bf16 (its spacing is 0.0078 to 0.0156 between 1 and 4)
MANY = [
    [4 + 7 * i, 3 + 5 * (i % 4), 20 + 7 * i, 25 + 5 * (i % 4)] for i in range(9)
]  # some overlap: NMS drops


def ask(text: str, images: int = 1) -> list[dict]:
    return [{"role": "user", "content": [*[{"type": "image"}] * images, {"type": "text", "text": text}]}]


def cases() -> dict[str, dict]:
    one, two = scene(1), scene(2, size=(60, 90))
    turns = [
        *ask("what is in the picture?"),
        {"role": "assistant", "content": "a red ellipse"},
        {"role": "user", "content": "and what colour is the background?"},
    ]
    labelled = {"boxes": MANY, "labels": ["a", "b", "a"] * 3, "scores": [0.9 - 0.05 * i for i in range(9)]}
    return {
        "no boxes": {"messages": ask("describe"), "images": [one], "boxes": None},
        "empty boxes": {"messages": ask("describe"), "images": [one], "boxes": [[]]},
        "one box": {"messages": ask("describe"), "images": [one], "boxes": [[[10, 8, 50, 40]]]},
        "many boxes": {"messages": ask("describe"), "images": [one], "boxes": [MANY]},
        "labelled boxes": {"messages": ask("describe"), "images": [one], "boxes": [labelled]},
        "two images": {
            "messages": ask("compare", 2),
            "images": [one, two],
            "boxes": [MANY[:3], [[0, 0, 30, 45]]],
        },
        "multi-turn": {"messages": turns, "images": [two], "boxes": [[[5, 5, 40, 70], [10, 20, 55, 80]]]},
    }


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def pair(request, vllm_folder):
    """(our engine, vLLM with the plugin) over the same folder, in one dtype."""
    dtype = request.param
    engine = Engine.from_pretrained(vllm_folder, dtype=getattr(torch, dtype))
    llm = LLM(str(vllm_folder), dtype=dtype, **llm_options(max_boxes=16))
    yield engine, llm, dtype
    del llm


def run_both(engine: Engine, llm: LLM, case: dict, logprobs: bool = False):
    settings = GenerationSettings(max_new_tokens=NEW_TOKENS)
    prepared = engine.prepare(case["messages"], case["images"], case["boxes"], settings=settings)
    ours = engine.generate([prepared])[0]
    prompt = TokensPrompt(
        prompt_token_ids=collapse_placeholders(
            prepared.input_ids, engine.processor.image_token_id, [f.rows for f in prepared.frames]
        ),
        multi_modal_data={"image": case["images"]},
        mm_processor_kwargs={"boxes": case["boxes"]} if case["boxes"] is not None else None,
    )
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, logprobs=0 if logprobs else None)
    (theirs,) = llm.generate([prompt], params, use_tqdm=False)
    return prepared, ours, theirs


def answer_ids(engine: Engine, token_ids) -> list[int]:
    return engine.processor.answer_ids(list(token_ids))[0]


def assert_same_answer(engine: Engine, prepared, ours, theirs, dtype: str) -> None:
    """Greedy answers equal. In bf16 two answers may part where the two best logits are a bf16 rounding apart
    (a random model has such near-ties; our own engine's cached decode and a full forward can differ there):
    accepted only at a tie of our model's logits, checked over the common prefix."""
    mine, their = ours.token_ids, answer_ids(engine, theirs.outputs[0].token_ids)
    if mine == their:
        return
    assert dtype == "bfloat16", f"greedy answers differ in {dtype}: ours {mine}, vLLM's {their}"
    k = next(
        i
        for i in range(min(len(mine), len(their)) + 1)
        if i == min(len(mine), len(their)) or mine[i] != their[i]
    )
    stop = engine.processor.stop_token_ids[0]
    a, b = (mine + [stop])[k], (their + [stop])[k]
    ids = torch.tensor([prepared.input_ids + mine[:k]])
    with torch.no_grad():
        rows = engine.visual_rows(prepared.frames)
        logits = engine.model(
            input_ids=ids, mm_encoder_outputs={"image": _image_output(rows)}, use_cache=False
        ).logits
    gap = abs(float(logits[0, -1, a]) - float(logits[0, -1, b]))
    assert gap <= BF16_TIE, (
        f"answers part at token {k} ({a} vs {b}), {gap:.4f} apart in our logits: not a tie"
    )


@pytest.mark.parametrize("name", list(cases()))
def test_greedy_answers_equal_our_engine(pair, name):
    engine, llm, dtype = pair
    prepared, ours, theirs = run_both(engine, llm, cases()[name])
    assert theirs.prompt_token_ids == prepared.input_ids  # 576 + K_i rows per image (16 + K_i here)
    assert_same_answer(engine, prepared, ours, theirs, dtype)


def test_one_batch_equals_requests_alone(pair):
    """All cases in one `generate` call (vLLM batches them, images of several requests in one encoder call)."""
    engine, llm, dtype = pair
    all_cases = list(cases().values())
    settings = GenerationSettings(max_new_tokens=NEW_TOKENS)
    prepared = [engine.prepare(c["messages"], c["images"], c["boxes"], settings=settings) for c in all_cases]
    ours = engine.generate(prepared)
    prompts = [
        TokensPrompt(
            prompt_token_ids=collapse_placeholders(
                p.input_ids, engine.processor.image_token_id, [f.rows for f in p.frames]
            ),
            multi_modal_data={"image": c["images"]},
            mm_processor_kwargs={"boxes": c["boxes"]} if c["boxes"] is not None else None,
        )
        for p, c in zip(prepared, all_cases, strict=True)
    ]
    outs = llm.generate(prompts, SamplingParams(max_tokens=NEW_TOKENS, temperature=0), use_tqdm=False)
    for p, mine, theirs in zip(prepared, ours, outs, strict=True):
        assert_same_answer(engine, p, mine, theirs, dtype)


def test_log_probs_equal_our_model(pair):
    """The log-probability of every generated token equals our model's (a full forward over prompt + answer),
    so the equality above is not an accident of a flat distribution."""
    engine, llm, dtype = pair
    for name in ("many boxes", "two images"):
        prepared, _, theirs = run_both(engine, llm, cases()[name], logprobs=True)
        assert_log_probs_equal(engine, prepared, theirs, dtype)


def assert_log_probs_equal(engine: Engine, prepared, theirs, dtype: str) -> None:
    """vLLM's log-probability of each token it generated against our model's over the same sequence."""
    tolerance = 1e-4 if dtype == "float32" else 0.1
    generated = list(theirs.outputs[0].token_ids)
    reported = [step[t].logprob for step, t in zip(theirs.outputs[0].logprobs, generated, strict=True)]
    ids = torch.tensor([prepared.input_ids + generated])
    rows = engine.visual_rows(prepared.frames)
    with torch.no_grad():
        logits = engine.model(
            input_ids=ids, mm_encoder_outputs={"image": _image_output(rows)}, use_cache=False
        ).logits.float()
    logits[..., engine.processor.image_token_id] = -math.inf
    start = len(prepared.input_ids) - 1
    ours = logits[0, start : start + len(generated)].log_softmax(-1)
    expected = ours.gather(-1, torch.tensor(generated)[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(reported), expected, atol=tolerance, rtol=0)


def test_same_image_with_other_boxes_is_processed_again(pair):
    """vLLM caches processed images by content and processor kwargs: other boxes must give other rows."""
    engine, llm, dtype = pair
    base = cases()["one box"]
    moved = {**base, "boxes": [[[40, 30, 90, 60]]]}
    prepared_a, ours_a, theirs_a = run_both(engine, llm, base, logprobs=True)
    prepared_b, ours_b, theirs_b = run_both(engine, llm, moved, logprobs=True)
    assert_same_answer(engine, prepared_a, ours_a, theirs_a, dtype)
    assert_same_answer(engine, prepared_b, ours_b, theirs_b, dtype)
    first_a = theirs_a.outputs[0].logprobs[0][theirs_a.outputs[0].token_ids[0]].logprob
    first_b = theirs_b.outputs[0].logprobs[0][theirs_b.outputs[0].token_ids[0]].logprob
    assert (first_a, theirs_a.outputs[0].token_ids) != (first_b, theirs_b.outputs[0].token_ids)


def test_too_many_boxes_are_refused_naming_both_numbers(pair):
    engine, llm, _ = pair
    apart = {"boxes": [[4 * i, 0, 4 * i + 3, 10] for i in range(20)], "labels": [f"l{i}" for i in range(20)]}
    case = {**cases()["one box"], "boxes": [apart]}
    with pytest.raises(ValueError, match=r"keeps 20 boxes .* at most 16"):
        run_both(engine, llm, case)


def test_boxes_for_the_wrong_number_of_images_are_refused(pair):
    engine, llm, _ = pair
    case = cases()["two images"]
    prompt = TokensPrompt(
        prompt_token_ids=[1, engine.processor.image_token_id, engine.processor.image_token_id, 100],
        multi_modal_data={"image": case["images"]},
        mm_processor_kwargs={"boxes": [MANY]},
    )
    with pytest.raises(ValueError, match=r"mm_processor_kwargs.boxes must hold one entry per image \(2\)"):
        llm.generate([prompt], SamplingParams(max_tokens=2), use_tqdm=False)


def _image_output(rows: list[torch.Tensor]):
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    return BaseModelOutputWithPooling(pooler_output=rows)


def test_phi3_family_answers_equal_our_engine(vllm_phi3_folder):
    """The LLM is vLLM's own implementation of `text_config`'s family: Phi-3 here (Llama in the tests above)."""
    engine = Engine.from_pretrained(vllm_phi3_folder)
    assert type(engine.model.model.language_model).__name__ == "Phi3Model"
    llm = LLM(str(vllm_phi3_folder), dtype="float32", **llm_options())
    for name in ("many boxes", "two images", "multi-turn"):
        prepared, ours, theirs = run_both(engine, llm, cases()[name])
        assert theirs.prompt_token_ids == prepared.input_ids
        assert answer_ids(engine, theirs.outputs[0].token_ids) == ours.token_ids


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_model_without_the_convnext_answers_as_our_engine(vllm_llava_folder, dtype):
    """No fusion and no object tokens (LLaVA's shape, as the serving bench runs it): the processor makes no
    high-res pixels and boxes sent with a request are not used, in both."""
    engine = Engine.from_pretrained(vllm_llava_folder, dtype=getattr(torch, dtype))
    assert not engine.processor.image_processor.use_high_res
    llm = LLM(str(vllm_llava_folder), dtype=dtype, **llm_options())
    for name in ("no boxes", "one box", "two images", "multi-turn"):
        prepared, ours, theirs = run_both(engine, llm, cases()[name])
        assert theirs.prompt_token_ids == prepared.input_ids  # 16 rows per image, no object rows
        assert_same_answer(engine, prepared, ours, theirs, dtype)
    del llm


def test_online_proposer_boxes_equal_our_engines(vllm_folder, box_models):
    """Images sent without boxes get the startup proposer's boxes (`mgllava serve`'s flags), as in our engine."""
    from mgllava.boxes.cli import add_proposer_options, proposer_from_args

    flags = ["--detector", str(box_models["owlv2"]), "--tagger", "fixed", "--tags", "circle,square"]
    parser = argparse.ArgumentParser()
    add_proposer_options(parser)
    engine = Engine.from_pretrained(vllm_folder, proposer=proposer_from_args(parser.parse_args(flags), "cpu"))
    llm = LLM(str(vllm_folder), dtype="float32", **llm_options(), mm_processor_kwargs={"proposer": flags})
    case = cases()["two images"]
    case = {**case, "boxes": None}
    prepared, ours, theirs = run_both(engine, llm, case)
    assert (
        sum(len(image.boxes) for image in ours.images) > 0
    )  # the proposer found boxes: they are in the rows
    assert theirs.prompt_token_ids == prepared.input_ids
    assert answer_ids(engine, theirs.outputs[0].token_ids) == ours.token_ids


def test_a_box_file_is_refused_with_the_reason(vllm_folder, tmp_path):
    with pytest.raises(Exception, match="--box-file cannot be used with vLLM"):
        LLM(
            str(vllm_folder),
            dtype="float32",
            **llm_options(),
            mm_processor_kwargs={"proposer": ["--box-file", str(tmp_path / "boxes.json")]},
        )


def test_an_image_cached_under_other_boxes_is_not_reused(pair):
    """vLLM keys an image's processing on the request's whole `mm_processor_kwargs`: two requests with the same
    `boxes` list and the same two images in swapped order would share keys while each image has other boxes.
    Each image's key must cover its own boxes; an image found in the cache next to a new one leaves the new one
    its own boxes."""
    engine, llm, dtype = pair
    first = cases()["two images"]
    swapped = {**first, "images": first["images"][::-1]}
    # one image found in the cache (the first with its boxes), one new: only the new one's boxes are used now
    partly = {
        **first,
        "images": [first["images"][0], scene(5)],
        "boxes": [first["boxes"][0], [[2, 2, 60, 40]]],
    }
    run_both(engine, llm, first)
    for case in (swapped, partly):
        prepared, ours, theirs = run_both(engine, llm, case, logprobs=True)
        assert_log_probs_equal(engine, prepared, theirs, dtype)
        assert_same_answer(engine, prepared, ours, theirs, dtype)


def test_dummy_images_for_memory_profiling_carry_max_boxes(pair):
    """vLLM profiles memory with dummy inputs: each dummy image must give the most rows an image can
    (num_image_tokens + max_boxes), and that is what the plugin declares as its largest item."""
    from vllm.multimodal import MULTIMODAL_REGISTRY

    engine, llm, _ = pair
    model_config = llm.llm_engine.model_config
    processor = MULTIMODAL_REGISTRY.create_processor(model_config)
    dummy = processor.get_dummy_mm_inputs({"image": 2})
    expected = engine.processor.num_image_tokens + 16  # the pair's max_boxes
    assert [p.length for p in dummy["mm_placeholders"]["image"]] == [expected, expected]
    assert processor.info.get_mm_max_tokens_per_item(2048, {"image": 1}) == {"image": expected}
