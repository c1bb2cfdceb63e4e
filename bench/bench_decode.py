"""Decode speed: MG-LLaVA's `generate` against transformers' LLaVA `generate`, same CLIP and LLM.

The model of `bench/models.py` (Vicuna-7B-width LLM cut to 2 layers, `--dtype`, random weights; the peer shares
our modules), one image with `--boxes` boxes (the peer: the same image, no boxes), 40 text tokens, greedy,
exactly `--new-tokens` tokens. A logits processor stamps the time of every step, so decode speed is read
between the first and the last token of one `generate` call (the prefill is not in it). A decode step reads
every weight of the LLM once (all decoder layers, the final norm, the LM head; one embedding row), so its
bytes per second are read against this machine's measured memory bandwidth.

Goal: ours decodes at least as fast as transformers' LLaVA; in bf16 also (issue 22) at >= 85% of the
measured memory bandwidth.

    .venv/bin/python bench/bench_decode.py [--quick] [--dtype float32] [--new-tokens 32] [--rounds 2] [--record out.json]
"""

from __future__ import annotations

import statistics
import time

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from common import Record, arguments, interleave, measure_machine, pct
from flops import PrefillShape, decode_weight_bytes
from models import SHORT, bench_config, build_ours, build_peer, describe, in_dtype, prefill_inputs


class StepClock(LogitsProcessor):
    """Records `time.perf_counter()` at every generation step (called once per new token)."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.stamps.append(time.perf_counter())
        return scores


def generate(model, batch: dict, new_tokens: int, results: list[tuple[float, float]]) -> None:
    """One greedy `generate`; appends (seconds to the first token, decode tokens/s after it)."""
    clock = StepClock()
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             logits_processor=LogitsProcessorList([clock]))  # fmt: skip
    made = out.shape[1] - batch["input_ids"].shape[1]
    if made != new_tokens or len(clock.stamps) != new_tokens:
        raise RuntimeError(f"asked for {new_tokens} new tokens, got {made} ({len(clock.stamps)} steps)")
    results.append((clock.stamps[0] - start, (new_tokens - 1) / (clock.stamps[-1] - clock.stamps[0])))


def main(argv: list[str] | None = None) -> None:
    parser = arguments(__doc__.splitlines()[0])
    parser.add_argument("--boxes", type=int, default=100)
    parser.add_argument(
        "--new-tokens", type=int, default=None, help="tokens per generate (32; 8 with --quick)"
    )
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="float32")
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    short = SHORT[args.dtype]
    new_tokens = args.new_tokens or (8 if args.quick else 32)
    record = Record(f"Decode vs transformers LLaVA generate, {args.dtype}", args.quick)
    machine = measure_machine(args.quick)
    record.machine(machine)
    config = bench_config(args.quick)
    ours = build_ours(config, dtype)
    peer = build_peer(ours)
    for model in (ours, peer):
        model.generation_config.pad_token_id = config.text_config.pad_token_id
    shape = PrefillShape(images=1, boxes_per_image=args.boxes, text_tokens=40)
    ours_batch, peer_batch = (in_dtype(b, dtype) for b in prefill_inputs(config, shape))
    record.line(f"Model: {describe(config, args.quick)}; {args.dtype}; greedy, {new_tokens} new tokens after one image "
                f"({args.boxes} boxes for ours) and 40 text tokens; {args.rounds} interleaved rounds after a warm-up.")  # fmt: skip
    record.line()
    results: dict[str, list[tuple[float, float]]] = {"ours": [], "peer": []}
    interleave({"ours": lambda: generate(ours, ours_batch, new_tokens, results["ours"]),
                "peer": lambda: generate(peer, peer_batch, new_tokens, results["peer"])}, args.rounds)  # fmt: skip
    weights = decode_weight_bytes(config.text_config, dtype.itemsize)
    rows, best = [], {}
    for name, label in (("ours", "MG-LLaVA (ours)"), ("peer", "transformers LLaVA")):
        timed = results[name][1:]  # the first call was the warm-up
        rates = [r for _, r in timed]
        best[name] = max(rates)
        streamed = weights * best[name] / 1e9
        rows.append([label, f"{best[name]:.2f}", f"{statistics.median(rates):.2f}", f"{1e3 / best[name]:.0f}",
                     f"{min(t for t, _ in timed):.2f}", f"{streamed:.1f}", pct(streamed / machine.bandwidth_gbs)])  # fmt: skip
    record.table(["", "tokens/s (best)", "tokens/s (median)", "ms per token", "s to first token",
                  "weights streamed GB/s", "of measured bandwidth"], rows)  # fmt: skip
    ratio = best["ours"] / best["peer"]
    record.values |= {
        "ours_tokens_per_s": best["ours"],
        "peer_tokens_per_s": best["peer"],
        "weight_bytes": weights,
    }
    record.line(f"Ratio ours/peer: {ratio:.2f}x the decode speed. Each step reads {weights / 1e9:.2f} GB of {short} LLM "
                f"weights; the memory read bandwidth measured in this run is {machine.bandwidth_gbs:.1f} GB/s.")  # fmt: skip
    record.line()
    why = "" if ratio >= 1 else (
        f"missed by {1 - ratio:.0%}: both run the same LLM modules through the same `generate`; ours reads "
        f"{args.boxes} more KV rows per step (its object rows) and its forward has a few more Python checks per "
        "step; `--boxes 0` (equal KV rows) measures the engine alone, and the ratio moves by several % between "
        "runs on a shared machine (best vs median above)"
    )  # fmt: skip
    record.goal(f"{short} decode speed vs transformers LLaVA", ">= 1.00x", f"{ratio:.2f}x", ratio >= 1, why)
    if dtype == torch.bfloat16:
        share = weights * best["ours"] / 1e9 / machine.bandwidth_gbs
        record.values["of_bandwidth"] = share
        note = "" if share >= 0.85 else (
            f"missed by {0.85 - share:.0%} of the bandwidth: a step also runs per-layer Python, norms, rotary and "
            "attention over the KV rows, whose time the weight bytes do not count; what would close it: fewer "
            "kernels per layer (fused norms and rotary, a compiled step), or a machine not shared with other work"
        )  # fmt: skip
        record.goal(
            "bf16 decode weights streamed vs measured memory bandwidth",
            ">= 85%",
            pct(share),
            share >= 0.85,
            note,
        )
    record.finish(args.record)


if __name__ == "__main__":
    main()
