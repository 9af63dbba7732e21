"""Run a trained detector on image files: drawn images and a ``detections.json``."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.utils import draw_bounding_boxes

from ..data.detection import UNREADABLE_IMAGE, letterbox, sanitize_boxes, upright_rgb
from ..files import atomic_path, atomic_write_text
from .detector import Detector


def _read_rgb(path: Path) -> np.ndarray:
    """The image upright, as training read its annotated images (`upright_rgb`): a phone photo stored
    turned by its EXIF orientation is detected and drawn as it is seen."""
    try:
        with Image.open(path) as im:
            return upright_rgb(im, str(path))
    except UNREADABLE_IMAGE as e:
        raise ValueError(f"{path}: cannot read image ({e})") from None


def boxes_in_image(det: dict[str, torch.Tensor], ratio: float, width: int, height: int) -> dict[str, torch.Tensor]:
    """Detections on a letterboxed input (`Detector.postprocess`) in the image's own pixels: scaled back
    by the letterbox ``ratio`` and clipped to the ``width`` x ``height`` image. A box left without width
    or height (it lay in the letterbox padding) is dropped. Prediction and evaluation both use this."""
    boxes, keep, _ = sanitize_boxes(det["boxes"].cpu().numpy() / ratio, width, height, min_size=0)
    keep = torch.from_numpy(keep)
    return {"boxes": torch.from_numpy(boxes)[keep], "scores": det["scores"].cpu()[keep], "labels": det["labels"].cpu()[keep]}


@torch.inference_mode()
def detect_image(model: Detector, image: np.ndarray, img_size: int, conf_thresh: float = 0.25,
                 iou_thresh: float = 0.45) -> dict[str, torch.Tensor]:
    """Detections on one RGB uint8 image, boxes in its own pixels (`boxes_in_image`)."""
    boxed, ratio = letterbox(image, img_size)
    x = torch.from_numpy(boxed).permute(2, 0, 1)[None].float().div_(255)
    model.eval()
    det = model.postprocess(model(x.to(next(model.parameters()).device)), conf_thresh, iou_thresh)[0]
    return boxes_in_image(det, ratio, image.shape[1], image.shape[0])


def predict_files(model: Detector, paths: list[Path], out_dir: Path, img_size: int, class_names: tuple[str, ...],
                  conf_thresh: float = 0.25, iou_thresh: float = 0.45, skipped: list[str] | None = None,
                  category_ids: tuple[int, ...] | None = None) -> list[dict]:
    """Detect in every image; write ``<stem>_det.png`` with boxes drawn and ``detections.json``.

    An unreadable image raises a ValueError naming it, or, when a ``skipped`` list is given, is left
    out and its error appended there: the other images' results are still written.

    Inputs sharing a stem (``a/x.png``, ``b/x.png``) get ``x_det.png``, ``x_2_det.png`` … in the order
    given. Each entry of the JSON: ``{"image": path, "width", "height", "drawn": the drawn image's path,
    "detections": [{"box": [x1, y1, x2, y2], "score", "label", "class"}]}`` in the image's own pixels;
    with ``category_ids`` (a run trained on a COCO file records them) each detection also carries its
    ``category_id``, the file's id of its class.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    taken: set[str] = set()
    for path in paths:
        try:
            image = _read_rgb(path)
        except ValueError as e:
            if skipped is None:
                raise
            skipped.append(str(e))
            continue
        det = detect_image(model, image, img_size, conf_thresh, iou_thresh)
        names = [f"{class_names[int(c)]} {s:.2f}" for c, s in zip(det["labels"], det["scores"])]
        drawn = torch.from_numpy(image.copy()).permute(2, 0, 1)
        if len(names):  # torchvision warns when given no box to draw
            drawn = draw_bounding_boxes(drawn, det["boxes"], names, colors="red", width=2)
        name, k = f"{path.stem}_det.png", 1
        while name in taken:
            k += 1
            name = f"{path.stem}_{k}_det.png"
        taken.add(name)
        target = out_dir / name
        with atomic_path(target) as tmp:
            Image.fromarray(drawn.permute(1, 2, 0).numpy()).save(tmp, format="PNG")
        detections = []
        for b, s, c in zip(det["boxes"], det["scores"], det["labels"]):
            entry = {"box": [round(float(v), 2) for v in b], "score": round(float(s), 4), "label": int(c), "class": class_names[int(c)]}
            if category_ids is not None:
                entry["category_id"] = int(category_ids[int(c)])
            detections.append(entry)
        results.append({"image": str(path), "width": image.shape[1], "height": image.shape[0], "drawn": str(target),
                        "detections": detections})
    atomic_write_text(out_dir / "detections.json", json.dumps(results, indent=1))
    return results
