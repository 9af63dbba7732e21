"""The ``cspnet`` command line: one sub-command module per area, each calling the library."""
from __future__ import annotations

import argparse
import os
import sys

from . import ablation as ablation_cmd
from . import analyze as analyze_cmd
from . import bench as bench_cmd
from . import convert as convert_cmd
from . import darknet as darknet_cmd
from . import detect as detect_cmd
from . import export as export_cmd
from . import models as models_cmd
from . import train as train_cmd

COMMANDS = (models_cmd, convert_cmd, train_cmd, darknet_cmd, analyze_cmd, ablation_cmd, export_cmd, bench_cmd, detect_cmd)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cspnet", description="CSPNet models, training and tools")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:  # output piped into e.g. `head`, which has exited: nothing left to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit flush cannot fail again
        return 1
    except (ValueError, OSError) as e:  # bad input, a missing or unwritable file: say what is wrong, no traceback
        print(f"cspnet {args.command}: error: {e}", file=sys.stderr)
        return 2
