"""`mgllava train CONFIG [key=value ...]`, `mgllava train --plan CONFIG --world-size N --gpu-memory GB [key=value
...]` (each rank's GPU memory, `train.plan`) and `mgllava check-data CONFIG [key=value ...]`."""

from __future__ import annotations

import argparse
import logging

from ..config import load_config
from .config import TrainConfig


def _load(args: argparse.Namespace) -> TrainConfig:
    return load_config(TrainConfig, args.config, args.overrides)


def _train(args: argparse.Namespace) -> int:
    if args.plan:
        return _plan(args)
    from .trainer import train

    logging.getLogger("mgllava").setLevel(logging.INFO)
    from ..utils.dist import info

    folder = train(_load(args))
    if info().is_main:
        print(f"exported {folder}")
    return 0


def _plan(args: argparse.Namespace) -> int:
    """Print the memory plan; exit 0 when it fits, 1 when it does not."""
    from .plan import format_plan, plan

    result = plan(_load(args), args.world_size, args.gpu_memory, args.config)
    print(format_plan([result]))
    return 0 if result.fits else 1


def _check(args: argparse.Namespace) -> int:
    from ..data.checks import check_dataset, exit_code, format_summary
    from ..data.dataset import LlavaDataset, load_samples
    from .setup import build_processor

    config = _load(args)
    dataset = LlavaDataset(load_samples(config.data, config.seed), build_processor(config))
    out = args.out or f"{config.output_dir}/check-data"
    summary = check_dataset(dataset, out, args.max_bad_fraction, args.workers)
    print(format_summary(summary))
    print(f"wrote {out}/check_summary.json and {out}/bad_samples.jsonl")
    return exit_code(summary)


def register(sub: argparse._SubParsersAction) -> None:
    train = sub.add_parser("train", help="train one stage (1 process, or torchrun for FSDP2/DDP)")
    train.add_argument("config", help="a train config YAML, or a packaged preset such as tiny-stage1")
    train.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. stage.lr=1e-4")
    train.add_argument("--plan", action="store_true", help="print each rank's GPU memory instead of training")
    train.add_argument("--world-size", type=int, default=8, help="with --plan: GPUs (default 8)")
    train.add_argument("--gpu-memory", type=float, default=80, help="with --plan: GB of one GPU (default 80)")
    train.set_defaults(func=_train)

    check = sub.add_parser("check-data", help="check a training config's data before training")
    check.add_argument("config", help="a train config YAML, or a packaged preset")
    check.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    check.add_argument("--out", help="where to write the report (default <output_dir>/check-data)")
    check.add_argument(
        "--max-bad-fraction", type=float, default=0.01, help="exit 1 above this share of bad samples"
    )
    check.add_argument("--workers", type=int, default=0, help="decoding processes")
    check.set_defaults(func=_check)
