"""Linear layers on the CPU: transformers' `F.linear` vs the engine's oneDNN-packed weights (`inference.linear`).

The linear layers of two LLMs, each layer's seven projections in turn (q, k, v, o, gate, up, down), at the
row counts a serving step sees: 1 (a decode step alone), 16 and 64 (batched decode steps), 256 and 512 (prompt
chunks): the serving bench's 8-layer, 512-wide Llama (27M parameters), and one layer of Vicuna-7B (4096
wide). fp32 and bf16. Prints ms per pass over the layers (best of interleaved rounds), GFLOP/s, the share
of the machine's matmul peak measured in this run (`common.matmul_peak`: the best of torch's matmul and
oneDNN's), the speed-up and the largest difference between the two outputs relative to their scale.

fp32 `F.linear` on the CPU is MKL's sgemm; bf16 `F.linear` is oneDNN already, but reorders the weight on
every call. No goal: this bench says why the engine packs (docs/server.md, "Linear layers on the CPU").

    .venv/bin/python bench/bench_linear.py [--quick] [--rounds 10] [--record out.json]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from common import Record, arguments, interleave, measure_machine
from mgllava.inference.linear import PackedLinear, packing_unavailable

MODELS = {"serving bench LLM (8 x 512 wide)": (8, 512, 256, 1536), "Vicuna-7B (1 layer, 4096 wide)": (1, 4096, 4096, 11008)}  # fmt: skip
ROWS = (1, 16, 64, 256, 512)


def projections(layers: int, width: int, kv_width: int, mlp: int, dtype: torch.dtype) -> list[nn.Linear]:
    shapes = [(width, width), (width, kv_width), (width, kv_width), (width, width), (width, mlp), (width, mlp),
              (mlp, width)]  # fmt: skip
    torch.manual_seed(0)
    return [nn.Linear(i, o, bias=False, dtype=dtype) for _ in range(layers) for i, o in shapes]


def measure(layers: list[nn.Linear], rows: int, rounds: int) -> dict:
    dtype = layers[0].weight.dtype
    packed = [PackedLinear(layer) for layer in layers]
    inputs = {n: torch.randn(rows, n, dtype=dtype) for n in {layer.in_features for layer in layers}}
    calls = {"F.linear": lambda: [F.linear(inputs[m.in_features], m.weight) for m in layers],
             "packed": lambda: [p(inputs[p.in_features]) for p in packed]}  # fmt: skip
    with torch.inference_mode():
        times = interleave(calls, rounds)
        plain, ours = calls["F.linear"](), calls["packed"]()
    diff = max(
        float((a.float() - b.float()).abs().max() / a.float().abs().max())
        for a, b in zip(plain, ours, strict=True)
    )
    flops = 2 * rows * sum(m.in_features * m.out_features for m in layers)
    return {"F.linear": times["F.linear"].best, "packed": times["packed"].best, "flops": flops, "diff": diff}


def main(argv: list[str] | None = None) -> None:
    parser = arguments(__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args(argv)
    record = Record("Linear layers on the CPU: F.linear vs oneDNN-packed weights", args.quick)
    machine = measure_machine(args.quick)
    record.machine(machine)
    why = packing_unavailable()
    if why is not None:
        record.line(f"skipped: {why}")
        record.finish(args.record)
        return
    models = dict(list(MODELS.items())[:1]) if args.quick else MODELS
    rows_list = ROWS[:2] if args.quick else ROWS
    table = []
    for dtype in (torch.float32, torch.bfloat16):
        peak = machine.peak(dtype)
        for name, shape in models.items():
            layers = projections(*shape, dtype)
            for rows in rows_list:
                r = measure(layers, rows, 2 if args.quick else args.rounds)
                record.values[f"{str(dtype)[6:]} {name} {rows}"] = r
                rates = {k: r["flops"] / r[k] / 1e9 for k in ("F.linear", "packed")}
                table.append([str(dtype)[6:], name, rows, f"{r['F.linear'] * 1e3:.2f}", f"{r['packed'] * 1e3:.2f}",
                              f"{r['F.linear'] / r['packed']:.2f}x", f"{rates['F.linear']:.0f} ({rates['F.linear'] / peak:.0%})",
                              f"{rates['packed']:.0f} ({rates['packed'] / peak:.0%})", f"{r['diff']:.1e}"])  # fmt: skip
    record.table(["dtype", "layers", "rows", "F.linear ms", "packed ms", "speed-up", "F.linear GFLOP/s (peak)",
                  "packed GFLOP/s (peak)", "max difference / scale"], table)  # fmt: skip
    record.finish(args.record)


if __name__ == "__main__":
    main()
