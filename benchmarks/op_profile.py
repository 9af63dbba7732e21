"""Our training step beside timm's, operator by operator (torch.profiler), for identical networks.

    .venv/bin/python benchmarks/op_profile.py --out docs/training_ops.md
    .venv/bin/python benchmarks/op_profile.py cspdarknet53 --rounds 5

For each model, ours and timm's same-named model take turns: warm-up steps, then ``--rounds``
profiled training steps each (batch 8, 224 px, SGD with momentum), then ``--rounds`` plain steps
each timed with their minor page faults. The report lists how many times each ATen op ran (which
is deterministic: it says whether the two do the same work) and its median self CPU time per step
(which is not: on a shared machine only the counts and large gaps mean something).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import os
import resource
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("cspresnet50", "cspresnext50", "cspdarknet53", "darknet53")


def _profiled_ops(step) -> dict[str, tuple[float, int]]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    return {e.key: (e.self_cpu_time_total / 1e3, e.count) for e in prof.key_averages() if e.key.startswith("aten::")}


def _timed_with_faults(step) -> tuple[float, int]:
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    start = time.perf_counter()
    step()
    ms = (time.perf_counter() - start) * 1e3
    return ms, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults


def compare(name: str, rounds: int, batch: int, size: int, top: int) -> list[str]:
    import torch

    from cspnet.bench import build, sgd_train_step, timm_name

    torch.manual_seed(0)
    impls = {"ours": build("ours", name).train(), "timm": build("timm", timm_name(name)).train()}
    x, y = torch.randn(batch, 3, size, size), torch.randint(0, 1000, (batch,))
    steps = {impl: sgd_train_step(model, x, y) for impl, model in impls.items()}
    for step in steps.values():  # warm-up: kernel libraries, optimizer state, allocator
        step()
        step()
    ops: dict[str, list[dict[str, tuple[float, int]]]] = {impl: [] for impl in impls}
    timed: dict[str, list[tuple[float, int]]] = {impl: [] for impl in impls}
    for r in range(rounds):
        order = list(impls) if r % 2 == 0 else list(reversed(impls))
        for impl in order:
            ops[impl].append(_profiled_ops(steps[impl]))
    for r in range(rounds):
        order = list(impls) if r % 2 == 0 else list(reversed(impls))
        for impl in order:
            timed[impl].append(_timed_with_faults(steps[impl]))

    def count(impl: str, op: str) -> int:
        return ops[impl][0].get(op, (0.0, 0))[1]

    def self_ms(impl: str, op: str) -> float:
        return statistics.median(run.get(op, (0.0, 0))[0] for run in ops[impl])

    names = sorted(set(ops["ours"][0]) | set(ops["timm"][0]),
                   key=lambda op: -max(self_ms("ours", op), self_ms("timm", op)))
    differ = [op for op in names if count("ours", op) != count("timm", op)]
    total = {impl: statistics.median(sum(ms for ms, _ in run.values()) for run in ops[impl]) for impl in impls}
    wall = {impl: statistics.median(ms for ms, _ in timed[impl]) for impl in impls}
    faults = {impl: statistics.median(f for _, f in timed[impl]) for impl in impls}
    lines = [f"## {name} (timm `{timm_name(name)}`)", "",
             "| | ours | timm | ours × timm |", "|---|---:|---:|---:|",
             f"| ATen ops per step | {sum(c for _, c in ops['ours'][0].values()):,} | "
             f"{sum(c for _, c in ops['timm'][0].values()):,} | |",
             f"| ATen self CPU per step (ms, profiled) | {total['ours']:.0f} | {total['timm']:.0f} | "
             f"{total['timm'] / total['ours']:.2f}× |",
             f"| step wall time (ms, unprofiled) | {wall['ours']:.0f} | {wall['timm']:.0f} | "
             f"{wall['timm'] / wall['ours']:.2f}× |",
             f"| minor page faults per step | {faults['ours']:,.0f} | {faults['timm']:,.0f} | |", "",
             "Ops whose counts differ: " + (
                 ", ".join(f"`{op}` {count('ours', op)} vs {count('timm', op)}" for op in differ)
                 if differ else "none: the same ops, the same number of times."), "",
             f"| op (top {top} by self time) | ours calls | timm calls | ours ms | timm ms |", "|---|---:|---:|---:|---:|"]
    for op in names[:top]:
        lines.append(f"| `{op}` | {count('ours', op)} | {count('timm', op)} | "
                     f"{self_ms('ours', op):.1f} | {self_ms('timm', op):.1f} |")
    return lines + [""]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="*", default=list(MODELS))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--input-size", type=int, default=224)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--top", type=int, default=10)
    p.add_argument("--out", default=None, help="write the Markdown report here")
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error("--rounds must be >= 1")
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch
    from tqdm import tqdm

    from cspnet.bench import timm_available, timm_name

    if not timm_available():
        p.error("timm is not installed: this script compares with timm's models")
    unpaired = [m for m in args.models if not timm_name(m)]
    if unpaired:
        p.error(f"no timm counterpart for {unpaired} (see cspnet.bench.TIMM_EQUIVALENTS)")
    torch.set_num_threads(args.threads)
    command = " ".join([".venv/bin/python benchmarks/op_profile.py", *(argv if argv is not None else sys.argv[1:])])
    lines = ["# Training step, operator by operator: ours vs timm", "",
             f"`{command}` on {_dt.datetime.now().isoformat(timespec='seconds')}; torch {torch.__version__}, "
             f"{args.threads} threads, batch {args.batch}, {args.input_size}×{args.input_size}, SGD with momentum; "
             f"{args.rounds} profiled and {args.rounds} timed steps per model, ours and timm's taking turns; "
             f"load average at start {' / '.join(f'{v:.2f}' for v in os.getloadavg())}.", "",
             "Op counts are deterministic and say whether both implementations do the same work; times are medians "
             "on a shared machine, so only large gaps mean something. Page faults depend on what malloc kept from "
             "the steps before (the profiled ones included), not on the model alone.", ""]
    for name in tqdm(args.models, desc="models"):
        lines += compare(name, args.rounds, args.batch, args.input_size, args.top)
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
