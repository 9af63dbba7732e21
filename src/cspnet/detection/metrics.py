"""COCO detection metrics through pycocotools' COCOeval (never a home-made mAP)."""
from __future__ import annotations

import contextlib
import copy
import io

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


def coco_evaluate(gt: dict | COCO, detections: list[dict]) -> dict[str, float]:
    """COCO box AP / AR of ``detections`` against ``gt``.

    ``detections`` are COCO result dicts: ``image_id``, ``category_id``, ``bbox`` [x, y, w, h] in
    original image pixels and ``score``. Returns the twelve summary numbers as fractions (``AP``,
    ``AP50``, ``AP75``, ``APs``, ``APm``, ``APl``, ``AR1`` …); with no detection at all every number
    is 0. pycocotools reports -1 for an area range without ground truth; those are kept.
    """
    coco_gt = gt if isinstance(gt, COCO) else coco_from_dict(gt)
    if not detections:
        return {k: 0.0 for k in STAT_NAMES}
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
    return {k: float(v) for k, v in zip(STAT_NAMES, np.asarray(ev.stats))}


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
