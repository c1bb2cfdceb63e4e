"""Image preparation: the PIL image processor (the reference's pixels) vs the torchvision backend, one thread.

One 1024x768 RGB photo-sized image -> pad to square, 768 px bicubic, normalise, 336 px view (`pixels`), best
of interleaved rounds, with the largest difference between the two. The engine prepares on worker threads
limited to one intra-op thread, so one thread is what serving sees.

    .venv/bin/python bench/bench_image_processor.py [--rounds 20]
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from common import arguments, interleave, ms
from mgllava.data.image_processor import MGLlavaImageProcessor, MGLlavaImageProcessorTorchvision


def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (768, 1024, 3), dtype=np.uint8))
    pil, fast = MGLlavaImageProcessor(), MGLlavaImageProcessorTorchvision()
    timings = interleave(
        {"pil": lambda: pil.pixels(image), "torchvision": lambda: fast.pixels(image)}, args.rounds
    )
    diff = max(float((a - b).abs().max()) for a, b in zip(pil.pixels(image), fast.pixels(image), strict=True))
    for name, t in timings.items():
        print(f"{name:12s} best {ms(t.best)} ms  median {ms(t.median)} ms")
    print(
        f"torchvision / pil time: {timings['torchvision'].best / timings['pil'].best:.2f}x; largest difference {diff:.4f}"
    )


if __name__ == "__main__":
    main()
