"""What one request can cost the server at the default limits, against what the same kind of request cost
before the limits existed (issue 15). Each measurement runs in a fresh process (so the allocator's memory
from one does not flatter the next); time is wall-clock on one core, memory is peak RSS growth sampled every
2 ms with psutil.

- box selection: the worst request the defaults admit (7 images x 300 disjoint boxes of one label, selected
  twice per image as the engine does: for the model and for the reply) vs one image with 20,000 boxes
- JSON parsing: the worst body the defaults admit (32 MB: 73,728 JSON items around a base64 string) vs a
  box flood parsed the way FastAPI parsed bodies before (`json.loads` then validation); its refusal now
  costs one count of `,` `[` `{` (also timed)
- decoding: two square PNGs filling the default per-request budget (2^27 counted pixels) through the 7B
  presets' image processor (336 / 768 px): 8-bit RGB (8192^2 each) and 16-bit grey (4729^2 each: these
  count 3x, `limits.WIDE_MODES_WEIGHT`)

    .venv/bin/python bench/bench_serve_limits.py [--flood-mb 8] [--budget 134217728]
"""

from __future__ import annotations

import argparse
import io
import json
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import psutil

from mgllava.serve.limits import decoded_pixels


def measure(work: Callable[[], object]) -> tuple[float, float]:
    """(seconds, peak RSS growth in MB) of `work()` in this process."""
    process = psutil.Process()
    base = peak = process.memory_info().rss
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.wait(0.002):
            peak = max(peak, process.memory_info().rss)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    try:
        work()
    finally:
        seconds = time.perf_counter() - start
        done.set()
        sampler.join()
    return seconds, (max(peak, process.memory_info().rss) - base) / 2**20


def boxes_case(images: int, per_image: int) -> tuple[float, float]:
    import torch

    from mgllava.boxes import Boxes
    from mgllava.boxes.select import FrameMap, prepare_boxes

    torch.set_num_threads(1)
    x = torch.arange(per_image, dtype=torch.float32)[:, None] * 3  # disjoint: NMS suppresses nothing
    xyxy = torch.cat([x, torch.zeros_like(x), x + 2, torch.ones_like(x) * 2], 1)
    width = 3 * per_image + 1
    boxes = Boxes(xyxy, torch.rand(per_image), ["thing"] * per_image, (width, 3))
    frame = FrameMap.padded(width, 3, 768)
    prepare_boxes(Boxes(xyxy[:10], None, [], (width, 3)), frame)  # warm-up (first-call overheads)
    return measure(lambda: [prepare_boxes(boxes, frame) for _ in range(2 * images)])


def json_case(kind: str, megabytes: float) -> tuple[float, float]:
    from mgllava.serve.limits import json_items
    from mgllava.serve.schemas import ChatCompletionRequest

    size = int(megabytes * 2**20)
    if kind == "admitted":  # 1024 boxes (8 items each) + 65,536 items of messages, padded with an image
        messages = [{"role": "user", "content": "hi"}] * 16_000  # 4 items each
        image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,"}}
        messages.append({"role": "user", "content": [image]})
        body = {"model": "m", "messages": messages, "mgllava": {"boxes": [[[1.5, 2.5, 3.5, 4.5]] * 1024]}}
        raw = json.dumps(body).encode()
        raw = raw.replace(b"base64,", b"base64," + b"QUJD" * ((size - len(raw)) // 4), 1)
        return measure(lambda: ChatCompletionRequest.model_validate_json(raw))
    count = size // len(b"[0.5,1.5,2.5,3.5],")
    raw = (
        b'{"model":"m","messages":[{"role":"user","content":"hi"}],"mgllava":{"boxes":[['
        + b"[0.5,1.5,2.5,3.5]," * count
        + b"[0,0,1,1]]]}}"
    )
    if kind == "flood-count":
        return measure(lambda: json_items(raw))
    return measure(lambda: ChatCompletionRequest.model_validate(json.loads(raw)))  # FastAPI's way before


def decode_case(mode: str, side: int) -> tuple[float, float]:
    import numpy as np
    from PIL import Image

    from mgllava.data.image_processor import MGLlavaImageProcessor

    if mode == "RGB":
        image = Image.new("RGB", (side, side), (120, 30, 200))
    else:
        image = Image.fromarray(np.full((side, side), 40_000, dtype=np.uint16))
    buf = io.BytesIO()
    image.save(buf, "PNG", compress_level=1)
    data = buf.getvalue()
    del image
    processor = MGLlavaImageProcessor()  # 336 / 768, as the 7B presets
    return measure(lambda: processor.preprocess([data, data]))


def isolated(fn: Callable, *args) -> tuple[float, float]:
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--flood-mb", type=float, default=8.0, help="size of the box flood parsed the old way"
    )
    parser.add_argument("--budget", type=int, default=1 << 27, help="--max-request-pixels")
    parser.add_argument(
        "--body-mb", type=float, default=32.0, help="the admitted body's size (--max-body-mb)"
    )
    args = parser.parse_args()
    print(
        f"per-request cost at the default limits vs before them ({psutil.cpu_count()} cores; peak = peak RSS growth)"
    )

    bounded, _ = isolated(boxes_case, 7, 300)
    unbounded, _ = isolated(boxes_case, 1, 20_000)
    print(f"  box selection, 7 x 300 boxes (defaults): {bounded * 1e3:8.1f} ms | 1 x 20,000 boxes (before): "
          f"{unbounded:6.2f} s | {unbounded / bounded:6.0f}x")  # fmt: skip

    seconds, peak = isolated(json_case, "admitted", args.body_mb)
    print(f"  JSON, {args.body_mb:g} MB body at the item limit: parse {seconds:6.2f} s, peak {peak:6.0f} MB")
    count_s, _ = isolated(json_case, "flood-count", args.flood_mb)
    flood_s, flood_peak = isolated(json_case, "flood", args.flood_mb)
    print(f"  JSON, {args.flood_mb:g} MB box flood: refused after counting in {count_s * 1e3:6.1f} ms | parsed "
          f"before: {flood_s:6.2f} s, peak {flood_peak:6.0f} MB | {flood_s / count_s:6.0f}x the time")  # fmt: skip

    for mode in ("RGB", "I;16"):
        side = math.isqrt(args.budget // (2 * decoded_pixels(1, 1, mode)))
        counted = 2 * decoded_pixels(side, side, mode)
        seconds, peak = isolated(decode_case, mode, side)
        print(f"  decode 2 x {side}^2 {mode:>4} PNGs ({counted / 2**20:.0f} M counted pixels): {seconds:6.2f} s, "
              f"peak {peak:6.0f} MB = {peak * 2**20 / counted:4.1f} bytes per counted pixel")  # fmt: skip


if __name__ == "__main__":
    main()
