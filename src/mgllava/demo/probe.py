"""Linear probes of the demo model's frozen towers: which features hold which question kind's answer.

    for each scene part (big shape, small shape, stripe) and each feature the model can read:
        clip_cell      the low-res CLIP token of the part's cell                     (64,)  what the baseline sees
        convnext_s{k}  ConvNeXt stage k's map, mean over the part's cell              (C_k,)
        conv_gate_in   = convnext_s4: the only stage the Conv-Gate fuses              (64,)
        object         the object feature at the part's true box (RoI mean, all stages) (160,)
        pixels         the canvas's mean colour over the part's cell (no network)     (3,)
    fit a logistic regression on train scenes, report held-out accuracy of the part's colour (chance 12.5%).

If a feature's probe is at chance, no amount of training the modules after it can answer from it: the
README's evidence for why the demo pretrains its towers (`pretrain.py`). Random towers are initialised as
the demo's model is (same config, `torch.manual_seed`); `--towers <data>/towers` probes the pretrained ones.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .scenes import PARTS


def _towers(seed: int, towers: Path | None = None) -> Any:
    from .pretrain import demo_model, load_towers

    model = demo_model(seed).eval()
    if towers is not None:
        load_towers(model, towers)
    return model


@torch.no_grad()
def features(
    split_dir: Path, seed: int = 0, limit: int | None = None, towers: Path | None = None
) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, np.ndarray]]:
    """(features[part][name] (n, d), colours[part] (n,)) for the scenes of one built split; random towers
    (initialised from `seed`), or the pretrained ones in `towers`."""
    from ..data.processor import MGLlavaProcessor
    from ..model.objects import pool_object_features

    model = _towers(seed, towers)
    pixels_of = MGLlavaProcessor.from_preset("demo").image_processor.pixels
    layout = [json.loads(line) for line in (split_dir / "scenes.jsonl").read_text().splitlines()][:limit]
    side, grid = model.high_res_tower.image_size, 6
    cell = side // grid
    out: dict[str, dict[str, list[np.ndarray]]] = {p: {} for p in PARTS}
    colours: dict[str, list[str]] = {p: [] for p in PARTS}
    for start in range(0, len(layout), 32):
        batch = layout[start : start + 32]
        images = [Image.open(split_dir / "images" / f"{r['id']}.png").convert("RGB") for r in batch]
        lows, highs = zip(*(pixels_of(im) for im in images), strict=True)
        low = model.vision_tower(torch.stack(lows))  # (B, 36, 64)
        stages = model.high_res_tower(torch.stack(highs))  # 4 x (B, C_k, 192 / 4 / 2^k, ...)
        for i, (record, image) in enumerate(zip(batch, images, strict=True)):
            canvas = np.asarray(image, dtype=np.float32) / 255
            for part in record.get("shown", PARTS):  # a part not drawn in this scene has nothing to probe
                box = record["boxes"][part]
                cx, cy = int((box[0] + box[2]) / 2 // cell), int((box[1] + box[3]) / 2 // cell)
                feats = {"clip_cell": low[i, cy * grid + cx].numpy()}
                for k, s in enumerate(stages):
                    g = s.shape[-1] // grid
                    feats[f"convnext_s{k + 1}"] = (
                        s[i, :, cy * g : (cy + 1) * g, cx * g : (cx + 1) * g].mean((1, 2)).numpy()
                    )
                boxes = torch.tensor([box], dtype=torch.float32)
                feats["object"] = pool_object_features([s[i] for s in stages], boxes, side)[0].numpy()
                feats["pixels"] = canvas[cy * cell : (cy + 1) * cell, cx * cell : (cx + 1) * cell].mean(
                    (0, 1)
                )
                for name, value in feats.items():
                    out[part].setdefault(name, []).append(value)
                colours[part].append(record["sources"][part]["color"])
    return ({p: {n: np.stack(v) for n, v in f.items()} for p, f in out.items()},
            {p: np.array(c) for p, c in colours.items()})  # fmt: skip


def linear_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                 l2: float = 1e-3) -> float:  # fmt: skip
    """Held-out accuracy (%) of a multinomial logistic regression on standardised features (L-BFGS)."""
    classes = sorted(set(train_y) | set(test_y))
    index = {c: k for k, c in enumerate(classes)}
    x = torch.as_tensor(train_x, dtype=torch.float64)
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    x = (x - mean) / std
    xt = (torch.as_tensor(test_x, dtype=torch.float64) - mean) / std
    y = torch.tensor([index[c] for c in train_y])
    yt = torch.tensor([index[c] for c in test_y])
    layer = torch.nn.Linear(x.shape[1], len(classes), dtype=torch.float64)
    optimizer = torch.optim.LBFGS(layer.parameters(), max_iter=300, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(layer(x), y) + l2 * layer.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    with torch.no_grad():
        return round(100 * float((layer(xt).argmax(1) == yt).double().mean()), 1)


def probe(data: Path, seed: int = 0, limit: int | None = None, towers: Path | None = None
          ) -> dict[str, dict[str, float]]:  # fmt: skip
    """Held-out accuracy (%) of a linear probe per part and feature (train scenes fit, test scenes score)."""
    train, train_y = features(data / "train", seed, limit, towers)
    test, test_y = features(data / "test", seed, limit, towers)
    return {part: {name: linear_probe(train[part][name], train_y[part], test[part][name], test_y[part])
                   for name in train[part]} for part in PARTS}  # fmt: skip


@torch.no_grad()
def gate_opening(model_dir: Path, images: list[Path]) -> dict[str, float]:
    """A trained Conv-Gate on some images: mean tanh(gate), and the norm of what it adds (tanh(gate) * h)
    relative to the low-res tokens it adds to (docs/design.md section 4)."""
    import torch.nn.functional as F
    from transformers import AutoModelForImageTextToText

    from ..data.processor import MGLlavaProcessor
    from ..model.fusion import _tokens

    model = AutoModelForImageTextToText.from_pretrained(model_dir).eval()
    fusion = model.fusion
    pixels_of = MGLlavaProcessor.from_preset("demo").image_processor.pixels
    lows, highs = zip(*(pixels_of(Image.open(p).convert("RGB")) for p in images), strict=True)
    low = model.vision_tower(torch.stack(lows))
    stages = model.high_res_tower(torch.stack(highs))
    high = stages[-1]
    h = _tokens(fusion.slow_proj(F.gelu(fusion.slow_conv(high))))
    b, _, c = low.shape
    grid = low.transpose(1, 2).reshape(b, c, high.shape[-2], high.shape[-1])
    tokens = _tokens(grid + fusion.fast_proj(F.gelu(fusion.fast_conv(grid))))
    gate = torch.tanh(fusion.gate(torch.cat([tokens, h], dim=-1).mean(dim=1)))  # (B, 1)
    if not torch.allclose(tokens + gate.unsqueeze(1) * h, fusion(low, stages), atol=1e-5):
        raise RuntimeError("the gate read-out disagrees with ConvGateFusion.forward")  # the module changed
    added = (gate.unsqueeze(1) * h).norm() / tokens.norm()
    return {"tanh_gate": round(float(gate.mean()), 3), "added_over_low": round(float(added), 4)}


def main(argv: list[str] | None = None) -> int:
    """`python -m mgllava.demo.probe <demo data folder> [--limit N]`: print the probe table (markdown)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m mgllava.demo.probe", description=__doc__.split("\n")[0])
    parser.add_argument("data", type=Path, help="a demo data folder (runs/demo/data) with train/ and test/")
    parser.add_argument("--limit", type=int, help="scenes per split (default: all)")
    parser.add_argument("--seed", type=int, default=0, help="the towers' initialisation seed")
    parser.add_argument(
        "--towers", type=Path, help="probe the pretrained towers in this folder (<data>/towers)"
    )
    parser.add_argument(
        "--gates", type=Path, help="instead: the Conv-Gate of every trained run under this folder"
    )
    args = parser.parse_args(argv)
    if args.gates:
        images = sorted((args.data / "test" / "images").glob("*.png"))[:64]
        for final in sorted(args.gates.glob("*/seed*/stage2/final")):
            if json.loads((final / "config.json").read_text()).get("fusion") == "conv_gate":
                print(final.parent.parent.relative_to(args.gates), gate_opening(final, images))
        return 0
    table = probe(args.data, args.seed, args.limit, args.towers)
    names = list(next(iter(table.values())))
    print("| part | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for part, row in table.items():
        print(f"| {part} | " + " | ".join(f"{row[n]:.1f}" for n in names) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
