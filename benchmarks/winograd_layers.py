"""Per-layer speed of Winograd against the direct oneDNN kernel, for every 3x3 stride-1 conv shape
of darknet53, cspdarknet53 and cspresnet50 at 224 px; the evidence for the rules in
`cspnet.winograd` (MIN_WIDTH, MIN_ROWS, which algorithm for which map size).

Each layer is a folded conv + bias + LeakyReLU run as deploy runs it (`OneDnnConvAct`, weights
pre-packed), against `WinogradConvAct.run` with each algorithm whose tile divides the map.
Interleaved medians, 2 threads. The first call of each shape compiles the transforms.

    .venv/bin/python benchmarks/winograd_layers.py [--out docs/winograd_layers.md] [--repeats 15]
"""
from __future__ import annotations

import argparse
import os
import sys

# (in channels, out channels, map side): the 3x3 stride-1 convs of the three networks at 224 px.
LAYERS = [
    (32, 64, 112), (64, 64, 56), (64, 128, 56), (128, 128, 28), (128, 256, 28),
    (256, 256, 14), (256, 512, 14), (512, 512, 7), (512, 1024, 7),
]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="also write the Markdown table here")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))

    import statistics

    import torch
    from torch import nn
    from tqdm import tqdm

    from cspnet.bench import Clock, run_interleaved
    from cspnet.export import ConvAct, OneDnnConvAct, keep_freed_memory
    from cspnet.winograd import F2x2, F4x4, WinogradConvAct, choose_algorithm, wide_enough

    torch.set_num_threads(args.threads)
    keep_freed_memory()
    clock = Clock(torch.device("cpu"))
    lines = [
        "| batch | layer | map | C·K/(C+K) | direct ms | F(2x2) ms | F(4x4) ms | F(2x2) × | F(4x4) × | rules pick |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for batch in args.batch_sizes:
        for c, k, side in tqdm(LAYERS, desc=f"batch {batch}"):
            torch.manual_seed(0)
            direct = OneDnnConvAct(ConvAct(nn.Conv2d(c, k, 3, padding=1), nn.LeakyReLU(0.1)), ("leaky_relu", [0.1]))
            layer = WinogradConvAct(direct)
            x = torch.randn(batch, c, side, side).contiguous(memory_format=torch.channels_last)
            fns = {"direct": lambda: direct(x)}
            for algorithm in (F2x2, F4x4):
                if side % algorithm.step == 0:
                    fns[algorithm.name] = lambda a=algorithm: layer.run(x, a)
            with torch.inference_mode():
                samples = run_interleaved(fns, warmup=2, repeats=args.repeats, clock=clock)
            ms = {key: statistics.median(v) for key, v in samples.items()}
            cell = lambda key: f"{ms[key]:.2f}" if key in ms else "—"  # noqa: E731
            ratio = lambda key: f"{ms['direct'] / ms[key]:.2f}×" if key in ms else "—"  # noqa: E731
            chosen = choose_algorithm(batch, side, side) if wide_enough(c, k) else None
            lines.append(
                f"| {batch} | {c}→{k} | {side}² | {c * k / (c + k):.0f} | {ms['direct']:.2f} | {cell(F2x2.name)} | "
                f"{cell(F4x4.name)} | {ratio(F2x2.name)} | {ratio(F4x4.name)} | {chosen.name if chosen else 'direct'} |"
            )
    table = "\n".join(lines)
    print(table)
    if args.out:
        command = " ".join([".venv/bin/python benchmarks/winograd_layers.py", *(argv if argv is not None else sys.argv[1:])])
        text = (f"# Winograd per layer\n\nMeasured with `{command}` ({torch.__version__}, {args.threads} threads). "
                "× = direct time / Winograd time; the last column is what `deploy(winograd=True)` runs.\n\n" + table + "\n")
        with open(args.out, "w") as f:
            f.write(text)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
