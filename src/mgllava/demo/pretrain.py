"""Pretrain the demo's two vision towers on a stand-in task: no pretrained weights exist on this machine.

The paper freezes pretrained towers (CLIP ViT-L/14 at 336 px, ConvNeXt-L at 768 px from OpenCLIP). Frozen
*random* towers keep a small object's colour no better at high resolution than at low resolution (the
README's probe table: 19% either way, chance 12.5%), so with them nothing after the towers can show what
the high-res branch is for. The demo therefore gives each tower a short pretraining of its own first:

    scenes  `scenes` easy-vqa train-split scenes with EVERY part in random cells (the benchmark fixes
            the big shape and the stripe), from a seed of their own; `test_scenes` from the test split
    target  per cell of a map's grid: the colour of the part whose box covers the cell, or "none"
            (9 classes; "none" weighted `none_weight` in the loss, as most cells hold nothing)
    CLIP     at 84 px: a linear head on each of its 36 tokens                  (B, 36, 64) -> (B, 36, 9)
    ConvNeXt at 192 px: a linear head per stage on each cell of that stage      (B, C_k, 48 / 2^k, ...)
             (grids 48, 24, 12, 6: fine detail stays in the early stages, as in a pretrained ConvNeXt;
             the Conv-Gate fuses only the last, the object tokens pool all four)
    both trained in full with AdamW, each tower in its own process (the two run side by side)

    <out>/<tower>.safetensors   the tower (`vision_tower`, `high_res_tower`; the heads are dropped)
    <out>/<tower>.json          held-out accuracy of its 6 x 6 head (CLIP's, the ConvNeXt's last stage's)
                                per part (big shape, small shape, stripe), at the cell holding the part's
                                centre: the README's evidence that
                                the high-res tower resolves what the low-res one cannot

Every variant and seed then starts from these towers and keeps them frozen, as the paper does. The two
pretrainings are jobs of the demo's worker pool (`tower_jobs`), so the baseline's runs, which need only
CLIP, train beside the ConvNeXt's pretraining. A tower is done when its weights file exists; an
interrupted one resumes from its last checkpoint (`<tower>.ckpt.pt`, every `save_every` steps; batches are
drawn from (seed, step), so a resumed pretraining equals an uninterrupted one).
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save

from ..utils.io import atomic_open, atomic_write_json
from .annotations import COLORS
from .jobs import TowerJob
from .scenes import PARTS, Composer, SceneSpec, easy_vqa_split

COLOURS = tuple(sorted(COLORS))  # easy-vqa's eight, as class indices 0-7
NONE = len(COLOURS)  # the "no part in this cell" class
TOWERS = ("vision_tower", "high_res_tower")
PROGRESS_EVERY = 50  # steps between progress lines (the demo's bar reads them)


@dataclass(frozen=True)
class PretrainSettings:
    scenes: int = 1000
    test_scenes: int = 200
    steps: int = 1500
    batch: int = 16
    lr: float = 1e-3
    none_weight: float = 0.1
    save_every: int = 250
    seed: int = 0

    @classmethod
    def quick(cls) -> PretrainSettings:
        return cls(scenes=128, test_scenes=48, steps=60, save_every=20)


def cell_targets(
    layout: dict[str, tuple[Any, str]], spec: SceneSpec, grid: int | None = None
) -> torch.Tensor:
    """(grid * grid,) class per cell of a `grid` x `grid` split of the canvas (default the 6 x 6 of the
    benchmark): the colour index of the part whose box covers the cell (the largest box, where several
    do: a cell's dominant colour), else NONE. `layout` maps part -> (box, colour)."""
    grid = grid or spec.grid
    cell = spec.side / grid
    target = torch.full((grid * grid,), NONE)
    for box, colour in sorted(layout.values(), key=lambda bc: (bc[0][2] - bc[0][0]) * (bc[0][3] - bc[0][1])):
        x1, y1 = int(box[0] // cell), int(box[1] // cell)
        x2, y2 = int((box[2] - 1e-3) // cell), int((box[3] - 1e-3) // cell)
        for y in range(y1, y2 + 1):
            for x in range(x1, x2 + 1):
                target[y * grid + x] = COLOURS.index(colour)
    return target


def map_grids(tower: str, spec: SceneSpec) -> tuple[int, ...]:
    """The grid of every map the tower is pretrained on: CLIP's 6 x 6 tokens; each ConvNeXt stage
    (48, 24, 12, 6 at 192 px), so that every stage, not only the one the Conv-Gate fuses, holds colour
    where it is, as a pretrained ConvNeXt's early stages hold fine detail."""
    if tower == "vision_tower":
        return (spec.grid,)
    return tuple(spec.grid * 2**k for k in (3, 2, 1, 0))


def pretraining_set(split: str, n: int, seed: int, tower: str) -> dict[str, Any]:
    """n scenes with every part anywhere: the tower's input pixels (n, 3, H, W), per-cell targets of each
    map (a list, the last one the 6 x 6 grid's; the small shape's neighbour is a part too), and per part
    (big, small, stripe) the 6 x 6 cell holding its centre and its colour index (n, 3)."""
    from ..data.processor import MGLlavaProcessor

    spec = SceneSpec()
    pool, paths, _ = easy_vqa_split(split)
    composer = Composer(pool, paths, spec)
    pixels = MGLlavaProcessor.from_preset("demo").image_processor.pixels
    rng = random.Random(f"pretrain-{seed}-{split}")
    grids = map_grids(tower, spec)
    images, targets, centres, colours = [], [[] for _ in grids], [], []
    for index in range(n):
        scene = composer.compose(rng, f"pretrain-{split}-{index:05d}", anywhere=True)
        low, high = pixels(scene.image)
        images.append(low if tower == "vision_tower" else high)
        parts = {p: getattr(scene, p) for p in PARTS}
        near = {"neighbour": scene.neighbour} if scene.neighbour else {}
        layout = {p: (q.box, q.source.color) for p, q in (parts | near).items()}
        colours.append([COLOURS.index(q.source.color) for q in parts.values()])
        for k, grid in enumerate(grids):
            targets[k].append(cell_targets(layout, spec, grid))
        centres.append([int((q.box[1] + q.box[3]) / 2) // spec.cell * spec.grid
                        + int((q.box[0] + q.box[2]) / 2) // spec.cell for q in parts.values()])  # fmt: skip
    return {"pixels": torch.stack(images), "targets": [torch.stack(t) for t in targets],
            "centres": torch.tensor(centres), "colours": torch.tensor(colours)}  # fmt: skip


def tower_maps(model: Any, tower: str, pixels: torch.Tensor) -> list[torch.Tensor]:
    """[(B, N_k, C_k)]: the CLIP tokens, or every ConvNeXt stage flattened cell by cell (`map_grids`)."""
    if tower == "vision_tower":
        return [model.vision_tower(pixels)]
    return [stage.flatten(2).transpose(1, 2) for stage in model.high_res_tower(pixels)]


def demo_model(seed: int) -> Any:
    """The demo's full model (both towers) as initialised from `seed`: the towers' starting point."""
    from ..model.configuration import MGLlavaConfig
    from ..model.modeling import MGLlavaForConditionalGeneration

    torch.manual_seed(seed)
    config = MGLlavaConfig.from_preset("demo", fusion="conv_gate", object_tokens="concat")
    return MGLlavaForConditionalGeneration(config)


def train_tower(tower: str, out: Path, settings: PretrainSettings) -> dict[str, float]:
    """Pretrain one tower (resuming from its checkpoint), write `<tower>.json` (held-out accuracy per part)
    and then `<tower>.safetensors` (the tower: its existence marks it done); returns the accuracy."""
    model = demo_model(settings.seed)
    module = getattr(model, tower)
    config = model.config.vision_config if tower == "vision_tower" else model.config.high_res_config
    widths = [config.hidden_size] if tower == "vision_tower" else list(config.hidden_sizes)
    head = torch.nn.ModuleList(torch.nn.Linear(width, NONE + 1) for width in widths)  # one per map
    optimizer = torch.optim.AdamW(
        [*module.parameters(), *head.parameters()], lr=settings.lr, weight_decay=0.0
    )
    checkpoint = out / f"{tower}.ckpt.pt"
    step = _resume(checkpoint, module, head, optimizer)
    data = pretraining_set("train", settings.scenes, settings.seed, tower)
    weight = torch.ones(NONE + 1)
    weight[NONE] = settings.none_weight
    module.train()
    while step < settings.steps:
        generator = torch.Generator().manual_seed(settings.seed * 1_000_003 + step)
        index = torch.randint(0, settings.scenes, (settings.batch,), generator=generator)
        maps = tower_maps(model, tower, data["pixels"][index])
        loss = sum(F.cross_entropy(h(m).flatten(0, 1), t[index].flatten(), weight=weight)
                   for h, m, t in zip(head, maps, data["targets"], strict=True)) / len(maps)  # fmt: skip
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        step += 1
        if step % settings.save_every == 0 or step == settings.steps:
            with atomic_open(checkpoint, "wb") as handle:
                torch.save({"tower": module.state_dict(), "head": head.state_dict(),
                            "optimizer": optimizer.state_dict(), "step": step}, handle)  # fmt: skip
        if step % PROGRESS_EVERY == 0 or step % settings.save_every == 0 or step == settings.steps:
            _progress(out, tower, step, loss.item())
    accuracy = held_out_accuracy(model, tower, head, settings)
    atomic_write_json(out / f"{tower}.json", {"settings": asdict(settings), "accuracy": accuracy})
    with atomic_open(out / f"{tower}.safetensors", "wb") as handle:
        handle.write(save({k: v.contiguous() for k, v in module.state_dict().items()}))
    checkpoint.unlink()
    return accuracy


def _resume(checkpoint: Path, module: torch.nn.Module, head: torch.nn.Module, optimizer: Any) -> int:
    """The step to go on from: the checkpoint's, its state loaded (tensors only), or 0."""
    if not checkpoint.is_file():
        return 0
    state = torch.load(checkpoint, weights_only=True)
    module.load_state_dict(state["tower"])
    head.load_state_dict(state["head"])
    optimizer.load_state_dict(state["optimizer"])
    return int(state["step"])


@torch.no_grad()
def held_out_accuracy(
    model: Any, tower: str, head: torch.nn.Module, settings: PretrainSettings
) -> dict[str, float]:
    """% of test-split pretraining scenes whose part's own colour the 6 x 6 head names at the cell of the
    part's centre (for the small shape that cell's dominant colour is often its neighbour's)."""
    getattr(model, tower).eval()
    data = pretraining_set("test", settings.test_scenes, settings.seed, tower)
    predicted = torch.cat([head[-1](tower_maps(model, tower, chunk)[-1]).argmax(-1)
                           for chunk in data["pixels"].split(64)])  # fmt: skip
    rows = torch.arange(len(predicted))
    return {part: round(100 * float((predicted[rows, data["centres"][:, k]] == data["colours"][:, k]).float().mean()), 1)
            for k, part in enumerate(PARTS)}  # fmt: skip


def _progress(out: Path, tower: str, step: int, loss: float) -> None:
    with (out / f"{tower}.progress.jsonl").open("a") as handle:
        handle.write(json.dumps({"step": step, "loss": round(loss, 4)}) + "\n")


def tower_jobs(out: Path, settings: PretrainSettings) -> list[TowerJob]:
    """The two pretrainings as jobs for `jobs.run_jobs` (the ConvNeXt, the long one, first); refuses towers
    already made with other settings."""
    jobs = []
    for tower in ("high_res_tower", "vision_tower"):
        summary = out / f"{tower}.json"
        if summary.is_file() and json.loads(summary.read_text())["settings"] != asdict(settings):
            raise ValueError(f"{out} holds a {tower} pretrained with other settings; use another --out")
        jobs.append(TowerJob(f"pretrain/{tower}", out, (settings.steps,), 0, (tower, out, settings),
                             tower=tower, work=train_tower))  # fmt: skip
    return jobs


def tower_summary(out: Path) -> dict[str, dict[str, float]]:
    """Held-out accuracy per tower and part, from the finished pretrainings."""
    return {t: json.loads((out / f"{t}.json").read_text())["accuracy"] for t in TOWERS}


def towers_line(accuracy: dict[str, dict[str, float]]) -> str:
    low, high = accuracy["vision_tower"], accuracy["high_res_tower"]
    return (
        "pretrained towers, colour read at the part's cell on held-out scenes, low-res CLIP / high-res ConvNeXt: "
        + (", ".join(f"{p} {low[p]:.0f}/{high[p]:.0f}%" for p in PARTS))
    )


def load_towers(model: Any, towers: Path) -> None:
    """Put the pretrained towers into a demo model (the towers it has: the baseline has no ConvNeXt)."""
    for tower in TOWERS:
        module = getattr(model, tower, None)
        if module is not None:
            module.load_state_dict(load_file(towers / f"{tower}.safetensors"))
