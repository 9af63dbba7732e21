"""Detection data: COCO JSON, Pascal-VOC XML, Darknet / YOLO labels, and two built-in sets that need no download.

- ``scenes``: Fashion-MNIST objects (Debian ``dataset-fashion-mnist`` or ``CSPNET_FASHION_MNIST``, read
  by the classification loaders; scikit-learn's digits when it is missing) pasted on scikit-image's bundled CC0 textures (grass, gravel, brick), 10 classes,
  exact boxes, fully determined by a seed. Train scenes use the training images, validation scenes
  the test images, so held-out scenes show unseen object instances.
- ``trees``: the aerial photos with hand-drawn tree boxes bundled in the ``deepforest`` wheel
  (install it with ``pip install --no-deps deepforest==2.1.0``; only its data files are read),
  tiled 400 x 400. The 2299 x 2472 YELL photo and SOAP_061 train; the 1249 x 1035 YELL photo and
  OSBS_029 validate.

User data: COCO JSON, Pascal-VOC XML, and Darknet / YOLO labels (a ``.data`` file, or a list or
folder of images with a ``.txt`` of normalised boxes each).

Every source becomes a list of `DetectionRecord` (boxes xyxy in image pixels). Boxes reaching out
of the image are clipped and boxes that are degenerate after clipping are dropped and counted
(`SanitizeReport`); a malformed annotation file raises `AnnotationError` naming the file and the
entry. `DetectionDataset` letterboxes to a square input and applies the training augmentation
(mosaic, scale / translate, flips, HSV jitter).
"""
from __future__ import annotations

import functools
import importlib.util
import json
import math
import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from . import classification

TREE_CLASSES = ("Tree",)
TREE_TRAIN = ("2019_YELL_2_528000_4978000_image_crop2", "SOAP_061")
TREE_VAL = ("2019_YELL_2_541000_4977000_image_crop", "OSBS_029")
# The 80 MS COCO detection classes in category-id order, as COCO's instances_*.json names them (Darknet's
# coco.names spells six otherwise: motorbike, aeroplane, sofa, pottedplant, diningtable, tvmonitor), and
# their category ids: 1..90 less the ten ids of categories never annotated with boxes. A detector trained
# on COCO by Darknet predicts class k for category COCO_CATEGORY_IDS[k].
COCO_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush",
)
COCO_CATEGORY_IDS = tuple(i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83))
PAD_VALUE = 114  # letterbox grey, as the YOLO family pads
MIN_BOX_SIZE = 1.0  # pixels; narrower boxes after clipping are degenerate
# A box reaching past the image by less than CLIP_TOLERANCE pixels plus CLIP_TOLERANCE_PER_PIXEL of the
# image's side is clipped without being counted: YOLO labels written at 6 decimals overshoot the edge by
# rounding (up to 5e-7 of the side: 0.002 px on a 4032-px photo), which is no annotation error
CLIP_TOLERANCE = 1e-3
CLIP_TOLERANCE_PER_PIXEL = 1e-6
# An augmented box (cut by the mosaic window, moved out of view by the affine) keeps so little of its
# object that it only teaches noise when it has a side under AUGMENTED_MIN_SIDE pixels, sides more
# than AUGMENTED_MAX_ASPECT apart, or under AUGMENTED_MIN_AREA of its area before augmentation (at the
# augmentation's scale): YOLOv5's box_candidates rule
AUGMENTED_MIN_SIDE = 2.0
AUGMENTED_MAX_ASPECT = 20.0
AUGMENTED_MIN_AREA = 0.1


class AnnotationError(ValueError):
    """An annotation file that cannot be read; the message names the file and the entry."""


# What PIL raises for an image it cannot read: OSError (UnidentifiedImageError is one) and the
# decompression-bomb guard's error, which is not an OSError.
UNREADABLE_IMAGE = (OSError, Image.DecompressionBombError)

# EXIF orientations that turn the stored pixels by 90 degrees (5 to 8: transposed, rotated 90 / 270,
# transversed): the upright image's width is the stored height
_QUARTER_TURNS = (5, 6, 7, 8)


def upright_size(im: Image.Image) -> tuple[int, int]:
    """``(width, height)`` of an open image as a viewer shows it (its EXIF orientation applied), read
    from the header without decoding the pixels."""
    w, h = im.size
    if im.format == "PNG" and "exif" not in im.info:
        # PIL decodes a whole PNG to look for an eXIf chunk after its pixels; the PNG spec puts it before them
        return w, h
    return (h, w) if im.getexif().get(ExifTags.Base.Orientation) in _QUARTER_TURNS else (w, h)


def upright_rgb(im: Image.Image, where: str) -> np.ndarray:
    """An open image's RGB uint8 pixels as a viewer shows them: cameras store a portrait photo as
    landscape pixels plus an EXIF orientation tag, and annotation tools draw the boxes on the upright
    image (`PIL.ImageOps.exif_transpose`, as the classification loader does). 16-bit images are scaled
    to 8 bits (`classification.to_8_bits`, which names ``where`` in its error)."""
    file_format = im.format  # the transposed copy has none
    return np.asarray(classification.to_8_bits(ImageOps.exif_transpose(im), where, file_format).convert("RGB"))


@dataclass
class DetectionRecord:
    """One image and its boxes. ``image`` is an RGB uint8 array, or ``None`` with ``path`` to read;
    ``source`` is the annotation file that describes it (named in errors)."""

    image_id: int
    file_name: str
    width: int
    height: int
    boxes: np.ndarray  # (M, 4) float32 xyxy pixels
    labels: np.ndarray  # (M,) int64, 0-based class index
    crowd: np.ndarray | None = None  # (M,) bool, COCO iscrowd (kept for evaluation, not trained on)
    # (M,) float: COCO's annotated object area (the mask's, usually below the box's), which sorts
    # objects into COCOeval's small / medium / large; None: the boxes' areas
    areas: np.ndarray | None = None
    image: np.ndarray | None = None
    path: str | None = None
    source: str | None = None

    def is_crowd(self) -> np.ndarray:
        """(M,) bool: the crowd boxes, which are evaluated as ignore regions but never trained on."""
        return self.crowd if self.crowd is not None and len(self.crowd) else np.zeros(len(self.boxes), bool)

    def load(self) -> np.ndarray:
        """The RGB image, upright (`upright_rgb`); raises `AnnotationError` when it cannot be read or
        is not the size the annotations declare (their boxes would be misplaced)."""
        if self.image is not None:
            return self.image
        where = f"{self.source}: image {self.path}" if self.source else f"image {self.path}"
        try:
            with Image.open(self.path) as im:
                stored = im.size
                image = upright_rgb(im, where)
        except UNREADABLE_IMAGE as e:
            raise AnnotationError(f"{where} cannot be read ({e})") from None
        size = (image.shape[1], image.shape[0])
        if size != (self.width, self.height):
            turned = f" upright (its EXIF orientation turns the stored {stored[0]} x {stored[1]})" if size != stored else ""
            raise AnnotationError(f"{where} is {size[0]} x {size[1]} pixels{turned}, the annotations declare {self.width} x {self.height}")
        return image


@dataclass
class SanitizeReport:
    """How many boxes were clipped to the image and how many dropped as degenerate; for YOLO labels,
    how many images had no label file (they are negatives)."""

    clipped: int = 0
    dropped: int = 0
    dropped_where: list[str] = field(default_factory=list)
    unlabelled: int = 0

    def merge(self, other: SanitizeReport) -> None:
        self.clipped += other.clipped
        self.dropped += other.dropped
        self.dropped_where += other.dropped_where
        self.unlabelled += other.unlabelled


def sanitize_boxes(
    boxes: np.ndarray, width: float, height: float, min_size: float = MIN_BOX_SIZE
) -> tuple[np.ndarray, np.ndarray, SanitizeReport]:
    """Clip xyxy ``boxes`` to the image; return ``(clipped boxes, keep mask, report)``.

    A box is degenerate (dropped) when it is narrower or lower than ``min_size`` after clipping, or
    has no width or height at all (``min_size=0``), which covers boxes entirely outside the image
    and boxes with x2 < x1. The report counts the kept boxes that moved by more than rounding
    (``CLIP_TOLERANCE`` pixels plus ``CLIP_TOLERANCE_PER_PIXEL`` of the side).
    """
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    clipped = boxes.copy()
    clipped[:, [0, 2]] = clipped[:, [0, 2]].clip(0, width)
    clipped[:, [1, 3]] = clipped[:, [1, 3]].clip(0, height)
    wh = clipped[:, 2:] - clipped[:, :2]
    keep = np.all((wh >= min_size) & (wh > 0), axis=1)
    tolerance = CLIP_TOLERANCE + CLIP_TOLERANCE_PER_PIXEL * np.array([width, height, width, height], np.float32)
    changed = np.any(np.abs(clipped - boxes) > tolerance, axis=1) & keep
    return clipped, keep, SanitizeReport(int(changed.sum()), int((~keep).sum()))


def kept_after_augmentation(before_wh: np.ndarray, boxes: np.ndarray, scale: float) -> np.ndarray:
    """(M,) bool: which augmented xyxy ``boxes`` still show enough of their object (see
    AUGMENTED_MIN_SIDE): ``before_wh`` (M, 2) are their sizes before augmentation, ``scale`` the
    factor the augmentation resized the image by."""
    wh = np.asarray(boxes, np.float32).reshape(-1, 4)
    wh = wh[:, 2:] - wh[:, :2]
    short, long = wh.min(1), wh.max(1)
    return ((short >= AUGMENTED_MIN_SIDE) & (long <= AUGMENTED_MAX_ASPECT * short)
            & (wh.prod(1) >= AUGMENTED_MIN_AREA * scale ** 2 * np.prod(before_wh, axis=1)))


def _finite_numbers(values, n: int) -> bool:
    return (
        isinstance(values, (list, tuple)) and len(values) == n
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)
    )


# -- COCO JSON ----------------------------------------------------------------------------------------
def load_coco(json_path: str | os.PathLike, images_dir: str | os.PathLike | None = None):
    """Read a COCO ``instances`` JSON; return ``(records, class_names, category_ids, report)``.

    ``category_ids[k]`` is the JSON category id of class index ``k`` (categories sorted by id).
    Images without annotations are kept (they are negatives). Raises `AnnotationError` naming the
    file and the offending entry (``annotations[12]``, ``images[3]`` …).
    """
    json_path = Path(json_path)
    try:
        data = json.loads(json_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AnnotationError(f"{json_path}: not a readable JSON file ({e})") from None
    if not isinstance(data, dict):
        raise AnnotationError(f"{json_path}: top level must be an object with images, annotations, categories")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise AnnotationError(f"{json_path}: key {key!r} must be a list")
    images_dir = Path(images_dir) if images_dir is not None else json_path.parent
    cats = {}
    for i, c in enumerate(data["categories"]):
        if not isinstance(c, dict) or not isinstance(c.get("id"), int) or "name" not in c:
            raise AnnotationError(f"{json_path}: categories[{i}] needs an integer 'id' and a 'name'")
        if c["id"] in cats:
            raise AnnotationError(f"{json_path}: categories[{i}] repeats id {c['id']}")
        cats[c["id"]] = str(c["name"])
    category_ids = sorted(cats)
    index_of = {cid: k for k, cid in enumerate(category_ids)}
    images = {}
    for i, im in enumerate(data["images"]):
        if not isinstance(im, dict) or not isinstance(im.get("id"), int) or not isinstance(im.get("file_name"), str):
            raise AnnotationError(f"{json_path}: images[{i}] needs an integer 'id' and a 'file_name'")
        w, h = im.get("width"), im.get("height")
        if not (isinstance(w, int) and isinstance(h, int) and w > 0 and h > 0):
            raise AnnotationError(f"{json_path}: images[{i}] (id {im['id']}) needs positive integer 'width' and 'height'")
        if im["id"] in images:
            raise AnnotationError(f"{json_path}: images[{i}] repeats id {im['id']}")
        images[im["id"]] = (im, [], [], [], [])
    report = SanitizeReport()
    for i, a in enumerate(data["annotations"]):
        where = f"{json_path}: annotations[{i}]"
        if not isinstance(a, dict):
            raise AnnotationError(f"{where} is not an object")
        if a.get("image_id") not in images:
            raise AnnotationError(f"{where}: image_id {a.get('image_id')!r} is not in 'images'")
        if a.get("category_id") not in index_of:
            raise AnnotationError(f"{where}: category_id {a.get('category_id')!r} is not in 'categories'")
        if not _finite_numbers(a.get("bbox"), 4):
            raise AnnotationError(f"{where}: 'bbox' must be 4 finite numbers [x, y, width, height], got {a.get('bbox')!r}")
        im, boxes, labels, crowd, areas = images[a["image_id"]]
        x, y, w, h = a["bbox"]
        area = a.get("area")
        if area is not None and not (_finite_numbers([area], 1) and area >= 0):
            raise AnnotationError(f"{where}: 'area' must be a finite number >= 0, got {area!r}")
        box, keep, rep = sanitize_boxes(np.array([[x, y, x + w, y + h]]), im["width"], im["height"])
        if not keep[0]:
            rep.dropped_where.append(f"annotations[{i}]")
            report.merge(rep)
            continue
        report.merge(rep)
        boxes.append(box[0])
        labels.append(index_of[a["category_id"]])
        crowd.append(bool(a.get("iscrowd", 0)))
        areas.append(area if area is not None else float(np.prod(box[0, 2:] - box[0, :2])))
    # checked after the entries, so that a broken entry is named first
    if not images:
        raise AnnotationError(f"{json_path}: no images")
    if not cats:
        raise AnnotationError(f"{json_path}: no categories")
    records = []
    for image_id, (im, boxes, labels, crowd, areas) in images.items():
        records.append(DetectionRecord(
            image_id, im["file_name"], im["width"], im["height"],
            np.array(boxes, np.float32).reshape(-1, 4), np.array(labels, np.int64), np.array(crowd, bool),
            np.array(areas, np.float64), path=str(images_dir / im["file_name"]), source=str(json_path),
        ))
    return records, tuple(cats[c] for c in category_ids), tuple(category_ids), report


# -- Pascal VOC XML -----------------------------------------------------------------------------------
def _find_image(xml_path: Path, filename: str | None, images_dir: Path | None) -> Path:
    dirs = [d for d in (images_dir, xml_path.parent, xml_path.parent.parent / "JPEGImages") if d is not None]
    stems = [filename] if filename else []
    stem = Path(filename).stem if filename else xml_path.stem
    stems += [stem + ext for ext in (".jpg", ".png", ".jpeg", ".JPG", ".PNG")]
    if filename and Path(filename).stem != xml_path.stem:
        stems += [xml_path.stem + ext for ext in (".jpg", ".png")]
    for d in dirs:
        for name in stems:
            if (d / name).is_file():
                return d / name
    raise AnnotationError(f"{xml_path}: image {filename or stem!r} not found in {', '.join(map(str, dirs))}")


def load_voc_file(xml_path: str | os.PathLike, images_dir: str | os.PathLike | None = None, one_based: bool = True):
    """Parse one Pascal-VOC XML; return ``(path, width, height, boxes, names, difficult, report)``.

    VOC's ``bndbox`` numbers pixels from 1, both ends inclusive: pixels ``xmin..xmax`` are the
    span ``[xmin - 1, xmax)`` in the image coordinates used everywhere else (as detectron2 reads
    them; a one-pixel object has ``xmin == xmax``). ``one_based=False`` reads files that store that
    span directly (the deepforest trees, as deepforest's own reader does). Size comes from
    ``<size>`` or, when absent, from the image. Raises `AnnotationError` naming the file and the
    object (``object[3]``) at fault.
    """
    xml_path = Path(xml_path)
    try:
        root = ET.parse(xml_path).getroot()
    except (ET.ParseError, OSError) as e:
        raise AnnotationError(f"{xml_path}: not a readable XML file ({e})") from None
    if root.tag != "annotation":
        raise AnnotationError(f"{xml_path}: root element is <{root.tag}>, expected <annotation>")
    path = _find_image(xml_path, root.findtext("filename"), Path(images_dir) if images_dir else None)
    try:
        width, height = int(root.findtext("size/width")), int(root.findtext("size/height"))
    except (TypeError, ValueError):
        try:
            with Image.open(path) as im:
                width, height = upright_size(im)
        except UNREADABLE_IMAGE as e:
            raise AnnotationError(f"{xml_path}: image {path} cannot be read ({e})") from None
    boxes, names, difficult = [], [], []
    for i, obj in enumerate(root.findall("object")):
        name = (obj.findtext("name") or "").strip()
        if not name:
            raise AnnotationError(f"{xml_path}: object[{i}] has no <name>")
        try:
            box = [float(obj.findtext(f"bndbox/{k}")) for k in ("xmin", "ymin", "xmax", "ymax")]
        except (TypeError, ValueError):
            raise AnnotationError(f"{xml_path}: object[{i}] ({name}) needs numeric bndbox xmin, ymin, xmax, ymax") from None
        if not all(math.isfinite(v) for v in box):
            raise AnnotationError(f"{xml_path}: object[{i}] ({name}) has a non-finite coordinate {box}")
        if one_based:
            box[0], box[1] = box[0] - 1, box[1] - 1
        boxes.append(box)
        names.append(name)
        difficult.append(obj.findtext("difficult", "0").strip() == "1")
    boxes = np.array(boxes, np.float32).reshape(-1, 4)
    clipped, keep, report = sanitize_boxes(boxes, width, height)
    report.dropped_where = [f"{xml_path}: object[{i}]" for i in np.flatnonzero(~keep)]
    names = [n for n, k in zip(names, keep) if k]
    difficult = np.array([d for d, k in zip(difficult, keep) if k], bool)
    return path, width, height, clipped[keep], names, difficult, report


def load_voc(xml_paths, images_dir=None, class_names: tuple[str, ...] | None = None, merge_classes: str | None = None,
             one_based: bool = True):
    """Read Pascal-VOC XML files; return ``(records, class_names, report)``.

    ``one_based``: the files number pixels from 1, as VOC does (see `load_voc_file`).
    Class names are taken from ``class_names`` (an unknown name is an error) or collected, sorted.
    ``merge_classes`` maps every object to one class of that name (the single-class tree set).
    ``difficult`` objects are kept as crowd regions (evaluated as ignore areas, as VOC does).
    """
    parsed, report = [], SanitizeReport()
    for p in sorted(Path(x) for x in xml_paths):
        path, w, h, boxes, names, difficult, rep = load_voc_file(p, images_dir, one_based)
        report.merge(rep)
        parsed.append((p, path, w, h, boxes, names, difficult))
    if merge_classes:
        class_names = (merge_classes,)
    elif class_names is None:
        class_names = tuple(sorted({n for *_, names, _ in parsed for n in names}))
    index = {n: k for k, n in enumerate(class_names)}
    records = []
    for i, (xml, path, w, h, boxes, names, difficult) in enumerate(parsed):
        if not merge_classes:
            bad = [n for n in names if n not in index]
            if bad:
                raise AnnotationError(f"{xml}: class {bad[0]!r} is not one of {list(class_names)}")
        labels = np.zeros(len(names), np.int64) if merge_classes else np.array([index[n] for n in names], np.int64)
        records.append(DetectionRecord(i, path.name, w, h, boxes, labels, difficult, path=str(path), source=str(xml)))
    return records, tuple(class_names), report


# -- Darknet / YOLO labels ---------------------------------------------------------------------------
def _search_folders(named_in: Path) -> list[Path]:
    """Where a relative path named in the file ``named_in`` is looked for: that file's folder, the
    folders above it, then the working directory. Darknet itself opens them from the working
    directory, its root folder, which its ``data/`` files lie below."""
    folder = named_in.resolve().parent
    return [folder, *folder.parents, Path.cwd()]


def _named_path(text: str, folders: list[Path], where: str) -> Path:
    path = Path(text)
    found = next((p for p in ([path] if path.is_absolute() else [d / path for d in folders]) if p.exists()), None)
    if found is None:
        raise AnnotationError(f"{where}: {text} does not exist (relative paths are looked for from the folder of "
                              f"the file naming them, the folders above it and the working directory)")
    return found


def _text_lines(path: Path, what: str) -> list[str]:
    try:
        return path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise AnnotationError(f"{path}: not a readable {what} ({e})") from None


def read_darknet_data(path: Path) -> dict[str, str]:
    """The ``key = value`` entries of a Darknet ``.data`` file (``classes``, ``train``, ``valid``,
    ``names``, ``backup`` …); lines starting with ``#`` or ``;`` are comments, as Darknet reads them."""
    entries = {}
    for n, line in enumerate(_text_lines(path, "Darknet .data file"), 1):
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        key, sep, value = line.partition("=")
        if not sep or not key.strip():
            raise AnnotationError(f"{path}:{n}: expected 'key = value', got {line!r}")
        entries[key.strip()] = value.strip()
    return entries


def image_list(list_path: Path) -> list[tuple[Path, str]]:
    """The images a Darknet / YOLO list file names, one path a line (blank lines skipped), as
    ``(path, "file:line")``. Raises `AnnotationError` naming the line of an image that does not exist."""
    folders = _search_folders(list_path)
    images = []
    for n, line in enumerate(_text_lines(list_path, "list of image paths"), 1):
        if line.strip():
            where = f"{list_path}:{n}"
            images.append((_named_path(line.strip(), folders, where), where))
    if not images:
        raise AnnotationError(f"{list_path}: lists no images")
    return images


def load_darknet_data(path: Path, split: str) -> tuple[list[tuple[Path, str]], tuple[str, ...] | None]:
    """The images of a Darknet ``.data`` file's ``train`` (``split="train"``) or ``valid`` list
    (`image_list`) and its class names: the ``names`` file's lines, else ``classes`` numbered
    (``"0"``, ``"1"`` …), else None. Raises `AnnotationError` naming the file and line at fault."""
    entries = read_darknet_data(path)
    key = "train" if split == "train" else "valid"
    if not entries.get(key):
        raise AnnotationError(f"{path}: no '{key} = <list of image paths>' entry for the {split} set")
    folders = _search_folders(path)
    classes = entries.get("classes")
    if classes is not None and not (classes.isdigit() and int(classes) > 0):
        raise AnnotationError(f"{path}: 'classes' must be a positive integer, got {classes!r}")
    names = None
    if entries.get("names"):
        names_path = _named_path(entries["names"], folders, f"{path}: names")
        lines = [line.strip() for line in _text_lines(names_path, "names file")]
        while lines and not lines[-1]:
            lines.pop()
        if "" in lines:  # class k is line k + 1: a blank line would shift every class after it
            raise AnnotationError(f"{names_path}:{lines.index('') + 1}: empty class name")
        names = tuple(lines)
        if not names:
            raise AnnotationError(f"{names_path}: no class names")
        if classes is not None and int(classes) != len(names):
            raise AnnotationError(f"{path}: classes = {classes}, but {names_path} names {len(names)}")
    elif classes is not None:
        names = tuple(str(k) for k in range(int(classes)))
    return image_list(_named_path(entries[key], folders, f"{path}: {key}")), names


def yolo_label_path(image: Path) -> Path:
    """Where Darknet reads an image's labels: its path with the last ``images`` or ``JPEGImages`` folder
    replaced by ``labels`` and the suffix by ``.txt`` (``data/images/a.jpg``: ``data/labels/a.txt``)."""
    parts = list(image.parts)
    for i in reversed(range(len(parts) - 1)):
        if parts[i] in ("images", "JPEGImages"):
            parts[i] = "labels"
            break
    return Path(*parts).with_suffix(".txt")


def load_yolo_labels(label_path: Path, width: int, height: int, num_classes: int | None):
    """Parse one YOLO / Darknet label file: a line per box, ``class x_centre y_centre width height``, the
    class an index from 0 and the rest fractions of the image's width and height. Return ``(boxes,
    labels, report)``, boxes xyxy in pixels, clipped (`sanitize_boxes`). Raises `AnnotationError`
    naming the file and line of a line that is not five numbers, a class id that is not an integer
    below ``num_classes`` (None: any), or a coordinate outside [0, 1]."""
    boxes, labels, where = [], [], []
    for n, line in enumerate(_text_lines(label_path, "label file"), 1):
        fields = line.split()
        if not fields:
            continue
        at = f"{label_path}:{n}"
        try:
            values = [float(v) for v in fields]
        except ValueError:
            values = []
        if len(values) != 5:
            raise AnnotationError(f"{at}: expected 'class x_centre y_centre width height' (5 numbers), got {line.strip()!r}")
        label, (cx, cy, w, h) = values[0], values[1:]
        if not (label.is_integer() and 0 <= label < (num_classes or math.inf)):
            known = f"0..{num_classes - 1}" if num_classes else "an integer >= 0"
            raise AnnotationError(f"{at}: class id {fields[0]} is not one of {known}")
        if not all(0 <= v <= 1 for v in (cx, cy, w, h)):  # NaN fails too
            raise AnnotationError(f"{at}: coordinates must be fractions of the image size in [0, 1], got {' '.join(fields[1:])}")
        boxes.append([(cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height])
        labels.append(int(label))
        where.append(at)
    clipped, keep, report = sanitize_boxes(np.array(boxes, np.float64).reshape(-1, 4), width, height)
    report.dropped_where = [at for at, k in zip(where, keep) if not k]
    return clipped[keep], np.array(labels, np.int64)[keep], report


def load_yolo(images: list[tuple[Path, str]], class_names: tuple[str, ...] | None = None, name: str = "YOLO data"):
    """Read the YOLO / Darknet labels of ``images`` (``(path, where it is named)`` pairs) of the data
    set ``name`` (named in errors); return ``(records, class_names, report)``.

    Each image's labels are `yolo_label_path`'s file, else a ``.txt`` of its name beside it (where
    AlexeyAB's Darknet keeps them). An image without a label file is a negative (no objects;
    ``report.unlabelled`` counts them). The fractions are of the upright image (`upright_size`).
    Class ids index ``class_names``; without them the classes are numbered up to the largest id.
    """
    parsed, report = [], SanitizeReport()
    for path, where in images:
        try:
            with Image.open(path) as im:
                width, height = upright_size(im)
        except UNREADABLE_IMAGE as e:
            raise AnnotationError(f"{where}: image {path} cannot be read ({e})") from None
        label_path = next((p for p in (yolo_label_path(path), path.with_suffix(".txt")) if p.is_file()), None)
        if label_path is None:
            report.unlabelled += 1
            boxes, labels = np.zeros((0, 4), np.float32), np.zeros(0, np.int64)
        else:
            boxes, labels, rep = load_yolo_labels(label_path, width, height, len(class_names) if class_names else None)
            report.merge(rep)
        parsed.append((path, where, width, height, boxes, labels))
    if class_names is None:
        largest = max((int(labels.max()) for *_, labels in parsed if len(labels)), default=None)
        if largest is None:
            raise AnnotationError(f"{name}: no image has a labelled box, and no names file says the classes "
                                  f"(give a Darknet .data file with 'classes' or 'names')")
        class_names = tuple(str(k) for k in range(largest + 1))
    records = [
        DetectionRecord(i, path.name, width, height, boxes, labels, np.zeros(len(labels), bool), path=str(path), source=where)
        for i, (path, where, width, height, boxes, labels) in enumerate(parsed)
    ]
    return records, tuple(class_names), report


# -- built-in: generated scenes -------------------------------------------------------------------------
@functools.lru_cache(maxsize=2)
def object_images(split: str = "train") -> tuple[np.ndarray, np.ndarray, tuple[str, ...], bool]:
    """Grey object crops ``(N, H, W)`` uint8, labels and class names for the scenes, at their own size,
    and whether a horizontal flip keeps their labels (the classification data's ``hflip``).

    Fashion-MNIST's training or test images when installed (`classification.load_fashion_mnist`; the
    ``CSPNET_FASHION_MNIST`` folder overrides the default), else scikit-learn's digits, the
    training or test part of `classification.load_digits_data`'s split (a mirrored digit is no digit).
    """
    if classification.FASHION_MNIST_ROOT.is_dir():
        data = classification.load_fashion_mnist(28)
    else:
        data = classification.load_digits_data(8)
    part = data.train if split == "train" else data.test
    return part.images[:, 0].numpy(), part.labels.numpy(), tuple(data.classes), data.hflip


def _textures() -> list[np.ndarray]:
    from skimage import data

    return [data.grass(), data.gravel(), data.brick()]


def make_scenes(
    n: int,
    seed: int = 0,
    size: int = 256,
    split: str = "train",
    objects: tuple[int, int] = (2, 5),
    object_size: tuple[int, int] | None = None,
) -> tuple[list[DetectionRecord], tuple[str, ...]]:
    """Generate ``n`` scenes: objects pasted on a random crop of a CC0 texture, with exact boxes.

    Each scene holds ``objects[0]``..``objects[1]`` non-overlapping objects of side ``object_size``
    (default ``size/8`` to ``3*size/8``), tinted with a random colour; the box is the tight extent of
    the pasted pixels (object opacity > 0.1; fainter ones are not pasted). The result depends only
    on the arguments.
    """
    if n < 1 or size < 32:
        raise ValueError(f"need n >= 1 and size >= 32, got n={n}, size={size}")
    lo, hi = object_size or (size // 8, 3 * size // 8)
    objs, obj_labels, names, _ = object_images(split)
    rng = np.random.default_rng(seed)
    textures = _textures()
    records = []
    for k in range(n):
        tex = textures[rng.integers(len(textures))]
        crop = min(size, *tex.shape[:2])
        oy, ox = rng.integers(0, tex.shape[0] - crop + 1), rng.integers(0, tex.shape[1] - crop + 1)
        bg = np.asarray(Image.fromarray(tex[oy:oy + crop, ox:ox + crop]).resize((size, size)), np.float32)
        tint_bg = rng.uniform(0.5, 1.0, 3) * rng.uniform(0.4, 0.7)
        img = bg[..., None] * tint_bg[None, None]
        boxes, labels = [], []
        for _ in range(int(rng.integers(objects[0], objects[1] + 1))):
            for _try in range(20):  # place without overlapping the objects already there
                s = int(rng.integers(lo, hi + 1))
                x0, y0 = int(rng.integers(0, size - s + 1)), int(rng.integers(0, size - s + 1))
                if all(x0 >= b[2] or x0 + s <= b[0] or y0 >= b[3] or y0 + s <= b[1] for b in boxes):
                    break
            else:
                continue
            i = int(rng.integers(len(objs)))
            alpha = np.asarray(Image.fromarray(objs[i]).resize((s, s), Image.BILINEAR), np.float32) / 255
            alpha[alpha <= 0.1] = 0  # faint fringe left out, so no object pixel lies outside its box
            ys, xs = np.nonzero(alpha)
            if len(xs) == 0:
                continue
            colour = rng.uniform(0.6, 1.0, 3) * 255
            a = alpha[..., None]
            img[y0:y0 + s, x0:x0 + s] = img[y0:y0 + s, x0:x0 + s] * (1 - a) + colour[None, None] * a
            boxes.append([x0 + xs.min(), y0 + ys.min(), x0 + xs.max() + 1, y0 + ys.max() + 1])
            labels.append(int(obj_labels[i]))
        records.append(DetectionRecord(
            k, f"scene_{split}_{seed}_{k:05d}.png", size, size,
            np.array(boxes, np.float32).reshape(-1, 4), np.array(labels, np.int64), np.zeros(len(labels), bool),
            image=img.clip(0, 255).astype(np.uint8),
        ))
    return records, names


# -- built-in: aerial tree photos (deepforest) ------------------------------------------------------------
def deepforest_data_dir() -> Path:
    """The ``data`` folder of the installed deepforest wheel, found without importing deepforest."""
    spec = importlib.util.find_spec("deepforest")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("the 'trees' data set needs the deepforest wheel's data: pip install --no-deps deepforest==2.1.0")
    path = Path(list(spec.submodule_search_locations)[0]) / "data"
    if not path.is_dir():
        raise ValueError(f"{path}: deepforest is installed but has no data folder")
    return path


def tile_starts(length: int, tile: int, overlap: bool = True) -> list[int]:
    """Tile origins covering ``length`` at a stride of ``tile``. With ``overlap`` the last tile is
    flush with the edge (overlapping its neighbour), else it is a narrower remainder."""
    if length <= tile:
        return [0]
    if not overlap:
        return list(range(0, length, tile))
    return list(range(0, length - tile, tile)) + [length - tile]


def tile_record(image: np.ndarray, boxes: np.ndarray, labels: np.ndarray, tile: int, name: str, first_id: int,
                overlap: bool = True):
    """Cut an image into ``tile`` x ``tile`` crops (see `tile_starts`); a box belongs to every tile
    holding its centre and is clipped to it."""
    h, w = image.shape[:2]
    out = []
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    for ty in tile_starts(h, tile, overlap):
        for tx in tile_starts(w, tile, overlap):
            crop = image[ty:ty + tile, tx:tx + tile]
            inside = (centres[:, 0] >= tx) & (centres[:, 0] < tx + crop.shape[1]) & (centres[:, 1] >= ty) & (centres[:, 1] < ty + crop.shape[0])
            b = boxes[inside] - np.array([tx, ty, tx, ty], np.float32)
            b, keep, _ = sanitize_boxes(b, crop.shape[1], crop.shape[0])
            out.append(DetectionRecord(
                first_id + len(out), f"{name}_x{tx}_y{ty}.png", crop.shape[1], crop.shape[0],
                b[keep], labels[inside][keep], np.zeros(int(keep.sum()), bool), image=np.ascontiguousarray(crop),
            ))
    return out


def tree_tiles(split: str = "train", tile: int = 400) -> tuple[list[DetectionRecord], tuple[str, ...]]:
    """Tiles of the deepforest photos (see the module docstring for the split), one class ``Tree``.

    Training tiles overlap at the right / bottom edges (every tile full size); validation tiles do
    not, so that every tree is evaluated exactly once.
    """
    if split not in ("train", "val"):
        raise ValueError(f"tree split must be 'train' or 'val', got {split!r}")
    data = deepforest_data_dir()
    stems = TREE_TRAIN if split == "train" else TREE_VAL
    records, _, _ = load_voc([data / f"{s}.xml" for s in stems], data, merge_classes=TREE_CLASSES[0], one_based=False)
    tiles: list[DetectionRecord] = []
    for r in records:
        tiles += tile_record(r.load(), r.boxes, r.labels, tile, Path(r.file_name).stem, len(tiles), overlap=split == "train")
    return tiles, TREE_CLASSES


# -- dataset with letterbox and augmentation -------------------------------------------------------------
@dataclass(frozen=True)
class AugmentCfg:
    """Training augmentation (YOLOv5-like defaults). Probabilities are per image."""

    mosaic: float = 0.5
    scale: float = 0.3  # random scale in [1 - scale, 1 + scale]
    translate: float = 0.1  # fraction of the input size
    hflip: float = 0.5
    vflip: float = 0.0
    hue: float = 0.015
    saturation: float = 0.5
    brightness: float = 0.3


def letterbox(image: np.ndarray, size: int) -> tuple[np.ndarray, float]:
    """Resize the longer side to ``size`` and pad right / bottom to a square; return ``(image, ratio)``."""
    h, w = image.shape[:2]
    r = size / max(h, w)
    nw, nh = max(1, round(w * r)), max(1, round(h * r))
    out = np.full((size, size, 3), PAD_VALUE, np.uint8)
    out[:nh, :nw] = np.asarray(Image.fromarray(image).resize((nw, nh), Image.BILINEAR)) if (nw, nh) != (w, h) else image
    return out, r


class DetectionDataset(Dataset):
    """Square letterboxed images and targets for the detector.

    Items are ``(image, target)``: a float ``(3, S, S)`` tensor in [0, 1] and a dict with ``boxes``
    (M, 4) xyxy in input pixels, ``labels`` (M,), ``image_id``, ``ratio`` (input / original pixels)
    and ``orig_size`` (h, w). Crowd boxes are not trained on. ``augment=None`` gives the evaluation
    pipeline. ``report`` counts the boxes clipped / dropped by the evaluation pipeline. Random
    draws use torch's global generator: training reads items through `detection.train.DetectionTask`'s
    ``train_set``, which seeds it per item from the loop's chunk seed (under ``fork_rng``, in whichever
    DataLoader process reads the item) so that a resumed run repeats the same augmentation.
    """

    def __init__(
        self,
        records: list[DetectionRecord],
        class_names: tuple[str, ...],
        img_size: int = 256,
        augment: AugmentCfg | None = None,
        report: SanitizeReport | None = None,
    ):
        if img_size % 32:
            raise ValueError(f"img_size must be a multiple of 32 (the coarsest stride), got {img_size}")
        self.records = records
        self.class_names = tuple(class_names)
        self.img_size = img_size
        self.augment = augment
        self.report = report or SanitizeReport()
        if augment is not None:
            self.geometric = v2.RandomAffine(
                degrees=0, translate=(augment.translate, augment.translate),
                scale=(1 - augment.scale, 1 + augment.scale), fill=PAD_VALUE,
            )
            self.colour = v2.ColorJitter(brightness=augment.brightness, saturation=augment.saturation, hue=augment.hue)

    def __len__(self) -> int:
        return len(self.records)

    def _letterboxed(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
        r = self.records[i]
        img, ratio = letterbox(r.load(), self.img_size)
        keep = ~r.is_crowd()
        return img, r.boxes[keep] * ratio, r.labels[keep], ratio

    def _mosaic(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        # Four letterboxed images on a 2S x 2S canvas; an S x S window around a random centre. Returns
        # the window, its boxes and labels, and the boxes' sizes before the window cut them.
        s = self.img_size
        canvas = np.full((2 * s, 2 * s, 3), PAD_VALUE, np.uint8)
        boxes, labels = [], []
        picks = [i] + torch.randint(len(self.records), (3,)).tolist()
        for (oy, ox), j in zip(((0, 0), (0, s), (s, 0), (s, s)), picks):
            img, b, lab, _ = self._letterboxed(j)
            canvas[oy:oy + s, ox:ox + s] = img
            boxes.append(b + np.array([ox, oy, ox, oy], np.float32))
            labels.append(lab)
        cx, cy = torch.randint(s // 2, 3 * s // 2 + 1, (2,)).tolist()
        x0, y0 = cx - s // 2, cy - s // 2
        boxes = np.concatenate(boxes) - np.array([x0, y0, x0, y0], np.float32)
        before_wh = boxes[:, 2:] - boxes[:, :2]
        # Clip to the window now: the affine that follows would otherwise carry a box's part outside
        # the window, whose pixels are cut away, back into view over the grey fill.
        boxes, keep, _ = sanitize_boxes(boxes, s, s)
        return canvas[y0:y0 + s, x0:x0 + s], boxes[keep], np.concatenate(labels)[keep], before_wh[keep]

    def __getitem__(self, i: int):
        r = self.records[i]
        aug = self.augment
        if aug is not None and torch.rand(()) < aug.mosaic:
            img, boxes, labels, before_wh = self._mosaic(i)
            ratio = 1.0
        else:
            img, boxes, labels, ratio = self._letterboxed(i)
            before_wh = boxes[:, 2:] - boxes[:, :2]
        image = tv_tensors.Image(torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1))
        boxes_t = tv_tensors.BoundingBoxes(torch.from_numpy(boxes).float().reshape(-1, 4), format="XYXY", canvas_size=(self.img_size,) * 2)
        if aug is not None:
            affine = self.geometric.make_params([image])  # drawn here for its scale, as calling it would draw them
            image, boxes_t = self.geometric.transform(image, affine), self.geometric.transform(boxes_t, affine)
            if torch.rand(()) < aug.hflip:
                image, boxes_t = v2.functional.horizontal_flip(image), v2.functional.horizontal_flip(boxes_t)
            if torch.rand(()) < aug.vflip:
                image, boxes_t = v2.functional.vertical_flip(image), v2.functional.vertical_flip(boxes_t)
            image = self.colour(image)
        boxes, keep, rep = sanitize_boxes(boxes_t.numpy(), self.img_size, self.img_size)
        if aug is None:  # boxes lost to augmentation are expected; only count the data's own
            self.report.merge(rep)
        else:
            keep &= kept_after_augmentation(before_wh, boxes, affine["scale"])
        target = {
            "boxes": torch.from_numpy(boxes[keep]),
            "labels": torch.from_numpy(np.asarray(labels)[keep]).long(),
            "image_id": r.image_id,
            "ratio": ratio,
            "orig_size": (r.height, r.width),
        }
        return image.float().div_(255), target


def collate_detection(batch):
    """Stack images; keep the targets as a list of dicts."""
    images, targets = zip(*batch)
    return torch.stack(images), list(targets)


def coco_ground_truth(records: list[DetectionRecord], class_names: tuple[str, ...], category_ids=None) -> dict:
    """A COCO ``instances`` dict of the records' boxes in original image pixels (for COCOeval), with
    each object's annotated area where the source has one (COCO's size ranges read it)."""
    category_ids = list(category_ids or range(len(class_names)))
    images, annotations = [], []
    for r in records:
        images.append({"id": r.image_id, "file_name": r.file_name, "width": r.width, "height": r.height})
        wh = r.boxes[:, 2:] - r.boxes[:, :2]
        areas = r.areas if r.areas is not None else wh.prod(1)
        for b, (w, h), label, c, area in zip(r.boxes, wh.tolist(), r.labels, r.is_crowd(), areas):
            annotations.append({
                "id": len(annotations) + 1, "image_id": r.image_id, "category_id": category_ids[int(label)],
                "bbox": [float(b[0]), float(b[1]), w, h], "area": float(area), "iscrowd": int(c),
            })
    categories = [{"id": cid, "name": n} for cid, n in zip(category_ids, class_names)]
    return {"images": images, "annotations": annotations, "categories": categories}


BUILTIN_DETECTION = ("scenes", "trees")


@dataclass
class DetectionSource:
    """Records of one split of a data source, with their classes and (COCO) category ids. ``hflip``:
    whether a horizontal flip keeps every label (the default of the flip augmentation)."""

    records: list[DetectionRecord]
    class_names: tuple[str, ...]
    category_ids: tuple[int, ...] | None
    report: SanitizeReport
    description: str
    hflip: bool = True


def load_detection_source(
    spec: str, split: str = "train", images_dir: str | None = None, num_scenes: int = 512, scene_size: int = 256,
    seed: int = 0, class_names: tuple[str, ...] | None = None,
) -> DetectionSource:
    """Resolve a ``--data`` argument: ``scenes``, ``trees``, a COCO ``.json`` file, a folder of
    Pascal-VOC ``.xml`` files, one ``.xml`` file, a Darknet ``.data`` file, or YOLO labels of the
    images a ``.txt`` list names or of a folder's images (`load_yolo`).

    For ``scenes`` the ``val`` split is generated from another seed and the Fashion-MNIST test
    images; ``num_scenes`` is the size of the split. A ``.data`` file's splits are its ``train`` and
    ``valid`` lists. Other user files have no split: the file given is the data. ``class_names``
    fixes the class order of VOC files and names the classes of YOLO labels without a names file
    (a trained model's classes).
    """
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if spec == "scenes":
        records, names = make_scenes(num_scenes, seed=seed if split == "train" else seed + 10_000, size=scene_size, split=split)
        *_, hflip = object_images(split)  # the objects make_scenes pasted (cached)
        return DetectionSource(records, names, None, SanitizeReport(), f"scenes/{split} ({num_scenes} x {scene_size}px, seed {seed})",
                               hflip=hflip)
    if spec == "trees":
        records, names = tree_tiles(split)
        return DetectionSource(records, names, None, SanitizeReport(), f"deepforest trees/{split} ({len(records)} tiles)")
    path = Path(spec)
    suffix = path.suffix.lower()
    if suffix == ".json":
        if not path.is_file():
            raise ValueError(f"{path}: no such COCO annotation file")
        records, names, cat_ids, report = load_coco(path, images_dir)
        return DetectionSource(records, names, cat_ids, report, f"COCO {path}")
    if suffix == ".xml" or (path.is_dir() and any(path.glob("*.xml"))):
        xmls = sorted(path.glob("*.xml")) if path.is_dir() else [path]
        records, names, report = load_voc(xmls, images_dir, class_names)
        return DetectionSource(records, names, None, report, f"VOC {path} ({len(xmls)} files)")
    if suffix in (".data", ".txt") or path.is_dir():
        if images_dir is not None:
            raise ValueError(f"{path}: an image folder is given for COCO / VOC annotations; YOLO labels lie beside the images")
        if not path.exists():
            raise ValueError(f"{path}: no such file")
        if suffix == ".data":
            images, names = load_darknet_data(path, split)
            what = f"Darknet {path} ({'train' if split == 'train' else 'valid'})"
        elif suffix == ".txt":
            images, names, what = image_list(path), None, f"YOLO list {path}"
        else:
            try:
                images = [(image, str(path)) for image in classification.image_files([path])]
            except classification.DataError:
                raise ValueError(f"{path}: neither Pascal-VOC .xml files nor images (for YOLO labels) here") from None
            names, what = None, f"YOLO images {path}"
        records, names, report = load_yolo(images, names or class_names, what)
        return DetectionSource(records, names, None, report, f"{what} ({len(records)} images)")
    raise ValueError(f"--data {spec!r}: expected {' or '.join(BUILTIN_DETECTION)}, a COCO .json file, a folder of VOC .xml "
                     "files, a Darknet .data file, or a .txt list or folder of images with YOLO labels")


def has_validation_split(spec: str) -> bool:
    """Whether ``--data spec`` holds its own validation set: the built-in sets, and a Darknet ``.data``
    file with a ``valid`` list."""
    return spec in BUILTIN_DETECTION or (Path(spec).suffix.lower() == ".data" and bool(read_darknet_data(Path(spec)).get("valid")))


def source_record(source_args: dict[str, Any], source: DetectionSource) -> dict[str, Any]:
    """What a training run records of a data set: the `load_detection_source` arguments (paths made
    absolute, since eval may run from another working directory) and the set's description, so that
    ``cspnet detect eval`` can load it again."""
    out = dict(source_args, description=source.description)
    if out["spec"] not in BUILTIN_DETECTION:
        out["spec"] = str(Path(out["spec"]).resolve())
    if out["images_dir"] is not None:
        out["images_dir"] = str(Path(out["images_dir"]).resolve())
    return out
