"""Detection as a task of the shared training loop (`cspnet.engine.train.fit`), and evaluation.

`DetectionTask` tells the loop what a detection batch is: its training items are loaded and
augmented (mosaic, scale / translate, flips, HSV) where the DataLoader reads them (its workers,
with ``num_workers``), each from torch's generator seeded with the item seed the loop derives from
its chunk seed (``seeded_items``), so a resumed run repeats the same augmented images and the number
of workers changes nothing; ``loss`` is `YoloLoss`; ``evaluate`` runs COCOeval (pycocotools) on the
validation set (under DDP each process predicts a share of it) and reports ``AP50`` as the metric
that picks the ``best`` checkpoint. Checkpoints, resume, DDP, mixed precision, EMA, progress bars
and the metric files are the loop's; this module adds ``detection_curves.png`` (loss parts and AP).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from ..data.detection import DetectionDataset, collate_detection
from ..engine.checkpoint import CheckpointError, check_run_dir, load_checkpoint, read_checkpoint_record, read_run_record
from ..engine.distributed import DistInfo
from ..engine.ema import ModelEMA
from ..engine.train import FitResult, TrainConfig, fit
from .detector import Detector, DetectorCfg
from .loss import YoloLoss
from .metrics import coco_evaluate, to_coco_results
from .predict import boxes_in_image
from ..files import atomic_savefig


@dataclass(frozen=True)
class DetectRecipe:
    """Task-side options: the loss and the evaluation."""

    box_loss: str = "ciou"
    ignore_thresh: float = 0.7
    iou_thresh: float = 1.0
    label_smoothing: float = 0.0
    box_weight: float = 0.05
    obj_weight: float = 1.0
    cls_weight: float = 0.5
    eval_every: int = 1
    eval_conf: float = 0.001
    eval_iou: float = 0.6
    eval_batch_size: int = 16
    time_limit: float | None = None  # seconds; training stops at the first step after it

    def __post_init__(self):
        # checked here, not an epoch later when the first evaluation or the time check uses them
        if not (isinstance(self.eval_every, int) and self.eval_every >= 1):
            raise ValueError(f"DetectRecipe.eval_every must be an integer >= 1, got {self.eval_every!r}")
        if not (isinstance(self.eval_batch_size, int) and self.eval_batch_size >= 1):
            raise ValueError(f"DetectRecipe.eval_batch_size must be an integer >= 1, got {self.eval_batch_size!r}")
        if not 0 <= self.eval_conf <= 1:
            raise ValueError(f"DetectRecipe.eval_conf must be a score threshold in [0, 1], got {self.eval_conf!r}")
        if not 0 < self.eval_iou <= 1:
            raise ValueError(f"DetectRecipe.eval_iou must be an IoU in (0, 1], got {self.eval_iou!r}")
        if self.time_limit is not None and not 0 < self.time_limit < math.inf:
            raise ValueError(f"DetectRecipe.time_limit must be a positive number of seconds or None, got {self.time_limit!r}")


class TimeBudgetSpent(RuntimeError):
    """Raised when ``DetectRecipe.time_limit`` has passed; the run's last checkpoint is kept and the message says where."""


class _SeededItems(Dataset):
    """Training items by ``(index, seed)`` (the loop's `item_seeds`): image ``index`` loaded and augmented
    with torch's generator seeded with ``seed``, whichever process (DataLoader worker) reads it."""

    def __init__(self, data: DetectionDataset):
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, item: tuple[int, int]):
        index, seed = item
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # `DetectionDataset` draws its augmentation from torch's generator
            return self.data[index]


@torch.no_grad()
def predict_dataset(model: Detector, dataset: DetectionDataset, batch_size: int = 16, conf_thresh: float = 0.001,
                    iou_thresh: float = 0.6, category_ids=None, progress: bool = False) -> list[dict]:
    """COCO result dicts (original image pixels) for every image of ``dataset``."""
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_detection)
    results = []
    for images, targets in tqdm(loader, desc="eval", unit="batch", leave=False, disable=not progress):
        dets = model.postprocess(model(images.to(device)), conf_thresh, iou_thresh)
        for d, t in zip(dets, targets):
            h, w = t["orig_size"]
            d = boxes_in_image(d, t["ratio"], w, h)
            results += to_coco_results(t["image_id"], d["boxes"], d["scores"], d["labels"], category_ids)
    model.train(was)
    return results


def evaluate_detector(model: Detector, dataset: DetectionDataset, gt: dict, category_ids=None, batch_size: int = 16,
                      conf_thresh: float = 0.001, iou_thresh: float = 0.6, progress: bool = False) -> dict[str, float]:
    """COCOeval figures (``AP``, ``AP50``, ``AP75``, ``APs`` …) of ``model`` on ``dataset`` against ``gt``."""
    dets = predict_dataset(model, dataset, batch_size, conf_thresh, iou_thresh, category_ids, progress)
    return coco_evaluate(gt, dets)


def plot_detection_curves(history: list[dict[str, Any]], path: Path) -> None:
    """Training loss parts and validation AP / AP50 per epoch, written atomically as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    epochs = [h["epoch"] for h in history]
    for key in ("train_loss", "train_box", "train_obj", "train_cls"):
        if any(key in h for h in history):
            ax1.plot(epochs, [h.get(key, float("nan")) for h in history], label=key)
    ax1.set(xlabel="epoch", yscale="log", title="training loss")
    ev = [h for h in history if "val_AP50" in h]
    for key in ("val_AP", "val_AP50"):
        ax2.plot([h["epoch"] for h in ev], [h[key] for h in ev], marker="o", label=key)
    ax2.set(xlabel="epoch", ylim=(0, 1), title="validation (COCOeval)")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=80)


class DetectionTask:
    """Training batches, loss and COCO evaluation of a detector, for `cspnet.engine.train.fit`."""

    metric = "AP50"
    seeded_items = True

    def __init__(self, model: Detector, train: DetectionDataset, val: DetectionDataset | None = None,
                 val_gt: dict | None = None, category_ids=None, recipe: DetectRecipe = DetectRecipe(),
                 epochs: int | None = None, out_dir: str | os.PathLike | None = None, epochs_done: int = 0):
        if (val is None) != (val_gt is None):
            raise ValueError("give both the validation set and its COCO ground truth, or neither")
        self.train_set = _SeededItems(train)
        self.val, self.val_gt, self.category_ids = val, val_gt, category_ids
        self.recipe = recipe
        self.epochs = epochs
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.loss_fn = YoloLoss(
            model.layout, model.num_classes, recipe.box_loss, recipe.ignore_thresh, recipe.iou_thresh,
            recipe.label_smoothing, recipe.box_weight, recipe.obj_weight, recipe.cls_weight, scale_x_y=model.scale_x_y,
        )
        # the run's epoch, not this process's: a resumed run evaluates the epochs an uninterrupted one does
        self._epoch = epochs_done
        self._deadline = None if recipe.time_limit is None else time.monotonic() + recipe.time_limit

    def collate(self, samples: list) -> tuple[torch.Tensor, list[dict]]:
        return collate_detection(samples)

    def prepare(self, batch: tuple[torch.Tensor, list[dict]], *, device: torch.device, seed: int):
        # the images were augmented when loaded (`_SeededItems`); ``seed`` is not needed here
        if self._deadline is not None and time.monotonic() > self._deadline:
            raise TimeBudgetSpent(f"the time limit of {self.recipe.time_limit:.0f} s is spent; {self._resume_point()}")
        images, targets = batch
        for t in targets:
            t["boxes"], t["labels"] = t["boxes"].to(device, non_blocking=True), t["labels"].to(device, non_blocking=True)
        return images.to(device, non_blocking=True), targets

    def _resume_point(self) -> str:
        """Where ``resume`` continues the stopped run: its last checkpoint, if one was written."""
        if self.out_dir is None or not (self.out_dir / "last.json").is_file():
            return "no checkpoint was written yet: nothing to resume"
        state = read_checkpoint_record(self.out_dir)["state"]
        return (f"resume continues the run from {self.out_dir / 'last.json'} after step {state['step']} "
                f"({state['epoch']} epoch(s) finished)")

    def loss(self, model: nn.Module, batch) -> tuple[torch.Tensor, dict[str, float]]:
        images, targets = batch
        # under --amp the head's maps are bf16 / fp16; box decoding, IoUs and BCE want float32
        loss, parts = self.loss_fn([level.float() for level in model(images)], targets)
        n = len(targets)  # the loop wants per-batch sums
        return loss, {k: v * n for k, v in parts.items()}

    def evaluate(self, model: nn.Module, dist: DistInfo) -> dict[str, Any]:
        self._epoch += 1
        if self.val is None:
            return {}
        last = self.epochs is not None and self._epoch >= self.epochs
        if self._epoch % self.recipe.eval_every and not last:
            return {}
        r = self.recipe
        # each process predicts every world_size-th image; rank 0 scores them all and tells the others,
        # so that every process returns the same metrics (and agrees on `best`)
        shard = Subset(self.val, range(dist.rank, len(self.val), dist.world_size)) if dist.enabled else self.val
        dets = predict_dataset(model, shard, r.eval_batch_size, r.eval_conf, r.eval_iou, self.category_ids)
        if dist.enabled:
            shares = [None] * dist.world_size
            torch.distributed.all_gather_object(shares, dets)
            dets = [d for share in shares for d in share]
        metrics = [coco_evaluate(self.val_gt, dets) if dist.is_main else None]
        if dist.enabled:
            torch.distributed.broadcast_object_list(metrics, src=0)
        metrics = metrics[0]
        if self.out_dir is not None and dist.is_main:
            self._plot(metrics)
        return metrics

    def _plot(self, metrics: dict[str, float]) -> None:
        # The loop writes metrics.jsonl after this call; plot what it holds plus this epoch.
        path = self.out_dir / "metrics.jsonl"
        history = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
        history.append({"epoch": (history[-1]["epoch"] + 1) if history else 1, **{f"val_{k}": v for k, v in metrics.items()}})
        plot_detection_curves(history, self.out_dir / "detection_curves.png")


def train_detector(
    model: Detector,
    train: DetectionDataset,
    val: DetectionDataset | None,
    val_gt: dict | None,
    out_dir: str | os.PathLike,
    cfg: TrainConfig,
    recipe: DetectRecipe = DetectRecipe(),
    *,
    category_ids=None,
    resume: bool = False,
    progress: bool = True,
    run_info: dict[str, Any] | None = None,
    dist: DistInfo | None = None,
) -> FitResult:
    """Train ``model`` with the shared loop. The checkpoints carry the detector config, class
    names, input size and category ids (``state.run``), so `load_detector` can rebuild it. A folder
    holding another run's checkpoints is refused unless ``resume``. ``dist`` (`init_distributed`)
    places the run on its device and in its DDP world."""
    check_run_dir(out_dir, resume)
    if dist is not None and dist.enabled and recipe.time_limit is not None:
        # each process would watch its own clock and stop at another step, leaving the others waiting
        raise ValueError("DetectRecipe.time_limit needs a single process; under DDP, limit the run with epochs")
    out_dir = Path(out_dir)
    info = {
        "task": "detection", "detector": model.cfg.to_dict(), "class_names": list(train.class_names),
        "img_size": train.img_size, "category_ids": list(category_ids) if category_ids is not None else None,
        "recipe": dataclasses.asdict(recipe), **(run_info or {}),
    }
    epochs_done = 0
    if resume and (out_dir / "last.json").is_file():
        saved_state = read_checkpoint_record(out_dir)["state"]
        epochs_done = saved_state["epoch"]
        saved = saved_state.get("run", {})
        # what the weights and the loss depend on: the detector config, the input size, the classes
        then, now = ({**run.get("detector", {}), "img_size": run.get("img_size"), "class_names": run.get("class_names")}
                     for run in (saved, info))
        diffs = [f"{k}: checkpoint {then.get(k)!r} vs now {now.get(k)!r}" for k in {**then, **now} if then.get(k) != now.get(k)]
        if diffs:
            raise CheckpointError(f"{out_dir / 'last.json'}: --resume with another detector or input would not continue the "
                                  f"same run ({'; '.join(diffs)})")
    task = DetectionTask(model, train, val, val_gt, category_ids, recipe, cfg.epochs, out_dir, epochs_done)
    return fit(task, model, cfg, out_dir, dist=dist, resume=resume, progress=progress, run_info=info, desc=f"{model.model_name} ")
    # a TimeBudgetSpent from `DetectionTask.prepare` propagates: the last checkpoint (of the last finished
    # epoch, or of a ``cfg.checkpoint_every`` step) is in out_dir (`load_detector` reads it; ``resume`` continues the run)


def load_detector(out_dir: str | os.PathLike, name: str | None = None) -> tuple[Detector, dict[str, Any]]:
    """Rebuild the detector of a training run and load its weights; return ``(model, run_info)``.

    ``name=None`` takes ``best`` (best validation AP50) when it exists, else ``last``; the EMA
    weights are used when the run kept an EMA. The model is returned in eval mode.
    """
    name, record = read_run_record(out_dir, name, require=("detector",))
    run = record["state"]["run"]
    model = Detector(DetectorCfg.from_dict(run["detector"]))
    if "ema" in record:
        ema = ModelEMA(model)
        load_checkpoint(out_dir, model=model, ema=ema, name=name, restore_rng=False)
        model = ema.module
    else:
        load_checkpoint(out_dir, model=model, name=name, restore_rng=False)
    return model.eval(), run


def load_detector_file(path: str | os.PathLike) -> tuple[Detector, dict[str, Any]]:
    """Rebuild the detector a safetensors file records (`cspnet.weights.load_model`: ``cspnet darknet convert`` of an
    official detector cfg, ``cspnet export --format safetensors`` of a run) and return ``(model, info)``, ``info``
    holding what `load_detector`'s run record gives predict and eval: ``img_size`` (the recorded input size),
    ``class_names`` and ``category_ids`` (None when the file records none). The model is returned in eval mode."""
    from ..weights import WeightsError, check_weights_file, load_model, read_metadata

    path = Path(path)
    check_weights_file(path, "a training run's folder is read with --checkpoint",
                       f"convert it first: cspnet darknet convert CFG {path} OUT.safetensors")
    meta = read_metadata(path)
    if not isinstance(meta.get("config"), dict) or "neck" not in meta["config"]:
        raise WeightsError(f"{path}: records no detector (metadata 'config' with a neck); it holds "
                           + (f"model {meta['model']!r}" if "model" in meta else "no cspnet model record"))
    size, names = meta.get("input_size"), meta.get("class_names")
    if isinstance(size, list) and len(size) == 2 and size[0] == size[1]:  # a Darknet cfg's [height, width]
        size = size[0]
    if not (isinstance(size, int) and size > 0 and size % 32 == 0):
        raise WeightsError(f"{path}: records input size {size!r}; the detector letterboxes images to a square whose "
                           "side is a multiple of 32")
    if not isinstance(names, list) or len(names) != meta["config"].get("num_classes"):
        raise WeightsError(f"{path}: records no name for each of its {meta['config'].get('num_classes')} classes "
                           "(metadata 'class_names')")
    return load_model(path), {"img_size": size, "class_names": names, "category_ids": meta.get("category_ids")}
