"""``cspnet train``, ``cspnet eval``, ``cspnet predict`` and ``cspnet compare``: classification training,
evaluation and inference, and the main job."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..files import atomic_write_text
from .argtypes import EMA_DECAY, FRACTION, NON_NEGATIVE, NON_NEGATIVE_INT, POSITIVE, POSITIVE_INT



def _json_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def model_opts(pairs: list[str]) -> dict:
    """``--model-opt KEY=VALUE`` pairs as config overrides; values are parsed as JSON where they can be."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--model-opt expects KEY=VALUE, got {pair!r}")
        out[key] = _json_value(value)
    return out


def add_data_args(p: argparse.ArgumentParser, default: str | None = "fashion-mnist") -> None:
    p.add_argument("--data", default=default, required=default is None,
                   help="fashion-mnist, digits, or an ImageFolder directory (root/<class>/<image>, optionally train/ + val/)")
    p.add_argument("--img-size", type=POSITIVE_INT, default=None, help="square input size (default 32; eval: the checkpoint's)")
    p.add_argument("--in-chans", type=int, choices=(1, 3), default=None, help="image folders: 1 (grey) or 3 (RGB, default)")
    p.add_argument("--train-limit", type=int, default=None, help="use a class-balanced subset of this many training images")
    p.add_argument("--test-limit", type=int, default=None, help="use a class-balanced subset of this many test images")
    p.add_argument("--val-fraction", type=float, default=None,
                   help="image folders without train/ + val/: held-out share (default 0.1; eval: the run's on its own "
                        "folder, 1.0 = every image on another)")
    p.add_argument("--skip-corrupt", action="store_true", help="leave out (and count) unreadable images instead of failing")
    p.add_argument("--workers", type=NON_NEGATIVE_INT, default=0, help="DataLoader worker processes (image folders)")


def add_recipe_args(p: argparse.ArgumentParser, *, epochs: int, batch_size: int, lr: float) -> None:
    g = p.add_argument_group("recipe")
    g.add_argument("--epochs", type=POSITIVE_INT, default=epochs)
    g.add_argument("--batch-size", type=POSITIVE_INT, default=batch_size, help="global batch per optimizer step (all processes)")
    g.add_argument("--accum-steps", type=POSITIVE_INT, default=1, help="gradient accumulation: chunks per process and step")
    g.add_argument("--seed", type=NON_NEGATIVE_INT, default=0)
    g.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd")
    g.add_argument("--lr", type=POSITIVE, default=lr)
    g.add_argument("--momentum", type=FRACTION, default=0.9)
    g.add_argument("--no-nesterov", action="store_true", help="plain momentum instead of Nesterov's")
    g.add_argument("--weight-decay", type=NON_NEGATIVE, default=5e-4, help="on conv/linear weights only, not BN or biases")
    g.add_argument("--schedule", choices=("cosine", "step", "poly", "constant"), default="cosine")
    g.add_argument("--burn-in", type=NON_NEGATIVE_INT, default=None, help="warm-up optimizer steps (Darknet burn_in); default: 1/3 epoch")
    g.add_argument("--poly-power", type=POSITIVE, default=4.0)
    g.add_argument("--label-smoothing", type=FRACTION, default=0.1)
    g.add_argument("--mixup", type=NON_NEGATIVE, default=0.0, help="mixup Beta(alpha, alpha); 0 = off")
    g.add_argument("--cutmix", type=NON_NEGATIVE, default=0.0, help="cutmix Beta(alpha, alpha); 0 = off")
    g.add_argument("--translate", type=NON_NEGATIVE_INT, default=2, help="random shift of up to this many pixels")
    g.add_argument("--no-hflip", action="store_true", help="never flip images horizontally")
    g.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none", help="mixed precision (bf16 on CPU)")
    g.add_argument("--ema", type=EMA_DECAY, default=0.0, help="EMA decay of the weights (e.g. 0.999); 0 = off")
    g.add_argument("--grad-clip", type=NON_NEGATIVE, default=0.0, help="clip the gradient norm to this; 0 = off")
    g.add_argument("--memory-efficient", action="store_true",
                   help="keep one map per conv layer for backward and recompute the activation (about half the activation memory)")
    g.add_argument("--threads", type=POSITIVE_INT, default=None, help="torch CPU threads (default: torch's choice)")
    g.add_argument("--device", default="auto", help="auto, cpu or cuda")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")


def register(sub) -> None:
    p = sub.add_parser("train", help="train a classifier (torchrun-ready for DDP)")
    p.add_argument("--model", required=True, help="registered model name (cspnet models)")
    p.add_argument("--width", type=POSITIVE, default=1.0, help="scale every channel count of the model by this")
    p.add_argument("--model-opt", action="append", default=[], metavar="KEY=VALUE", help="override a config field, e.g. act=mish")
    p.add_argument("--pretrained", default=None, metavar="FILE",
                   help="start from these weights (.safetensors, e.g. from cspnet convert / darknet convert, or a .pth read "
                        "with weights_only); a classifier for another class count starts fresh, an RGB stem is summed for grey data")
    p.add_argument("--out", required=True, help="run directory: checkpoints, metrics.csv, curves.png")
    p.add_argument("--resume", action="store_true", help="continue the run in --out exactly where it stopped")
    p.add_argument("--checkpoint-every", type=NON_NEGATIVE_INT, default=0, help="also checkpoint every N optimizer steps")
    p.add_argument("--tensorboard", action="store_true", help="also log to OUT/tensorboard (if tensorboard is installed)")
    add_data_args(p)
    add_recipe_args(p, epochs=10, batch_size=128, lr=0.1)
    p.set_defaults(func=run_train)

    p = sub.add_parser("eval", help="evaluate a checkpoint: top-1, top-5, per-class accuracy, confusion matrix (JSON)")
    p.add_argument("--checkpoint", required=True, help="run directory written by cspnet train")
    p.add_argument("--name", default="last", help="which checkpoint: last or best")
    add_weights_args(p)
    p.add_argument("--num-classes", type=POSITIVE_INT, default=None, help="build the model with this many classes (default: the checkpoint's)")
    p.add_argument("--batch-size", type=POSITIVE_INT, default=256)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=POSITIVE_INT, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json-out", default=None, help="also write the JSON to this file")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_data_args(p, default=None)
    p.set_defaults(func=run_eval)

    p = sub.add_parser("predict", help="classify image files with a trained run: top-k classes and probabilities (JSON)")
    p.add_argument("images", nargs="+", help="image files, or folders (searched recursively)")
    p.add_argument("--checkpoint", required=True, help="run directory written by cspnet train")
    p.add_argument("--name", default="last", help="which checkpoint: last or best")
    add_weights_args(p)
    p.add_argument("--topk", type=int, default=5, help="classes listed per image (at most the model's)")
    p.add_argument("--batch-size", type=POSITIVE_INT, default=64)
    p.add_argument("--skip-corrupt", action="store_true", help="leave out (and name) unreadable images instead of failing")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=POSITIVE_INT, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json-out", default=None, help="also write the JSON to this file")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_predict)

    p = sub.add_parser("compare", help="the main job: a CSP model vs its plain twin on Fashion-MNIST (report + plots)")
    from ..compare import DEFAULTS

    p.add_argument("--models", default=",".join(DEFAULTS.models), help="CSP model and its twin, comma-separated")
    p.add_argument("--width", type=POSITIVE, default=DEFAULTS.width, help="channel multiplier for both models")
    p.add_argument("--out", default="runs/compare", help="report directory")
    p.add_argument("--jobs", type=POSITIVE_INT, default=DEFAULTS.jobs, help="models trained at once, each in its own process (default: 2 if 2+ CPUs)")
    p.add_argument("--bench-batch", type=POSITIVE_INT, default=DEFAULTS.bench_batch, help="batch for throughput / memory")
    p.add_argument("--bench-seconds", type=POSITIVE, default=2.0, help="time each throughput measurement at least this long")
    add_data_args(p)
    add_recipe_args(p, epochs=DEFAULTS.epochs, batch_size=DEFAULTS.batch_size, lr=DEFAULTS.lr)
    p.set_defaults(func=run_compare)


def add_weights_args(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--ema", action="store_true",
                   help="the EMA weights (default when the run kept an EMA: the weights its metrics were scored with)")
    g.add_argument("--raw-weights", action="store_true", help="the raw weights of a run that kept an EMA")


def weights_choice(args) -> bool | None:
    """`load_classifier`'s ``ema``: True (--ema), False (--raw-weights), None (the EMA when the run has one)."""
    return True if args.ema else False if args.raw_weights else None


def build_recipe(args, n_train: int):
    """``(TrainConfig, ClassifyRecipe)`` from the `add_recipe_args` / `add_data_args` options."""
    from ..engine.classify import ClassifyRecipe
    from ..engine.train import TrainConfig

    burn_in = args.burn_in if args.burn_in is not None else max(1, n_train // args.batch_size // 3)
    cfg = TrainConfig(
        epochs=args.epochs, batch_size=args.batch_size, accum_steps=args.accum_steps, optimizer=args.optimizer,
        lr=args.lr, momentum=args.momentum, nesterov=not args.no_nesterov, weight_decay=args.weight_decay,
        schedule=args.schedule, burn_in=burn_in, poly_power=args.poly_power, amp=args.amp, ema_decay=args.ema,
        grad_clip=args.grad_clip, seed=args.seed, checkpoint_every=getattr(args, "checkpoint_every", 0),
        num_workers=args.workers, memory_efficient=args.memory_efficient,
    )
    recipe = ClassifyRecipe(translate=args.translate, hflip=False if args.no_hflip else None, mixup=args.mixup,
                            cutmix=args.cutmix, label_smoothing=args.label_smoothing, num_workers=args.workers)
    return cfg, recipe


def _load_data(args, img_size: int):
    """The dataset; its split and subsets use a fixed seed (0), so every run and eval sees the same images."""
    from ..data import load_classification

    data = load_classification(args.data, img_size, in_chans=args.in_chans, train_limit=args.train_limit,
                               test_limit=args.test_limit, val_fraction=args.val_fraction,
                               skip_corrupt=args.skip_corrupt)
    if data.skipped:
        print(f"skipped {len(data.skipped)} corrupt image(s), e.g. {data.skipped[0]}", file=sys.stderr)
    if not len(data.train):
        raise ValueError(f"{args.data}: no training images (--val-fraction {args.val_fraction} holds out every image)")
    return data


def set_threads(args) -> None:
    """Apply ``--threads`` (torch CPU threads), if given."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)


def pretrained_statistics(path: str, in_chans: int) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """The input mean and std a weights file's metadata records (`cspnet convert`, `cspnet darknet convert`),
    or a training run's record beside its checkpoint weights (``RUN/last.safetensors``), for ``in_chans``
    channels; None when there are none (a .pth).

    RGB statistics for grey data are the colour channels' average, as the first conv is summed over
    them; grey ones for RGB data are repeated, as the conv is spread over three channels.
    """
    from ..engine.checkpoint import run_beside_weights
    from ..weights import WeightsError, is_torch_save_file, read_metadata

    meta = {} if is_torch_save_file(Path(path)) else read_metadata(path)
    run = run_beside_weights(path, meta)
    mean, std = (run["data"].get("mean"), run["data"].get("std")) if run is not None else (meta.get("mean"), meta.get("std"))
    if mean is None and std is None:
        return None
    numbers = all(isinstance(v, (list, tuple)) and len(v) in (1, 3) and all(isinstance(x, (int, float)) for x in v)
                  for v in (mean, std))
    if not numbers or len(mean) != len(std) or min(std) <= 0:
        raise WeightsError(f"{path}: metadata 'mean' {mean!r} / 'std' {std!r} are not one or three numbers "
                           "each, with every std above 0")
    if len(mean) != in_chans:
        mean, std = ([sum(mean) / 3], [sum(std) / 3]) if in_chans == 1 else (mean * 3, std * 3)
    return tuple(map(float, mean)), tuple(map(float, std))


def _other_epochs_hint(out_dir: str, epochs: int) -> str | None:
    """How to get what ``--resume --epochs`` asked of the run in ``out_dir`` when it was made for another
    epoch count (None when the epoch counts agree): the count sets the learning-rate schedule, so a
    run cannot be lengthened, but its weights can start a new one."""
    from ..engine.checkpoint import read_checkpoint_record

    state = read_checkpoint_record(out_dir)["state"]
    planned = state["train_config"]["epochs"]
    if planned == epochs:
        return None
    further = (f"to train its weights further, start a new run from them: --pretrained "
               f"{Path(out_dir) / 'last.safetensors'} --out NEW_DIR --epochs {epochs}")
    if state["epoch"] < planned:
        return f"--resume --epochs {planned} finishes the run; or, {further}"
    return f"the run finished its {planned} epochs (the epoch count sets its learning-rate schedule); {further}"


def run_train(args) -> int:
    from ..engine.checkpoint import CheckpointError, check_run_dir, read_checkpoint_record
    from ..engine.classify import ClassificationTask
    from ..engine.distributed import cleanup, init_distributed
    from ..engine.models import model_record, rebuild_model
    from ..engine.train import fit
    from ..weights import load_pretrained

    check_run_dir(args.out, args.resume)  # before the data is loaded, so a refusal comes at once
    set_threads(args)
    dist = init_distributed(args.device)
    try:
        data = _load_data(args, args.img_size or 32)
        cfg, recipe = build_recipe(args, len(data.train))
        record = model_record(args.model, num_classes=data.num_classes, in_chans=data.in_chans, width=args.width,
                              options=model_opts(args.model_opt))
        model = rebuild_model(record, seed=args.seed)
        statistics, pretrained = "the data's own", args.pretrained
        if args.resume:
            # a resumed run takes its weights from its checkpoint, and the statistics of the file it started
            # from from its record (with or without --pretrained: the file is not read again)
            started = read_checkpoint_record(args.out)["state"].get("run", {})
            pretrained = started.get("pretrained")
            if pretrained is not None:
                data.mean, data.std = tuple(started["data"]["mean"]), tuple(started["data"]["std"])
                statistics = f"the run's, as it started from {pretrained}"
        elif pretrained:
            adapted = load_pretrained(model, pretrained, finetune=True)
            for line in adapted if dist.is_main else ():
                print(f"{pretrained}: {line}", file=sys.stderr)
            recorded = pretrained_statistics(pretrained, data.in_chans)
            if recorded is not None:  # the inputs the weights were trained on (Darknet's: [0, 1], mean 0, std 1)
                data.mean, data.std = recorded
                statistics = f"recorded in {pretrained}"
        if dist.is_main:
            print(f"normalising inputs with mean {list(data.mean)}, std {list(data.std)} ({statistics})", file=sys.stderr)
        run_info = {"model": record, "data": data.describe(), "recipe": recipe.__dict__}
        if pretrained:
            run_info["pretrained"] = str(pretrained)
        try:
            result = fit(ClassificationTask(data, recipe), model, cfg, args.out, dist=dist, resume=args.resume,
                         progress=not args.no_progress, tensorboard=args.tensorboard, run_info=run_info)
        except CheckpointError as e:
            hint = _other_epochs_hint(args.out, args.epochs) if args.resume else None
            if hint is None:
                raise
            raise CheckpointError(f"{e}; {hint}") from None
        if dist.is_main:
            final = {k: v for k, v in result.final.items() if k in ("top1", "top5", "loss")}
            print(json.dumps({"out": str(result.out_dir), **final, "wall_s": round(result.wall_s, 1),
                              "train_img_per_s": round(result.train_img_per_s, 1)}))
    finally:
        cleanup(dist)
    return 0


def run_eval(args) -> int:
    import torch

    from ..data import BUILTIN, load_classification
    from ..data.classification import HOLDOUT_RULE
    from ..engine.classify import evaluate_classifier, load_classifier
    from ..engine.distributed import DistInfo, resolve_device
    from ..export import fuse

    set_threads(args)
    model, run = load_classifier(args.checkpoint, args.name, ema=weights_choice(args), num_classes=args.num_classes)
    fuse(model)  # inference only: BatchNorms folded into their convs, faster, the same predictions
    trained = run["data"]
    img_size = args.img_size or trained["img_size"]
    # runs record a folder's absolute path (older runs the path as given, read here from the current directory)
    same_folder = args.data not in BUILTIN and Path(args.data).resolve() == Path(trained["name"]).resolve()
    # The run's own test split of a folder: the share it held out, or it scores images it trained on.
    holdout = trained.get("holdout") if same_folder else None
    if holdout is not None and trained.get("holdout_rule") != HOLDOUT_RULE:
        raise ValueError(f"the run held out {holdout} of {args.data} by another rule "
                         f"({trained.get('holdout_rule') or 'an older one, not recorded'}) "
                         f"than this version's ({HOLDOUT_RULE}): its test split would hold images the run trained on")
    if holdout is not None and args.val_fraction not in (None, holdout):
        raise ValueError(f"the run held out {holdout} of {args.data} for testing; --val-fraction {args.val_fraction} "
                         "would score images it was trained on")
    if holdout is not None:
        val_fraction = holdout
    elif args.data not in BUILTIN and not same_folder and args.val_fraction is None:
        val_fraction = 1.0  # the run never saw this folder: all of it is test data
    else:
        val_fraction = args.val_fraction
    in_chans = args.in_chans or (trained["in_chans"] if args.data not in BUILTIN else None)
    data = load_classification(args.data, img_size, in_chans=in_chans, test_limit=args.test_limit,
                               val_fraction=val_fraction, skip_corrupt=args.skip_corrupt)
    split = ("its test split" if data.holdout is None else "every image" if data.holdout == 1.0
             else f"the {data.holdout} held out")
    print(f"{args.data}: scoring {len(data.test)} image(s), {split}", file=sys.stderr)
    if data.num_classes != run["model"]["num_classes"]:
        raise ValueError(f"{args.data} has {data.num_classes} classes but the checkpoint's model has "
                         f"num_classes={run['model']['num_classes']} (trained on {trained['name']})")
    if data.classes != trained["classes"]:
        raise ValueError(f"{args.data} has classes {data.classes} but the run was trained on {trained['classes']} "
                         f"({trained['name']}): its outputs would be scored against the wrong labels")
    if data.in_chans != trained["in_chans"]:
        raise ValueError(f"{args.data} gives {data.in_chans}-channel images but the run was trained on "
                         f"{trained['in_chans']}-channel ones")
    data.mean, data.std = tuple(trained["mean"]), tuple(trained["std"])  # normalise as in training
    device = resolve_device(args.device)
    with torch.inference_mode():
        result = evaluate_classifier(model.to(device), data, DistInfo(device=device), batch_size=args.batch_size,
                                     progress=not args.no_progress)
    out = {"checkpoint": str(args.checkpoint), "name": args.name, "model": run["model"]["name"], "data": args.data,
           "split": split, "img_size": img_size, "ema": run["weights"] == "ema", **result}
    text = json.dumps(out, indent=1)
    print(text)  # first, so that the result is seen even if the file cannot be written
    if args.json_out:
        atomic_write_text(Path(args.json_out), text + "\n")
    return 0


def run_predict(args) -> int:
    from ..data.classification import image_files
    from ..engine.classify import classify_files, load_classifier
    from ..engine.distributed import resolve_device
    from ..export import fuse

    set_threads(args)
    paths = image_files(args.images)
    model, run = load_classifier(args.checkpoint, args.name, ema=weights_choice(args))
    fuse(model)  # inference only, as in eval
    rows, skipped = classify_files(model.to(resolve_device(args.device)), paths, run["data"], topk=args.topk,
                                   batch_size=args.batch_size, skip_corrupt=args.skip_corrupt,
                                   progress=not args.no_progress)
    for reason in skipped:
        print(f"skipped: {reason}", file=sys.stderr)
    out = {"checkpoint": str(args.checkpoint), "name": args.name, "model": run["model"]["name"], "ema": run["weights"] == "ema",
           "trained_on": run["data"]["name"], "images": len(rows), "skipped": skipped, "predictions": rows}
    text = json.dumps(out, indent=1)
    print(text)  # first, so that the result is seen even if the file cannot be written
    if args.json_out:
        atomic_write_text(Path(args.json_out), text + "\n")
    return 0


def run_compare(args) -> int:
    from ..compare import run_compare_models

    set_threads(args)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    data = _load_data(args, args.img_size or 32)
    cfg, recipe = build_recipe(args, len(data.train))
    report = run_compare_models(models, data, cfg, recipe, args.out, width=args.width, jobs=args.jobs, bench_batch=args.bench_batch,
                                bench_seconds=args.bench_seconds, device=args.device, progress=not args.no_progress,
                                command="cspnet " + " ".join(sys.argv[1:]))
    print(json.dumps({"report": str(Path(args.out) / "report.md"), "wall_s": round(report["wall_s"], 1),
                      "models": [{k: m[k] for k in ("name", "top1", "bflops")} for m in report["models"]]}))
    return 0
