"""``cspnet darknet info FILE.cfg`` and ``cspnet darknet convert FILE.cfg FILE.weights OUT.safetensors``."""
from __future__ import annotations

import json
import os

from ..darknet import convert_weights
from ..darknet.convert import CFG_NECK_WORDS, UNREAD_FILL_SEED
from ..darknet.info import format_table, summarize
from .argtypes import POSITIVE_INT


def register(sub) -> None:
    p = sub.add_parser("darknet", help="Darknet .cfg / .weights: layer table, conversion to safetensors")
    cmds = p.add_subparsers(dest="darknet_command", required=True)

    info = cmds.add_parser("info", help="per-layer table with output shapes, conv-weight params and BFLOPs "
                                              "(conv only, and Darknet's total with maxpool and shortcut layers)")
    info.add_argument("cfg", help="Darknet .cfg file")
    info.add_argument("--size", type=int, nargs="+", metavar=("H", "W"), default=None,
                      help="input size (default: the cfg's [net] width/height)")
    info.add_argument("--json", action="store_true", help="print JSON instead of the table")
    info.set_defaults(func=run_info)

    conv = cmds.add_parser(
        "convert", help="read Darknet .weights and write cspnet safetensors",
        description="If the cfg is a registered model's official cfg (or --model names one), the file holds "
                    "that native model's weights, with the cfg's class count (load with cspnet.create_model(NAME, "
                    "num_classes=K, in_chans=C, pretrained=OUT), as printed); "
                    "otherwise, or with --raw, the cfg-built network's (cspnet.darknet.load_model(CFG, OUT)). "
                    "A detector cfg (with [yolo] layers, e.g. csresnext50-panet-spp.cfg) becomes a native detector "
                    "with the cfg's anchors, classes and input size (and COCO's class names and category ids for 80 "
                    "classes): cspnet detect predict / eval --weights OUT run it, cspnet.weights.load_model(OUT) "
                    "rebuilds it.")
    conv.add_argument("cfg", help="Darknet .cfg file")
    conv.add_argument("weights", help="Darknet .weights file (or a partial file such as x.conv.104)")
    conv.add_argument("out", help="output .safetensors file")
    conv.add_argument("--model", default=None, help="registered model to convert into, a detector cfg's backbone "
                                                    "(default: found from the cfg name)")
    conv.add_argument("--neck", default=None, choices=tuple(CFG_NECK_WORDS.values()),
                      help="a detector cfg's neck (default: found from the cfg name: -panet-, -fpn-, -yolo-)")
    conv.add_argument("--raw", action="store_true", help="keep the cfg-built network's layout")
    conv.add_argument("--cutoff", type=POSITIVE_INT, default=None,
                      help="read only layers 0..N-1 (default: N from a .conv.N file name, else all)")
    conv.set_defaults(func=run_convert)


def _size(values: list[int] | None) -> tuple[int, int] | None:
    if values is None:
        return None
    if len(values) not in (1, 2) or min(values) < 1:
        raise ValueError(f"--size takes one or two positive numbers (H [W]), got {values}")
    return (values[0], values[-1])


def run_info(args) -> int:
    rows, prof, model = summarize(args.cfg, _size(args.size))
    if args.json:
        print(json.dumps({
            "cfg": os.path.basename(model.cfg_path),
            "input_size": list(model.input_size),
            "conv_params": prof.conv_params,
            "params": prof.params,
            "bflops": prof.bflops,
            "total_bflops": sum(r.bflops for r in rows),
            "layers": [{**r.__dict__, "detail": r.detail.strip()} for r in rows],
        }, indent=1))
    else:
        print(format_table(rows, prof, model))
    return 0


def run_convert(args) -> int:
    if not args.out.endswith(".safetensors"):
        raise ValueError(f"output {args.out!r} must be a .safetensors file")
    result = convert_weights(args.cfg, args.weights, args.out, model=args.model, neck=args.neck, raw=args.raw,
                             cutoff=args.cutoff)
    h = result.header
    kwargs = "".join(f"{k}={v}, " for k, v in result.model_kwargs.items())
    if result.detector:
        how = f"cspnet.weights.load_model({args.out!r}), or run it with cspnet detect predict --weights {args.out}"
    elif result.model:
        how = f"cspnet.create_model({result.model!r}, {kwargs}pretrained={args.out!r})"
    else:
        how = f"cspnet.darknet.load_model({args.cfg!r}, {args.out!r})"
    print(f"wrote {args.out}: {result.records} weighted layers from {args.weights} "
          f"(Darknet {h.major}.{h.minor}.{h.revision}, seen {h.seen}); load with {how}")
    if result.records < result.records_total:
        print(f"note: {args.weights} holds the first {result.records} of the {result.records_total} weighted layers; "
              f"the other {result.records_total - result.records} are written with their random initial values "
              f"(torch seed {UNREAD_FILL_SEED}), not trained weights")
    return 0
