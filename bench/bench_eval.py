"""Evaluation throughput of `mgllava eval` on easy-vqa: batch size 1 against batched generation.

A small MG-LLaVA at the real resolutions (CLIP 336 px, 576 image tokens; ConvNeXt 768 px) with narrow towers
and a 4-layer LLM, random weights, the packaged tiny tokenizer, so that it runs on a CPU. Each setting runs
the real runner (`mgllava.eval.run_eval`: image decoding, processor, greedy `generate`, JSONL, scoring) on the
same easy-vqa questions into a fresh folder and reports answered questions per second from its `run.json`.
Answers are checked to be identical across batch sizes.

    .venv/bin/python bench/bench_eval.py [--questions 32] [--batch-sizes 1 4 8] [--new-tokens 8]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from mgllava import MGLlavaConfig, MGLlavaForConditionalGeneration, MGLlavaProcessor
from mgllava.convert.folder import configure_generation, write_folder
from mgllava.eval import EvalOptions, run_eval
from mgllava.eval.easy_vqa import convert_easy_vqa

VISION = dict(model_type="clip_vision_model", hidden_size=256, intermediate_size=1024, num_hidden_layers=6,
              num_attention_heads=4, patch_size=14, image_size=336, projection_dim=256)  # fmt: skip
HIGH = dict(model_type="convnext", hidden_sizes=[32, 64, 128, 256], depths=[1, 1, 3, 1], image_size=768)
TEXT = dict(model_type="llama", vocab_size=2048, hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
            num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=2048, bos_token_id=1,
            eos_token_id=2, pad_token_id=3, tie_word_embeddings=False)  # fmt: skip


def build(folder: Path) -> Path:
    torch.manual_seed(0)
    config = MGLlavaConfig(vision_config=VISION, high_res_config=HIGH, text_config=TEXT, image_token_id=4)
    model = MGLlavaForConditionalGeneration(config).eval()
    tokenizer = MGLlavaProcessor.from_preset("tiny").tokenizer
    processor = MGLlavaProcessor.for_config(config, tokenizer, template="vicuna")
    configure_generation(model, processor)
    return write_folder(model, processor, folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=32)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--new-tokens", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = build(root / "model")
        data = convert_easy_vqa(root / "easy", "test", args.questions)
        print(
            f"{args.questions} easy-vqa questions, {args.new_tokens} new tokens max, {torch.get_num_threads()} threads"
        )
        print(f"{'batch':>5} {'q/s':>8} {'speed-up':>9}")
        base, answers = None, None
        for batch in args.batch_sizes:
            out = root / f"out{batch}"
            opts = EvalOptions("short_vqa", str(data), str(out), model=str(model), batch_size=batch,
                               max_new_tokens=args.new_tokens)  # fmt: skip
            run_eval(opts)
            rate = json.loads((out / "run.json").read_text())["samples_per_second"]
            got = [
                json.loads(line)["prediction"]
                for line in (out / "predictions.jsonl").read_text().splitlines()
            ]
            if answers is None:
                answers = got
            same = "same answers" if got == answers else "DIFFERENT answers"
            base = base or rate
            print(f"{batch:>5} {rate:>8.2f} {rate / base:>8.2f}x  {same}")


if __name__ == "__main__":
    main()
