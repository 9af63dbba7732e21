"""The ``cspnet`` command line: one sub-command module per area, each calling the library."""
from __future__ import annotations

import argparse
import sys

from . import convert as convert_cmd
from . import models as models_cmd

COMMANDS = (models_cmd, convert_cmd,)


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
    except ValueError as e:  # bad user input: say what is wrong, no traceback
        print(f"cspnet {args.command}: error: {e}", file=sys.stderr)
        return 2
