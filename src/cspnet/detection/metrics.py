"""COCO detection metrics through pycocotools' COCOeval (never a home-made mAP)."""
from __future__ import annotations

import contextlib
import copy
import io
from typing import Any

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

# The twelve numbers COCOeval.summarize() prints, in its order.
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def coco_from_dict(gt: dict) -> COCO:
    """A pycocotools ``COCO`` object from an ``instances`` dict (no file, no printing)."""
    coco = COCO()
    coco.dataset = copy.deepcopy(gt)
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def coco_evaluate(gt: dict | COCO, detections: list[dict], per_class: bool = False) -> dict[str, Any]:
    """COCO box AP / AR of ``detections`` against ``gt``.

    ``detections`` are COCO result dicts: ``image_id``, ``category_id``, ``bbox`` [x, y, w, h] in
    original image pixels and ``score``. Returns the twelve summary numbers as fractions (``AP``,
    ``AP50``, ``AP75``, ``APs``, ``APm``, ``APl``, ``AR1`` …); with no detection at all every number
    is 0. pycocotools reports -1 for an area range without ground truth; those are kept.

    ``per_class`` adds ``"per_class"``: ``[{"class", "category_id", "AP", "AP50"}]`` by category id, read from
    COCOeval's precision array (all areas, 100 detections) as its summary reads the whole; -1 for a
    category without ground truth.
    """
    coco_gt = gt if isinstance(gt, COCO) else coco_from_dict(gt)
    if not detections:
        result: dict[str, Any] = {k: 0.0 for k in STAT_NAMES}
        if per_class:
            result["per_class"] = [
                {"class": coco_gt.cats[cid]["name"], "category_id": int(cid),
                 # crowd boxes are ignore regions: a category with only those has no ground truth (-1, as COCOeval)
                 **dict.fromkeys(("AP", "AP50"), 0.0 if coco_gt.getAnnIds(catIds=[cid], iscrowd=False) else -1.0)}
                for cid in sorted(coco_gt.getCatIds())
            ]
        return result
    image_ids = set(coco_gt.getImgIds())
    stray = {d["image_id"] for d in detections} - image_ids
    if stray:
        raise ValueError(f"detections for image ids not in the ground truth: {sorted(stray)[:5]}")
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(copy.deepcopy(detections))
        ev = COCOeval(coco_gt, coco_dt, iouType="bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    result = {k: float(v) for k, v in zip(STAT_NAMES, np.asarray(ev.stats))}
    if per_class:
        # precision[iou threshold, recall, category, area range, max detections]; -1 where there is no ground truth
        precision = ev.eval["precision"][:, :, :, 0, -1]
        at_50 = int(np.argmin(np.abs(ev.params.iouThrs - 0.5)))
        result["per_class"] = [
            {"class": coco_gt.cats[cid]["name"], "category_id": int(cid),
             "AP": _mean_valid(precision[:, :, k]), "AP50": _mean_valid(precision[at_50, :, k])}
            for k, cid in enumerate(ev.params.catIds)
        ]
    return result


def _mean_valid(precision: np.ndarray) -> float:
    """The mean of the precisions COCOeval filled in (as its summary takes them), -1 when there is none."""
    valid = precision[precision > -1]
    return float(valid.mean()) if valid.size else -1.0


def to_coco_results(image_id: int, boxes, scores, labels, category_ids=None) -> list[dict]:
    """COCO result dicts for one image from xyxy ``boxes`` in its own pixels (`predict.boxes_in_image`)."""
    out = []
    for b, s, c in zip(np.asarray(boxes, np.float64), np.asarray(scores), np.asarray(labels)):
        cid = int(category_ids[int(c)]) if category_ids is not None else int(c)
        out.append({
            "image_id": int(image_id), "category_id": cid,
            "bbox": [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])], "score": float(s),
        })
    return out
