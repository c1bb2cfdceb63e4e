"""`mgllava eval` and `mgllava eval-data`: parse, then call `runner.run_eval` / the converters.

mgllava eval --model runs/tiny --benchmark mmbench_dev --data MMBench_DEV_EN.tsv --out runs/eval/mmb
mgllava eval ... --benchmark vqav2_testdev --boxes vqav2_box.json      # boxes keyed as docs/benchmarks.md
torchrun --nproc_per_node 8 -m mgllava.cli eval ... --batch-size 8      # sharded, gathered on rank 0
mgllava eval-data easy-vqa --out data/easy_vqa                          # then --benchmark short_vqa
"""

from __future__ import annotations

import argparse
from typing import Any

from ..utils.dtypes import DTYPES
from .benchmarks import BENCHMARKS, EvalOptions
from .metrics import CHOICE_RULES
from .multiple_choice import DEFAULT_MC_INSTRUCTION, MC_INSTRUCTIONS
from .scoring import DEFAULT_SCORING, SCORING
from .short_answer import SHORT_METRICS


def _eval(args: argparse.Namespace) -> int:
    from ..utils import dist
    from .runner import run_eval

    fields = EvalOptions.__dataclass_fields__
    opts = EvalOptions(**{k: v for k, v in vars(args).items() if k in fields})
    opts.box_settings = {k: v for k, v in vars(args).items() if k in BOX_FLAGS}  # only the flags given
    opts.out = opts.out or f"runs/eval/{opts.benchmark}"
    try:
        results = run_eval(opts)
    finally:
        dist.cleanup()
    if results is not None:
        print(summary_line(results, opts.out))
    return 0


def summary_line(results: dict[str, Any], out: str) -> str:
    counts = results["counts"]
    score = "-" if results["score"] is None else f"{results['score']:.2f}"
    extra = f"; submission {results['submission']}" if results.get("submission") else ""
    return (
        f"{results['benchmark']}: {results['metric']} {score} (scoring {results['scoring']['pipeline']}; "
        f"{counts['scored']} scored; "
        f"{counts['invalid']} invalid, {counts['failed']} failed, {counts['missing']} not answered, "
        f"{counts['no_ground_truth']} without ground truth{extra}) -> {out}/results.json"
    )


def _count_or_none(text: str) -> int | None:
    """A positive integer, or None for "none" (no limit)."""
    if text.lower() == "none":
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'none', got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'none', got {text!r}")
    return value


def _iou_or_none(text: str) -> float | None:
    if text.lower() == "none":
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an IoU in (0, 1] or 'none', got {text!r}") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected an IoU in (0, 1] or 'none', got {text!r}")
    return value


def _per_label(text: str) -> int | None:
    return None if text.lower() == "auto" else _count_or_none(text)


BOX_FLAGS = ("box_limit", "box_nms_iou", "box_cap", "box_per_label")


def _add_box_flags(ev: Any) -> None:
    """Box settings; each defaults to the benchmark's reference value (docs/benchmarks.md), so a flag is
    only set when given (argparse.SUPPRESS)."""
    off = argparse.SUPPRESS
    ev.add_argument(
        "--box-limit",
        type=_count_or_none,
        default=off,
        help="cap boxes per image above this many, or 'none' (default: the benchmark's reference value: "
        "100, none for VQAv2)",
    )
    ev.add_argument(
        "--box-nms-iou",
        type=_iou_or_none,
        default=off,
        help="class-wise NMS IoU, or 'none' to skip NMS (default 0.2, the reference's)",
    )
    ev.add_argument(
        "--box-cap",
        choices=["per_label", "top_k"],
        default=off,
        help="per_label: the reference's rule (top N per label once over the limit); top_k: a true cap",
    )
    ev.add_argument(
        "--box-per-label",
        type=_per_label,
        default=off,
        help="boxes kept per label by the per_label cap, or 'auto' (20 above a limit of 50, else 5; "
        "20 for video, as the reference)",
    )


def _eval_data(args: argparse.Namespace) -> int:
    from .easy_vqa import convert_easy_vqa

    path = convert_easy_vqa(args.out, args.split, args.limit)
    print(f"wrote {path}; score it with: mgllava eval --benchmark short_vqa --data {path} --model MODEL")
    return 0


def register(sub: Any) -> None:
    """Add the `eval` and `eval-data` sub-commands to the `mgllava` parser."""
    ev = sub.add_parser("eval", help="answer a benchmark with a model folder and score it")
    ev.add_argument("--model", help="MG-LLaVA folder (from `mgllava assemble` or training)")
    ev.add_argument("--benchmark", required=True, choices=sorted(BENCHMARKS))
    ev.add_argument("--data", required=True, help="the benchmark's question file (TSV, JSON or JSONL)")
    ev.add_argument("--images", help="folder of the images or videos the data file names")
    ev.add_argument("--boxes", help="box file (our JSONL or the reference's JSON); default: no boxes")
    ev.add_argument(
        "--max-missing-boxes",
        type=float,
        default=0.0,
        help="share of samples allowed to find no boxes in --boxes before the run is refused (default 0); "
        "a box file that matches no sample is refused at any share",
    )
    _add_box_flags(ev)
    ev.add_argument(
        "--max-failed-samples",
        type=int,
        default=0,
        help="samples whose generation may fail (unreadable image, prompt too long, out of memory) before "
        "the score is withheld and the command exits non-zero (default 0); failures are always listed",
    )
    ev.add_argument(
        "--annotations",
        help="ground truth in its own file: VQAv2 annotations, TextVQA JSON "
        "for a LLaVA question file, Video-ChatGPT test_a.json",
    )
    ev.add_argument("--ocr", help="TextVQA Rosetta OCR JSON for the OCR-token prompt")
    ev.add_argument("--prompt", default="ocr", choices=["ocr", "plain"], help="TextVQA prompt variant")
    ev.add_argument(
        "--mc-instruction",
        default=DEFAULT_MC_INSTRUCTION,
        choices=list(MC_INSTRUCTIONS),
        help="multiple choice: the closing instruction. by-text (default, the MG-LLaVA reference): Chinese "
        "when the prompt holds a CJK character; english / chinese: always that one, as LLaVA's --lang en / cn",
    )
    ev.add_argument(
        "--scoring",
        default=DEFAULT_SCORING,
        choices=list(SCORING),
        help="scoring pipeline (docs/scoring.md): 'official' = the benchmarks' own scripts (vqaEval.py, M4C, "
        "ANLS, VLMEvalKit can_infer / MMStar's rule, Video-ChatGPT judge counting); 'llava' = LLaVA's "
        "scripts (VQAv2 answers through the EvalAI processor first, its ScienceQA and SEED rules); "
        "'lmms-eval' = lmms-eval's (VQAv2 normalised on both sides always, judge failures count as 'no')",
    )
    ev.add_argument(
        "--choice-rule",
        choices=list(CHOICE_RULES),
        help="multiple-choice letter rule, instead of the --scoring pipeline's for the benchmark "
        "('reference' = the MG-LLaVA reference's re.search('[A-D]+'))",
    )
    ev.add_argument(
        "--metric",
        choices=sorted(SHORT_METRICS),
        help="short_vqa metric (default: exact; vqa follows --scoring)",
    )
    ev.add_argument("--split", default="test", help="ScienceQA problems.json split")
    ev.add_argument(
        "--submission-questions",
        help="VQAv2 test-dev: all test2015 questions for the upload, the official JSON or LLaVA's "
        "llava_vqav2_mscoco_test2015.jsonl (the upload then follows that file's order)",
    )
    ev.add_argument("--limit", type=int, help="first N questions only")
    ev.add_argument("--out", help="output folder (default runs/eval/<benchmark>)")
    ev.add_argument("--batch-size", type=int, default=1)
    ev.add_argument(
        "--max-new-tokens",
        type=int,
        help="answer length (default 100, the reference's; its 13B config used 50 for every benchmark)",
    )
    ev.add_argument("--dtype", default="auto", choices=list(DTYPES))
    ev.add_argument("--device", help="default: this rank's GPU, else CPU")
    ev.add_argument("--judge-url", help="OpenAI-compatible base URL of the video QA judge")
    ev.add_argument("--judge-model", default="gpt-3.5-turbo")
    ev.add_argument(
        "--judge-key-env",
        default="MGLLAVA_JUDGE_API_KEY",
        help="name of the environment variable holding the judge's API key",
    )
    ev.add_argument("--judge-workers", type=int, default=4)
    ev.add_argument(
        "--judge-rounds",
        type=int,
        default=3,
        help="passes over the questions still without a usable judge reply in one run (the official "
        "scripts ask until every question has one; a later run asks again)",
    )
    ev.add_argument("--score-only", action="store_true", help="score the answers on disk, generate nothing")
    ev.set_defaults(func=_eval)

    data = sub.add_parser("eval-data", help="write a benchmark from a public package (easy-vqa)")
    data.add_argument("source", choices=["easy-vqa"])
    data.add_argument("--out", required=True)
    data.add_argument("--split", default="test", choices=["train", "test"])
    data.add_argument("--limit", type=int)
    data.set_defaults(func=_eval_data)
