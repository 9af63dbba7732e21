"""``cspnet detect train|eval|predict|bench``: object detection on CSP backbones."""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path

from ..detection.necks import NECKS
from .argtypes import EMA_DECAY, FRACTION, NON_NEGATIVE, NON_NEGATIVE_INT, POSITIVE, POSITIVE_INT, PROBABILITY, checked
from .train import set_threads

MODULE_HELP = "object detection: train, evaluate (COCO AP), predict, and time detectors"


# the coarsest level has stride 32: decoding assumes the input divides by it
IMG_SIZE = checked(int, lambda v: v >= 32 and v % 32 == 0, "a positive multiple of 32")
SCENE_SIZE = checked(int, lambda v: v >= 32, "an integer >= 32")
# the finest of the three levels gets a quarter of it: at least 8 channels
NECK_WIDTH = checked(int, lambda v: v >= 32, "an integer >= 32")
IOU = checked(float, lambda v: 0 < v <= 1, "an IoU in (0, 1]")


_ANCHOR_SIZES = checked(lambda t: [float(v) for v in t.split(",")], lambda v: len(v) % 6 == 0 and all(0 < x < math.inf for x in v),
                        "auto, yolov3 or positive w,h pairs (w,h,w,h,…), the same number for each of the 3 levels")


def _anchor_spec(text: str):
    """``auto``, ``yolov3`` or ``w,h,w,h,…`` (positive pixel sizes, as ``(w, h)`` pairs, spread evenly
    over the three levels)."""
    if text in ("auto", "yolov3"):
        return text
    values = _ANCHOR_SIZES(text)
    return tuple(zip(values[::2], values[1::2]))


NECK_LIST = checked(lambda t: [n.strip() for n in t.split(",") if n.strip()], lambda v: v and set(v) <= set(NECKS),
                    f"a comma-separated list of {', '.join(NECKS)}")


def _add_data(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("--data", required=required, default=None,
                   help="scenes (generated), trees (deepforest photos), a COCO instances .json, a folder of VOC .xml, a Darknet "
                        ".data file, or YOLO labels (.txt beside each image, images/ -> labels/) of a .txt list or folder of images")
    p.add_argument("--images", default=None, help="image folder of a COCO / VOC --data (default: next to the annotations)")
    p.add_argument("--num-scenes", type=POSITIVE_INT, default=None, help="scenes: images per split (train 512, val 128)")
    p.add_argument("--scene-size", type=SCENE_SIZE, default=None, help="scenes: generated image size (default: --img-size)")


def _add_detector_source(p: argparse.ArgumentParser) -> None:
    """The detector to run: a training run's checkpoint or a detector weights file, exactly one."""
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--checkpoint", default=None, metavar="RUN_DIR", help="run directory written by cspnet detect train")
    which.add_argument("--weights", default=None, metavar="FILE",
                       help="a detector .safetensors file recording its input size and classes: an official Darknet "
                            "detector converted by cspnet darknet convert (e.g. csresnext50-panet-spp), or a run's "
                            "cspnet export --format safetensors")
    p.add_argument("--name", default=None, help="with --checkpoint: best or last (default: best if present)")


def _load_detector(args):
    """``(model, info)``: the detector of ``--checkpoint`` or ``--weights`` and what eval / predict read of it,
    its input size, class names and category ids (``img_size``, ``class_names``, ``category_ids``)."""
    from ..detection.train import load_detector, load_detector_file

    if args.checkpoint is not None:
        return load_detector(args.checkpoint, args.name)
    if args.name is not None:
        raise ValueError("--name picks a checkpoint of a run (--checkpoint RUN_DIR); --weights is one file")
    return load_detector_file(args.weights)


def register(sub) -> None:
    det = sub.add_parser("detect", help=MODULE_HELP)
    dsub = det.add_subparsers(dest="detect_command", required=True)

    p = dsub.add_parser("train", help="train a detector (checkpoints, resume, metrics and curves in --out)")
    p.add_argument("--model", required=True, help="backbone: a registered model name (cspnet models)")
    p.add_argument("--neck", default="panet", choices=NECKS)
    _add_data(p, required=True)
    p.add_argument("--val-data", default=None,
                   help="validation data (default: the val split of scenes / trees, a .data file's valid list; none for other files)")
    p.add_argument("--val-images", default=None, help="image folder of a COCO / VOC --val-data (default: next to its annotations)")
    p.add_argument("--img-size", type=IMG_SIZE, default=256, help="square input size, a multiple of 32")
    p.add_argument("--epochs", type=POSITIVE_INT, default=30)
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--resume", action="store_true", help="continue the run in --out where it stopped")
    p.add_argument("--checkpoint-every", type=NON_NEGATIVE_INT, default=0, help="also checkpoint every N optimizer steps")
    p.add_argument("--batch-size", type=POSITIVE_INT, default=16, help="global batch per optimizer step (all processes)")
    p.add_argument("--accum-steps", type=POSITIVE_INT, default=1, help="gradient accumulation: chunks per process and step")
    p.add_argument("--optimizer", choices=("sgd", "adamw"), default="adamw")
    p.add_argument("--lr", type=POSITIVE, default=2e-3)
    p.add_argument("--weight-decay", type=NON_NEGATIVE, default=5e-4)
    p.add_argument("--burn-in", type=NON_NEGATIVE_INT, default=100,
                   help="warm-up optimizer steps (default: 100; capped at half the run's steps, with a note)")
    p.add_argument("--ema", type=EMA_DECAY, default=0.999, help="EMA decay (0 = off); evaluation uses the EMA weights")
    p.add_argument("--seed", type=NON_NEGATIVE_INT, default=0)
    p.add_argument("--neck-width", type=NECK_WIDTH, default=None, help="neck channels at the coarsest level (cfg: 512)")
    p.add_argument("--backbone-width", type=POSITIVE, default=1.0, help="channel multiplier of the backbone")
    p.add_argument("--backbone-weights", default=None, metavar="FILE",
                   help="start the backbone from these weights: a .safetensors / .pth of the backbone model, or an official "
                        "Darknet .weights (whole, or a .conv.N cut) for its cfg")
    p.add_argument("--anchors", type=_anchor_spec, default="auto",
                   help="auto (k-means on the training boxes), yolov3 (the cfgs' COCO anchors) or w,h,w,h,...")
    p.add_argument("--box-loss", choices=("mse", "giou", "diou", "ciou"), default="ciou")
    p.add_argument("--label-smoothing", type=FRACTION, default=0.0)
    p.add_argument("--mosaic", type=PROBABILITY, default=0.5, help="probability of a 4-image mosaic")
    p.add_argument("--hflip", type=PROBABILITY, default=None,
                   help="horizontal flip probability (default: 0.5; 0 for scenes made of digits, which a mirror turns into other symbols)")
    p.add_argument("--vflip", type=PROBABILITY, default=None, help="vertical flip probability (default: 0.5 for trees, else 0)")
    p.add_argument("--no-augment", action="store_true", help="no augmentation at all")
    p.add_argument("--eval-every", type=POSITIVE_INT, default=1, help="evaluate every N epochs (and after the last)")
    p.add_argument("--workers", type=NON_NEGATIVE_INT, default=0,
                   help="DataLoader processes that load and augment the training images (the result does not depend on it)")
    p.add_argument("--memory-efficient", action="store_true",
                   help="keep one map per conv layer for backward and recompute the activation (cspnet.memory_efficient)")
    p.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none", help="mixed precision (bf16 on CPU or CUDA, fp16 on CUDA)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto (the GPU when there is one), cpu or cuda; under torchrun each process takes its local GPU")
    p.add_argument("--threads", type=POSITIVE_INT, default=None, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run_train)

    p = dsub.add_parser("eval", help="COCO AP / AP50 / AP75 / APs / APm / APl and per-class AP / AP50 of a checkpoint or "
                                     "weights file (JSON on stdout)")
    _add_detector_source(p)
    _add_data(p, required=False)
    p.add_argument("--split", choices=("train", "val"), default="val",
                   help="without --data: the run's validation (default) or training set; with --data scenes / trees / a Darknet "
                        ".data file: their split (--weights needs --data)")
    p.add_argument("--conf", type=PROBABILITY, default=0.001)
    p.add_argument("--iou", type=IOU, default=0.6)
    p.add_argument("--batch-size", type=POSITIVE_INT, default=16)
    p.add_argument("--json-out", default=None, metavar="FILE", help="also write the printed JSON to this file")
    p.add_argument("--results-out", default=None, metavar="FILE",
                   help="write the detections as a COCO results list (image_id, category_id, bbox, score)")
    p.set_defaults(func=run_eval)

    p = dsub.add_parser("predict", help="detect objects in images; write drawn images and detections.json")
    _add_detector_source(p)
    p.add_argument("images", nargs="+", help="image files, or folders (searched recursively)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--skip-corrupt", action="store_true",
                   help="leave out (and name) unreadable images instead of failing, as cspnet predict does")
    p.add_argument("--conf", type=PROBABILITY, default=0.25)
    p.add_argument("--iou", type=IOU, default=0.45)
    p.set_defaults(func=run_predict)

    p = dsub.add_parser("bench", help="per-image latency backbone / neck / head / NMS and BFLOPs per neck")
    p.add_argument("--model", default="cspresnet10", help="backbone")
    p.add_argument("--necks", type=NECK_LIST, default=list(NECKS), help=f"comma-separated (default: all, {','.join(NECKS)})")
    p.add_argument("--img-size", type=IMG_SIZE, default=416, help="square input size, a multiple of 32")
    p.add_argument("--neck-width", type=NECK_WIDTH, default=256, help="the same width for every neck, for a fair comparison")
    p.add_argument("--num-classes", type=POSITIVE_INT, default=80)
    p.add_argument("--runs", type=POSITIVE_INT, default=10)
    p.add_argument("--threads", type=POSITIVE_INT, default=None)
    p.add_argument("--json", action="store_true", help="JSON rows instead of a Markdown table")
    p.set_defaults(func=run_bench)


def _source_args(spec, split, images, args, img_size, seed, recorded=None) -> dict:
    """`load_detection_source` arguments for a data option. Scene options not given take those of
    ``recorded`` (the run's record of the same built-in set), else the split's defaults."""
    same = recorded if isinstance(recorded, dict) and recorded.get("spec") == spec else {}
    return {"spec": spec, "split": split, "images_dir": images,
            "num_scenes": args.num_scenes or same.get("num_scenes") or (512 if split == "train" else 128),
            "scene_size": args.scene_size or same.get("scene_size") or img_size, "seed": same.get("seed", seed)}


def _check_images(source, spec: str, which: str, option: str) -> None:
    """Every image file of a set exists: a cheap check before the run, not a failed read after an epoch."""
    from ..data.detection import AnnotationError

    for r in source.records:
        if r.path is not None and not Path(r.path).is_file():
            raise AnnotationError(f"{spec}: image {r.path} of the {which} set does not exist "
                                  f"(give the folder of its images with {option}; default: the annotation file's folder)")


def _report(source) -> None:
    r = source.report
    if r.clipped or r.dropped:
        where = f" (e.g. {', '.join(r.dropped_where[:3])})" if r.dropped_where else ""
        print(f"{source.description}: clipped {r.clipped} box(es) to the image, dropped {r.dropped} degenerate box(es){where}",
              file=sys.stderr)
    if r.unlabelled:
        print(f"{source.description}: {r.unlabelled} image(s) have no label file: read as negatives (no objects)", file=sys.stderr)


def _anchors(spec, data: str, records, img_size: int):
    """The detector's anchors for ``--anchors`` (parsed by `_anchor_spec`): None for the cfgs' own;
    ``auto`` fits them to the boxes trained on (not the crowd ones) of ``data``, at the input scale."""
    from ..detection.head import fit_anchors

    if spec == "yolov3":
        return None
    if spec == "auto":
        import numpy as np

        boxes = [r.boxes[~r.is_crowd()] * (img_size / max(r.width, r.height)) for r in records]
        boxes = np.concatenate([np.zeros((0, 4), np.float32), *boxes])
        try:
            return fit_anchors(boxes[:, 2:] - boxes[:, :2], 9)
        except ValueError as e:
            raise ValueError(f"{data}: {e} (--anchors auto; give --anchors yolov3 or w,h pairs)") from None
    return spec


def run_train(args) -> int:
    from ..engine.checkpoint import check_run_dir
    from ..engine.distributed import cleanup, init_distributed
    from ..engine.train import amp_context

    check_run_dir(args.out, args.resume)  # before the data is loaded, so a refusal comes at once
    set_threads(args)
    dist = init_distributed(args.device)  # a world of one, unless started by torchrun
    try:
        amp_context(args.amp, dist.device)  # refuses fp16 off CUDA now, not after the data is loaded
        return _train(args, dist)
    finally:
        cleanup(dist)


def _accept_unrecorded_augmentation(out: str, augment, data_record: dict) -> None:
    """Let a run written before its augmentation was recorded (no ``data.augment``) be resumed with the one it had.

    Those versions flipped horizontally with probability 0.5 (there was no --hflip) and took --mosaic / --vflip,
    recorded nowhere either, as given, or trained without augmentation (--no-augment): a resume with either is
    taken to continue the run. Another augmentation is refused, naming data.augment. An accepted resume is
    compared without ``augment``, as the checkpoint records the data (and its later checkpoints keep that record).
    """
    from ..data.detection import AugmentCfg
    from ..engine.checkpoint import CheckpointError, read_checkpoint_record

    then_data = (read_checkpoint_record(out)["state"].get("run") or {}).get("data")
    if not isinstance(then_data, dict) or "augment" in then_data:
        return
    if augment is not None and augment != AugmentCfg(mosaic=augment.mosaic, hflip=0.5, vflip=augment.vflip):
        raise CheckpointError(
            f"{Path(out) / 'last.json'}: data.augment: the run was written before its augmentation was recorded, when "
            f"horizontal flips had probability 0.5, but now it is {dataclasses.asdict(augment)}; resume with --hflip 0.5 "
            "(and the --mosaic / --vflip it was started with), or --no-augment if it was started with it"
        )
    del data_record["augment"]


def _train(args, dist) -> int:
    from ..data.detection import AugmentCfg, DetectionDataset, coco_ground_truth, has_validation_split, load_detection_source, source_record
    from ..detection import create_detector
    from ..detection.train import DetectRecipe, train_detector
    from ..engine.train import TrainConfig, seed_everything

    report = _report if dist.is_main else (lambda source: None)  # said once, not by every process
    train_args = _source_args(args.data, "train", args.images, args, args.img_size, args.seed)
    train_src = load_detection_source(**train_args)
    _check_images(train_src, args.data, "training", "--images")
    report(train_src)
    val_spec = args.val_data or (args.data if has_validation_split(args.data) else None)
    val_args = val_src = None
    if val_spec is not None:
        val_args = _source_args(val_spec, "val", args.val_images, args, args.img_size, args.seed)
        val_src = load_detection_source(**val_args, class_names=train_src.class_names)
        _check_images(val_src, val_spec, "validation", "--val-images")
        report(val_src)
        if val_src.class_names != train_src.class_names:
            raise ValueError(f"validation classes {list(val_src.class_names)} differ from training classes {list(train_src.class_names)}")
    if args.no_augment:
        augment = None
    else:
        hflip = args.hflip if args.hflip is not None else (0.5 if train_src.hflip else 0.0)
        vflip = args.vflip if args.vflip is not None else (0.5 if args.data == "trees" else 0.0)
        augment = AugmentCfg(mosaic=args.mosaic, hflip=hflip, vflip=vflip)
    train_set = DetectionDataset(train_src.records, train_src.class_names, args.img_size, augment, report=train_src.report)
    val_set = gt = None
    if val_src is not None:
        val_set = DetectionDataset(val_src.records, val_src.class_names, args.img_size, None, report=val_src.report)
        gt = coco_ground_truth(val_src.records, val_src.class_names, train_src.category_ids)
    seed_everything(args.seed)  # the initial weights are a function of the seed (the same in every process)
    model = create_detector(
        args.model, args.neck, num_classes=len(train_src.class_names),
        anchors=_anchors(args.anchors, args.data, train_src.records, args.img_size),
        neck_width=args.neck_width, backbone_width=args.backbone_width,
    )
    if args.backbone_weights and not args.resume:  # a resumed run takes every weight from its checkpoint
        for line in model.load_backbone_weights(args.backbone_weights):
            if dist.is_main:
                print(line, file=sys.stderr)
    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, accum_steps=args.accum_steps, optimizer=args.optimizer,
                      lr=args.lr, weight_decay=args.weight_decay, burn_in=args.burn_in, burn_in_power=1.0, amp=args.amp,
                      ema_decay=args.ema, grad_clip=10.0, seed=args.seed, num_workers=args.workers, min_lr_ratio=0.05,
                      memory_efficient=args.memory_efficient, checkpoint_every=args.checkpoint_every)
    recipe = DetectRecipe(box_loss=args.box_loss, label_smoothing=args.label_smoothing, eval_every=args.eval_every)
    # the augmentation is recorded with the data: a --resume with other settings is refused, naming data.augment
    run_info = {"data": {"train": source_record(train_args, train_src), "val": source_record(val_args, val_src) if val_src else None,
                         "augment": dataclasses.asdict(augment) if augment else None},
                "backbone_weights": args.backbone_weights}
    if args.resume:
        _accept_unrecorded_augmentation(args.out, augment, run_info["data"])
    result = train_detector(model, train_set, val_set, gt, args.out, cfg, recipe, category_ids=train_src.category_ids,
                            resume=args.resume, progress=not args.no_progress, run_info=run_info, dist=dist)
    if dist.is_main:
        final = {k: round(v, 4) for k, v in result.final.items() if isinstance(v, float)}
        print(json.dumps({"out": str(result.out_dir), **final, "wall_s": round(result.wall_s, 1)}))
    return 0


def run_eval(args) -> int:
    from ..data.detection import DetectionDataset, coco_ground_truth, load_detection_source
    from ..detection.metrics import coco_evaluate
    from ..detection.train import predict_dataset
    from ..export import fuse
    from ..files import atomic_write_text

    if args.weights is not None and args.data is None:  # said before the detector is loaded
        raise ValueError(f"--weights {args.weights}: a weights file records no data set to evaluate on; give --data "
                         "(e.g. COCO's instances_val2017.json with --images val2017/)")
    model, run = _load_detector(args)
    fuse(model)  # inference only: BatchNorms folded into their convs, ~20 % faster on the CPU
    recorded = run.get("data", {}).get(args.split)
    recorded = recorded if isinstance(recorded, dict) else None  # runs of older versions recorded only a description
    if args.data is None and recorded is None:
        which = "validation" if args.split == "val" else "training"
        raise ValueError(f"{args.checkpoint}: the run records no {which} set; give --data"
                         + (" (or --split train for its training set)" if args.split == "val" else ""))
    img_size = run["img_size"]
    spec = args.data or recorded["spec"]
    images = args.images or (recorded["images_dir"] if args.data is None else None)
    src = load_detection_source(**_source_args(spec, args.split, images, args, img_size, 0, recorded),
                                class_names=tuple(run["class_names"]))
    _check_images(src, spec, "evaluation", "--images")
    _report(src)
    if list(src.class_names) != list(run["class_names"]):
        model_classes = "the checkpoint was trained on" if args.checkpoint else f"the detector of {args.weights} predicts"
        raise ValueError(f"{spec} has classes {list(src.class_names)[:10]}, {model_classes} {run['class_names'][:10]}")
    category_ids = src.category_ids
    dataset = DetectionDataset(src.records, src.class_names, img_size, None)
    gt = coco_ground_truth(src.records, src.class_names, category_ids)
    detections = predict_dataset(model, dataset, args.batch_size, args.conf, args.iou, category_ids, progress=True)
    if args.results_out:
        atomic_write_text(args.results_out, json.dumps(detections))
    metrics = coco_evaluate(gt, detections, per_class=True)
    per_class = [{**row, "AP": round(row["AP"], 4), "AP50": round(row["AP50"], 4)} for row in metrics.pop("per_class")]
    evaluated = {"checkpoint": str(args.checkpoint)} if args.checkpoint else {"weights": str(args.weights)}
    text = json.dumps({**evaluated, "model": model.model_name, "data": src.description,
                       "images": len(src.records), **{k: round(v, 4) for k, v in metrics.items()}, "per_class": per_class},
                      indent=1)
    print(text)  # first, so that the result is seen even if the file cannot be written
    if args.json_out:
        atomic_write_text(args.json_out, text + "\n")
    return 0


def run_predict(args) -> int:
    from ..data.classification import image_files
    from ..detection.predict import predict_files
    from ..export import fuse

    paths = image_files(args.images)  # as cspnet predict takes them, before the model is loaded
    model, run = _load_detector(args)
    fuse(model)  # inference only, as in eval
    skipped: list[str] | None = [] if args.skip_corrupt else None
    results = predict_files(model, paths, Path(args.out), run["img_size"],
                            tuple(run["class_names"]), args.conf, args.iou, skipped=skipped,
                            category_ids=run.get("category_ids"))
    skipped = skipped or []
    for reason in skipped:
        print(f"skipped: {reason}", file=sys.stderr)
    print(json.dumps({"out": str(args.out), "images": len(results), "skipped": skipped,
                      "detections": sum(len(r["detections"]) for r in results)}))
    return 0


def run_bench(args) -> int:
    from ..detection import create_detector
    from ..detection.bench import PARTS, time_detector

    set_threads(args)
    rows = []
    for neck in args.necks:
        model = create_detector(args.model, neck, num_classes=args.num_classes, neck_width=args.neck_width)
        rows.append({"detector": model.model_name, **time_detector(model, args.img_size, runs=args.runs)})
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    cols = [f"{p}_ms" for p in PARTS] + ["total_ms", "fps", "bflops", "conv_params_m"]
    print(f"input {args.img_size}x{args.img_size}, batch 1, neck width {args.neck_width}, {args.num_classes} classes; median of {args.runs} runs")
    print("| detector | " + " | ".join(cols) + " |")
    print("|" + "---|" * (len(cols) + 1))
    for r in rows:
        print(f"| {r['detector']} | " + " | ".join(f"{r[c]:.3f}" if c in ("bflops", "conv_params_m") else f"{r[c]:.1f}" for c in cols) + " |")
    return 0
