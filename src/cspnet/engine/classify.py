"""The classification task for `cspnet.engine.train.fit`, top-1 / top-5 / per-class evaluation, and a
trained run's classifier applied to image files.

Augmentation is done on whole batches from a seeded generator (see `fit`): a random shift of up
to ``translate`` pixels (zero padding, then a crop), a horizontal flip when the dataset allows it,
and mixup / cutmix (the paper's ImageNet recipe uses them for the "-gamma" models, §4.1). Labels
are smoothed by ``label_smoothing``.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset, default_collate

from ..data.classification import ClassificationData, CorruptImageError, decode_image, with_worker_errors
from .checkpoint import load_checkpoint, read_run_record
from .distributed import DistInfo, all_reduce_sum
from .ema import ModelEMA
from .models import rebuild_model


@dataclass(frozen=True)
class ClassifyRecipe:
    """Task-side options: augmentation, loss and evaluation batch."""

    translate: int = 2
    hflip: bool | None = None  # None: whatever the dataset says is label-preserving
    mixup: float = 0.0
    cutmix: float = 0.0
    mix_prob: float = 1.0
    label_smoothing: float = 0.1  # as `cspnet train --label-smoothing`
    eval_batch_size: int = 256
    num_workers: int = 0


@dataclass
class ClassifyBatch:
    images: torch.Tensor
    labels: torch.Tensor
    mixed_labels: torch.Tensor | None = None  # the partner labels of mixup / cutmix
    lam: float = 1.0  # weight of ``labels``


def normalize(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """``uint8`` images -> float, scaled to [0, 1] and standardised per channel."""
    x = images.float().div_(255.0)
    m = torch.tensor(mean, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, -1, 1, 1)
    return x.sub_(m).div_(s)


class ClassificationTask:
    """Images and labels from a `ClassificationData`, cross-entropy loss, accuracy metrics."""

    metric = "top1"

    def __init__(self, data: ClassificationData, recipe: ClassifyRecipe = ClassifyRecipe()):
        self.data = data
        self.recipe = recipe
        self.train_set = data.train
        self.hflip = data.hflip if recipe.hflip is None else recipe.hflip

    def collate(self, samples: list) -> Any:
        return default_collate(samples)

    # -- training -------------------------------------------------------------------------------
    def prepare(self, batch: Any, *, device: torch.device, seed: int) -> ClassifyBatch:
        images, labels = batch
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        gen = torch.Generator().manual_seed(seed)
        rng = np.random.default_rng(seed)
        n = images.shape[0]
        t = self.recipe.translate
        if t > 0:
            size = images.shape[-1]
            padded = F.pad(images, (t, t, t, t))
            offsets = torch.randint(0, 2 * t + 1, (n, 2), generator=gen).tolist()
            images = torch.stack([padded[i, :, dy:dy + size, dx:dx + size] for i, (dy, dx) in enumerate(offsets)])
        if self.hflip:
            flip = (torch.rand(n, generator=gen) < 0.5).to(device)
            images = torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)
        x = normalize(images, self.data.mean, self.data.std)
        out = ClassifyBatch(x, labels)
        r = self.recipe
        if (r.mixup > 0 or r.cutmix > 0) and rng.random() < r.mix_prob:
            use_cutmix = r.cutmix > 0 and (r.mixup <= 0 or rng.random() < 0.5)
            lam = float(rng.beta(r.cutmix, r.cutmix) if use_cutmix else rng.beta(r.mixup, r.mixup))
            partner = x.flip(0)  # pair sample i with sample n-1-i, as timm does
            if use_cutmix:
                h, w = x.shape[-2:]
                cut_h, cut_w = int(h * math.sqrt(1 - lam)), int(w * math.sqrt(1 - lam))
                cy, cx = int(rng.integers(h)), int(rng.integers(w))
                y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, h)
                x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, w)
                x = x.clone()
                x[..., y0:y1, x0:x1] = partner[..., y0:y1, x0:x1]
                lam = 1.0 - (y1 - y0) * (x1 - x0) / (h * w)  # the label weight is the area really kept
            else:
                x = lam * x + (1 - lam) * partner
            out = ClassifyBatch(x, labels, labels.flip(0), lam)
        return out

    def loss(self, model: nn.Module, batch: ClassifyBatch) -> tuple[torch.Tensor, dict[str, float]]:
        logits = model(batch.images).float()
        eps = self.recipe.label_smoothing
        loss = F.cross_entropy(logits, batch.labels, label_smoothing=eps)
        pred = logits.argmax(1)
        if batch.mixed_labels is None:
            correct = (pred == batch.labels).sum()
        else:
            loss = batch.lam * loss + (1 - batch.lam) * F.cross_entropy(logits, batch.mixed_labels, label_smoothing=eps)
            main = batch.labels if batch.lam >= 0.5 else batch.mixed_labels
            correct = (pred == main).sum()
        return loss, {"acc": float(correct)}

    # -- evaluation -----------------------------------------------------------------------------
    def evaluate(self, model: nn.Module, dist: DistInfo) -> dict[str, Any]:
        return evaluate_classifier(model, self.data, dist, batch_size=self.recipe.eval_batch_size,
                                   num_workers=self.recipe.num_workers)


@torch.no_grad()
def evaluate_classifier(model: nn.Module, data: ClassificationData, dist: DistInfo | None = None, *,
                        batch_size: int = 256, num_workers: int = 0, progress: bool = False) -> dict[str, Any]:
    """Top-1, top-5, mean loss, per-class accuracy and the confusion matrix on ``data.test``.

    Each process scores every ``world_size``-th image; the confusion matrices are summed.
    ``confusion[i][j]`` counts images of class ``i`` predicted as ``j``. With 5 classes or fewer, top-5
    is None: every label is among the top 5, so the figure would say nothing.
    """
    dist = dist or DistInfo()
    device = dist.device
    was_training = model.training
    model.eval()
    k = data.num_classes
    shard = Subset(data.test, range(dist.rank, len(data.test), dist.world_size))
    loader = DataLoader(shard, batch_size=batch_size, num_workers=num_workers, collate_fn=default_collate)
    confusion = torch.zeros(k * k, dtype=torch.float64)
    sums = torch.zeros(2, dtype=torch.float64)  # top-5 hits, loss sum
    if progress:
        from tqdm import tqdm

        loader = tqdm(loader, desc="eval", unit="batch", leave=False)
    for images, labels in with_worker_errors(loader):
        labels = labels.to(device)
        logits = model(normalize(images.to(device), data.mean, data.std)).float()
        pred = logits.argmax(1)
        confusion += torch.bincount((labels * k + pred).cpu(), minlength=k * k).double()
        top = logits.topk(min(5, k), dim=1).indices
        sums[0] += (top == labels[:, None]).any(1).sum().item()
        sums[1] += F.cross_entropy(logits, labels, reduction="sum").item()
    all_reduce_sum(confusion, dist)
    all_reduce_sum(sums, dist)
    model.train(was_training)
    confusion = confusion.view(k, k)
    total = confusion.sum().item()
    if total == 0:
        raise ValueError(f"{data.name}: the test split is empty")
    counts = confusion.sum(1)
    # a class without test images has no accuracy (None), not an accuracy of 0
    per_class = [float(hit / n) if n else None for hit, n in zip(confusion.diag().tolist(), counts.tolist())]
    return {
        "top1": confusion.diag().sum().item() / total,
        "top5": sums[0].item() / total if k > 5 else None,
        "loss": sums[1].item() / total,
        "images": int(total),
        "per_class": dict(zip(data.classes, per_class)),
        "confusion": confusion.long().tolist(),
    }


def load_classifier(out_dir: str | os.PathLike, name: str | None = "last", *, ema: bool | None = None,
                    num_classes: int | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the classifier of a ``cspnet train`` run, load checkpoint ``name``; return ``(model, run)``.

    ``run["model"]`` is the model record and ``run["data"]`` what it was trained on: class names,
    image size, channels, mean and std. ``ema=None`` loads the EMA weights when the run kept an EMA
    (the weights its metrics and ``best`` were scored with, as `load_detector` does), else the raw
    ones; ``ema=True`` the EMA weights (an error for a run without); ``ema=False`` the raw weights.
    ``run["weights"]`` says which were loaded: ``"ema"`` or ``"raw"``.
    ``num_classes`` builds the head for another class count (the load then fails, naming the tensor).
    The model is returned in eval mode.
    """
    name, record = read_run_record(out_dir, name, require=("model", "data"))
    if ema is None:
        ema = "ema" in record
    run = {**record["state"]["run"], "weights": "ema" if ema else "raw"}
    model_rec = dict(run["model"])
    if num_classes is not None:
        model_rec["num_classes"] = num_classes
    model = rebuild_model(model_rec)
    holder = ModelEMA(model) if ema else None
    load_checkpoint(out_dir, model=model, ema=holder, name=name, restore_rng=False)
    if holder is not None:  # the EMA copy's parameters are frozen: hand back the model itself, holding them
        model.load_state_dict(holder.module.state_dict())
    return model.eval(), run


@torch.inference_mode()
def classify_files(model: nn.Module, paths: list[Path], trained: dict[str, Any], *, topk: int = 5,
                   batch_size: int = 64, skip_corrupt: bool = False,
                   progress: bool = False) -> tuple[list[dict[str, Any]], list[str]]:
    """The ``topk`` most likely classes of each image file; returns ``(rows, skipped)``.

    ``trained`` is the run's data description (`load_classifier`'s ``run["data"]``). Each image is
    prepared as an image-folder test image is for ``cspnet eval`` (grey or RGB as trained, short side to
    the training size, centre crop, the training mean and std). A row:
    ``{"image": path, "top": [{"class": name, "index": i, "prob": p}, ...]}``, most likely first.
    An unreadable image raises `CorruptImageError` naming it, or with ``skip_corrupt`` is left out and
    its error listed in ``skipped``.
    """
    if topk < 1:
        raise ValueError(f"topk must be >= 1, got {topk}")
    classes = trained["classes"]
    k = min(topk, len(classes))
    device = next(model.parameters()).device
    rows, skipped = [], []
    chunks = range(0, len(paths), batch_size)
    if progress:
        from tqdm import tqdm

        chunks = tqdm(chunks, desc="predict", unit="batch", leave=False)
    for start in chunks:
        images, kept = [], []
        for path in paths[start:start + batch_size]:
            try:
                images.append(decode_image(str(path), trained["img_size"], trained["in_chans"]))
                kept.append(path)
            except CorruptImageError as e:
                if not skip_corrupt:
                    raise
                skipped.append(str(e))
        if not images:
            continue
        x = normalize(torch.stack(images).to(device), tuple(trained["mean"]), tuple(trained["std"]))
        probs, indices = model(x).float().softmax(1).topk(k, dim=1)
        for path, p, idx in zip(kept, probs.tolist(), indices.tolist()):
            rows.append({"image": str(path), "top": [{"class": classes[i], "index": i, "prob": round(q, 6)}
                                                     for q, i in zip(p, idx)]})
    return rows, skipped
