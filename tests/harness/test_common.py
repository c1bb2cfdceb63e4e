"""What the harness adapters share: gen_kwargs -> settings, continuation scores against a plain forward,
and the box finder's sources. No harness needs to be installed."""

import pytest

from mgllava.boxes import ImageKey, MissingBoxes
from mgllava.harness.common import BoxFinder, settings_from_gen_kwargs
from mgllava.harness.likelihood import score_continuations
from mgllava.inference import GenerationSettings

from ..harnessing import plain_scores
from ..serving import ShapesProposer, ask, data_url, scene, tiny_engine


@pytest.fixture(scope="module")
def engine():
    return tiny_engine(ShapesProposer())


def test_gen_kwargs_greedy_by_default_sampling_when_asked_and_stops_cut_the_answer():
    greedy = settings_from_gen_kwargs(
        {"max_new_tokens": 7.0, "temperature": 0, "top_p": 0, "num_beams": 1}, 99
    )
    assert greedy.settings == GenerationSettings(max_new_tokens=7) and greedy.until == ()
    assert settings_from_gen_kwargs({}, 99).settings.max_new_tokens == 99
    # do_sample=False wins over a temperature, as in transformers
    assert not settings_from_gen_kwargs({"temperature": 0.7, "do_sample": False}, 9).settings.sampled
    sampled = settings_from_gen_kwargs({"temperature": 0.7, "top_p": 0.9, "seed": 3, "until": "\n\n"}, 9)
    assert sampled.settings == GenerationSettings(max_new_tokens=9, temperature=0.7, top_p=0.9, seed=3)
    assert sampled.until == ("\n\n",)
    stops = settings_from_gen_kwargs({"until": ["</s>", "Q:", ""]}, 9)
    assert stops.cut(" A cat.Q: more</s>") == "A cat." and stops.cut("\n\nQ:") == ""


@pytest.mark.parametrize(
    ("gen_kwargs", "message"),
    [
        ({"num_beams": 4}, "num_beams=4"),
        ({"repetition_penalty": 1.2}, "repetition_penalty"),
        ({"do_sample": True, "temperature": 0}, "temperature > 0"),
        ({"temperature": 0.5, "top_k": 40}, "top_k=40"),
        ({"until": 3}, "until must be"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
    ],
)
def test_gen_kwargs_the_engine_cannot_honour_are_errors(gen_kwargs, message):
    with pytest.raises(ValueError, match=message):
        settings_from_gen_kwargs(gen_kwargs, 9)


def test_unknown_gen_kwargs_are_named_in_a_warning(caplog):
    settings_from_gen_kwargs({"visual_cot": True, "image_aspect_ratio": "pad"}, 9)
    assert (
        "not used by the mgllava model: visual_cot" in caplog.text and "image_aspect_ratio" not in caplog.text
    )


def test_continuation_scores_equal_a_plain_forward_and_know_greedy_tokens(engine):
    tokenizer = engine.processor.tokenizer
    first, second = ask("What shape?", data_url(scene(1))), ask("And here?", data_url(scene(2, (50, 90))))
    greedy = engine.chat(first, settings=GenerationSettings(max_new_tokens=3)).token_ids
    cases = [
        (first, tokenizer.encode(" a red circle", add_special_tokens=False)),
        (first, greedy),  # what greedy decoding produces
        (second, tokenizer.encode("B", add_special_tokens=False)),
        (first, tokenizer.encode("no", add_special_tokens=False)),  # the same image again: encoded once
    ]
    prepared = [(engine.prepare(m, settings=GenerationSettings(max_new_tokens=4)), c) for m, c in cases]
    scores = score_continuations(engine, prepared)  # one left-padded batch
    for (messages, continuation), score in zip(cases, scores, strict=True):
        logprob, is_greedy = plain_scores(engine, messages, continuation)
        assert score.logprob == pytest.approx(logprob, abs=1e-4)
        assert score.greedy == is_greedy and score.tokens == len(continuation)
        assert score.mean_nll == pytest.approx(-logprob / len(continuation), abs=1e-4)
    assert scores[1].greedy and scores[1].logprob < 0
    with pytest.raises(ValueError, match="at least one token"):
        score_continuations(engine, [(prepared[0][0], [])])
    too_long = [5] * (engine.context_length - len(prepared[0][0].input_ids) + 1)
    with pytest.raises(ValueError, match="exceeds the model's context") as refused:
        score_continuations(engine, [(prepared[0][0], too_long)])
    assert refused.value.code == "context_length_exceeded"


def test_box_finder_names_the_box_file_and_its_misses(tmp_path):
    box_file = tmp_path / "boxes.json"
    box_file.write_text('[{"id": "q1", "boxes": [[2, 2, 30, 20]], "scores": [0.8], "labels": ["cat"]}]')
    engine = tiny_engine()  # no detector: a miss is a miss
    finder = BoxFinder(box_file, engine, max_missing=0.0, what="test images")
    found = finder.find([ImageKey(("q1",))]) + finder.find([ImageKey(("q2",))])
    assert found[0].labels == ["cat"] and found[1] is None
    hit = engine.prepare(ask("?", data_url(scene(1))), boxes=[found[0]]).images
    miss = engine.prepare(ask("?", data_url(scene(1))), boxes=[None]).images
    assert (hit[0].source, miss[0].source) == ("request", "none")  # what the engine saw
    assert [v.source for v in finder.sources(found, hit + miss)] == ["box_file", "missing"]
    assert finder.sources(found, hit + miss)[0].boxes.labels == ["cat"]
    with pytest.raises(MissingBoxes, match=r"1 of 2 test images \(50.0%\) have no boxes"):
        finder.check()
    with pytest.raises(FileNotFoundError, match="no such file"):
        BoxFinder(tmp_path / "nope.json", engine)
    with pytest.raises(ValueError, match="share in"):
        BoxFinder(None, engine, max_missing=2)
