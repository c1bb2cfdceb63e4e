"""Decode-step attention on the CPU, bf16: transformers' sdpa call, our grouped fallback and our compiled kernel.

One query token per row over K/V held as the batch cache holds them (`kv.SlotLayer`: views of storage with
spare rows and columns), as every decode step computes it per layer, at the head layouts of the bench's
serving model (8 query / 4 K/V heads of 64), Llama-3-8B's (32/8 of 128) and Vicuna-7B's (32/32 of 128),
1-64 rows and 100-2000 keys, with a padding mask and without one:
- transformers: `sdpa_attention_forward` (torch's flash kernel; `enable_gqa` without a mask), what a model
  outside the engine runs;
- grouped: `grouped_decode_attention` (the flash kernel over each K/V head's block of queries), the fallback;
- kernel: `kernel_decode_attention` (compiled; float32 scores, softmax and sums; reads the views in place);
- engine: whichever of the last two `kernel_pays` picks, and its speed-up over transformers';
- fp32: transformers' call on the same K/V in fp32 (what an fp32 model's decode step costs), to read bf16
  against.
Times per call (best of interleaved rounds), and each bf16 output's largest difference from the fp32 one.
Where the kernel cannot compile (no C++ compiler), it records why and measures the rest, the engine then
taking the fallback everywhere, as it does on such a machine.

    .venv/bin/python bench/bench_decode_attention.py [--quick] [--rounds 20] [--record out.json]
"""

from __future__ import annotations

import itertools

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from common import Record, arguments, interleave, measure_machine
from mgllava.inference.attention import (
    KERNEL_FLAG,
    grouped_decode_attention,
    kernel_decode_attention,
    kernel_pays,
)

LAYOUTS = {"serving bench (8/4 x 64)": (8, 4, 64), "Llama-3-8B (32/8 x 128)": (32, 8, 128),
           "Vicuna-7B (32/32 x 128)": (32, 32, 128)}  # fmt: skip
SHAPES = [(1, 100), (1, 2000), (4, 500), (16, 100), (16, 1000), (64, 100), (64, 400)]


class Layer(torch.nn.Module):
    def __init__(self, groups: int, head_dim: int) -> None:
        super().__init__()
        self.num_key_value_groups, self.head_dim = groups, head_dim
        setattr(self, KERNEL_FLAG, True)
        self.eval()


def cache_views(rows: int, kv_heads: int, keys: int, head_dim: int, g: torch.Generator) -> list[torch.Tensor]:
    """K and V (rows, kv_heads, keys, head_dim) bf16 as views of storage with spare rows and columns."""
    spare = max(64, keys // 4)
    return [torch.randn(rows + rows // 2, kv_heads, keys + spare, head_dim, generator=g).bfloat16()[:rows, :, 8 : 8 + keys]
            for _ in range(2)]  # fmt: skip


def kernel_unavailable() -> str | None:
    """Why the compiled kernel cannot run here (None: it can), from one call on small inputs."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 8, 1, 64, generator=g).bfloat16()
    k, v = cache_views(2, 4, 16, 64, g)
    try:
        with torch.inference_mode():
            kernel_decode_attention(Layer(2, 64), q, k, v, None)
    except Exception as err:  # inductor's errors are of many types: all mean "not here"
        return f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
    return None


def measure(
    layout: tuple[int, int, int], rows: int, keys: int, rounds: int, masked: bool, kernel: bool = True
) -> dict:
    heads, kv_heads, head_dim = layout
    g = torch.Generator().manual_seed(0)
    q = torch.randn(rows, heads, 1, head_dim, generator=g).bfloat16()
    k, v = cache_views(rows, kv_heads, keys, head_dim, g)
    mask = None
    if masked:
        mask = torch.ones(rows, 1, 1, keys, dtype=torch.bool)
        mask[0, ..., : keys // 4] = False  # one left-padded row
    layer = Layer(heads // kv_heads, head_dim)
    fp32 = [t.float() for t in (q, k, v)]
    calls = {"transformers": lambda: sdpa_attention_forward(layer, q, k, v, mask)[0],
             "grouped": lambda: grouped_decode_attention(layer, q, k, v, mask)[0],
             "kernel": lambda: kernel_decode_attention(layer, q, k, v, mask)[0],
             "fp32": lambda: sdpa_attention_forward(layer, *fp32, mask)[0]}  # fmt: skip
    if not kernel:
        del calls["kernel"]
    with torch.inference_mode():
        if kernel:
            calls["kernel"]()  # compiled before it is timed
        times = interleave(calls, rounds)
        reference = calls["fp32"]()
        diffs = {name: (calls[name]().float() - reference).abs().max().item() for name in ("grouped", "kernel")
                 if name in calls}  # fmt: skip
    out = {name: t.best for name, t in times.items()}
    pays = kernel and kernel_pays(rows, heads // kv_heads, k.numel())
    out["engine"] = "kernel" if pays else "grouped"
    return out | {f"{name} diff": d for name, d in diffs.items()}


def main(argv: list[str] | None = None) -> None:
    parser = arguments(__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args(argv)
    record = Record(
        "Decode attention on the CPU, bf16: transformers, grouped fallback, compiled kernel", args.quick
    )
    record.machine(measure_machine(args.quick))
    why = kernel_unavailable()
    if why is not None:
        record.line(f"The compiled kernel is not measured: it does not compile here ({why}); the engine takes the "
                    "grouped fallback for every call.")  # fmt: skip
        record.line()
    layouts = dict(list(LAYOUTS.items())[:1]) if args.quick else LAYOUTS
    shapes = SHAPES[:2] if args.quick else SHAPES
    rows = []
    for name, layout in layouts.items():
        for (batch, keys), masked in itertools.product(shapes, (False, True)):
            if batch == 1 and masked:
                continue  # one row needs no padding mask
            r = measure(layout, batch, keys, 3 if args.quick else args.rounds, masked, kernel=why is None)
            record.values[f"{name} {batch}x{keys} {'mask' if masked else 'no mask'}"] = r
            ms = {
                key: f"{r[key] * 1e3:.3f}" if key in r else "n/a"
                for key in ("transformers", "grouped", "kernel", "fp32")
            }
            rows.append([name, batch, keys, "yes" if masked else "no", ms["transformers"], ms["grouped"], ms["kernel"],
                         r["engine"], f"{r['transformers'] / r[r['engine']]:.2f}x", ms["fp32"],
                         f"{r['fp32'] / r[r['engine']]:.2f}x", f"{r['grouped diff']:.1e}", f"{r['kernel diff']:.1e}" if "kernel diff" in r else "n/a"])  # fmt: skip
    record.table(["heads", "rows", "keys", "mask", "transformers ms", "grouped ms", "kernel ms", "engine takes",
                  "engine vs transformers", "fp32 ms", "engine vs fp32", "grouped max diff", "kernel max diff"],
                 rows)  # fmt: skip
    record.finish(args.record)


if __name__ == "__main__":
    main()
