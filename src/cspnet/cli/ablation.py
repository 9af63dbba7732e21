"""``cspnet ablation``: paper Table 1's γ / fusion ablation, trained on a built-in dataset or an ImageFolder."""
from __future__ import annotations

import sys
from pathlib import Path

from .argtypes import POSITIVE, POSITIVE_INT

MODULE_HELP = "train a family over γ and fusion (+ the plain model); write Table 1's layout and a scatter plot"


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"--gammas expects comma-separated numbers, got {text!r}") from None


def register(sub) -> None:
    from ..analysis.ablation import ABLATION_FUSIONS, ABLATION_GAMMAS, TABLE1_FAMILY
    from .train import add_data_args, add_recipe_args

    p = sub.add_parser("ablation", help=MODULE_HELP)
    p.add_argument("--family", default=TABLE1_FAMILY,
                   help="CSP model with part_ratio / fusion options (default: the CSPPeleeNet of paper Table 1); "
                        "the plain row is the family without CSP (its plain twin of the same builder, else itself "
                        "with fusion none)")
    p.add_argument("--out", required=True, help="ablation directory (runs/<key>/, ablation.md/.json/.png); re-run to resume")
    p.add_argument("--gammas", default=",".join(f"{g:g}" for g in ABLATION_GAMMAS), help="part ratios γ, comma-separated")
    p.add_argument("--fusions", default=",".join(ABLATION_FUSIONS), help="fusions, comma-separated")
    p.add_argument("--no-plain", action="store_true", help="leave out the plain model")
    p.add_argument("--width", type=POSITIVE, default=1.0, help="channel multiplier for every model")
    p.add_argument("--model-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for every model, e.g. act=swish (not fusion / part_ratio)")
    p.add_argument("--paper-size", type=POSITIVE_INT, default=224, help="input size of the ImageNet-architecture BFLOPs column")
    add_data_args(p)
    add_recipe_args(p, epochs=10, batch_size=128, lr=0.1)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..analysis.ablation import run_ablation
    from ..data import load_classification
    from .train import build_recipe, model_opts, set_threads

    set_threads(args)
    fusions = tuple(f.strip() for f in args.fusions.split(",") if f.strip())
    # The split and subsets use a fixed seed, so every run of the ablation sees the same images.
    data = load_classification(args.data, args.img_size or 32, in_chans=args.in_chans, train_limit=args.train_limit,
                               test_limit=args.test_limit, val_fraction=args.val_fraction, skip_corrupt=args.skip_corrupt)
    cfg, recipe = build_recipe(args, len(data.train))
    rows = run_ablation(args.family, data, cfg, recipe, args.out, width=args.width, options=model_opts(args.model_opt), gammas=_floats(args.gammas),
                        fusions=fusions, include_plain=not args.no_plain, paper_size=args.paper_size,
                        progress=not args.no_progress)
    if rows:
        print((Path(args.out) / "ablation.md").read_text())
    else:
        print(f"no finished run in {args.out} yet: other processes are training every run", file=sys.stderr)
    print(f"{sum(r['status'] == 'skipped' for r in rows)} run(s) reused, {sum(r['status'] != 'skipped' for r in rows)} trained")
    return 0
