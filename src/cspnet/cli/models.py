"""``cspnet models``: every model with its measured figures beside the paper's."""
from __future__ import annotations

import json

from ..modeltable import format_markdown, model_rows


def register(sub) -> None:
    p = sub.add_parser("models", help="list models with measured params/BFLOPs beside the paper's")
    p.add_argument("pattern", nargs="?", default="*", help="shell-style name pattern")
    p.add_argument("--input-size", type=int, default=None, help="profile at this size instead of the paper's")
    p.add_argument("--json", action="store_true", help="print JSON rows instead of a Markdown table")
    p.set_defaults(func=run)


def run(args) -> int:
    rows = model_rows(args.pattern, args.input_size)
    if not rows:
        raise ValueError(f"no model matches {args.pattern!r}")
    if args.json:
        print(json.dumps([{**r.__dict__, "matches_paper": r.matches_paper} for r in rows], indent=1))
    else:
        print(format_markdown(rows))
    return 0
