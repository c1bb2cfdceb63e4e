"""Second-turn latency: the first turn's KV cache reused (prefix reuse) versus recomputing the whole prompt.

The server bench's small random MG-LLaVA (8-layer 512-wide Llama, 27M parameters) with the paper's visual row
count: CLIP at 336 px (24 x 24 = 576 image tokens) and ConvNeXt at 768 px, so a conversation's prompt is
mostly image rows, as with the released models. A conversation is an image and a question, answered with
`--max-tokens` tokens; its second turn re-sends the conversation with the answer and a new question. Three
engines over one model answer both turns: "reuse" (continuous scheduling with its prefix cache), "recompute"
(continuous, `prefix_cache_bytes=0`) and "static" (the earlier engine). Each engine's first turn warms its
own feature cache, so the second turns differ only in how much of the prompt the LLM computes. The second
turns are timed (time to first text, and the whole answer), in a rotating order per conversation. Prints
medians, the reuse/recompute ratios, the prompt tokens reused and computed, and whether the answers agree.

    .venv/bin/python bench/bench_turns.py [--quick] [--conversations 6] [--max-tokens 16] [--threads 1]

`--quick` is a smoke run (3 conversations of 8 tokens). The last line is ours (reuse), the peer
(recomputation) and their ratio.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from PIL import Image

from bench_serve import HIGH, TEXT, VISION
from common import Record, measure_machine
from mgllava import MGLlavaConfig, MGLlavaForConditionalGeneration, MGLlavaProcessor
from mgllava.inference import Engine, GenerationSettings

NAMES = ("reuse", "recompute", "static")


def build_engines() -> dict[str, Engine]:
    torch.manual_seed(0)
    vision, high = {**VISION, "image_size": 336}, {**HIGH, "image_size": 768}
    config = MGLlavaConfig(vision_config=vision, high_res_config=high, text_config=TEXT, image_token_id=4)
    model = MGLlavaForConditionalGeneration(config).eval()
    processor = MGLlavaProcessor.for_config(
        config, MGLlavaProcessor.from_preset("tiny").tokenizer, template="vicuna"
    )
    return {
        "reuse": Engine(model, processor),
        "recompute": Engine(model, processor, prefix_cache_bytes=0),
        "static": Engine(model, processor, scheduling="static"),
    }


def image(seed: int) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 255, (240, 320, 3), generator=g, dtype=torch.uint8).numpy())


def first_turn(seed: int) -> list[dict]:
    return [
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "text", "text": f"What is in picture {seed}?"}],
        }
    ]


def timed(engine: Engine, messages: list[dict], pictures: list, settings: GenerationSettings) -> dict:
    start = time.perf_counter()
    stream = engine.stream(messages, images=pictures, settings=settings)
    first = None
    for _ in stream:
        first = first or time.perf_counter()
    end = time.perf_counter()
    return {"ttft": (first or end) - start, "total": end - start, "tokens": stream.result.token_ids}


def run(engines: dict[str, Engine], conversations: int, max_tokens: int) -> dict[str, list[dict]]:
    settings = GenerationSettings(max_new_tokens=max_tokens)
    out: dict[str, list[dict]] = {name: [] for name in engines}
    for c in range(conversations):
        pictures = [image(c)]
        answers = {
            name: e.chat(first_turn(c), images=pictures, settings=settings) for name, e in engines.items()
        }
        order = NAMES[c % 3 :] + NAMES[: c % 3]
        for name in order:
            second = [*first_turn(c), {"role": "assistant", "content": answers[name].text},
                      {"role": "user", "content": "Where is it, and what colour?"}]  # fmt: skip
            prefixes = engines[name].prefixes
            reused = prefixes.reused_tokens if prefixes else 0
            record = timed(engines[name], second, pictures, settings)
            record["prompt"] = len(
                engines[name].prepare(second, images=pictures, settings=settings).input_ids
            )
            record["reused"] = (prefixes.reused_tokens if prefixes else 0) - reused
            out[name].append(record)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="a smoke run: 3 conversations of 8 tokens")
    parser.add_argument("--conversations", type=int, default=None, help="6 (3 with --quick)")
    parser.add_argument("--max-tokens", type=int, default=None, help="16 (8 with --quick)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--record", help="write the results as JSON here (bench/run.py collects them)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.conversations = args.conversations or (3 if args.quick else 6)
    args.max_tokens = args.max_tokens or (8 if args.quick else 16)
    record = Record("Second turn: prefix reuse vs recomputation", args.quick)
    record.machine(measure_machine(args.quick))
    lines: list[str] = []

    def say(text: str) -> None:
        print(text, flush=True)
        lines.append(text)

    engines = build_engines()
    model = engines["reuse"].model
    say(f"second-turn bench: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M-parameter MG-LLaVA "
          f"({model.config.num_image_tokens} image tokens, 27M-parameter LLM), {args.conversations} conversations, "
          f"{args.max_tokens} new tokens per turn, float32, {torch.get_num_threads()} threads on {os.cpu_count()} "
          f"cores, load average {os.getloadavg()[0]:.1f}")  # fmt: skip
    results = run(engines, args.conversations, args.max_tokens)
    medians = {name: {k: statistics.median(r[k] for r in rs) for k in ("ttft", "total", "prompt", "reused")}
               for name, rs in results.items()}  # fmt: skip
    say(f"  {'engine':>10} {'ttft s':>8} {'total s':>8} {'prompt':>7} {'reused':>7}   (second turn, medians)")
    for name, m in medians.items():
        say(f"  {name:>10} {m['ttft']:8.3f} {m['total']:8.3f} {m['prompt']:7.0f} {m['reused']:7.0f}")
    r, c = medians["reuse"], medians["recompute"]
    same = sum(
        a["tokens"] == b["tokens"] for a, b in zip(results["reuse"], results["recompute"], strict=True)
    )
    say(f"  reuse / recompute: time to first text {r['ttft'] / c['ttft']:.2f}x, whole answer "
        f"{r['total'] / c['total']:.2f}x; same answers {same}/{args.conversations}; "
        f"load average after {os.getloadavg()[0]:.1f}")  # fmt: skip
    say(f"  second turn, time to first text: ours (reuse) {r['ttft']:.3f} s, peer (recompute) {c['ttft']:.3f} s, "
        f"ratio {r['ttft'] / c['ttft']:.2f}x; static engine {medians['static']['ttft']:.3f} s")  # fmt: skip
    record.lines += ["```", *lines, "```", ""]
    ratio = r["ttft"] / c["ttft"]
    record.values |= {"ttft_ratio": ratio, "same": same}
    record.goal(
        "second turn's time to first text vs recomputation",
        "< 1x, same answers",
        f"{ratio:.2f}x, same answers {same}/{args.conversations}",
        ratio < 1 and same == args.conversations,
    )
    record.finish(args.record)


if __name__ == "__main__":
    main()
