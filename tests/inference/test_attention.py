"""bf16 decode attention on the CPU (`inference.attention`): the compiled kernel against an fp32 model and
torch's flash kernel, reading the cache's strided views in place, row by row as one batch; the grouped
fallback as transformers' sdpa call; which calls take which path; a kernel that fails or cannot compile
leaves its calls to the fallback; and an engine decodes through it with logits as near an fp32 model's."""

import logging
import os
import shutil
import subprocess
import sys
import types

import pytest
import torch
from torch._dynamo.utils import counters
from torch._inductor.utils import run_and_get_code
from transformers.cache_utils import DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from mgllava import MGLlavaConfig, MGLlavaForConditionalGeneration, MGLlavaProcessor
from mgllava.inference import Batcher, Engine, attention
from mgllava.inference.attention import (
    KERNEL,
    KERNEL_FLAG,
    KERNEL_MIN_KEYS,
    KERNEL_MIN_ROWS,
    decode_aware_sdpa,
    enable_decode_kernel,
    grouped_decode_attention,
    kernel_decode_attention,
    kernel_pays,
    takes_decode_path,
)
from mgllava.inference.packed import install as install_packed

from ..serving import ShapesProposer, tiny_parts
from .test_decoding import ask, greedy, solo, workload

# inductor compiles the kernel with a C++ compiler; without one the engine takes the fallback (tested below
# without one), and these tests skip (CI installs one: `make compiler`)
needs_compiler = pytest.mark.skipif(
    not any(shutil.which(c) for c in ("g++", "c++", "clang++")),
    reason="no C++ compiler: inductor cannot compile the decode kernel (`make compiler` installs g++)",
)


@pytest.fixture(autouse=True)
def kernel_state():
    """Tests that break the kernel must not leave it off for the rest of the process."""
    compiled, failed = dict(KERNEL._compiled), KERNEL.failed
    yield
    KERNEL._compiled, KERNEL.failed = compiled, failed


class Heads(torch.nn.Module):
    def __init__(self, groups: int, head_dim: int = 32, kernel: bool = True) -> None:
        super().__init__()
        self.num_key_value_groups, self.head_dim = groups, head_dim
        setattr(self, KERNEL_FLAG, kernel)
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


@needs_compiler
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(8, 2, 32), (8, 8, 64), (32, 8, 128)])
@pytest.mark.parametrize("spread", [1.0, 4.0])
def test_the_kernel_is_as_near_an_fp32_model_as_the_flash_kernel(heads, kv_heads, head_dim, spread):
    """Against an fp32 model (the same inputs unrounded): both keep scores in float32, the kernel also the
    probabilities x V, so its mean error is at most the flash kernel's (to 5%, for the order of the sums)."""
    g = torch.Generator().manual_seed(1)
    shapes = ((heads, 1), (kv_heads, 300), (kv_heads, 300))
    q, k, v = (torch.randn(6, h, n, head_dim, generator=g) for h, n in shapes)
    q, k = q * spread, k * spread  # scores of standard deviation about spread^2
    mask = decode_inputs(batch=6, length=300)[3]
    layer = Heads(heads // kv_heads, head_dim)
    reference, _ = sdpa_attention_forward(layer, q, k, v, mask)
    bf16 = [t.bfloat16() for t in (q, k, v)]
    ours, _ = kernel_decode_attention(layer, *bf16, mask)
    flash, _ = sdpa_attention_forward(layer, *bf16, mask)
    assert ours.shape == flash.shape == (6, 1, heads, head_dim) and ours.dtype == torch.bfloat16
    ours_error, flash_error = ((x.float() - reference).abs() for x in (ours, flash))
    assert ours_error.mean() <= 1.05 * flash_error.mean()  # measured: 0.90-1.00x
    assert ours_error.max() <= 1.5 * flash_error.max()  # one output's last rounding; measured: up to 1.3x


@needs_compiler
def test_the_kernel_reads_strided_cache_views_and_each_row_as_alone():
    """The batch cache's views (spare rows and columns around the window) give what contiguous copies give,
    and a row's output does not depend on the rows beside it (one-row and many-row graphs)."""
    q, _, _, mask = decode_inputs(batch=4, length=20)
    g = torch.Generator().manual_seed(3)
    k_store, v_store = (torch.randn(6, 2, 32, 32, generator=g).bfloat16() for _ in range(2))
    k, v = k_store[:4, :, 5:25], v_store[:4, :, 5:25]
    assert not k.is_contiguous()
    layer = Heads(4)
    strided, _ = kernel_decode_attention(layer, q, k, v, mask)
    assert torch.equal(strided, kernel_decode_attention(layer, q, k.contiguous(), v.contiguous(), mask)[0])
    for row in range(4):
        alone, _ = kernel_decode_attention(
            layer, q[row : row + 1], k[row : row + 1], v[row : row + 1], mask[row : row + 1]
        )
        assert torch.equal(alone, strided[row : row + 1])


@needs_compiler
def test_the_kernel_masks_as_sdpa_does():
    """No mask is an all-True mask, and masked columns' K/V never matter (not even NaN ones: a failed row's
    leftovers in storage)."""
    q, k, v, mask = decode_inputs(heads=8, kv_heads=8, length=40)
    layer = Heads(1)
    assert torch.equal(
        kernel_decode_attention(layer, q, k, v, None)[0],
        kernel_decode_attention(layer, q, k, v, torch.ones_like(mask))[0],
    )
    poisoned_k, poisoned_v = k.clone(), v.clone()
    poisoned_k[1, :, :3], poisoned_v[1, :, :3] = float("nan"), 1e4  # row 1 skips its first 3 columns
    poisoned, _ = kernel_decode_attention(layer, q, poisoned_k, poisoned_v, mask)
    assert torch.equal(poisoned, kernel_decode_attention(layer, q, k, v, mask)[0])


@needs_compiler
def test_the_kernel_compiled_under_one_thread_runs_on_the_threads_a_call_has():
    """inductor writes the compiling thread's OpenMP thread count into its code unless told otherwise, and
    `mgllava serve` builds its engine (and compiles the kernel) under one thread."""
    probe = types.FunctionType(attention._attend_single.__code__.replace(co_name="probe"), vars(attention))
    q, k, v, mask = decode_inputs(batch=3, heads=4, kv_heads=4, length=64)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            _, code = run_and_get_code(
                torch.compile(probe, **attention.COMPILE), q[:, :, 0], k, v, mask[:, 0], torch.tensor(0.2)
            )
    finally:
        torch.set_num_threads(threads)
    code = "".join(code)
    assert "#pragma omp parallel" in code and "num_threads(1)" not in code


@pytest.mark.parametrize(
    ("heads", "kv_heads", "head_dim"), [(8, 1, 32), (8, 2, 32), (8, 4, 32), (32, 8, 128)]
)
@pytest.mark.parametrize("mask_kind", ["bool", "additive", "none"])
def test_the_grouped_fallback_is_transformers_sdpa_to_bf16_rounding(heads, kv_heads, head_dim, mask_kind):
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


def test_only_bf16_decode_steps_on_the_cpu_take_the_decode_path():
    module = Heads(4)
    q, k = torch.zeros(2, 8, 1, 16, dtype=torch.bfloat16), torch.zeros(2, 2, 9, 16, dtype=torch.bfloat16)
    assert takes_decode_path(module, q, k, {})
    assert takes_decode_path(
        module, q, torch.zeros(2, 8, 9, 16, dtype=torch.bfloat16), {}
    )  # one per K/V head
    assert not takes_decode_path(module, q.float(), k.float(), {})  # fp32: sdpa
    assert not takes_decode_path(module, q.expand(-1, -1, 3, -1), k, {})  # a prompt
    assert not takes_decode_path(module, q.to("meta"), k.to("meta"), {})  # not the CPU
    assert not takes_decode_path(module, q, k, {"softcap": 30.0})
    module.train()
    assert not takes_decode_path(module, q, k, {"dropout": 0.1})


def route(monkeypatch) -> list[str]:
    """Record which function computes each `decode_aware_sdpa` call."""
    taken = []
    for name in ("kernel_decode_attention", "grouped_decode_attention", "sdpa_attention_forward"):
        real = getattr(attention, name)
        monkeypatch.setattr(
            attention, name, lambda *a, _n=name, _r=real, **kw: taken.append(_n) or _r(*a, **kw)
        )
    return taken


@needs_compiler
def test_which_calls_the_kernel_takes(monkeypatch):
    taken = route(monkeypatch)
    q, k, v, mask = decode_inputs(batch=KERNEL_MIN_ROWS)
    decode_aware_sdpa(Heads(4), q, k, v, mask)  # a flagged layer with grouped heads, enough rows
    decode_aware_sdpa(Heads(4), q, k, v, None)
    decode_aware_sdpa(Heads(4), q[:-1], k[:-1], v[:-1], mask[:-1])  # too few rows to pay: grouped blocks
    decode_aware_sdpa(Heads(4, kernel=False), q, k, v, mask)  # a layer no engine enabled: grouped blocks
    decode_aware_sdpa(Heads(4), q, k, v, additive(mask, q.dtype))  # an additive mask: grouped blocks
    decode_aware_sdpa(Heads(4), q.float(), k.float(), v.float(), mask)  # fp32: transformers' sdpa
    q1, k1, v1, mask1 = decode_inputs(batch=1, kv_heads=8, length=KERNEL_MIN_KEYS // (8 * 32))
    decode_aware_sdpa(Heads(1), q1, k1, v1, mask1)  # one query head per K/V head: the kernel from one row
    decode_aware_sdpa(Heads(1), q1, k1[:, :, 1:], v1[:, :, 1:], mask1[..., 1:])  # one key short: sdpa
    decode_aware_sdpa(Heads(1, kernel=False), q1, k1, v1, mask1)  # nothing to group: transformers' sdpa
    kernel, grouped, sdpa = "kernel_decode_attention", "grouped_decode_attention", "sdpa_attention_forward"
    assert taken == [kernel, kernel, grouped, grouped, grouped, sdpa, kernel, sdpa, sdpa]
    cases = ((1, 1, KERNEL_MIN_KEYS), (64, 1, KERNEL_MIN_KEYS - 1), (7, 2, 1 << 24), (8, 2, 1), (64, 4, 1))
    assert [kernel_pays(*case) for case in cases] == [True, False, False, True, True]


def test_a_failing_kernel_hands_its_call_and_the_rest_to_the_fallback(monkeypatch, caplog):
    q, k, v, mask = decode_inputs(batch=KERNEL_MIN_ROWS)
    expected, _ = grouped_decode_attention(Heads(4), q, k, v, mask)

    def broken(*args):
        raise RuntimeError("inductor: no C++ compiler")

    monkeypatch.setattr(KERNEL, "_compiled", {True: broken, False: broken})
    with caplog.at_level(logging.WARNING, logger="mgllava.inference.attention"):
        out, _ = decode_aware_sdpa(Heads(4), q, k, v, mask)
    assert torch.equal(out, expected)
    assert KERNEL.failed == "RuntimeError: inductor: no C++ compiler"
    assert "kernel off" in caplog.text
    taken = route(monkeypatch)
    decode_aware_sdpa(Heads(4), q, k, v, mask)
    assert taken == ["grouped_decode_attention"]


@pytest.fixture
def every_step_pays(monkeypatch):
    """The tiny models' decode steps are far below where the kernel pays (`kernel_pays`): take it anyway."""
    monkeypatch.setattr(attention, "KERNEL_MIN_KEYS", 0)
    monkeypatch.setattr(attention, "KERNEL_MIN_ROWS", 0)


def one_head_per_kv_head():
    """The tiny model with as many K/V heads as query heads (as Vicuna's)."""
    torch.manual_seed(0)
    config = MGLlavaConfig.from_preset("tiny")
    config.text_config.num_key_value_heads = config.text_config.num_attention_heads
    return MGLlavaForConditionalGeneration(config).eval(), MGLlavaProcessor.from_preset("tiny")


DISABLED = """
import torch
from mgllava.inference.attention import KERNEL, KERNEL_FLAG, decode_aware_sdpa, grouped_decode_attention
layer = torch.nn.Module().eval()
layer.num_key_value_groups, layer.head_dim = 4, 32
setattr(layer, KERNEL_FLAG, True)
q, k, v = torch.randn(8, 8, 1, 32).bfloat16(), torch.randn(8, 2, 9, 32).bfloat16(), torch.randn(8, 2, 9, 32).bfloat16()
assert torch.equal(decode_aware_sdpa(layer, q, k, v, None)[0], grouped_decode_attention(layer, q, k, v, None)[0])
print(KERNEL.failed)
"""


def test_with_dynamo_disabled_the_kernel_refuses_to_run_uncompiled():
    """TORCHDYNAMO_DISABLE=1 makes compiled functions run as written, which for the kernel would be (B, heads,
    L, d) float32 products: it refuses, and its call and the rest take the fallback."""
    env = {**os.environ, "TORCHDYNAMO_DISABLE": "1"}
    run = subprocess.run(
        [sys.executable, "-c", DISABLED], env=env, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr
    assert "would run uncompiled" in run.stdout


def bf16_llm():
    model, _ = tiny_parts()
    return model.to(torch.bfloat16).language_model


def test_a_model_where_the_kernel_cannot_compile_stays_on_the_fallback(monkeypatch, caplog):
    llm = bf16_llm()
    monkeypatch.setattr(KERNEL, "_compiled", {})
    monkeypatch.setattr(torch, "compile", lambda *a, **kw: (_ for _ in ()).throw(RuntimeError("no inductor")))
    with caplog.at_level(logging.WARNING, logger="mgllava.inference.attention"):
        reason = enable_decode_kernel(llm)
    assert reason == "RuntimeError: no inductor" and "flash kernel" in caplog.text
    assert not any(getattr(m, KERNEL_FLAG, False) for m in llm.modules())
    assert enable_decode_kernel(bf16_llm()) == reason  # off for the process: no second try
    assert enable_decode_kernel(tiny_parts()[0].language_model) == "the model is not all bf16 on the CPU"


def decode_logits(model, ids: torch.Tensor, mask: torch.Tensor, steps: int) -> list[torch.Tensor]:
    """The model's fp32 logits of `steps` decode steps after a left-padded prompt, fed `ids`' last tokens."""
    prompt = ids.shape[1] - steps
    cache = DynamicCache(config=model.config.text_config)
    with torch.no_grad():
        model(input_ids=ids[:, :prompt], attention_mask=mask[:, :prompt], cache=cache, use_cache=True)
        return [
            model(input_ids=ids[:, t : t + 1], attention_mask=mask[:, : t + 1], cache=cache,
                  use_cache=True).logits[:, -1].float()
            for t in range(prompt, ids.shape[1])
        ]  # fmt: skip


@needs_compiler
def test_a_bf16_models_decode_logits_are_as_near_an_fp32_models_as_on_sdpa(monkeypatch, every_step_pays):
    """Three left-padded rows, six decode steps: the bf16 model's logits through the kernel and through sdpa,
    each against the fp32 model's; the kernel's error is within 1.5x sdpa's (measured: 0.9-1.2x)."""
    model, _ = one_head_per_kv_head()
    install_packed(model.language_model)
    ids = torch.randint(
        3, model.config.text_config.vocab_size, (3, 18), generator=torch.Generator().manual_seed(0)
    )
    mask = torch.ones_like(ids)
    mask[1, :4], mask[2, :7] = 0, 0
    reference = decode_logits(model, ids, mask, 6)
    bf16 = model.to(torch.bfloat16)
    assert enable_decode_kernel(bf16.language_model) is None
    taken = route(monkeypatch)
    kernel = decode_logits(bf16, ids, mask, 6)
    assert taken.count("kernel_decode_attention") == 6 * model.config.text_config.num_hidden_layers
    monkeypatch.setattr(attention, "takes_decode_path", lambda *a: False)
    on_sdpa = decode_logits(bf16, ids, mask, 6)
    for ours, sdpa, ref in zip(kernel, on_sdpa, reference, strict=True):
        assert (ours - ref).abs().mean() <= 1.5 * (sdpa - ref).abs().mean()
        assert (ours - ref).abs().max() <= 1.5 * (sdpa - ref).abs().max()


@needs_compiler
@pytest.mark.parametrize("scheduling", ["static", "continuous"])
def test_a_bf16_engine_decodes_through_the_kernel_unless_told_not_to(
    monkeypatch, every_step_pays, scheduling
):
    model, processor = one_head_per_kv_head()
    layers = model.config.text_config.num_hidden_layers
    engine = Engine(model.to(torch.bfloat16), processor, ShapesProposer(), scheduling=scheduling)
    assert engine.decode_kernel
    prepared = workload(engine)
    taken = route(monkeypatch)
    answers = [solo(engine, p) for p in prepared]
    assert all(answers)
    assert taken.count("kernel_decode_attention") == sum(len(a) - 1 for a in answers) * layers
    model, processor = one_head_per_kv_head()
    engine = Engine(model.to(torch.bfloat16), processor, ShapesProposer(), decode_kernel=False)
    assert not engine.decode_kernel
    taken.clear()
    solo(engine, prepared[0])
    assert "kernel_decode_attention" not in taken and "sdpa_attention_forward" in taken


@needs_compiler
@pytest.mark.parametrize("warm", [True, False])
def test_the_batchers_worker_compiles_the_kernel_for_its_threads_before_the_first_request(
    monkeypatch, every_step_pays, warm
):
    """dynamo keys graphs on the thread count: a worker with other threads than the thread that built the
    engine (`mgllava serve` builds it under one) compiles them when it starts, not at its first requests;
    with `warm=False` (as `mgllava serve` builds it) only the worker compiles them."""
    model, processor = one_head_per_kv_head()
    engine = Engine(model.to(torch.bfloat16), processor, ShapesProposer(), warm=warm)
    assert engine.decode_kernel is warm
    prepared = workload(engine)
    warmed = []
    real = engine.warm_up
    monkeypatch.setattr(
        engine, "warm_up", lambda: (real(), warmed.append(counters["stats"]["unique_graphs"]))
    )
    taken = route(monkeypatch)
    batcher = Batcher(
        engine, max_batch_size=8, max_wait_s=0.0, threads=2 if torch.get_num_threads() == 1 else 1
    )
    try:
        assert all(job.future.result(120).token_ids for job in [batcher.submit(p) for p in prepared])
    finally:
        batcher.close(5)
    assert "kernel_decode_attention" in taken and engine.decode_kernel
    assert warmed == [counters["stats"]["unique_graphs"]]  # no graph compiled after the warm-up


def test_a_worker_whose_warm_up_fails_serves_on_the_fallback(monkeypatch, every_step_pays, caplog):
    """An error in the worker's warm-up is logged, the worker serves, and a kernel left to that warm-up
    (`warm=False`, as `mgllava serve` builds the engine) stays off."""
    model, processor = one_head_per_kv_head()
    engine = Engine(model.to(torch.bfloat16), processor, ShapesProposer(), warm=False)
    prepared = workload(engine)
    monkeypatch.setattr(engine, "warm_up", lambda: (_ for _ in ()).throw(RuntimeError("warm-up broke")))
    taken = route(monkeypatch)
    with caplog.at_level(logging.ERROR, logger="mgllava.inference.batcher"):
        batcher = Batcher(engine, max_batch_size=8, max_wait_s=0.0)
        try:
            assert all(job.future.result(120).token_ids for job in [batcher.submit(p) for p in prepared])
        finally:
            batcher.close(5)
    assert "warm-up broke" in caplog.text and "serving without the kernels" in caplog.text
    assert batcher.error is None and not engine.decode_kernel
    assert "kernel_decode_attention" not in taken and "sdpa_attention_forward" in taken


@needs_compiler
def test_a_pending_kernel_is_compiled_checked_and_turned_on_by_the_first_warm_up(
    monkeypatch, every_step_pays
):
    """`warm=False`: the fallback until `warm_up`; after it the kernel; `decode_kernel` says which, and says
    False again once a failure turned the kernel off for the process."""
    model, processor = one_head_per_kv_head()
    warmed = []
    real = attention._warm_up
    monkeypatch.setattr(attention, "_warm_up", lambda *a: warmed.append(a) or real(*a))
    engine = Engine(model.to(torch.bfloat16), processor, ShapesProposer(), warm=False)
    assert not warmed and not engine.decode_kernel  # nothing compiled or checked yet
    prepared = workload(engine)
    taken = route(monkeypatch)
    assert solo(engine, prepared[0])
    assert "kernel_decode_attention" not in taken and "sdpa_attention_forward" in taken
    engine.warm_up()
    assert len(warmed) == 1 and engine.decode_kernel
    taken.clear()
    assert solo(engine, prepared[0])
    assert "kernel_decode_attention" in taken
    monkeypatch.setattr(KERNEL, "failed", "RuntimeError: later")
    assert not engine.decode_kernel


@needs_compiler
def test_a_grouped_head_engine_takes_the_kernel_for_batches_that_pay(monkeypatch):
    """The tiny model's 2 query heads per K/V head: the kernel for decode steps of 8 rows or more only."""
    model, processor = tiny_parts()
    engine = Engine(model.to(torch.bfloat16), processor, ShapesProposer())
    prepared = [engine.prepare(ask(f"Count to {i}."), settings=greedy(6)) for i in range(KERNEL_MIN_ROWS + 2)]
    taken = route(monkeypatch)
    solo(engine, prepared[0])
    assert "kernel_decode_attention" not in taken and "grouped_decode_attention" in taken
    taken.clear()
    assert all(r.token_ids for r in engine.generate(prepared))
    assert "kernel_decode_attention" in taken
