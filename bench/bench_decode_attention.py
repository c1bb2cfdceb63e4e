"""Decode-step attention on the CPU: transformers' sdpa call vs ours (`inference.attention`), bf16 and fp32.

One query token per row over a K/V cache, as every decode step computes it per layer: transformers'
`sdpa_attention_forward` against `grouped_decode_attention` (torch's `scaled_dot_product_attention` with
each K/V head's group of query heads as one block of queries, mask or not), with a padding mask (where
transformers packs the queries the same way) and without one (one row, or rows of equal length: where
transformers passes `enable_gqa` to torch instead), at the head layouts of the bench's serving model (8 query / 4 K/V heads of 64), Llama-3-8B's
(32/8 of 128) and Vicuna-7B's (32/32 of 128, where there is nothing to group and the engine keeps sdpa),
1/16/64 rows and 100-2000 keys. Times per call (best of interleaved rounds) and the largest difference
between the two outputs. The engine takes ours only for bf16 decode steps with grouped heads on the CPU.

    .venv/bin/python bench/bench_decode_attention.py [--quick] [--rounds 20] [--record out.json]
"""

from __future__ import annotations

import itertools

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from common import Record, arguments, interleave, measure_machine
from mgllava.inference.attention import grouped_decode_attention

LAYOUTS = {"serving bench (8/4 x 64)": (8, 4, 64), "Llama-3-8B (32/8 x 128)": (32, 8, 128),
           "Vicuna-7B (32/32 x 128)": (32, 32, 128)}  # fmt: skip
SHAPES = [(1, 100), (1, 2000), (16, 100), (16, 1000), (64, 100), (64, 400)]


class Layer(torch.nn.Module):
    def __init__(self, groups: int) -> None:
        super().__init__()
        self.num_key_value_groups = groups
        self.eval()


def measure(
    layout: tuple[int, int, int], rows: int, keys: int, dtype: torch.dtype, rounds: int, masked: bool
) -> dict:
    heads, kv_heads, head_dim = layout
    g = torch.Generator().manual_seed(0)
    q = torch.randn(rows, heads, 1, head_dim, generator=g).to(dtype)
    k, v = (torch.randn(rows, kv_heads, keys, head_dim, generator=g).to(dtype) for _ in range(2))
    mask = None
    if masked:
        mask = torch.ones(rows, 1, 1, keys, dtype=torch.bool)
        mask[0, ..., : keys // 4] = False  # one left-padded row
    layer = Layer(heads // kv_heads)
    calls = {"sdpa": lambda: sdpa_attention_forward(layer, q, k, v, mask)[0],
             "grouped": lambda: grouped_decode_attention(layer, q, k, v, mask)[0]}  # fmt: skip
    with torch.inference_mode():
        times = interleave(calls, rounds)
        diff = (calls["sdpa"]().float() - calls["grouped"]().float()).abs().max().item()
    return {"sdpa": times["sdpa"].best, "grouped": times["grouped"].best, "diff": diff}


def main(argv: list[str] | None = None) -> None:
    parser = arguments(__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args(argv)
    record = Record("Decode attention on the CPU: sdpa vs grouped query blocks", args.quick)
    record.machine(measure_machine(args.quick))
    layouts = dict(list(LAYOUTS.items())[:1]) if args.quick else LAYOUTS
    shapes = SHAPES[:2] if args.quick else SHAPES
    rows = []
    for dtype in (torch.bfloat16, torch.float32):
        for name, layout in layouts.items():
            for (batch, keys), masked in itertools.product(shapes, (False, True)):
                if batch == 1 and masked:
                    continue  # one row needs no padding mask
                r = measure(layout, batch, keys, dtype, 3 if args.quick else args.rounds, masked)
                record.values[f"{str(dtype)[6:]} {name} {batch}x{keys} {'mask' if masked else 'no mask'}"] = r
                rows.append([str(dtype)[6:], name, batch, keys, "yes" if masked else "no", f"{r['sdpa'] * 1e3:.3f}",
                             f"{r['grouped'] * 1e3:.3f}", f"{r['sdpa'] / r['grouped']:.2f}x", f"{r['diff']:.1e}"])  # fmt: skip
    record.table(["dtype", "heads", "rows", "keys", "mask", "transformers ms", "grouped ms", "ratio", "max difference"],
                 rows)  # fmt: skip
    record.finish(args.record)


if __name__ == "__main__":
    main()
