"""Fault injection in the engine: an exception or a NaN at each internal point (prefill, accept/sampling,
detokenisation, a decode step, the K/V of a decode step, the answer, the prefix-cache put), aimed at one
request, alone and inside a burst of 32 mixed requests through the `Batcher`. Checked: the faulted request
gets a clear `RequestFailed` (or, for a failing cache put, its normal answer), every other request gets the
answer it has without the fault, and the worker is alive and answers after. Also the worker's supervision
(if it dies, everything waiting is told at once), the static engine's retry, the sampler's edge cases, and
OpenAI's penalties and logit bias against a straightforward reference."""

import threading
import time
from collections.abc import Callable

import pytest
import torch
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPooling

from mgllava.inference import (
    Batcher,
    Busy,
    Engine,
    EngineUnavailable,
    GenerationSettings,
    Prepared,
    RequestFailed,
)
from mgllava.inference.decoding import RunningBatch
from mgllava.inference.kv import BatchCache
from mgllava.inference.packed import PackedCache
from mgllava.inference.prefix import PrefixCache
from mgllava.inference.sampling import MIN_TEMPERATURE, penalize

from ..serving import ShapesProposer, ask, data_url, scene, tiny_parts
from .test_engine import greedy, two_turns

SHORT = 32  # prefix_min_tokens: the tiny model's second turns (~80 tokens) reuse their first


@pytest.fixture(scope="module")
def engine() -> Engine:
    model, processor = tiny_parts()
    return Engine(model, processor, ShapesProposer(), prefix_min_tokens=SHORT)


@pytest.fixture(scope="module")
def static() -> Engine:
    model, processor = tiny_parts()
    return Engine(model, processor, ShapesProposer(), scheduling="static")


def burst(engine: Engine, size: int = 32) -> list[Prepared]:
    """Greedy and seeded-sampled requests, images with proposer boxes, text only, second turns (whose
    first turns are answered before, so their prefixes are cached), different lengths."""
    out = []
    for k in range(size):
        url = data_url(scene(100 + k % 5))
        kind = k % 4
        if kind == 0:
            messages = ask(f"What is in picture {k}?", url)
        elif kind == 1:
            messages = ask(f"Say something about {k}.")
        elif kind == 2:
            messages = two_turns(url)
        else:
            messages = ask(f"Describe the colours {k}.", url)
        seeded = GenerationSettings(max_new_tokens=3 + k % 6, temperature=0.8, top_p=0.9, seed=k)
        out.append(engine.prepare(messages, settings=seeded if k % 3 == 0 else greedy(3 + k % 6)))
    return out


@pytest.fixture(scope="module")
def workload(engine):
    """(32 requests, each one's answer alone without faults)."""
    for url in {data_url(scene(100 + k)) for k in range(5)}:  # the second turns' first turns
        engine.chat(ask("What is in the image?", url), settings=greedy(4))
    prepared = burst(engine)
    return prepared, [engine.generate([p])[0].token_ids for p in prepared]


def run(engine: Engine, prepared: list[Prepared], timeout: float = 120) -> list:
    """Every request through one Batcher at once: each one's ChatResult or exception."""
    batcher = Batcher(engine, max_batch_size=8, max_wait_s=0.05, max_queue=64)
    try:
        jobs = [batcher.submit(p) for p in prepared]
        out = []
        for job in jobs:
            try:
                out.append(job.future.result(timeout))
            except Exception as err:
                out.append(err)
        assert batcher.alive
        after = batcher.submit(prepared[1]).future.result(timeout)  # the worker still answers
        assert not isinstance(after, Exception)
        return out
    finally:
        batcher.close()


def aim(monkeypatch, target: Prepared, point: str, mixed: list[int] | None = None) -> Callable[[], int]:
    """Inject a fault at `point` for `target` only; returns a counter of how often it fired (`mixed`, when
    given, counts the times it fired in a mixed step: prompt chunks and decoding rows in one forward)."""
    fired = [0]
    mixed = mixed if mixed is not None else [0]

    def hit(rows) -> int | None:
        return next((i for i, r in enumerate(rows) if r.prepared is target), None)

    forward = RunningBatch._forward

    def faulty_forward(self, rows, ids, mask, position_ids, cache, visual=None):
        i = hit(rows)
        packed = isinstance(cache, PackedCache)  # a mixed step: decoding rows first, then prompt chunks
        decode = i < cache.decoding if packed and i is not None else ids.shape[1] == 1 and visual is None
        if i is not None and point == ("decode" if decode else "prefill"):
            fired[0] += 1
            mixed[0] += packed
            raise RuntimeError(f"injected {point} fault")
        out_cache, logits = forward(self, rows, ids, mask, position_ids, cache, visual)
        if i is not None and decode and point == "nan_logits":
            fired[0] += 1
            mixed[0] += packed
            logits = logits.clone()
            logits[i] = float("nan")
        if i is not None and decode and point == "nan_kv":
            fired[0] += 1
            mixed[0] += packed
            for layer in (cache.batch if packed else out_cache).layers:  # the step's new column of this row
                layer.keys[i, :, -1] = float("nan")
                layer.values[i, :, -1] = float("nan")
        return out_cache, logits

    monkeypatch.setattr(RunningBatch, "_forward", faulty_forward)
    make_row = RunningBatch._row

    def faulty_row(self, request):
        row = make_row(self, request)
        if row.prepared is target and point == "detokenise":

            def broken(ids):
                fired[0] += 1
                raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "injected")

            row.stream.detokenizer.decode = broken
        return row

    monkeypatch.setattr(RunningBatch, "_row", faulty_row)
    choose = RunningBatch._choose

    def faulty_choose(self, row, scores, greedy):
        if row.prepared is target and point == "sample":
            fired[0] += 1
            raise RuntimeError("probability tensor contains either inf, nan or element < 0 (injected)")
        return choose(self, row, scores, greedy)

    monkeypatch.setattr(RunningBatch, "_choose", faulty_choose)
    answer = Engine.answer

    def faulty_answer(self, prepared, generated, stream, reason):
        if prepared is target and point == "answer":
            fired[0] += 1
            raise RuntimeError("injected answer fault")
        return answer(self, prepared, generated, stream, reason)

    monkeypatch.setattr(Engine, "answer", faulty_answer)
    put = PrefixCache.put

    def faulty_put(self, content, kv, extends=None):
        if point == "cache_put":
            fired[0] += 1
            raise torch.OutOfMemoryError("injected: out of memory in the prefix cache")
        return put(self, content, kv, extends)

    monkeypatch.setattr(PrefixCache, "put", faulty_put)
    return lambda: fired[0]


FAILING = ["prefill", "decode", "nan_logits", "nan_kv", "sample", "detokenise", "answer"]


@pytest.mark.parametrize("point", FAILING)
def test_a_fault_fails_its_request_alone_and_the_batch_answers_as_without_it(
    engine, workload, monkeypatch, point
):
    prepared, expected = workload
    target = 4 if point != "sample" else 6  # 6 is sampled (k % 3 == 0), 4 greedy with an image
    if point == "nan_kv":
        target = 8  # 9 new tokens: the NaN K/V of its first step reaches its second step's logits
    fired = aim(monkeypatch, prepared[target], point)
    results = run(engine, prepared)
    assert fired() > 0
    assert isinstance(results[target], RequestFailed), results[target]
    assert (str(results[target]) and "generation failed" in str(results[target])) or "non-finite" in str(
        results[target]
    )
    others = [
        (r.token_ids if not isinstance(r, Exception) else r) for k, r in enumerate(results) if k != target
    ]
    assert others == [e for k, e in enumerate(expected) if k != target]


@pytest.fixture(scope="module")
def chunked() -> Engine:
    """The engine's model with a step budget of 24 tokens: prompts are computed in several chunks, each in a
    mixed step with the rows decoding beside it."""
    model, processor = tiny_parts()
    return Engine(model, processor, ShapesProposer(), prefix_min_tokens=SHORT, max_step_tokens=24)


@pytest.mark.parametrize("point", ["prefill", "decode", "nan_logits", "nan_kv"])
def test_a_fault_in_a_mixed_step_fails_only_its_row(chunked, workload, monkeypatch, point):
    """A fault aimed at one row of a mixed step (its prompt chunk, or its decode token beside other rows'
    chunks) fails that request alone; the others answer as they do alone without faults."""
    prepared, expected = workload
    target = 8 if point == "nan_kv" else 4
    mixed = [0]
    fired = aim(monkeypatch, prepared[target], point, mixed)
    results = run(chunked, prepared)
    assert mixed[0] > 0  # it fired inside a mixed step
    assert isinstance(results[target], RequestFailed), results[target]
    others = [
        (r.token_ids if not isinstance(r, Exception) else r) for k, r in enumerate(results) if k != target
    ]
    assert others == [e for k, e in enumerate(expected) if k != target]
    assert fired() >= mixed[0]


def test_a_failing_image_encode_fails_its_request_alone(chunked, workload, monkeypatch):
    """The images of requests starting in one step are encoded together; when that fails, each request's
    alone, and only the requests whose image fails (the target's, and others sending the same image) fail."""
    prepared, expected = workload
    target = 4
    keys = {f.key for f in prepared[target].frames}
    visual_rows = Engine.visual_rows
    fired = [0]

    def faulty(self, frames):
        if any(f.key in keys for f in frames):
            fired[0] += 1
            raise RuntimeError("injected image encode fault")
        return visual_rows(self, frames)

    monkeypatch.setattr(Engine, "visual_rows", faulty)
    chunked.features.clear()
    chunked.prefixes.clear()  # earlier tests' cached prefixes would cover the image (no encode)
    results = run(chunked, prepared)
    sharing = {k for k, p in enumerate(prepared) if keys & {f.key for f in p.frames}}  # the same image
    assert fired[0] > 0 and target in sharing and len(sharing) < len(prepared) // 2
    assert all(isinstance(results[k], RequestFailed) for k in sharing), [results[k] for k in sharing]
    others = [
        (r.token_ids if not isinstance(r, Exception) else r)
        for k, r in enumerate(results)
        if k not in sharing
    ]
    assert others == [e for k, e in enumerate(expected) if k not in sharing]


@pytest.mark.parametrize("point", FAILING)
def test_a_fault_in_a_request_alone_fails_it_and_the_worker_goes_on(engine, workload, monkeypatch, point):
    prepared, _ = workload
    target = prepared[6] if point == "sample" else prepared[8]
    aim(monkeypatch, target, point)
    batcher = Batcher(engine, max_batch_size=8, max_wait_s=0.0)
    try:
        with pytest.raises(RequestFailed):
            batcher.submit(target).future.result(60)
        assert batcher.alive
    finally:
        batcher.close()


def test_a_failing_prefix_cache_loses_its_entry_not_the_answers(engine, workload, monkeypatch):
    prepared, expected = workload
    fired = aim(monkeypatch, prepared[0], "cache_put")
    results = run(engine, prepared)
    assert fired() > 0
    assert [r.token_ids for r in results] == expected


def test_a_slot_taken_after_a_nan_row_holds_only_finite_padding():
    """A failed row's NaN K/V stays in storage after it leaves; the row that takes its slot (and rows whose
    window widens over old columns) must see zeros there, since masked attention computes 0 x NaN = NaN."""
    cache = BatchCache(1)

    def rows(k: int, n: int, value: float = 1.0) -> DynamicCache:
        kv = torch.full((k, 2, n, 4), value)
        return DynamicCache(ddp_cache_data=[(kv, kv.clone())])

    cache.add_rows(rows(1, 20))  # a long row
    cache.add_rows(rows(1, 5))  # the row that will fail
    cache.layers[0].update(torch.ones(2, 2, 1, 4), torch.ones(2, 2, 1, 4))
    cache.layers[0].keys[1, :, -1] = float("nan")  # its step's K/V
    cache.remove_rows([1])
    for _ in range(10):
        cache.layers[0].update(torch.ones(1, 2, 1, 4), torch.ones(1, 2, 1, 4))
    cache.add_rows(rows(1, 3))  # takes the slot; the NaN column is in its padding
    assert torch.isfinite(cache.layers[0].keys).all()
    cache.add_rows(rows(1, 40))  # a longer row widens the window to the left of every row
    assert torch.isfinite(cache.layers[0].keys).all() and torch.isfinite(cache.layers[0].values).all()


class Crash(BaseException):
    """What no handler catches (stands for a bug that escapes the worker's loop)."""


def test_if_the_worker_dies_everything_waiting_is_told_at_once(engine, workload, monkeypatch):
    prepared, _ = workload
    started = threading.Event()
    step = RunningBatch.step

    def dying_step(self):
        started.set()
        time.sleep(0.05)
        raise Crash("injected: the worker's loop broke")

    monkeypatch.setattr(RunningBatch, "step", dying_step)
    batcher = Batcher(engine, max_batch_size=2, max_wait_s=0.0)
    jobs = [batcher.submit(p) for p in prepared[:6]]  # 2 running, 4 queued
    assert started.wait(30)
    for job in jobs:
        with pytest.raises(EngineUnavailable, match="worker stopped"):
            job.future.result(10)
    assert not batcher.alive and isinstance(batcher.error, Crash)
    with pytest.raises(Busy, match="worker stopped") as refused:
        batcher.submit(prepared[0])
    assert refused.value.closed
    batcher.close(1)
    monkeypatch.setattr(RunningBatch, "step", step)


def test_close_fails_what_the_worker_could_not_finish_in_time(engine, workload, monkeypatch):
    prepared, _ = workload
    step = RunningBatch.step

    def slow_step(self):
        time.sleep(0.2)
        return step(self)

    monkeypatch.setattr(RunningBatch, "step", slow_step)
    batcher = Batcher(engine, max_batch_size=2, max_wait_s=0.0)
    jobs = [batcher.submit(p) for p in prepared[:6]]
    start = time.monotonic()
    batcher.close(0.5)
    assert time.monotonic() - start < 5
    outcomes = [job.future.exception(10) for job in jobs]
    assert any(isinstance(e, EngineUnavailable) for e in outcomes)  # the unfinished ones, told
    assert all(e is None or isinstance(e, EngineUnavailable) for e in outcomes)


def test_the_static_engine_retries_a_failed_batch_one_by_one(static, monkeypatch):
    prepared = [static.prepare(ask(f"Question {k}?"), settings=greedy(5)) for k in range(4)]
    expected = [static.generate([p])[0].token_ids for p in prepared]
    generate = static.model.generate
    target_ids = prepared[2].input_ids

    def faulty(*args, **kwargs):
        rows = kwargs["input_ids"]
        if any(row[-len(target_ids) :].tolist() == target_ids for row in rows):
            raise RuntimeError("injected fault in generate")
        return generate(*args, **kwargs)

    monkeypatch.setattr(static.model, "generate", faulty)
    pieces = [[] for _ in prepared]
    results = static.generate_static(prepared, [p.append for p in pieces], [None] * 4)
    assert isinstance(results[2], RequestFailed) and "injected" in str(results[2])
    assert [r.token_ids for k, r in enumerate(results) if k != 2] == [
        e for k, e in enumerate(expected) if k != 2
    ]
    assert "".join(pieces[0]) == results[0].text  # the retried stream did not repeat its text


def test_a_tiny_temperature_is_greedy_in_both_schedulers(engine, static):
    messages = ask("Is there a circle?", data_url(scene(3)))
    for e in (engine, static):
        greedy_answer = e.chat(messages, settings=greedy(8)).token_ids
        for t in (1e-300, MIN_TEMPERATURE / 2):
            tiny = GenerationSettings(max_new_tokens=8, temperature=t, seed=3)
            assert not tiny.sampled
            assert e.chat(messages, settings=tiny).token_ids == greedy_answer
        at_floor = e.chat(
            messages, settings=GenerationSettings(max_new_tokens=8, temperature=MIN_TEMPERATURE)
        )
        assert at_floor.token_ids == greedy_answer  # sampling at the floor: finite, and the argmax


def test_seeds_over_the_generators_whole_range_are_accepted_and_others_refused(engine):
    messages = ask("Hello")
    for seed in (0, -1, 2**63, 2**64 - 1, -(2**63)):
        settings = GenerationSettings(max_new_tokens=3, temperature=1.0, seed=seed)
        assert len(engine.chat(messages, settings=settings).token_ids) <= 3
    for seed in (2**64, -(2**63) - 1):
        with pytest.raises(ValueError, match="seed") as refused:
            GenerationSettings(temperature=1.0, seed=seed)
        assert refused.value.param == "seed"


def reference_penalized(scores: torch.Tensor, generated: list[int], s: GenerationSettings) -> torch.Tensor:
    """OpenAI's formula, one token at a time."""
    out = scores.clone()
    for token in set(generated):
        count = generated.count(token)
        out[token] -= count * s.frequency_penalty + s.presence_penalty
    for token, bias in s.logit_bias:
        out[token] += bias
    return out


def test_penalties_and_logit_bias_follow_openais_formula():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(50, generator=g)
    scores[7] = float("-inf")  # a suppressed token stays suppressed
    generated = [3, 3, 9, 3, 12, 9]
    s = GenerationSettings(frequency_penalty=0.7, presence_penalty=-0.4, logit_bias=((1, 5.0), (3, -2.5)))
    torch.testing.assert_close(penalize(scores, generated, s), reference_penalized(scores, generated, s))
    assert penalize(scores, [], GenerationSettings()) is scores


def reference_greedy(engine: Engine, prepared: Prepared) -> list[int]:
    """Greedy decoding with penalties by hand: the full sequence re-run for every token (no cache)."""
    s, ids, out = prepared.settings, list(prepared.input_ids), []
    rows = engine.visual_rows(prepared.frames)
    extra = {"mm_encoder_outputs": {"image": BaseModelOutputWithPooling(pooler_output=rows)}} if rows else {}
    suppress = list(engine.model.generation_config.suppress_tokens or [])
    stops = set(engine.processor.stop_token_ids)
    with torch.no_grad():
        for _ in range(s.max_new_tokens):
            logits = engine.model(input_ids=torch.tensor([ids]), **extra).logits[0, -1].float()
            logits[suppress] = float("-inf")
            token = int(reference_penalized(logits, out, s).argmax())
            out.append(token)
            ids.append(token)
            if token in stops:
                break
    return [t for t in out if t not in stops]


def test_greedy_answers_with_penalties_and_bias_equal_the_reference_in_both_schedulers(engine, static):
    settings = GenerationSettings(max_new_tokens=10, frequency_penalty=1.5, presence_penalty=0.5,
                                  logit_bias=((5, 3.0),))  # fmt: skip
    messages = ask("Describe it.", data_url(scene(4)))
    plain = engine.chat(messages, settings=greedy(10)).token_ids
    for e in (engine, static):
        prepared = e.prepare(messages, settings=settings)
        answer = e.generate([prepared])[0].token_ids
        assert answer == reference_greedy(e, prepared)
        assert answer != plain  # the penalties changed something
    forced = GenerationSettings(max_new_tokens=4, logit_bias=((9, 100.0),))
    assert engine.chat(messages, settings=forced).token_ids == [9, 9, 9, 9]


def test_a_logit_bias_outside_the_vocabulary_is_refused(engine):
    with pytest.raises(ValueError, match="outside the vocabulary") as refused:
        engine.prepare(ask("Hi"), settings=GenerationSettings(logit_bias=((10**6, 1.0),)))
    assert refused.value.param == "logit_bias"
