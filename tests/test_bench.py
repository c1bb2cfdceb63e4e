"""The bench suite's own parts: FLOP formulas against FlopCounterMode, the machine and memory probes, and a
--quick smoke run of each model bench through its `main(argv)` (the numbers are not judged, only produced)."""

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from mgllava import MGLlavaConfig, MGLlavaForConditionalGeneration
from mgllava.model.objects import pool_object_features

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import common  # noqa: E402
import flops  # noqa: E402
import models  # noqa: E402


def counted(fn) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.fixture(scope="module")
def eager_tiny():
    """The tiny preset with eager attention, whose matmuls FlopCounterMode sees (it skips CPU sdpa kernels)."""
    torch.manual_seed(0)
    config = MGLlavaConfig.from_preset("tiny")
    model = MGLlavaForConditionalGeneration._from_config(config, attn_implementation="eager").eval()
    assert model.language_model.config._attn_implementation == "eager"
    assert model.vision_tower.clip.config._attn_implementation == "eager"
    return model


def test_flop_formulas_equal_flop_counter_part_by_part(eager_tiny):
    model, config = eager_tiny, eager_tiny.config
    shape = flops.PrefillShape(images=2, boxes_per_image=3, text_tokens=7)
    want = flops.mgllava_flops(config, shape)
    batch, _ = models.prefill_inputs(config, shape)
    with torch.no_grad():
        low = model.vision_tower(batch["pixel_values"])
        stages = model.high_res_tower(batch["high_res_pixel_values"])
        fused = model.fusion(low, stages)
    boxes = batch["object_boxes"].split([3, 3])
    size = config.high_res_config.image_size
    embeds = torch.randn(1, flops.sequence_length(config, shape), config.text_config.hidden_size)
    assert counted(lambda: model.vision_tower(batch["pixel_values"])) == want["CLIP"]
    assert counted(lambda: model.high_res_tower(batch["high_res_pixel_values"])) == want["ConvNeXt"]
    assert counted(lambda: model.fusion(low, stages)) == want["fusion"]
    projected = counted(
        lambda: (model.projector(fused), model.box_projector(torch.randn(6, config.object_feature_dim)))
    )
    assert projected == want["projectors"]
    assert counted(lambda: model.lm_head(model.language_model(inputs_embeds=embeds)[0])) == want["LLM"]
    pooled = counted(
        lambda: [pool_object_features([s[i] for s in stages], b, size) for i, b in enumerate(boxes)]
    )
    assert 0 < pooled <= want["pooling"] * 1.1  # dense upper bound (+ the small weight matmuls)
    assert counted(lambda: model(**batch)) == pytest.approx(sum(want.values()), rel=0.01)


def test_llava_flops_and_decode_bytes_follow_the_peer_and_the_llm(eager_tiny):
    config = eager_tiny.config
    peer = models.build_peer(eager_tiny)
    shape = flops.PrefillShape(images=1, text_tokens=9)
    _, batch = models.prefill_inputs(config, shape)
    assert counted(lambda: peer(**batch)) == sum(flops.llava_flops(config, shape).values())
    llm = [*eager_tiny.language_model.named_parameters(), *eager_tiny.lm_head.named_parameters()]
    streamed = sum(p.numel() for n, p in llm if "embed_tokens" not in n)
    assert flops.decode_weight_bytes(config.text_config, 2) == 2 * streamed


def test_peer_shares_our_modules_and_gives_our_logits_without_boxes():
    config = models.bench_config(quick=True)
    ours = models.build_ours(config)
    peer = models.build_peer(ours)
    assert peer.model.language_model is ours.model.language_model
    assert peer.lm_head is ours.lm_head
    mine, theirs = models.prefill_inputs(config, flops.PrefillShape(1, 0, 12))
    with torch.inference_mode():
        torch.testing.assert_close(ours(**mine).logits, peer(**theirs).logits)


def test_machine_probe_and_bf16_verdict():
    machine = common.measure_machine(quick=True)
    assert machine.fp32_gflops > 0 and machine.bf16_gflops > 0 and machine.bandwidth_gbs > 0
    assert machine.cores >= 1 and machine.cpu
    fast = common.Machine("cpu", 2, 2, ["amx_bf16"], 1.0, None, 100.0, 400.0, 10.0)
    slow = common.Machine("cpu", 2, 2, [], 1.0, None, 100.0, 25.0, 10.0)
    odd = common.Machine("cpu", 2, 2, ["avx512_bf16"], 1.0, None, 100.0, 25.0, 10.0)
    assert fast.bf16_hardware and not slow.bf16_hardware and not odd.bf16_hardware
    assert "disagree" in odd.describe() and "bf16 hardware: yes" in fast.describe()


def test_peak_rss_sees_a_large_allocation_and_interleave_alternates():
    assert common.peak_rss_during(lambda: torch.ones(25 * 2**20).sum()) >= 90 * 2**20
    calls = []
    timings = common.interleave(
        {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, 3, warmup=False
    )
    assert calls == ["a", "b", "b", "a", "a", "b"] and len(timings["a"].seconds) == 3


def run_quick(script: str, tmp_path, *extra: str) -> dict:
    module = __import__(script)
    out = tmp_path / f"{script}.json"
    module.main(["--quick", "--record", str(out), *extra])
    record = json.loads(out.read_text())
    assert record["markdown"].startswith("## ") and "--quick" in record["title"]
    assert all(g["met"] is None for g in record["goals"])  # small models: goals are not judged
    assert record["machine"]["fp32_gflops"] > 0
    return record


@pytest.mark.parametrize(("dtype", "same"), [("float32", 1e-4), ("bfloat16", 0.1)])
def test_prefill_quick(tmp_path, dtype, same):
    record = run_quick("bench_prefill", tmp_path, "--boxes", "5", "--rounds", "1", "--dtype", dtype)
    values = record["values"]
    short = {"float32": "fp32", "bfloat16": "bf16"}[dtype]
    assert [g["goal"] for g in record["goals"]] == [
        f"{short} prefill time ratio vs LLaVA",
        f"whole prefill vs {short} matmul peak",
    ]
    assert values["logits_diff_no_boxes"] < same
    assert values["ours_flops"] > values["peer_flops"] > 0 and values["ours_s"] > 0
    parts = {"CLIP", "ConvNeXt", "fusion", "pooling", "projectors", "LLM", "glue"}
    assert set(values["ours_parts_s"]) == parts


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_decode_quick(tmp_path, dtype):
    record = run_quick("bench_decode", tmp_path, "--new-tokens", "4", "--rounds", "1", "--dtype", dtype)
    values = record["values"]
    assert values["ours_tokens_per_s"] > 0 and values["peer_tokens_per_s"] > 0
    assert len(record["goals"]) == (2 if dtype == "bfloat16" else 1)
    assert ("of_bandwidth" in values) == (dtype == "bfloat16")


def test_scaling_quick(tmp_path):
    values = run_quick("bench_scaling", tmp_path, "--boxes", "0", "20", "--frames", "1", "2", "--rounds", "1")
    boxes, frames = values["values"]["boxes"], values["values"]["frames"]
    assert boxes["x"] == [0, 20] and frames["flops"][1] > 2 * frames["flops"][0] * 0.9
    assert len(frames["seconds"]) == 2 and all(t > 0 for t in boxes["seconds"])


def test_object_pooling_quick_measures_memory_in_a_child(tmp_path):
    values = run_quick("bench_object_pooling", tmp_path, "--boxes", "1", "4", "--rounds", "1")["values"]
    assert values["4"]["max_diff"] < 1e-5
    assert values["4"]["reference_bytes"] > 20 * max(values["4"]["ours_bytes"], 64 * 1024)


def test_memory_quick_runs_a_preset_in_a_child(tmp_path):
    record = run_quick("bench_memory", tmp_path, "--presets", "tiny", "mgllava-yi1.5-34b")
    tiny = record["values"]["tiny"]
    assert tiny["run_peak"] >= tiny["baseline"] > 0 and tiny["weights"] > 0
    assert record["values"]["skipped"] == ["mgllava-yi1.5-34b"]


@pytest.mark.slow
def test_suite_runner_writes_results(tmp_path):
    import run

    out = tmp_path / "results.md"
    run.main(["--quick", "--out", str(out)])
    text = out.read_text()
    for heading in ("# Bench results", "## Machine", "## Goals", "## Prefill at full vision size vs transformers LLaVA, float32",
                    "## Prefill at full vision size vs transformers LLaVA, bfloat16", "## Object pooling", "## Decode",
                    "## Decode vs transformers LLaVA generate, bfloat16",
                    "## Prefill scaling", "## Memory", "## Serving", "## Second turn",
                    "## Serving: inter-token gap", "## Decode attention", "## Serving: our server vs vLLM"):  # fmt: skip
        assert heading in text


def test_serving_benches_quick_record_their_goals(tmp_path):
    serve = run_quick("bench_serve", tmp_path, "--clients", "1,2", "--requests", "1")
    assert "continuous" in serve["markdown"] and "same answers 2/2" in serve["markdown"]
    turns = run_quick("bench_turns", tmp_path, "--conversations", "1", "--max-tokens", "2")
    assert turns["values"]["same"] == 1 and turns["values"]["ttft_ratio"] > 0
    assert [g["goal"] for g in turns["goals"]] == ["second turn's time to first text vs recomputation"]
    gap = run_quick("bench_gap", tmp_path)
    ratios = ("gap_ratio", "gap_ratio_full_team", "gap_ratio_process", "gap_ratio_process_a_core_left")
    assert all(gap["values"][key] > 0 for key in ratios)


@pytest.mark.skipif(
    not any(shutil.which(c) for c in ("g++", "c++", "clang++")),
    reason="no C++ compiler for the decode kernel",
)
def test_decode_attention_quick_compares_transformers_call_with_ours(tmp_path):
    values = run_quick("bench_decode_attention", tmp_path, "--rounds", "1")["values"]
    assert values and all(
        min(v[k] for k in ("transformers", "grouped", "kernel", "fp32")) > 0 for v in values.values()
    )
    assert all(v["engine"] in ("grouped", "kernel") and max(v["grouped diff"], v["kernel diff"]) < 0.05
               for v in values.values())  # fmt: skip


def test_decode_attention_quick_without_a_compiler_records_why_and_measures_the_rest(tmp_path, monkeypatch):
    import bench_decode_attention

    def no_compiler(*args):
        raise RuntimeError("InductorError: CppCompileError: no C++ compiler found\ndetails")

    monkeypatch.setattr(bench_decode_attention, "kernel_decode_attention", no_compiler)
    record = run_quick("bench_decode_attention", tmp_path, "--rounds", "1")
    assert (
        "does not compile here (RuntimeError: InductorError: CppCompileError: no C++ compiler found)"
        in (record["markdown"])
    )
    values = record["values"].values()
    assert values and all("kernel" not in v and v["engine"] == "grouped" and v["grouped"] > 0 for v in values)


def test_linear_quick_compares_f_linear_with_packed_weights(tmp_path):
    values = run_quick("bench_linear", tmp_path)["values"]
    assert {"float32", "bfloat16"} == {key.split()[0] for key in values}
    assert all(v["F.linear"] > 0 and v["packed"] > 0 and v["diff"] < 0.02 for v in values.values())


def test_vllm_serve_bench_without_the_vllm_venv_records_why_it_did_not_run(tmp_path, monkeypatch):
    import bench_vllm_serve

    monkeypatch.setattr(bench_vllm_serve, "VLLM_PYTHON", tmp_path / "no-venv" / "bin" / "python")
    record = run_quick("bench_vllm_serve", tmp_path)
    assert "skipped: no vLLM venv" in record["markdown"]
    assert [g["met"] for g in record["goals"]] == [None]


def test_vllm_serve_schedule_gives_each_round_its_own_seeds_and_alternates_the_order():
    import bench_vllm_serve

    plan = bench_vllm_serve.schedule([1, 4, 16], requests=2, rounds=3)
    assert [(c, r) for c, r, _, _ in plan] == [(c, r) for c in (1, 4, 16) for r in range(3)]
    seeds = [set(range(first, first + c * 2)) for c, _, first, _ in plan]
    assert sum(map(len, seeds)) == len(set().union(*seeds)) == 3 * 2 * (1 + 4 + 16)  # no request sent twice
    assert bench_vllm_serve.WARM_SEED not in set().union(*seeds)
    assert [order for _, r, _, order in plan if r < 2][:2] == [("ours", "vllm"), ("vllm", "ours")]


@pytest.mark.slow
def test_vllm_serve_quick_run_with_our_server_on_both_sides(tmp_path, monkeypatch):
    """The whole bench (two servers up, interleaved rounds, the one-at-a-time pass, the table) with our
    server standing in for vLLM: the same fp32 engine gives the same answers on both sides."""
    import bench_vllm_serve

    command, body = bench_vllm_serve.command, bench_vllm_serve.body
    monkeypatch.setattr(bench_vllm_serve, "VLLM_PYTHON", Path(sys.executable))
    monkeypatch.setattr(bench_vllm_serve, "command", lambda server, *args: command("ours", *args))
    monkeypatch.setattr(bench_vllm_serve, "body", lambda seed, model, server, boxes: {
        **body(seed, model, "ours", boxes), "max_tokens": 4})  # fmt: skip
    markdown = run_quick("bench_vllm_serve", tmp_path)["markdown"]
    rows = [line.split("|")[1:-1] for line in markdown.splitlines() if line.startswith("| llava-fp32")]
    table = {(int(r[1]), r[2].strip()): [c.strip() for c in r[3:]] for r in rows}
    assert set(table) == {(c, s) for c in (1, 4) for s in ("ours", "vllm", "ours/vllm")}
    for (clients, server), cells in table.items():
        rates = cells[1].split()
        assert len(rates) == 2  # two rounds, each reported
        if server != "ours/vllm":
            assert float(cells[0]) > 0 and cells[-2] == f"{clients * 2}/{clients * 2}"
            assert cells[-1] == f"{clients}/{clients}"  # the first round's requests, sent again one at a time
    assert "equal answers to 5/5 requests" in markdown


def test_memory_bench_materialises_meta_models_with_real_buffers():
    import bench_memory

    config = MGLlavaConfig.from_preset("tiny")
    built = MGLlavaForConditionalGeneration(config)
    meta = bench_memory.on_meta(config)
    bench_memory.materialise(meta)
    for (name, a), (_, b) in zip(built.named_buffers(), meta.named_buffers(), strict=True):
        assert torch.equal(a.to(b.dtype), b), name
    weights = [p for p in meta.parameters()]
    assert all(p.device.type == "cpu" and p.dtype == torch.bfloat16 and p.isfinite().all() for p in weights)
    assert 0.01 < torch.cat([p.float().flatten() for p in weights]).std() < 0.1
