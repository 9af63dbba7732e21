"""``cspnet bench``: the side-by-side speed and memory suite (see `cspnet.bench`)."""
from __future__ import annotations

import argparse
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("bench", help="speed and memory: eager vs deploy vs onnxruntime vs timm, CSP vs plain twin")
    p.add_argument("models", nargs="*", help="models (default: cspresnet50 cspresnext50 cspdarknet53); twins are added")
    p.add_argument("--quick", action="store_true", help="seconds-long run at 64 px (checks the bookkeeping, not speed)")
    p.add_argument("--out", type=report_path, default=None,
                   help="write the Markdown report here (and the raw numbers as .json beside it; so not a .json path)")
    p.add_argument("--input-size", type=int, default=None)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=None)
    p.add_argument("--train-batch", type=int, default=None)
    p.add_argument("--train-cl", action="store_true", help="also time the training step in channels-last")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default 2; --quick: 1)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per inference entry")
    p.add_argument("--train-repeats", type=int, default=None,
                   help="timed training steps per entry (6 or more give ours x timm a 95%% interval)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (CUDA: CUDA events, CUDA memory)")
    p.add_argument("--no-twins", action="store_true")
    p.add_argument("--no-timm", action="store_true")
    p.add_argument("--no-onnx", action="store_true")
    p.add_argument("--no-deploy", action="store_true")
    p.add_argument("--no-winograd", action="store_true", help="skip deploy(winograd=True), which compiles on first use")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--no-memory-efficient", action="store_true",
                   help="skip the memory-efficient training rows (cspnet.memory_efficient) of our models")
    p.add_argument("--keep-freed-memory", action="store_true",
                   help="set glibc malloc to reuse freed memory in this process (all entries alike; see cspnet.export)")
    p.add_argument("--glibc-default-malloc", action="store_true",
                   help="measure peak RSS with glibc's adaptive malloc, which keeps freed blocks (default: a fixed "
                        "mmap threshold, so RSS follows the live tensors)")
    p.set_defaults(func=run)


def report_path(text: str) -> Path:
    """--out, refused while parsing (not after the run) where the JSON beside it would overwrite it."""
    from ..bench import report_json_path

    try:
        report_json_path(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return Path(text)


def config_from_args(args):
    from ..bench import DEFAULT_MODELS, BenchConfig, quick_config

    models = tuple(args.models) or DEFAULT_MODELS
    over = {
        "twins": not args.no_twins, "timm": not args.no_timm, "onnx": not args.no_onnx,
        "deploy": not args.no_deploy, "winograd": not args.no_winograd, "memory": not args.no_memory, "device": args.device,
        "keep_freed_memory": args.keep_freed_memory, "memory_efficient": not args.no_memory_efficient,
        "return_freed_memory": not args.glibc_default_malloc,
    }
    for key in ("input_size", "train_batch", "repeats", "train_repeats", "threads"):
        if getattr(args, key) is not None:
            over[key] = getattr(args, key)
    if args.batch_sizes:
        over["batch_sizes"] = tuple(args.batch_sizes)
    if args.train_cl:
        over["train_formats"] = ("contiguous", "channels_last")
    if args.quick:
        return quick_config(models if args.models else ("cspresnet10",), **over)
    return BenchConfig(models=models, **over)


def run(args) -> int:
    from ..bench import run_benchmarks, to_markdown, write_report

    report = run_benchmarks(config_from_args(args))
    print(to_markdown(report))
    if args.out:
        print(f"wrote {write_report(report, Path(args.out))}")
    return 0
