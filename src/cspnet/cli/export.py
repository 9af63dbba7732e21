"""``cspnet export``: a model (or a detector on it), or the model of a training run, as ONNX, TorchScript or
safetensors."""
from __future__ import annotations

from pathlib import Path

import torch

from .argtypes import NON_NEGATIVE_INT, POSITIVE_INT
from .train import add_weights_args, weights_choice

SUFFIXES = {".onnx": "onnx", ".pt": "torchscript", ".ts": "torchscript", ".safetensors": "safetensors"}


def register(sub) -> None:
    p = sub.add_parser("export", help="export a model or a trained run as ONNX (dynamic batch), TorchScript or safetensors")
    p.add_argument("model", nargs="?", default=None, help="registered model name (see `cspnet models`)")
    p.add_argument("--checkpoint", metavar="RUN", default=None,
                   help="instead of MODEL: the trained model of a run directory (cspnet train or cspnet detect train), "
                        "with its width, options, channels, classes and input size")
    p.add_argument("--name", default=None, help="with --checkpoint: last or best (default: last; detection: best if any)")
    add_weights_args(p)  # with --checkpoint, classification: EMA (the default when kept) or raw weights
    p.add_argument("--format", choices=("onnx", "torchscript", "safetensors"), default=None,
                   help="default: from the --out suffix (.onnx, .pt/.ts, .safetensors)")
    p.add_argument("--out", required=True, help="output file")
    p.add_argument("--weights", default=None, help="weights to load first (.safetensors, or .pth read with weights_only)")
    p.add_argument("--detector", metavar="NECK", default=None,
                   help="export a detector with this neck on MODEL (fpn, panet, efm, …); its eval output, "
                        "the decoded boxes before NMS, is what gets exported")
    p.add_argument("--num-classes", type=NON_NEGATIVE_INT, default=None, help="classifier classes (default 1000) or detector classes (80)")
    p.add_argument("--input-size", type=POSITIVE_INT, default=None,
                   help="example input size for tracing (default: the size the run or the --weights file records, "
                        "else the model's; a detector's 416)")
    p.add_argument("--opset", type=int, default=17,
                   help="ONNX opset: 17 (default) up to the newest the installed onnx defines; above 20 the dynamo "
                        "exporter writes it")
    p.add_argument("--no-fuse", action="store_true", help="keep BatchNorm layers in ONNX / TorchScript graphs")
    p.add_argument("--no-check", action="store_true", help="skip running the export against PyTorch")
    p.set_defaults(func=run)


def _run_metadata(run: dict) -> dict:
    """What the exports of a training run's model record of it (`cspnet.export.export_record`): its classes,
    input size and normalisation, and a classifier's width and options (a detector's config holds its own)."""
    if "detector" in run:  # letterboxed RGB in [0, 1], not normalised: export_record adds the letterbox rule
        channels = run["detector"].get("in_chans", 3)
        return {"class_names": run["class_names"], "category_ids": run.get("category_ids"), "input_size": run["img_size"],
                "mean": [0.0] * channels, "std": [1.0] * channels}
    from ..export import CLASSIFIER_RESIZE_RECORD

    data, model = run["data"], run["model"]
    return {"class_names": data["classes"], "input_size": data["img_size"], "mean": data["mean"], "std": data["std"],
            "width": model["width"], "options": model["options"], **CLASSIFIER_RESIZE_RECORD}


def _weights_metadata(path: Path, meta: dict) -> dict:
    """What the exports of a weights file's model record of it: the training run's record when the file is a
    run's checkpoint weights (``RUN/best.safetensors`` beside ``RUN/best.json``, which carries the file's token),
    else the file's own description (`cspnet.export.descriptive_metadata`: a converted file's preprocessing)."""
    from ..engine.checkpoint import run_beside_weights
    from ..export import descriptive_metadata

    run = run_beside_weights(path, meta)
    return _run_metadata(run) if run is not None else descriptive_metadata(meta)


def _from_run(args):
    """The trained model of ``--checkpoint RUN`` and what its exports record of the run (`_run_metadata`)."""
    from ..engine.checkpoint import read_checkpoint_record

    clashing = [opt for opt, given in (("MODEL", args.model), ("--weights", args.weights), ("--detector", args.detector),
                                       ("--num-classes", args.num_classes is not None)) if given]
    if clashing:
        raise ValueError(f"--checkpoint takes the model from the run; drop {', '.join(clashing)}")
    record = read_checkpoint_record(args.checkpoint, args.name or "last")
    run = record["state"].get("run", {}) if isinstance(record["state"], dict) else {}
    if "detector" in run:
        from ..detection.train import load_detector

        if args.ema or args.raw_weights:
            raise ValueError("--ema / --raw-weights are for classification runs; a detection run's EMA weights are its weights")
        model, run = load_detector(args.checkpoint, args.name)
        return model, _run_metadata(run)
    from ..engine.classify import load_classifier

    model, run = load_classifier(args.checkpoint, args.name or "last", ema=weights_choice(args))
    return model, _run_metadata(run)


def _detector(args, path: Path | None, meta: dict):
    """The detector ``--detector NECK`` on MODEL; with ``--weights``, the one the file was saved from.

    A detector's anchors (k-means on its training set), strides and widths are not in its state
    dict: a cspnet weights file records them in its metadata, and the detector is rebuilt from
    there. The options given must agree with the file, field by field.
    """
    from ..detection import create_detector
    from ..detection.detector import Detector, DetectorCfg
    from ..weights import WeightsError, load_into, load_state

    state = load_state(path) if path else None
    name = f"{args.model}-{args.detector}"
    if meta.get("model") not in (None, name):
        raise WeightsError(f"{path}: holds weights of model {meta['model']!r} (metadata 'model'), not {name!r}")
    if isinstance(meta.get("config"), dict):
        cfg = DetectorCfg.from_dict(meta["config"])
        given = {"backbone": args.model, "neck": args.detector, "num_classes": args.num_classes}
        diffs = [f"{k}: file {getattr(cfg, k)!r} vs option {v!r}" for k, v in given.items()
                 if v is not None and getattr(cfg, k) != v]
        if diffs:
            raise WeightsError(f"{path}: made for another detector: " + "; ".join(diffs))
        model = Detector(cfg)
    else:  # no weights, or a file without cspnet metadata: the options' detector, default anchors
        kwargs = {} if args.num_classes is None else {"num_classes": args.num_classes}
        model = create_detector(args.model, args.detector, **kwargs)
    if state is not None:
        load_into(model, state, source=str(path))
    return model


def _recorded_model(args, path: Path, meta: dict):
    """The classifier a cspnet weights file records (`cspnet.weights.load_model`), which must be MODEL's, with
    --num-classes if given; --num-classes 0 exports its pooled features (the classifier dropped)."""
    from ..weights import WeightsError, load_model

    if meta.get("model") != args.model:
        raise WeightsError(f"{path}: holds weights of model {meta.get('model')!r} (metadata 'model'), not {args.model!r}")
    if args.num_classes not in (None, 0, meta.get("num_classes")):
        raise WeightsError(f"{path}: made for another model: num_classes: file {meta.get('num_classes')!r} vs option "
                           f"{args.num_classes!r}")
    model = load_model(path)
    if args.num_classes == 0:
        model.reset_classifier(0)
    return model


def _build(args):
    """The model to export, its input size, and what its exports record beyond the model itself: the
    training run's classes, input size and normalisation, or a weights file's (`_weights_metadata`)."""
    from ..registry import create_model, get_spec
    from ..darknet.weights import is_darknet_weights
    from ..weights import is_torch_save_file, read_metadata

    if args.checkpoint:
        model, metadata = _from_run(args)
        return model, args.input_size or metadata["input_size"], metadata
    if args.model is None:
        raise ValueError("give a registered MODEL or --checkpoint RUN")
    if args.name or args.ema or args.raw_weights:
        raise ValueError("--name, --ema and --raw-weights go with --checkpoint RUN")
    spec = get_spec(args.model)
    path = Path(args.weights) if args.weights else None
    # a missing file is named by the weights loader below
    has_metadata = path and path.is_file() and not is_torch_save_file(path) and not is_darknet_weights(path)
    meta = read_metadata(path) if has_metadata else {}
    metadata = _weights_metadata(path, meta) if path else {}
    if args.detector:
        return _detector(args, path, meta), args.input_size or metadata.get("input_size", 416), metadata
    if isinstance(meta.get("config"), dict):  # a cspnet file: the model it records, whatever its width or options
        model = _recorded_model(args, path, meta)
    else:
        kwargs = {} if args.num_classes is None else {"num_classes": args.num_classes}
        model = create_model(args.model, pretrained=args.weights, **kwargs) if args.weights else create_model(args.model, **kwargs)
    return model, args.input_size or metadata.get("input_size", spec.default_input), metadata


def _check(fmt: str, path: Path, model, input_size: int | list[int]) -> float:
    """Largest |export - PyTorch| over the outputs, relative to the output scale, at batch 2."""
    from ..export import load_torchscript, onnx_session, run_onnx

    model.eval()
    height, width = (input_size, input_size) if isinstance(input_size, int) else input_size
    x = torch.randn(2, getattr(model, "in_chans", 3), height, width)
    with torch.no_grad():
        ref = model(x)
        refs = [ref] if isinstance(ref, torch.Tensor) else list(ref)
        if fmt == "onnx":
            outs = run_onnx(onnx_session(path), x)
        else:
            out = load_torchscript(path)(x)
            outs = [out] if isinstance(out, torch.Tensor) else list(out)
    return max(float((o - r).abs().max() / r.abs().max().clamp_min(1e-12)) for o, r in zip(outs, refs))


def run(args) -> int:
    from ..export import export, onnx_opset

    out = Path(args.out)
    fmt = args.format or SUFFIXES.get(out.suffix)
    if fmt is None:
        raise ValueError(f"cannot tell the format from {out.name!r}; give --format onnx|torchscript|safetensors")
    if SUFFIXES.get(out.suffix, fmt) != fmt:
        raise ValueError(f"--out {out.name} names a {SUFFIXES[out.suffix]} file, but --format is {fmt}; "
                         f"name the file for its format ({', '.join(s for s, f in SUFFIXES.items() if f == fmt)})")
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder; give the path of the file to write")
    model, input_size, metadata = _build(args)
    model.eval()
    kwargs = {"metadata": metadata}
    if fmt == "onnx":
        kwargs.update(opset=args.opset, fused=not args.no_fuse)
    elif fmt == "torchscript":
        kwargs.update(fused=not args.no_fuse)
    path = export(model, out, fmt, input_size, **kwargs)
    kind = f"onnx opset {onnx_opset(path)}" if fmt == "onnx" else fmt
    line = f"wrote {path} ({kind}, {path.stat().st_size / 1e6:.1f} MB)"
    if fmt != "safetensors" and not args.no_check:
        err = _check(fmt, path, model, input_size)
        line += f"; max |export - torch| / output scale at batch 2: {err:.1e}"
    print(line)
    return 0
