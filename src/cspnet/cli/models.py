"""``cspnet models``: every model with its measured figures beside the paper's."""
from __future__ import annotations

import json

from ..files import atomic_write_text
from ..modeltable import model_rows, models_markdown, models_page, update_readme


def register(sub) -> None:
    p = sub.add_parser("models", help="list models with measured params/BFLOPs beside the paper's")
    p.add_argument("pattern", nargs="?", default="*", help="shell-style name pattern")
    p.add_argument("--input-size", type=int, default=None, help="profile at this size instead of the paper's")
    p.add_argument("--json", action="store_true", help="print JSON rows instead of a Markdown table")
    p.add_argument("--out", default=None, help="also write the tables as a Markdown page (docs/models.md)")
    p.add_argument("--readme", default=None,
                   help="also replace the README's generated model-table block with the tables")
    p.set_defaults(func=run)


def run(args) -> int:
    if (args.out or args.readme) and (args.json or args.input_size is not None or args.pattern != "*"):
        raise ValueError("--out and --readme write the tables of every model at the paper's sizes; "
                         "drop the pattern, --json and --input-size")
    if args.json:
        rows = model_rows(args.pattern, args.input_size)
        print(json.dumps([{**r.__dict__, "matches_paper": r.matches_paper} for r in rows], indent=1))
        return 0
    tables = models_markdown(args.pattern, args.input_size)
    print(tables)
    if args.out:
        atomic_write_text(args.out, models_page(tables))
    if args.readme:
        update_readme(args.readme, tables)
    return 0
