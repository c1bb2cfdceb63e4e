"""`mgllava boxes` and `mgllava boxes-convert`: argument parsing over `boxes.run` and `boxes.files`.

    mgllava boxes data/llava_v1_5_mix665k.json --image-root data/images --out boxes.jsonl \\
        --detector owlv2-large-patch14-ensemble --tagger clip --tagger-model clip-vit-large-patch14 \\
        [--vocabulary lvis] [--reference-json boxes.json]
    torchrun --nproc_per_node 8 -m mgllava.cli boxes ...        # same file, 8 processes
    mgllava boxes-convert reference_boxes.json boxes.jsonl      # and back: .jsonl -> .json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from ..media.images import DEFAULT_MAX_PIXELS
from ..utils import dist
from ..utils.dtypes import resolve_dtype
from ..utils.io import atomic_write_json, atomic_write_text

TAGGERS = ("clip", "fixed", "sample", "ram++")


def register(sub: argparse._SubParsersAction) -> None:
    run = sub.add_parser(
        "boxes",
        help="tag images and detect object boxes (OWLv2) into a resumable JSONL box file",
        description="Input: a LLaVA JSON/JSONL, an image folder, or a benchmark TSV with base64 images.",
    )
    run.add_argument("input", help="LLaVA .json/.jsonl, image folder, or benchmark .tsv")
    run.add_argument("--out", required=True, help="box file (.jsonl); an existing one is resumed")
    run.add_argument(
        "--image-root", help="folder the LLaVA image paths are relative to (default: its folder)"
    )
    run.add_argument("--detector", required=True, help="OWLv2 folder (Owlv2ForObjectDetection + processor)")
    add_tagger_options(run)
    run.add_argument("--threshold", type=float, default=0.2, help="OWLv2 box score threshold")
    run.add_argument("--batch-size", type=int, default=4, help="images per detector call")
    run.add_argument("--workers", type=int, default=0, help="image-decoding worker processes")
    run.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    run.add_argument("--device", help="default: this rank's GPU if there is one, else cpu")
    run.add_argument("--max-image-pixels", type=int, default=DEFAULT_MAX_PIXELS)
    run.add_argument("--no-exif", action="store_true", help="ignore EXIF orientation (as the reference did)")
    run.add_argument("--reference-json", help="also write the reference's JSON form of the box file here")
    run.add_argument(
        "--retry-errors", action="store_true", help="read unreadable images of a resumed file again"
    )
    run.add_argument("--no-progress", action="store_true")
    run.set_defaults(func=_boxes)

    convert = sub.add_parser(
        "boxes-convert", help="convert a box file: ours (.jsonl) <-> the reference's JSON (.json)"
    )
    convert.add_argument("src", help="our .jsonl or the reference's .json")
    convert.add_argument("dst", help=".jsonl (ours) or .json (the reference's form)")
    convert.set_defaults(func=_convert)


def add_tagger_options(parser: argparse.ArgumentParser, default: str | None = "clip") -> None:
    """The tagger's options, shared by `boxes` and by `chat`/`serve` (whose online proposer uses them)."""
    parser.add_argument(
        "--tagger", default=default, choices=TAGGERS, help="where the detector's queries come from"
    )
    parser.add_argument("--tagger-model", help="CLIP folder (--tagger clip) or RAM++ .pth (--tagger ram++)")
    parser.add_argument(
        "--vocabulary", help="coco80, lvis or a file (default: lvis for clip, coco80 for fixed)"
    )
    parser.add_argument("--tags", help="comma-separated tags for --tagger fixed, instead of --vocabulary")
    parser.add_argument("--tag-threshold", type=float, default=0.05, help="CLIP tag probability threshold")
    parser.add_argument("--tag-top-k", type=int, default=10, help="at most this many CLIP tags per image")


def add_proposer_options(parser: argparse.ArgumentParser) -> None:
    """Boxes for images given without any: `--box-file` (looked up first) and/or `--detector` (OWLv2)."""
    parser.add_argument(
        "--box-file", help="a box file (ours or the reference's): images found in it use its boxes"
    )
    parser.add_argument("--detector", help="OWLv2 folder: propose boxes for images given without any")
    add_tagger_options(parser, default="clip")


def proposer_from_args(args: argparse.Namespace, device: str):
    """A `BoxProposer` from `add_proposer_options`' arguments (`--box-file`, `--detector`), or None."""
    if not args.detector and not args.box_file:
        return None
    from .lookup import BoxLookup
    from .proposer import BoxProposer

    lookup = BoxLookup.load(args.box_file) if args.box_file else None
    if not args.detector:
        return BoxProposer(lookup=lookup)
    from .detector import Owlv2Detector

    if args.tagger == "sample":
        raise ValueError(
            "--tagger sample reads tags from a data file; pick clip, fixed or ram++ for chat/serve"
        )
    detector = Owlv2Detector.from_pretrained(args.detector, dtype=torch.float32, device=device)
    return BoxProposer(_tagger(args, device), detector, lookup)


def _tagger(args: argparse.Namespace, device: str):
    from .taggers import ClipTagger, FixedTagger, RamPlusTagger

    if args.tagger == "sample":
        return None
    if args.tagger == "fixed":
        if args.tags is not None:
            return FixedTagger(args.tags.split(","))
        return FixedTagger.from_vocabulary(args.vocabulary or "coco80")
    if not args.tagger_model:
        raise ValueError(f"--tagger {args.tagger} needs --tagger-model")
    if args.tagger == "ram++":
        return RamPlusTagger(args.tagger_model, device=device)
    return ClipTagger.from_pretrained(
        args.tagger_model,
        vocabulary=args.vocabulary or "lvis",
        dtype=_tower_dtype(args),
        device=device,
        threshold=args.tag_threshold,
        top_k=args.tag_top_k,
    )


def _tower_dtype(args: argparse.Namespace) -> torch.dtype:
    """The tagger's and detector's dtype: `--dtype` when it names one (`mgllava boxes`), else float32 (chat
    and serve share `--dtype`, which may be unset or `auto` there, meaning the MG-LLaVA checkpoint's own)."""
    dtype = resolve_dtype(getattr(args, "dtype", None))
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def _boxes(args: argparse.Namespace) -> int:
    from .detector import Owlv2Detector
    from .run import BoxJob, run_boxes

    info = dist.info()
    device = args.device or (f"cuda:{info.local_rank}" if torch.cuda.is_available() else "cpu")
    job = BoxJob(
        input=Path(args.input),
        out=Path(args.out),
        image_root=Path(args.image_root) if args.image_root else None,
        batch_size=args.batch_size,
        workers=args.workers,
        max_image_pixels=args.max_image_pixels,
        apply_exif=not args.no_exif,
        reference_json=Path(args.reference_json) if args.reference_json else None,
        progress=not args.no_progress,
        retry_errors=args.retry_errors,
    )
    try:
        tagger = _tagger(args, device)
    except ImportError as err:
        print(f"mgllava boxes: error: {err}", file=sys.stderr)
        return 2
    detector = Owlv2Detector.from_pretrained(
        args.detector, dtype=_tower_dtype(args), device=device,
        threshold=args.threshold, batch_size=args.batch_size,
    )  # fmt: skip
    try:
        summary = run_boxes(job, tagger, detector)
    finally:
        dist.cleanup()
    if summary is not None:
        print("\n".join(summary.lines()))
        print(f"wrote {job.out}" + (f" and {job.reference_json}" if job.reference_json else ""))
    return 0


def _convert(args: argparse.Namespace) -> int:
    import json

    from .files import BoxIndex, to_reference_json

    index = BoxIndex.load(args.src)
    records = [r for r in index.records if r.id is None or index.by_id.get(r.id) is r]  # one per id
    dst = Path(args.dst)
    if dst.suffix == ".jsonl":
        atomic_write_text(dst, "".join(json.dumps(r.to_json(), ensure_ascii=False) + "\n" for r in records))
    elif dst.suffix == ".json":
        atomic_write_json(dst, to_reference_json(records), indent=None)
    else:
        raise ValueError(f"boxes-convert: {dst} must end in .jsonl (ours) or .json (the reference's form)")
    print(f"wrote {dst}: {len(records)} records")
    return 0
