"""Detection benchmark: a small CSP detector trained from scratch under a wall-clock budget.

1. ``scenes``: CSPPeleeNet-EFM (SAM) (the paper's final small detector, Table 2/4) trained on
   generated scenes (Fashion-MNIST objects on CC0 textures) and evaluated on held-out scenes
   (other seed, Fashion-MNIST *test* objects) with pycocotools. Target: AP50 >= 0.6.
2. ``trees``: the same recipe on the deepforest aerial photos (train: YELL crop 2 + SOAP_061,
   validation: YELL crop + OSBS_029), reporting the real AP50.
3. ``timing``: per-image latency backbone / neck / head / NMS and BFLOPs of FPN, PANet, EFM,
   EFM (SAM), EFM (SPP) and GFM on one backbone (paper Tables 2 and 5 style).

Each training run gets ``--minutes`` of wall clock (default 20). The number of epochs is chosen
from the measured speed of the first steps so that the cosine schedule ends inside the budget; a
hard stop at the budget keeps the promise if the machine slows down (the result says so).

    python benchmarks/detection_scenes.py --out runs/detection_bench          # everything
    python benchmarks/detection_scenes.py --only timing                       # one part
    python benchmarks/detection_scenes.py --only scenes --backbone cspresnet10 --backbone-width 0.5

Results go to ``OUT/results.json`` (and a Markdown summary on stdout); docs/detection.md quotes them.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import shutil
import time
from pathlib import Path

import torch

from cspnet.data.detection import AugmentCfg, DetectionDataset, coco_ground_truth, load_detection_source, source_record
from cspnet.detection import create_detector
from cspnet.detection.bench import time_detector
from cspnet.detection.head import fit_anchors
from cspnet.detection.train import (
    DetectionTask,
    DetectRecipe,
    TimeBudgetSpent,
    evaluate_detector,
    load_detector,
    train_detector,
)
from cspnet.engine.train import TrainConfig, item_seeds
from cspnet.files import atomic_write_text

RECIPE = {"backbone": "csppeleenet", "backbone_width": 1.0, "neck": "efm-sam", "neck_width": 128, "batch_size": 16,
          "lr": 2e-3, "weight_decay": 5e-4, "ema": 0.999, "box_loss": "ciou"}
SETS = {
    # name: (img_size, train images, val images, augmentation)
    "scenes": (128, 3000, 300, AugmentCfg(mosaic=0.3, scale=0.2, translate=0.1)),
    "trees": (256, None, None, AugmentCfg(mosaic=0.5, scale=0.3, translate=0.1, vflip=0.5)),
}


def _anchors(records, img_size):
    import numpy as np

    wh = [(r.boxes[:, 2:] - r.boxes[:, :2]) * img_size / max(r.width, r.height) for r in records if len(r.boxes)]
    return fit_anchors(np.concatenate(wh), 9)


def _steps_per_second(model, task, batch_size, steps=6) -> float:
    """Training steps per second of a scratch copy of ``model`` on real batches."""
    scratch = copy.deepcopy(model).train()
    opt = torch.optim.AdamW(scratch.parameters(), 1e-4)
    times = []
    for s in range(steps):
        indices = [(s * batch_size + k) % len(task.train_set) for k in range(batch_size)]
        items = [task.train_set[item] for item in item_seeds(indices, s)]
        batch = task.prepare(task.collate(items), device=torch.device("cpu"), seed=s)
        t = time.perf_counter()
        loss, _ = task.loss(scratch, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t)
    return 1 / sorted(times)[len(times) // 2]


def train_set_run(name: str, out: Path, minutes: float, seed: int = 0) -> dict:
    img_size, n_train, n_val, augment = SETS[name]
    run_name = f"{name}-{RECIPE['backbone']}-w{RECIPE['backbone_width']:g}-{RECIPE['neck']}"
    train_args, val_args = ({"spec": name, "split": split, "images_dir": None, "num_scenes": n or 0, "scene_size": img_size,
                             "seed": seed} for split, n in (("train", n_train), ("val", n_val)))
    train_src = load_detection_source(**train_args)
    val_src = load_detection_source(**val_args, class_names=train_src.class_names)
    train = DetectionDataset(train_src.records, train_src.class_names, img_size, augment)
    val = DetectionDataset(val_src.records, val_src.class_names, img_size)
    gt = coco_ground_truth(val_src.records, val_src.class_names)
    torch.manual_seed(seed)
    anchors = _anchors(train_src.records, img_size)
    model = create_detector(RECIPE["backbone"], RECIPE["neck"], num_classes=len(train_src.class_names),
                            anchors=anchors, neck_width=RECIPE["neck_width"], backbone_width=RECIPE["backbone_width"])
    bs = RECIPE["batch_size"]
    recipe = DetectRecipe(box_loss=RECIPE["box_loss"], eval_every=1)
    probe = DetectionTask(model, train, val, gt, recipe=recipe)
    rate = _steps_per_second(model, probe, bs)
    steps_per_epoch = len(train) // bs
    t0 = time.perf_counter()
    evaluate_detector(model, val, gt, batch_size=bs)
    eval_s = time.perf_counter() - t0
    budget = minutes * 60
    # epochs so that training and ~10% of evaluations fit in 75% of the budget (the rest is slack)
    epoch_s = steps_per_epoch / rate
    max_evals = max(1, int(0.1 * budget / max(eval_s, 1e-3)))
    eval_every = max(1, math.ceil(int(0.8 * budget / epoch_s) / max_evals))
    epochs = max(1, int(0.75 * budget / (epoch_s + eval_s / eval_every)))
    cfg = TrainConfig(epochs=epochs, batch_size=bs, optimizer="adamw", lr=RECIPE["lr"],
                      weight_decay=RECIPE["weight_decay"], burn_in=min(200, steps_per_epoch * epochs // 10),
                      burn_in_power=1.0, ema_decay=RECIPE["ema"], grad_clip=10.0, seed=seed, min_lr_ratio=0.05)
    recipe = DetectRecipe(box_loss=RECIPE["box_loss"], eval_every=eval_every, time_limit=budget)
    started = time.perf_counter()
    stopped_early = False
    shutil.rmtree(out / run_name, ignore_errors=True)  # a rerun measures afresh
    try:
        train_detector(model, train, val, gt, out / run_name, cfg, recipe, progress=False,
                       run_info={"data": {"train": source_record(train_args, train_src), "val": source_record(val_args, val_src)}})
    except TimeBudgetSpent:
        stopped_early = True
    wall = time.perf_counter() - started
    if not (out / run_name / "last.json").is_file():
        raise SystemExit(f"{name}: the {minutes:g}-minute budget ended before the first epoch finished "
                         f"({steps_per_epoch} steps at ~{rate:.1f} steps/s); give more --minutes")
    best, _ = load_detector(out / run_name)
    metrics = evaluate_detector(best, val, gt, batch_size=bs)
    history = [json.loads(x) for x in (out / run_name / "metrics.jsonl").read_text().splitlines()]
    return {
        "set": name, "detector": best.model_name, "recipe": dict(RECIPE), "img_size": img_size, "train_images": len(train),
        "val_images": len(val), "val_boxes": len(gt["annotations"]), "classes": len(train_src.class_names),
        "anchors": [list(a) for a in anchors], "epochs_planned": epochs, "eval_every": eval_every, "epochs_done": len(history),
        "steps_per_s_probe": round(rate, 3), "train_wall_min": round(wall / 60, 2), "stopped_early": stopped_early,
        "val": {k: round(v, 4) for k, v in metrics.items()},
        "history": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in h.items()
                     if k in ("epoch", "train_loss", "val_AP", "val_AP50", "epoch_s")} for h in history],
    }


def timing_run(backbone: str = "csppeleenet", img_size: int = 416, width: int = 128, runs: int = 10) -> list[dict]:
    rows = []
    for neck in ("fpn", "panet", "efm", "efm-sam", "efm-spp", "gfm"):
        torch.manual_seed(0)
        model = create_detector(backbone, neck, num_classes=80, neck_width=width)
        rows.append({"detector": model.model_name, "img_size": img_size, "neck_width": width,
                     **{k: round(v, 3) for k, v in time_detector(model, img_size, runs=runs).items()}})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/detection_bench")
    p.add_argument("--minutes", type=float, default=20.0, help="wall-clock budget per training run")
    p.add_argument("--only", choices=("scenes", "trees", "timing"), action="append")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared machine)")
    p.add_argument("--backbone", default=RECIPE["backbone"])
    p.add_argument("--backbone-width", type=float, default=RECIPE["backbone_width"])
    p.add_argument("--neck", default=RECIPE["neck"])
    p.add_argument("--neck-width", type=int, default=RECIPE["neck_width"])
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    RECIPE.update(backbone=args.backbone, backbone_width=args.backbone_width, neck=args.neck, neck_width=args.neck_width)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    results["machine"] = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                          "threads": args.threads, "torch": torch.__version__}
    for part in args.only or ("scenes", "trees", "timing"):
        if part == "timing":
            results["timing"] = timing_run()
        else:
            result = train_set_run(part, out, args.minutes)
            results.setdefault(part, {})[result["detector"] + f"@w{RECIPE['backbone_width']:g}"] = result
        atomic_write_text(path, json.dumps(results, indent=1))
        shown = results[part] if part == "timing" else {k: v for k, v in result.items() if k not in ("history", "anchors")}
        print(json.dumps({part: shown}, indent=1), flush=True)


if __name__ == "__main__":
    main()
