"""Run the full benchmark suite and write docs/benchmarks.md (+ docs/benchmarks.json).

    .venv/bin/python benchmarks/run_all.py                 # cspresnet50, cspresnext50, cspdarknet53 + twins (~10 min quiet)
    .venv/bin/python benchmarks/run_all.py --controls      # also timm-layout twins of ours (exact architecture match)
    .venv/bin/python benchmarks/run_all.py --out /tmp/b.md --repeats 11

The hand-written reading guide and findings in benchmarks/NOTES.md are put before the tables.
Run it on a quiet machine: only ratios measured side by side in one run are meaningful, and
the report records the load average at the start and the end.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONTROLS = ("cspresnet50_timm", "cspresnext50_timm", "cspdarknet53_timm")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"))
    p.add_argument("--controls", action="store_true", help="also run our timm-layout models against timm")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))

    from cspnet.bench import DEFAULT_MODELS, BenchConfig, report_json_path, run_benchmarks, to_markdown, write_report

    try:
        report_json_path(args.out)  # refused now, not after a run of many minutes
    except ValueError as e:
        p.error(str(e))

    models = DEFAULT_MODELS + (CONTROLS if args.controls else ())
    config = BenchConfig(models=models, repeats=args.repeats, threads=args.threads, device=args.device)
    report = run_benchmarks(config)
    report.env["command"] = " ".join([".venv/bin/python benchmarks/run_all.py", *(argv if argv is not None else sys.argv[1:])])
    notes = (ROOT / "benchmarks" / "NOTES.md").read_text()
    path = write_report(report, args.out, title="Benchmarks: speed and memory", preamble=notes)
    print(to_markdown(report))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
