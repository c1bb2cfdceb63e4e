"""How MG-LLaVA's prefill grows with object boxes (0, 10, 50, 100) and with video frames (1, 4, 8).

The model of `bench/models.py` (full vision size, Vicuna-7B-width LLM cut to 2 layers, fp32, random
weights), 40 text tokens, a plain forward (logits at every position, as in bench_prefill.py). Video frames
each go through the whole image path with their own `--frame-boxes` boxes and their rows follow each other
(docs/design.md section 8.6). Prints time (best of `--rounds` for boxes; one run per frame count, the larger ones cost
tens of seconds), FLOPs from `bench/flops.py`, GFLOP/s against the measured fp32 matmul peak, time per
part, and a least-squares line through the points with its largest deviation: the growth law. For frames,
transformers' LLaVA given the same frames as images (sharing our modules) runs beside ours.

    .venv/bin/python bench/bench_scaling.py [--quick] [--boxes 0 10 50 100] [--frames 1 4 8] [--record out.json]
"""

from __future__ import annotations

import time

import torch

from common import Record, arguments, gflops, measure_machine, ms, pct
from flops import PrefillShape, llava_flops, mgllava_flops, sequence_length
from models import PartTimer, bench_config, build_ours, build_peer, describe, ours_parts, prefill_inputs


def run(model, batch, timer: PartTimer) -> tuple[float, dict[str, float]]:
    timer.take()
    start = time.perf_counter()
    with torch.inference_mode():
        model(**batch)
    seconds = time.perf_counter() - start
    parts = timer.take()
    parts["rest"] = seconds - sum(parts.values())
    return seconds, parts


def fit(xs: list[float], ys: list[float]) -> tuple[float, float, float]:
    """Least-squares line y = a + b x: (a, b, largest |residual| / y)."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx if sxx else 0.0
    a = my - b * mx
    worst = max(abs(y - (a + b * x)) / y for x, y in zip(xs, ys, strict=True))
    return a, b, worst


def sweep(
    model, config, shapes: list[PrefillShape], rounds: int, timer: PartTimer, peak: float
) -> list[dict]:
    """Time each shape (interleaved over `rounds`); one dict per shape with its best run."""
    batches = [prefill_inputs(config, s)[0] for s in shapes]
    best: list[tuple[float, dict[str, float]] | None] = [None] * len(shapes)
    for r in range(rounds):
        for i in range(len(shapes)) if r % 2 == 0 else reversed(range(len(shapes))):
            got = run(model, batches[i], timer)
            if best[i] is None or got[0] < best[i][0]:
                best[i] = got
    out = []
    for shape, (seconds, parts) in zip(shapes, best, strict=True):
        flops = sum(mgllava_flops(config, shape).values())
        out.append({"shape": shape, "seconds": seconds, "parts": parts, "flops": flops,
                    "tokens": sequence_length(config, shape), "rate": gflops(flops, seconds) / peak})  # fmt: skip
    return out


def table(record: Record, label: str, key, points: list[dict]) -> None:
    names = list(points[0]["parts"])
    record.table([label, "LLM tokens", "TFLOP", "s", "of fp32 peak", *[f"{n} s" for n in names]],
                 [[key(p["shape"]), p["tokens"], f"{p['flops'] / 1e12:.3f}", f"{p['seconds']:.2f}", pct(p["rate"]),
                   *[f"{p['parts'][n]:.2f}" for n in names]] for p in points])  # fmt: skip


FIXED = ("CLIP", "ConvNeXt", "fusion")  # parts whose work does not depend on the boxes (per image)


def law(record: Record, what: str, unit: str, xs: list[int], points: list[dict]) -> None:
    """State the growth law: least-squares lines through time and FLOPs; for boxes also through the time of
    the parts that grow with them (LLM, projectors, pooling and the rest), free of the towers' noise."""
    x = [float(v) for v in xs]
    a, b, worst = fit(x, [p["seconds"] for p in points])
    fa, fb, fworst = fit(x, [p["flops"] / 1e9 for p in points])
    record.values[what] = {"x": xs, "seconds": [p["seconds"] for p in points], "flops": [p["flops"] for p in points],
                           "intercept_s": a, "slope_s": b, "worst_fit": worst}  # fmt: skip
    text = (f"Growth with {what}: time = {a:.2f} s + {ms(b)} ms per {unit} (least squares, off by at most "
            f"{worst:.1%}); FLOPs = {fa:.0f} + {fb:.1f} GFLOP per {unit} (off by at most {fworst:.1%}; the LLM's "
            f"attention grows with the square of its length)")  # fmt: skip
    if what == "boxes":
        growing = [p["seconds"] - sum(p["parts"].get(k, 0.0) for k in FIXED) for p in points]
        ga, gb, gworst = fit(x, growing)
        record.values[what] |= {"growing_slope_s": gb, "growing_intercept_s": ga}
        rate = f"{fb / gb:.0f} GFLOP/s" if gb > 0 else "no measurable rate"
        text += (f". The parts that grow with boxes (everything but CLIP, ConvNeXt and the fusion) take {ga:.2f} s + "
                 f"{ms(gb)} ms per box (off by at most {gworst:.1%}), {rate} on each box's {fb:.2f} GFLOP: 100 "
                 f"boxes add {100 * gb / a:.1%} to the prefill")  # fmt: skip
    record.line(text + ".")
    record.line()


def main(argv: list[str] | None = None) -> None:
    parser = arguments(__doc__.splitlines()[0])
    parser.add_argument("--boxes", type=int, nargs="+", default=[0, 10, 50, 100])
    parser.add_argument(
        "--frames", type=int, nargs="+", default=None, help="frame counts (1 4 8; 1 2 with --quick)"
    )
    parser.add_argument("--frame-boxes", type=int, default=10, help="boxes per video frame")
    parser.add_argument("--rounds", type=int, default=2, help="rounds over the box counts")
    args = parser.parse_args(argv)
    frames = args.frames or ([1, 2] if args.quick else [1, 4, 8])
    record = Record("Prefill scaling with boxes and video frames", args.quick)
    machine = measure_machine(args.quick)
    record.machine(machine)
    config = bench_config(args.quick)
    model = build_ours(config)
    timer = PartTimer(ours_parts(model))
    record.line(f"Model: {describe(config, args.quick)}; fp32; 40 text tokens; boxes of 10 to 310 px; "
                f"{args.frame_boxes} boxes per video frame.")  # fmt: skip
    record.line()
    run(model, prefill_inputs(config, PrefillShape(1, 0, 40))[0], timer)  # warm-up
    box_points = sweep(model, config, [PrefillShape(1, n, 40) for n in args.boxes], args.rounds, timer,
                       machine.fp32_gflops)  # fmt: skip
    record.line(f"One image, boxes {args.boxes} (best of {args.rounds} interleaved rounds):")
    record.line()
    table(record, "boxes", lambda s: s.boxes_per_image, box_points)
    law(record, "boxes", "box", args.boxes, box_points)
    peer = build_peer(model)
    with torch.inference_mode():
        peer(**prefill_inputs(config, PrefillShape(1, 0, 40))[1])  # warm-up
    frame_points, peer_rows = [], []
    for (
        f
    ) in frames:  # ours then the peer (transformers LLaVA, the same frames as images, no boxes), once each
        shape = PrefillShape(f, args.frame_boxes, 40)
        frame_points += sweep(model, config, [shape], 1, timer, machine.fp32_gflops)
        start = time.perf_counter()
        with torch.inference_mode():
            peer(**prefill_inputs(config, shape)[1])
        peer_s = time.perf_counter() - start
        ours, peer_flops = frame_points[-1], sum(llava_flops(config, shape).values())
        peer_rows.append([f, f"{ours['seconds']:.2f}", f"{peer_s:.2f}", f"{ours['seconds'] / peer_s:.2f}x",
                          f"{ours['flops'] / peer_flops:.2f}x", f"{ours['seconds'] / peer_s / (ours['flops'] / peer_flops):.2f}x"])  # fmt: skip
    record.line(f"Video, frames {frames} (one run each):")
    record.line()
    table(record, "frames", lambda s: s.images, frame_points)
    record.line("Against transformers LLaVA given the same frames as images (no high-res branch, no boxes):")
    record.line()
    record.table(
        ["frames", "ours s", "LLaVA s", "time ratio", "FLOP ratio", "time per FLOP ratio"], peer_rows
    )
    law(record, "frames", "frame", frames, frame_points)
    timer.remove()
    record.finish(args.record)


if __name__ == "__main__":
    main()
