"""``cspnet analyze gradients|layers``: check the paper's gradient-duplication and bottleneck claims."""
from __future__ import annotations

from .argtypes import BATCH_STATISTICS, NON_NEGATIVE_INT, POSITIVE, POSITIVE_INT

MODULE_HELP = "gradient duplication per stage, per-layer BFLOPs / CIO (paper §3.1, Fig. 7)"


def register(sub) -> None:
    p = sub.add_parser("analyze", help=MODULE_HELP)
    kinds = p.add_subparsers(dest="kind", required=True)

    g = kinds.add_parser("gradients", help="path duplication and update overlap per stage, a model beside its twin")
    g.add_argument("model", help="registered model name, or a run directory written by cspnet train / ablation")
    g.add_argument("--out", required=True, help="output directory (gradients.md/.json, gradients_stage<i>.png)")
    g.add_argument("--twin", default="auto",
                   help="model to compare with: auto (the registered twin; none for a run directory), none, a name or a run directory")
    g.add_argument("--data", default=None, help="fashion-mnist, digits or an ImageFolder directory (default: the run's data, else digits)")
    g.add_argument("--img-size", type=POSITIVE_INT, default=None, help="input size (default: the run's, else 64)")
    g.add_argument("--in-chans", type=int, choices=(1, 3), default=None, help="image folders: 1 or 3 channels")
    g.add_argument("--batch", type=BATCH_STATISTICS, default=32, help="images in the analysed batch (class-balanced, from the training split)")
    g.add_argument("--width", type=POSITIVE, default=1.0, help="channel multiplier for registered models")
    g.add_argument("--model-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for registered models; fusion=... applies to MODEL only (the twin keeps its own)")
    g.add_argument("--checkpoint", default=None, help="which checkpoint of a run directory: best or last (default: best if any)")
    g.add_argument("--seed", type=NON_NEGATIVE_INT, default=0, help="seed of the batch selection")
    g.set_defaults(func=run_gradients)

    lay = kinds.add_parser("layers", help="BFLOPs and CIO of every layer along the depth, a model beside its twin (Fig. 7)")
    lay.add_argument("model", help="registered model name")
    lay.add_argument("--out", required=True, help="output directory (layers.png/.md/.json)")
    lay.add_argument("--twin", default="auto", help="auto (the registered twin), none, or a model name")
    lay.add_argument("--input-size", type=POSITIVE_INT, default=None, help="square input size (default: the model's)")
    lay.add_argument("--in-chans", type=POSITIVE_INT, default=3)
    lay.set_defaults(func=run_layers)


def run_gradients(args) -> int:
    from ..analysis.gradients import analyze_gradients, format_gradient_table, gradient_subjects
    from .train import model_opts

    models, batches, labels = gradient_subjects(
        args.model, args.twin, data=args.data, img_size=args.img_size, in_chans=args.in_chans, batch=args.batch,
        width=args.width, options=model_opts(args.model_opt), checkpoint=args.checkpoint, seed=args.seed)
    reports = analyze_gradients(models, batches, labels, args.out)
    print(format_gradient_table(reports))
    print(f"wrote {args.out}/gradients.md, gradients.json and {max(len(r.stages) for r in reports)} heat maps")
    return 0


def run_layers(args) -> int:
    from ..analysis.layers import analyze_layers, format_layer_report

    twin = None if args.twin == "none" else args.twin
    summaries = analyze_layers(args.model, args.out, input_size=args.input_size, twin=twin, in_chans=args.in_chans)
    print(format_layer_report(summaries, top=3))
    print(f"wrote {args.out}/layers.png, layers.md, layers.json")
    return 0
