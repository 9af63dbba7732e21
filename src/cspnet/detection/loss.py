"""YOLOv3 training loss: anchor assignment, ignore threshold, objectness / class BCE and box loss.

Assignment follows Darknet's ``forward_yolo_layer``: every ground-truth box goes to the anchor (of
all levels) whose shape best overlaps it (IoU of the two boxes centred together), at the grid cell
holding its centre; with ``iou_thresh < 1`` every other anchor above that shape IoU is assigned too
(the "optimal" cfg's ``iou_thresh=0.213``). Predictions that are not assigned but overlap some
ground truth by more than ``ignore_thresh`` (0.7 in the cfgs) get no objectness loss.

The box loss is MSE on the raw parametrisation (Darknet's default, weighted by ``2 - w*h`` as in
YOLOv3) or an IoU loss from ``torchvision.ops``: GIoU, DIoU or CIoU. Losses are means (over positives
for box / class, over the non-ignored cells of a level for objectness, weighted per level 4 /
1 / 0.4 with three levels, as YOLOv5), so the learning rate does not depend on the batch size.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import box_iou, complete_box_iou_loss, distance_box_iou_loss, generalized_box_iou_loss

from .head import AnchorLayout, decode_boxes, encode_boxes, grid_cells, level_scale_x_y, split_level

BoxLoss = Literal["mse", "giou", "diou", "ciou"]
BOX_LOSSES = ("mse", "giou", "diou", "ciou")
_IOU_LOSSES = {"giou": generalized_box_iou_loss, "diou": distance_box_iou_loss, "ciou": complete_box_iou_loss}


def shape_iou(wh1: torch.Tensor, wh2: torch.Tensor) -> torch.Tensor:
    """``(M, K)`` IoU of boxes of sizes ``wh1`` (M, 2) and ``wh2`` (K, 2) sharing one centre."""
    inter = torch.min(wh1[:, None], wh2[None]).prod(-1)
    return inter / (wh1.prod(-1)[:, None] + wh2.prod(-1)[None] - inter)


def check_targets(targets: list[dict], batch: int) -> None:
    if len(targets) != batch:
        raise ValueError(f"{len(targets)} target dicts for a batch of {batch} images")
    for i, t in enumerate(targets):
        if "boxes" not in t or "labels" not in t:
            raise ValueError(f"targets[{i}] needs keys 'boxes' and 'labels', has {sorted(t)}")
        if t["boxes"].ndim != 2 or t["boxes"].shape[-1] != 4 or len(t["boxes"]) != len(t["labels"]):
            raise ValueError(f"targets[{i}]: boxes of shape {tuple(t['boxes'].shape)} with {len(t['labels'])} labels")


class YoloLoss(nn.Module):
    """The detector's training loss; ``forward(raw_outputs, targets)`` -> ``(loss, parts)``.

    ``targets`` is one dict per image with ``boxes`` (M, 4) xyxy in input pixels and ``labels`` (M,).
    """

    def __init__(
        self,
        layout: AnchorLayout,
        num_classes: int,
        box_loss: BoxLoss = "ciou",
        ignore_thresh: float = 0.7,
        iou_thresh: float = 1.0,
        label_smoothing: float = 0.0,
        box_weight: float = 0.05,
        obj_weight: float = 1.0,
        cls_weight: float = 0.5,
        scale_x_y: float | tuple[float, ...] = 1.0,
    ):
        super().__init__()
        if box_loss not in BOX_LOSSES:
            raise ValueError(f"unknown box loss {box_loss!r}; expected one of {', '.join(BOX_LOSSES)}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.layout = layout
        self.num_classes = num_classes
        self.box_loss = box_loss
        self.ignore_thresh = ignore_thresh
        self.iou_thresh = iou_thresh
        self.label_smoothing = label_smoothing
        self.weights = {"box": box_weight, "obj": obj_weight, "cls": cls_weight}
        # YOLOv5's per-level objectness balance for 3 levels: fine levels have many more cells.
        self.level_balance = (4.0, 1.0, 0.4) if layout.num_levels == 3 else (1.0,) * layout.num_levels
        self.scale_x_y = level_scale_x_y(scale_x_y, layout.num_levels)

    def assign(self, targets: list[dict], shapes: list[tuple[int, int]], device) -> list[dict[str, torch.Tensor]]:
        """Per level, for each positive: the truth's index in the batch (``gt``), its image, the anchor
        index within the level, the cell (gx, gy), the target box, label and anchor size."""
        boxes = torch.cat([t["boxes"].to(device, torch.float32) for t in targets])
        labels = torch.cat([t["labels"].to(device, torch.long) for t in targets])
        image = torch.cat([torch.full((len(t["boxes"]),), i, device=device, dtype=torch.long) for i, t in enumerate(targets)])
        anchors = self.layout.all_anchors().to(device)
        ious = shape_iou((boxes[:, 2:] - boxes[:, :2]).clamp(min=1e-6), anchors)
        matched = torch.zeros_like(ious, dtype=torch.bool)
        if len(boxes):
            matched[torch.arange(len(boxes), device=device), ious.argmax(1)] = True
        if self.iou_thresh < 1.0:
            matched |= ious > self.iou_thresh
        per_level = []
        for level, (h, w) in enumerate(shapes):
            stride = self.layout.strides[level]
            gt_idx, anchor_idx = [], []
            for j, a in enumerate(self.layout.masks[level]):
                hit = matched[:, a].nonzero().flatten()
                gt_idx.append(hit)
                anchor_idx.append(torch.full_like(hit, j))
            gt_idx, anchor_idx = torch.cat(gt_idx), torch.cat(anchor_idx)
            centre = (boxes[gt_idx, :2] + boxes[gt_idx, 2:]) / 2 / stride
            cells = torch.stack([centre[:, 0].floor().clamp(0, w - 1), centre[:, 1].floor().clamp(0, h - 1)], dim=1)
            per_level.append({
                "gt": gt_idx, "image": image[gt_idx], "anchor": anchor_idx, "cells": cells, "boxes": boxes[gt_idx],
                "labels": labels[gt_idx],
                "anchor_wh": self.layout.level_anchors(level).to(device)[anchor_idx],
            })
        return per_level

    def forward(self, raw: list[torch.Tensor], targets: list[dict]) -> tuple[torch.Tensor, dict[str, float]]:
        if len(raw) != self.layout.num_levels:
            raise ValueError(f"loss got {len(raw)} output levels, the anchor layout has {self.layout.num_levels}")
        batch = raw[0].shape[0]
        check_targets(targets, batch)
        device = raw[0].device
        shapes = [(r.shape[-2], r.shape[-1]) for r in raw]
        assigned = self.assign(targets, shapes, device)
        gt_boxes = [t["boxes"].to(device, torch.float32) for t in targets]
        box_terms, cls_terms = [], []
        obj_loss = raw[0].new_zeros(())
        for level, (r, pos) in enumerate(zip(raw, assigned)):
            a = self.layout.num_anchors(level)
            stride = self.layout.strides[level]
            p = split_level(r, a)  # (N, A, H, W, 5 + C)
            obj_target = torch.zeros_like(p[..., 4])
            keep = torch.ones_like(obj_target, dtype=torch.bool)
            with torch.no_grad():  # ignore threshold: unassigned predictions already overlapping a truth
                h, w = shapes[level]
                pred_boxes = decode_boxes(
                    p[..., :4].detach(), grid_cells(h, w, device)[None, None],
                    self.layout.level_anchors(level).to(device)[None, :, None, None, :], stride, self.scale_x_y[level],
                )
                for i, gt in enumerate(gt_boxes):
                    if len(gt):
                        best = box_iou(pred_boxes[i].reshape(-1, 4), gt).amax(1).view(a, h, w)
                        keep[i] = best <= self.ignore_thresh
            if len(pos["image"]):
                b, j = pos["image"], pos["anchor"]
                gx, gy = pos["cells"][:, 0].long(), pos["cells"][:, 1].long()
                keep[b, j, gy, gx] = True
                obj_target[b, j, gy, gx] = 1.0
                pp = p[b, j, gy, gx]
                box_terms.append(self._box_loss(pp[:, :4], pos, stride, self.scale_x_y[level], r.shape[-2:]))
                onehot = F.one_hot(pos["labels"], self.num_classes).to(pp.dtype)
                if self.label_smoothing:
                    # Darknet's label_smooth_eps: y * (1 - eps) + eps / 2 for a per-class sigmoid.
                    onehot = onehot * (1 - self.label_smoothing) + self.label_smoothing / 2
                cls_terms.append(F.binary_cross_entropy_with_logits(pp[:, 5:], onehot, reduction="none").mean(1))
            obj = F.binary_cross_entropy_with_logits(p[..., 4], obj_target, reduction="none")
            obj_loss = obj_loss + self.level_balance[level] * obj[keep].mean()
        box_loss = torch.cat(box_terms).mean() if box_terms else raw[0].sum() * 0
        cls_loss = torch.cat(cls_terms).mean() if cls_terms else raw[0].sum() * 0
        total = self.weights["box"] * box_loss + self.weights["obj"] * obj_loss + self.weights["cls"] * cls_loss
        parts = {"box": float(box_loss.detach()), "obj": float(obj_loss.detach()), "cls": float(cls_loss.detach())}
        return total, parts

    def _box_loss(self, t: torch.Tensor, pos: dict, stride: int, scale_x_y: float, grid: tuple[int, int]) -> torch.Tensor:
        if self.box_loss == "mse":
            target = encode_boxes(pos["boxes"], pos["cells"], pos["anchor_wh"], stride, scale_x_y)
            wh = pos["boxes"][:, 2:] - pos["boxes"][:, :2]
            image_area = grid[0] * grid[1] * stride * stride
            scale = 2 - wh.prod(1) / image_area  # YOLOv3: small boxes weigh more
            err = (torch.sigmoid(t[:, :2]) - torch.sigmoid(target[:, :2])).pow(2).sum(1) + (t[:, 2:] - target[:, 2:]).pow(2).sum(1)
            return scale * err
        pred = decode_boxes(t, pos["cells"], pos["anchor_wh"], stride, scale_x_y)
        return _IOU_LOSSES[self.box_loss](pred, pos["boxes"], reduction="none")
