"""Foundation speed check: our cspresnet50, cspresnext50, cspdarknet53 and their plain twins,
with timm's same-named models in the same run.

Forward at batch 1 and 8 and a training step at batch 8, 224x224, fp32, 2 threads, NCHW and
channels-last, medians of interleaved repeated runs, ratios ours/timm (as speedups: timm time /
our time). No deploy, ONNX or memory measurements (see benchmarks/run_all.py for those).

    .venv/bin/python benchmarks/foundation_speed.py [--out docs/foundation_speed.md] [--repeats 7] [--train-repeats 9]
"""
from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="also write the Markdown (and JSON) report here")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--train-repeats", type=int, default=9, help="timed training steps per model (medians)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))

    from cspnet.bench import DEFAULT_MODELS, BenchConfig, report_json_path, run_benchmarks, to_markdown, write_report

    if args.out:
        try:
            report_json_path(args.out)  # refused now, not after a run of many minutes
        except ValueError as e:
            p.error(str(e))

    config = BenchConfig(
        models=DEFAULT_MODELS, input_size=224, batch_sizes=(1, 8), train_batch=8,
        train_formats=("contiguous", "channels_last"), threads=args.threads, repeats=args.repeats,
        train_repeats=args.train_repeats, deploy=False, onnx=False, memory=False,
    )
    report = run_benchmarks(config)
    report.env["command"] = " ".join([".venv/bin/python benchmarks/foundation_speed.py", *(argv if argv is not None else sys.argv[1:])])
    print(to_markdown(report))
    if args.out:
        print(f"wrote {write_report(report, args.out, title='Foundation speed: ours vs timm')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
