"""`mgllava demo`: build the scene benchmark, train miniature MG-LLaVA variants through both stages with the
real trainer, score them per question kind with the real evaluation harness, and report the paper's
ablation in small.

    easy-vqa ──► scenes.build_split ──► train/ (captions, one question per scene, boxes)
                                        test/  (one short-answer line per question, kind a/b/c, boxes)
    jobs in parallel workers (jobs.py), each started once the files it needs exist:
        pretrain.train_tower (CLIP, ConvNeXt) ──► data/towers/<tower>.safetensors
        for each variant and seed: base_model (its towers, a random LLM) ──► demo-stage1 ──► demo-stage2
            (train.Trainer) ──► eval.run_eval (short_vqa) ──► result.json
    ──► table per kind (markdown + JSON), plot (PNG), the full model in <out>/model for `mgllava chat`

Every step is resumable: the data is reused when its settings match, a finished tower or run is skipped,
an interrupted pretraining continues from its checkpoint and an interrupted run from its trainer checkpoint
and its answered questions. An output folder made with other settings is refused rather than mixed.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from ..config import load_config
from ..eval.benchmarks import EvalOptions
from ..eval.runner import run_eval
from ..train.config import TrainConfig
from ..train.trainer import Trainer
from ..utils.io import atomic_write_json, atomic_write_text, read_jsonl
from .check import verify_benchmark
from .jobs import Job, TowerJob, run_jobs
from .pretrain import PretrainSettings, load_towers, tower_jobs, tower_summary, towers_line
from .report import collapse_note, markdown, plot, summarize, verdict
from .scenes import KINDS, SceneSpec, build_split


@dataclass(frozen=True)
class Variant:
    title: str
    fusion: str
    object_tokens: str
    boxes: str = "boxes.jsonl"
    train_towers: tuple[
        str, ...
    ] = ()  # towers that train with the new modules (both stages) instead of frozen


VARIANTS = {
    "baseline": Variant("LLaVA-style baseline (low-res only)", "none", "off"),
    "fusion": Variant("+ high-res fusion (Conv-Gate), no objects", "conv_gate", "off"),
    "objects": Variant("+ object tokens, no fusion", "none", "concat"),
    "full": Variant("full MG-LLaVA (Conv-Gate + object tokens)", "conv_gate", "concat"),
    "fusion_concat": Variant("fusion: channel concat", "concat", "concat"),
    "fusion_patch_info_mining": Variant("fusion: patch info mining", "patch_info_mining", "concat"),
    "fusion_resampler": Variant("fusion: resampler", "resampler", "concat"),
    "objects_f2b": Variant("objects: cross-attention F-to-B", "conv_gate", "cross_attn_f2b"),
    "objects_b2f": Variant("objects: cross-attention B-to-F", "conv_gate", "cross_attn_b2f"),
    "tags_coco80": Variant("full, boxes from COCO-80 tags", "conv_gate", "concat", "boxes-coco80.jsonl"),
    "fusion_trained_convnext": Variant("+ Conv-Gate, ConvNeXt trained, no objects", "conv_gate", "off",
                                       train_towers=("high_res_tower",)),
    "full_trained_convnext": Variant("full, ConvNeXt trained", "conv_gate", "concat", train_towers=("high_res_tower",)),
    "baseline_trained_clip": Variant("baseline, CLIP trained", "none", "off", train_towers=("vision_tower",)),
    "fusion_trained_towers": Variant("+ Conv-Gate, both towers trained, no objects", "conv_gate", "off",
                                     train_towers=("vision_tower", "high_res_tower")),
}  # fmt: skip
DEFAULT_VARIANTS = ("baseline", "fusion", "objects", "full")
BATCH = 16  # the demo stages' global batch (configs/train/demo-stage*.yaml)


@dataclass(frozen=True)
class DemoSettings:
    train_scenes: int = 3000
    test_scenes: int = 600
    captions: int = 256  # stage-1 pairs used (of train_scenes)
    stage2_epochs: int = 2
    seeds: int = 3
    data_seed: int = 0
    save_every: int = 40  # trainer checkpoints: what an interruption can lose
    overrides: tuple[str, ...] = ()  # extra training-config overrides for both stages (experiments)
    pretrain: PretrainSettings = field(default_factory=PretrainSettings)  # the towers' stand-in pretraining

    @classmethod
    def quick(cls) -> DemoSettings:
        return cls(train_scenes=320, test_scenes=48, captions=64, stage2_epochs=2, seeds=1, save_every=10,
                   pretrain=PretrainSettings.quick())  # fmt: skip

    def steps(self) -> tuple[int, int]:
        return self.captions // BATCH, self.train_scenes // BATCH * self.stage2_epochs


HONESTY = """\
What is real and what is not:
- data: real easy-vqa images and annotations, composed into scenes (a big shape, a small one or a stripe,
  among bare panels). The boxes are NOT from a detector: a simulated OWLv2 boxes the true objects with stated
  recall (95% large, {small_recall:.0%}-ish small), box noise and false positives (demo/detector.py).
- weights: nothing pretrained exists on this machine. The vision towers (CLIP at 84 px, ConvNeXt at
  192 px) get a stand-in pretraining first: each learns to name the colour in every cell of other scenes
  with the parts anywhere (demo/pretrain.py); then they stay frozen in both stages, as the paper freezes
  its pretrained towers. LLM: random; frozen in stage 1, trained in stage 2. Trained: fusion, projector,
  box projector, object mixer (both stages) and the LLM (stage 2); the *_trained_* variants also train the
  tower they name.
- questions: one part per scene (a big shape, a small shape or a stripe), so the LLM, which starts from
  random weights, need not also learn to route a question to one of several parts.
- scale: a {params:,}-parameter miniature at 84/192 px on a CPU, minutes not days; the numbers show the
  direction of the paper's ablation on a task built to need each granularity, not the paper's benchmarks."""


def _demo_parameters() -> int:
    import torch

    from ..model.configuration import MGLlavaConfig
    from ..model.modeling import MGLlavaForConditionalGeneration

    with torch.device("meta"):
        model = MGLlavaForConditionalGeneration(MGLlavaConfig.from_preset("demo"))
    return sum(p.numel() for p in model.parameters())


def _wanted(settings: DemoSettings) -> dict[str, Any]:
    return {"settings": asdict(settings), "spec": asdict(SceneSpec())}


def check_output_folder(out: Path, settings: DemoSettings) -> None:
    """Refuse a folder whose data and runs were made with other settings (they would be mixed in)."""
    path = out / "settings.json"
    wanted = json.loads(json.dumps(_wanted(settings)))  # as the file holds it: tuples are lists
    if path.is_file():
        old = json.loads(path.read_text())
        if old != wanted:
            differ = sorted(k for k in set(old["settings"]) | set(wanted["settings"])
                            if old["settings"].get(k) != wanted["settings"].get(k))  # fmt: skip
            what = ", ".join(differ) if differ else "the scene specification"
            raise ValueError(f"{out} holds a demo made with other settings ({what}); use another --out")
    else:
        atomic_write_json(path, wanted)


def build_data(out: Path, settings: DemoSettings, say: Callable[[str], None]) -> dict[str, Any]:
    summary_path = out / "summary.json"
    if summary_path.is_file():
        say(f"data: reusing {out}")
        return json.loads(summary_path.read_text())
    start = time.perf_counter()
    spec = SceneSpec()
    train = build_split("train", settings.train_scenes, out / "train", spec, settings.data_seed)
    test = build_split("test", settings.test_scenes, out / "test", spec, settings.data_seed)
    check = verify_benchmark(out, spec)
    summary = {"train": train, "test": test, "check": check, "seconds": round(time.perf_counter() - start, 1)}
    atomic_write_json(summary_path, summary)
    kinds = ", ".join(f"{k} {n}" for k, n in test["questions"].items())
    say(f"data: {settings.train_scenes} train / {settings.test_scenes} test scenes in {summary['seconds']:.0f} s; "
        f"test questions by kind: {kinds}; {check['answers_checked']} answers and "
        f"{check['kinds_checked']} kinds checked, {check['shared_source_images']} source images shared "
        "between splits")  # fmt: skip
    return summary


def base_model(name: str, seed: int, towers: Path, out: Path) -> Path:
    """The run's starting folder, as `mgllava assemble` makes one for the paper's stage 1: the variant's
    model as the trainer builds it from the preset (random LLM and new modules from `seed`) with the
    pretrained towers put in, and its processor."""
    from ..convert.folder import write_folder
    from ..train.setup import build_model

    if (out / "config.json").is_file():
        return out
    variant = VARIANTS[name]
    overrides = f"model_overrides={{fusion: {variant.fusion}, object_tokens: {variant.object_tokens}}}"
    model, processor = build_model(load_config(TrainConfig, "demo-stage1", [overrides, f"seed={seed}"]))
    load_towers(model, towers)
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    write_folder(model, processor, partial)
    partial.rename(out)
    return out


def train_variant(name: str, seed: int, data: Path, root: Path, settings: DemoSettings) -> Path:
    variant = VARIANTS[name]
    src = f"data.sources=[{{path: {data}/train/PAIRS, image_root: {data}/train/images, boxes: {data}/train/{variant.boxes}}}]"
    common = [f"seed={seed}", f"save_every={settings.save_every}", *settings.overrides]
    tower = "".join(f", {t}" for t in variant.train_towers)
    if not (root / "stage1/final").is_dir():
        base = base_model(name, seed, data / "towers", root / "base")
        stage1 = src.replace("PAIRS", "captions.json").replace(
            "}]", f", sample: 'first:{settings.captions}'}}]"
        )
        config = load_config(TrainConfig, "demo-stage1", [stage1, f"model={base}", f"output_dir={root}/stage1",
                                                          f"stage.trainable=[new_modules{tower}]", *common])  # fmt: skip
        Trainer(config).run()
    if not (root / "stage2/final").is_dir():
        stage2 = [src.replace("PAIRS", "qa.json"), f"init_from={root}/stage1/final", f"output_dir={root}/stage2",
                  f"stage.epochs={settings.stage2_epochs}", f"stage.trainable=[new_modules, language_model{tower}]"]  # fmt: skip
        Trainer(load_config(TrainConfig, "demo-stage2", [*stage2, *common])).run()
    return root / "stage2/final"


def evaluate(model: Path, data: Path, variant: Variant, out: Path) -> dict[str, Any]:
    options = EvalOptions(benchmark="short_vqa", data=str(data / "test/test.jsonl"), out=str(out),
                          model=str(model), images=str(data / "test/images"),
                          boxes=str(data / "test" / variant.boxes), batch_size=48, max_new_tokens=8)  # fmt: skip
    return run_eval(options)


def execute_run(name: str, seed: int, data: Path, root: Path, settings: DemoSettings) -> None:
    """One run in a worker: both stages, the evaluation, then `result.json` (the run is done when it exists).
    Timings go to `timing.json`, kept apart so that a resumed run's result equals an uninterrupted one's."""
    clock = {"wall": time.perf_counter(), "cpu": time.process_time()}
    model = train_variant(name, seed, data, root, settings)
    trained = {"wall": time.perf_counter(), "cpu": time.process_time()}
    results = evaluate(model, data, VARIANTS[name], root / "eval")
    done = {"wall": time.perf_counter(), "cpu": time.process_time()}
    predictions = [r.get("prediction") for r in read_jsonl(root / "eval" / "predictions.jsonl")]
    kinds = results["categories"]["category"]
    result = {
        "variant": name,
        "seed": seed,
        "overall": results["score"],
        "kinds": {k: kinds[k]["score"] for k in KINDS if k in kinds},
        "questions": {k: kinds[k]["n"] for k in KINDS if k in kinds},
        "answers": dict(Counter(predictions).most_common()),
        "stage2_loss": [r["loss"] for r in read_jsonl(root / "stage2" / "metrics.jsonl")],
    }
    atomic_write_json(root / "timing.json", {
        "train_seconds": round(trained["wall"] - clock["wall"], 1),
        "train_cpu_seconds": round(trained["cpu"] - clock["cpu"], 1),
        "eval_seconds": round(done["wall"] - trained["wall"], 1),
        "eval_cpu_seconds": round(done["cpu"] - trained["cpu"], 1),
        "steps": list(settings.steps()), "questions": len(predictions),
    })  # fmt: skip
    atomic_write_json(root / "result.json", result)


def _needs(name: str, towers: Path) -> tuple[Path, ...]:
    """The pretrained towers a variant's model has (the baseline has no ConvNeXt)."""
    from ..model.configuration import MGLlavaConfig

    variant = VARIANTS[name]
    config = MGLlavaConfig.from_preset("demo", fusion=variant.fusion, object_tokens=variant.object_tokens)
    wanted = ("vision_tower", "high_res_tower") if config.uses_high_res else ("vision_tower",)
    return tuple(towers / f"{t}.safetensors" for t in wanted)


def _jobs(variants: tuple[str, ...], seeds: int, data: Path, runs: Path, settings: DemoSettings,
          questions: int) -> list[Job]:  # fmt: skip
    """The towers' pretrainings, then every run (each waits for the towers its model has)."""
    return [
        *tower_jobs(data / "towers", settings.pretrain),
        *(
            Job(
                f"{name}/seed{seed}",
                runs / name / f"seed{seed}",
                settings.steps(),
                questions,
                (name, seed, data, runs / name / f"seed{seed}", settings),
                needs=_needs(name, data / "towers"),
            )
            for name in variants
            for seed in range(seeds)
        ),
    ]


def _finished_line(job: Job) -> str:
    if isinstance(job, TowerJob):
        accuracy = json.loads((job.root / f"{job.tower}.json").read_text())["accuracy"]
        return f"pretrained {job.tower}: held-out colour at the part's cell " + ", ".join(
            f"{part} {value:.0f}%" for part, value in accuracy.items()
        )
    result = json.loads(job.result.read_text())
    kinds = "  ".join(f"{k} {v:5.1f}" for k, v in result["kinds"].items())
    title = VARIANTS[result["variant"]].title
    line = f"{title:44s} seed {result['seed']}: overall {result['overall']:5.1f}%  ({kinds})"
    note = collapse_note(result["answers"])
    return line + (f"\n    {note}" if note else "")


def run_demo(out: str | Path, variants: tuple[str, ...] = DEFAULT_VARIANTS, quick: bool = False,
             seeds: int | None = None, workers: int | None = None, epochs: int | None = None,
             say: Callable[[str], None] = print) -> dict[str, Any]:  # fmt: skip
    settings = DemoSettings.quick() if quick else DemoSettings()
    if seeds is not None:
        settings = replace(settings, seeds=seeds)
    if epochs is not None:
        settings = replace(settings, stage2_epochs=epochs)
    workers = workers or min(2, os.cpu_count() or 1)
    out = Path(out)
    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    check_output_folder(out, settings)
    say(HONESTY.format(params=_demo_parameters(), small_recall=SceneSpec().detector.small_recall))
    data = out / "data"
    summary = build_data(data, settings, say)
    questions = sum(summary["test"]["questions"].values())
    jobs = _jobs(variants, settings.seeds, data, out / "runs", settings, questions)
    runs = [j for j in jobs if not isinstance(j, TowerJob)]
    say(f"pretraining the two vision towers ({settings.pretrain.steps} steps each; nothing pretrained exists "
        f"here), then training and evaluating {len(runs)} runs ({', '.join(variants)} x {settings.seeds} "
        f"seed(s)); {workers} jobs at a time, one torch thread each, a run starting once its towers are "
        f"pretrained; logs in {out}/runs/<variant>/seed<k>/log.txt")  # fmt: skip
    run_jobs(jobs, execute_run, workers, _finished_line, say, preload="mgllava.demo.run")
    summary["towers"] = tower_summary(data / "towers")
    say(towers_line(summary["towers"]))
    results = [json.loads(j.result.read_text()) for j in runs]
    rows = summarize(results, VARIANTS)
    table = markdown(rows, settings.seeds)
    report = {"rows": rows, "verdict": verdict(rows), "data": summary, "settings": asdict(settings),
              "seeds": settings.seeds, "minutes": round((time.perf_counter() - start) / 60, 1)}  # fmt: skip
    atomic_write_text(out / "results.md", table + "\n" + "\n".join(report["verdict"]) + "\n")
    atomic_write_json(out / "results.json", report)
    plot(rows, results, out / "results.png")
    if "full" in variants:
        shutil.rmtree(out / "model", ignore_errors=True)
        shutil.copytree(out / "runs" / "full" / "seed0" / "stage2" / "final", out / "model")
    say("\n" + table + "\n".join(report["verdict"]))
    say(f"wrote {out}/results.md, results.json, results.png in {report['minutes']} min")
    if "full" in variants:
        asked = read_jsonl(data / "test" / "test.jsonl")
        example = next((q for q in asked if q["category"] == "b"), None)  # a boxed small shape
        if example is not None:
            say(f"try it: mgllava chat --model {out}/model --image {data}/test/images/{example['image']} "
                f"--box-file {data}/test/boxes.jsonl --show-boxes --prompt '{example['question']}' "
                f"(the answer: {example['answers'][0]})")  # fmt: skip
    return report
