"""`mgllava` command line: each sub-command parses its arguments, then calls the library."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from .boxes import cli as boxes_cli
from .data.templates import TEMPLATES
from .eval import cli as eval_cli
from .inference.decoding import MAX_STEP_TOKENS
from .model.configuration import FUSIONS, OBJECT_TOKENS
from .train import cli as train_cli
from .utils.dtypes import DTYPES, resolve_dtype
from .utils.threads import limited_threads


def _demo(args: argparse.Namespace) -> int:
    from .demo.run import DEFAULT_VARIANTS, VARIANTS, run_demo

    if args.variants == "all":
        variants = tuple(VARIANTS)
    elif args.variants:
        variants = tuple(v.strip() for v in args.variants.split(","))
        unknown = [v for v in variants if v not in VARIANTS]
        if unknown:
            raise ValueError(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)} or all")
    else:
        variants = DEFAULT_VARIANTS
    if args.seeds is not None and args.seeds < 1:
        raise ValueError(f"--seeds must be at least 1, got {args.seeds}")
    if args.epochs is not None and args.epochs < 1:
        raise ValueError(f"--epochs must be at least 1, got {args.epochs}")
    if args.workers is not None and args.workers < 1:
        raise ValueError(f"--workers must be at least 1, got {args.workers}")
    out = args.out or ("runs/demo-quick" if args.quick else "runs/demo")
    try:
        report = run_demo(
            out, variants, quick=args.quick, seeds=args.seeds, workers=args.workers, epochs=args.epochs
        )
    except KeyboardInterrupt:
        print(f"\nmgllava demo: interrupted; run the same command again to resume ({out})", file=sys.stderr)
        return 130
    return 0 if report["rows"] else 1


def _assemble(args: argparse.Namespace) -> int:
    from .convert import assemble, write_folder

    model, processor = assemble(
        clip=args.clip,
        convnext=args.convnext,
        llm=args.llm,
        template=args.template,
        reference=args.reference,
        fusion=args.fusion,
        object_tokens=args.object_tokens,
        high_res_image_size=args.high_res_size,
        dtype=resolve_dtype(args.dtype),
        trust_pickle=args.trust_pickle,
        context_length=args.context_length,
    )
    folder = write_folder(model, processor, args.out)
    print(f"wrote {folder} ({sum(p.numel() for p in model.parameters()):,} parameters)")
    return 0


def _engine(args: argparse.Namespace, **options):
    from .inference import Engine

    dtype = resolve_dtype(args.dtype)
    proposer = boxes_cli.proposer_from_args(args, args.device)
    return Engine.from_pretrained(args.model, dtype=dtype, device=args.device, proposer=proposer,
                                  pack_linear=args.pack_linear, decode_kernel=args.decode_kernel, **options)  # fmt: skip


def _settings(args: argparse.Namespace):
    from .inference import GenerationSettings

    return GenerationSettings(args.max_tokens, args.temperature, args.top_p, args.seed)


def _chat(args: argparse.Namespace) -> int:
    from .chat import ChatSession, answer_once, parse_boxes, repl

    boxes = parse_boxes(args.boxes)
    session = ChatSession(_engine(args), args.image, args.video, _settings(args), boxes)
    if args.prompt is not None:
        return answer_once(session, args.prompt, sys.stdout, args.show_boxes)
    return repl(session, sys.stdin, sys.stdout, args.show_boxes)


def server_settings(args: argparse.Namespace):
    """`mgllava serve`'s flags as `ServerSettings` (each flag is the field's name with dashes)."""
    from .serve import ServerSettings

    return ServerSettings(
        model_name=args.model_name or Path(args.model).resolve().name,
        max_body_bytes=int(args.max_body_mb * (1 << 20)),
        max_tokens=args.max_tokens,
        default_max_tokens=min(args.default_max_tokens, args.max_tokens),
        max_in_flight=args.max_in_flight,
        max_batch_size=args.max_batch_size,
        batch_window_s=args.batch_window_ms / 1000,
        max_queue=args.max_queue,
        max_images=args.max_images,
        max_boxes_per_image=args.max_boxes_per_image,
        max_boxes_per_request=args.max_boxes_per_request,
        max_box_pairs=args.max_box_pairs,
        max_request_pixels=args.max_request_pixels,
        max_json_items=args.max_json_items,
        max_preparing=args.max_preparing,
        allow_image_urls=args.allow_image_urls,
        image_url_allow=tuple(args.image_url_allow),
        image_url_timeout_s=args.image_url_timeout_s,
        image_url_max_bytes=int(args.image_url_max_mb * (1 << 20)),
        body_timeout_s=args.body_timeout_s,
        shutdown_timeout_s=args.shutdown_timeout_s,
        threads=args.threads,
        prepare_threads=args.prepare_threads,
    )


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from .serve import create_app

    settings = server_settings(args)  # checked before the model loads
    # every thread but the model's (the batcher worker sets its own count) runs with --prepare-threads OpenMP
    # threads, from before the model loads: the event loop and request threads never start a team beside
    # the model's, and neither does loading (a team the main thread ever started slows the model thread's
    # small oneDNN calls about 2x, even once idle: docs/server.md, "Threads"); compiled kernels are compiled
    # by the worker, for its thread count (`warm=False`)
    with limited_threads(settings.prepare_threads):
        engine = _engine(args, max_image_pixels=args.max_image_pixels, max_prompt_chars=args.max_prompt_chars,
                         max_message_chars=args.max_message_chars, prefix_cache_bytes=int(args.prefix_cache_mb * (1 << 20)),
                         prefix_min_tokens=args.prefix_min_tokens, max_step_tokens=args.max_step_tokens,
                         warm=False)  # fmt: skip
        uvicorn.run(create_app(engine, settings), host=args.host, port=args.port, log_level="info",
                    timeout_graceful_shutdown=settings.shutdown_timeout_s)  # fmt: skip
    return 0


def _model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", required=True, help="MG-LLaVA folder (from `mgllava assemble` or training)"
    )
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="default: as saved")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--no-pack-linear",
        dest="pack_linear",
        action="store_false",
        help="keep the linear layers' F.linear (default on the CPU: oneDNN-packed weights, docs/server.md)",
    )
    parser.add_argument(
        "--no-decode-kernel",
        dest="decode_kernel",
        action="store_false",
        help="bf16 on the CPU: decode attention by torch's flash kernel, not the compiled one (docs/server.md)",
    )
    boxes_cli.add_proposer_options(parser)


def _add_chat(sub) -> None:
    chat = sub.add_parser("chat", help="talk to a model in the terminal (streaming, multi-turn)")
    _model_options(chat)
    chat.add_argument("--image", action="append", default=[], metavar="FILE", help="an image (repeatable)")
    chat.add_argument("--video", metavar="FILE", help="a video (8 frames are sampled)")
    chat.add_argument("--prompt", help="answer this one question and exit (for scripts)")
    chat.add_argument("--show-boxes", action="store_true", help="print the tags and boxes the model saw")
    chat.add_argument("--boxes", help="JSON: one list of [x1, y1, x2, y2] per --image, in its pixels")
    chat.add_argument("--max-tokens", type=int, default=256)
    chat.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    chat.add_argument("--top-p", type=float, default=1.0)
    chat.add_argument("--seed", type=int)
    chat.set_defaults(func=_chat)


def _add_serve(sub) -> None:
    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP server with a web page")
    _model_options(serve)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--model-name", help="the model id clients send (default: the folder name)")
    serve.add_argument("--max-tokens", type=int, default=1024, help="largest max_tokens a request may ask")
    serve.add_argument("--default-max-tokens", type=int, default=256)
    serve.add_argument("--max-in-flight", type=int, default=32, help="more concurrent requests get 429")
    serve.add_argument("--max-batch-size", type=int, default=8)
    serve.add_argument("--batch-window-ms", type=float, default=10.0, help="wait this long to fill a batch")
    serve.add_argument("--max-queue", type=int, default=64, help="queued requests beyond this get 503")
    serve.add_argument("--max-body-mb", type=float, default=32.0)
    limits = serve.add_argument_group(
        "per-request limits (docs/server.md gives the reasons for the defaults)"
    )
    limits.add_argument("--max-image-pixels", type=int, default=64 << 20, help="width x height of one image")
    limits.add_argument(
        "--max-request-pixels",
        type=int,
        default=1 << 27,
        help="decoded pixels of all a request's images, each non-square image's max(w, h)^2 canvas included",
    )
    limits.add_argument(
        "--max-images",
        type=int,
        help="default: as many as the context holds (7 at 4096 tokens, 576 rows each)",
    )
    limits.add_argument(
        "--max-boxes-per-image", type=int, default=300, help="boxes a request gives one image"
    )
    limits.add_argument("--max-boxes-per-request", type=int, default=1024)
    limits.add_argument(
        "--max-box-pairs",
        type=int,
        default=1_000_000,
        help="box-selection budget: sum over images of boxes^2 (what NMS compares at worst)",
    )
    limits.add_argument(
        "--max-json-items",
        type=int,
        help="',' '[' '{' in a body (default 65536 + 8 x --max-boxes-per-request)",
    )
    limits.add_argument(
        "--max-preparing", type=int, default=2, help="requests decoding their images at once; others wait"
    )
    limits.add_argument(
        "--max-prompt-chars", type=int, help="characters of text per request (default: 16 x the context)"
    )
    limits.add_argument(
        "--max-message-chars", type=int, help="characters of text per message (default: --max-prompt-chars)"
    )
    limits.add_argument(
        "--body-timeout-s", type=float, default=10.0, help="the whole body must arrive within this (else 408)"
    )
    serve.add_argument(
        "--prefix-cache-mb",
        type=float,
        default=1024.0,
        help="earlier turns' KV caches kept for reuse, on the model's device (0: none)",
    )
    serve.add_argument(
        "--prefix-min-tokens",
        type=int,
        default=128,
        help="shorter shared prefixes are recomputed, not reused",
    )
    serve.add_argument(
        "--max-step-tokens",
        type=int,
        default=MAX_STEP_TOKENS,
        help="tokens per model step: one per decoding request, the rest for new prompts, in chunks",
    )
    serve.add_argument(
        "--threads", type=int, help="the model thread's intra-op (OpenMP) threads (default: the cores)"
    )
    serve.add_argument(
        "--prepare-threads",
        type=int,
        default=1,
        help="intra-op threads of every other thread (request preparation, the event loop)",
    )
    serve.add_argument(
        "--shutdown-timeout-s",
        type=float,
        default=10.0,
        help="on SIGTERM: wait this long for open requests, then as long again for running ones",
    )
    urls = serve.add_argument_group("image URLs")
    urls.add_argument(
        "--allow-image-urls",
        action="store_true",
        help="fetch http(s) image URLs, from public addresses only (off: data URLs only)",
    )
    urls.add_argument(
        "--image-url-allow",
        action="append",
        default=[],
        metavar="HOST_OR_NETWORK",
        help="also fetch from this hostname or IP network (e.g. 10.1.2.0/24) although it is not public; repeatable",
    )
    urls.add_argument("--image-url-timeout-s", type=float, default=10.0, help="per URL, redirects included")
    urls.add_argument("--image-url-max-mb", type=float, default=16.0)
    serve.set_defaults(func=_serve)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mgllava", description="MG-LLaVA: run, train, evaluate, serve")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="train and evaluate miniature MG-LLaVA variants on easy-vqa scenes")
    demo.add_argument(
        "--out", help="where data, runs, results and the model go (runs/demo, quick: runs/demo-quick)"
    )
    demo.add_argument("--quick", action="store_true", help="the same path on little data, a minute or two")
    demo.add_argument(
        "--variants", help="comma-separated variant names, or all (default: baseline,fusion,objects,full)"
    )
    demo.add_argument("--seeds", type=int, help="seeds per variant (default 3, quick 1)")
    demo.add_argument("--epochs", type=int, help="stage-2 epochs (default 2, quick 2)")
    demo.add_argument(
        "--workers",
        type=int,
        help="jobs (tower pretrainings, runs) side by side, one torch thread each (default: 2 or the cores)",
    )
    demo.set_defaults(func=_demo)

    asm = sub.add_parser(
        "assemble", help="build an HF folder from CLIP, OpenCLIP ConvNeXt and LLM checkpoints"
    )
    asm.add_argument("--clip", required=True, help="HF CLIP folder (e.g. clip-vit-large-patch14-336)")
    asm.add_argument("--convnext", required=True, help="OpenCLIP ConvNeXt file or folder")
    asm.add_argument("--llm", required=True, help="HF causal-LM folder with its tokenizer")
    asm.add_argument("--template", required=True, choices=sorted(TEMPLATES))
    asm.add_argument("--reference", help="reference XTuner .pth with projector/fusion/LLM weights")
    asm.add_argument("--fusion", default="conv_gate", choices=FUSIONS)
    asm.add_argument("--object-tokens", default="concat", choices=OBJECT_TOKENS)
    asm.add_argument("--high-res-size", type=int, default=768)
    asm.add_argument("--dtype", default="bfloat16", choices=sorted(set(DTYPES) - {"auto"}))
    asm.add_argument("--trust-pickle", action="store_true", help="allow arbitrary classes in pickled files")
    asm.add_argument(
        "--context-length",
        type=int,
        help="longest prompt + answer in tokens (default: the LLM's max_position_embeddings); a video model "
        "needs more, 8 frames being >= 4,616 visual rows (preset mgllava-vicuna-7b-video: 8192, RoPE unscaled)",
    )
    asm.add_argument("--out", required=True)
    asm.set_defaults(func=_assemble)
    _add_chat(sub)
    _add_serve(sub)
    train_cli.register(sub)
    eval_cli.register(sub)
    boxes_cli.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, ArithmeticError) as err:
        print(f"mgllava {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
