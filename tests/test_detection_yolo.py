"""Darknet / YOLO labels: .data files, image lists and folders, label paths, errors, and the round trip against COCO."""
import json
import types

import numpy as np
import pytest
from PIL import Image

from cspnet.data import detection as D
from cspnet.data.detection import AnnotationError, coco_ground_truth, load_coco, load_detection_source

# image name, (width, height), boxes as (class, x0, y0, x1, y1) in pixels; every fraction of the image size
# is a binary fraction, so the normalised label text and the COCO pixels describe exactly the same boxes
IMAGES = [
    ("a.png", (64, 32), [(0, 8, 4, 40, 20), (1, 32, 16, 64, 32)]),
    ("b.png", (48, 48), [(1, 6, 12, 30, 45)]),
    ("c.png", (32, 64), []),  # an empty label file: a negative
    ("d.png", (40, 40), None),  # no label file: a negative too
]
NAMES = ("cat", "dog")


def _label_line(label, box, size):
    (w, h), (x0, y0, x1, y1) = size, box
    return f"{label} {(x0 + x1) / 2 / w!r} {(y0 + y1) / 2 / h!r} {(x1 - x0) / w!r} {(y1 - y0) / h!r}\n"


def _yolo_set(root, images_dir="images", labels_dir="labels"):
    """A YOLO data set under ``root``: ``images_dir`` / PNGs, ``labels_dir`` / .txt (``root/obj.names``)."""
    (root / images_dir).mkdir(parents=True)
    (root / labels_dir).mkdir(parents=True, exist_ok=True)
    for name, size, boxes in IMAGES:
        Image.new("RGB", size, (90, 90, 90)).save(root / images_dir / name)
        if boxes is not None:
            (root / labels_dir / name.replace(".png", ".txt")).write_text("".join(_label_line(c, b, size) for c, *b in boxes))
    (root / "obj.names").write_text("\n".join(NAMES) + "\n")
    return [root / images_dir / name for name, *_ in IMAGES]


def _equivalent_coco(root, images_dir="images"):
    images = [{"id": i, "file_name": name, "width": w, "height": h} for i, (name, (w, h), _) in enumerate(IMAGES)]
    annotations = [{"id": len(images) * 10 + k, "image_id": i, "category_id": c, "bbox": [x0, y0, x1 - x0, y1 - y0]}
                   for i, (_, _, boxes) in enumerate(IMAGES) for k, (c, x0, y0, x1, y1) in enumerate(boxes or [])]
    path = root / "instances.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations,
                                "categories": [{"id": k, "name": n} for k, n in enumerate(NAMES)]}))
    return load_coco(path, root / images_dir)


def _darknet_data(root, train="train.txt", valid="train.txt", names="obj.names", classes=2):
    path = root / "obj.data"
    path.write_text(f"# made for a test\nclasses = {classes}\ntrain  = {train}\nvalid = {valid}\nnames = {names}\nbackup = backup/\n")
    return path


def test_darknet_data_round_trips_against_the_equivalent_coco_json(tmp_path):
    paths = _yolo_set(tmp_path)
    (tmp_path / "train.txt").write_text("".join(f"images/{p.name}\n" for p in paths) + "\n")  # a blank last line
    source = load_detection_source(str(_darknet_data(tmp_path)))
    coco, names, cat_ids, _ = _equivalent_coco(tmp_path)
    assert source.class_names == names == NAMES and cat_ids == (0, 1)
    assert source.report.unlabelled == 1 and source.report.clipped == source.report.dropped == 0
    assert len(source.records) == len(coco) == 4
    for yolo, ref in zip(source.records, sorted(coco, key=lambda r: r.image_id)):
        assert (yolo.image_id, yolo.file_name, yolo.width, yolo.height, yolo.path) == (ref.image_id, ref.file_name, ref.width, ref.height, ref.path)
        assert np.array_equal(yolo.boxes, ref.boxes) and yolo.boxes.dtype == ref.boxes.dtype == np.float32
        assert np.array_equal(yolo.labels, ref.labels) and np.array_equal(yolo.is_crowd(), ref.is_crowd())
    assert coco_ground_truth(source.records, source.class_names) == coco_ground_truth(coco, names, cat_ids)
    assert source.description == f"Darknet {tmp_path / 'obj.data'} (train) (4 images)"


def test_lists_folders_and_where_darknet_finds_labels(tmp_path, monkeypatch):
    # Darknet's own layout: run from its folder, files under data/ naming paths from there
    root = tmp_path / "darknet"
    _yolo_set(root / "data", "JPEGImages", "labels")  # VOC's folder: labels in data/labels
    (root / "data" / "train.txt").write_text("".join(f"data/JPEGImages/{name}\n" for name, *_ in IMAGES))
    data = _darknet_data(root / "data", train="data/train.txt", valid="data/train.txt", names="data/obj.names")
    monkeypatch.chdir(tmp_path)  # from elsewhere: found from the folder above the .data file's
    boxes = [r.boxes.tolist() for r in load_detection_source(str(data), "val").records]
    assert boxes[0] == [[8, 4, 40, 20], [32, 16, 64, 32]] and boxes[2:] == [[], []]
    # a list naming paths from its own folder, and a folder of images; labels beside the images (AlexeyAB)
    flat = tmp_path / "flat"
    _yolo_set(flat, "obj", "obj")
    (flat / "list.txt").write_text("obj/a.png\nobj/b.png\n")
    listed = load_detection_source(str(flat / "list.txt"))
    folder = load_detection_source(str(flat / "obj"))
    assert listed.class_names == folder.class_names == ("0", "1")  # no names file: numbered
    assert [r.file_name for r in folder.records] == ["a.png", "b.png", "c.png", "d.png"] and folder.report.unlabelled == 1
    assert [r.boxes.tolist() for r in listed.records] == [r.boxes.tolist() for r in folder.records[:2]] == boxes[:2]
    assert D.yolo_label_path(D.Path("/x/images/train/images/a.b.jpg")) == D.Path("/x/images/train/labels/a.b.txt")


def test_label_fractions_are_of_the_upright_image(tmp_path):
    stored = Image.new("RGB", (60, 20))
    exif = stored.getexif()
    exif[0x0112] = 6  # shown turned: 20 x 60
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    stored.save(tmp_path / "images" / "photo.png", exif=exif.tobytes())
    (tmp_path / "labels" / "photo.txt").write_text("0 0.5 0.5 0.5 0.5\n")
    [record] = load_detection_source(str(tmp_path / "images")).records
    assert (record.width, record.height) == (20, 60) and record.boxes.tolist() == [[5, 15, 15, 45]]
    assert record.load().shape == (60, 20, 3)


@pytest.mark.parametrize("line, message", [
    ("0 0.5 0.5 0.2", "expected 'class x_centre y_centre width height' \\(5 numbers\\), got '0 0.5 0.5 0.2'"),
    ("0 0.5 0.5 0.2 0.2 0.1", "\\(5 numbers\\)"),
    ("cat 0.5 0.5 0.2 0.2", "\\(5 numbers\\), got 'cat"),
    ("2 0.5 0.5 0.2 0.2", "class id 2 is not one of 0..1"),
    ("-1 0.5 0.5 0.2 0.2", "class id -1 is not one of 0..1"),
    ("0.5 0.5 0.5 0.2 0.2", "class id 0.5 is not one of 0..1"),
    ("1 0.5 1.5 0.2 0.2", "coordinates must be fractions of the image size in \\[0, 1\\], got 0.5 1.5 0.2 0.2"),
    ("1 0.5 0.5 -0.2 0.2", "in \\[0, 1\\]"),
    ("1 0.5 nan 0.2 0.2", "in \\[0, 1\\]"),
])
def test_bad_label_lines_are_named_by_file_and_line(tmp_path, line, message):
    _yolo_set(tmp_path)
    label = tmp_path / "labels" / "b.txt"
    label.write_text(f"1 0.5 0.5 0.1 0.1\n\n{line}\n")
    (tmp_path / "train.txt").write_text("images/a.png\nimages/b.png\n")
    with pytest.raises(AnnotationError, match=f"^{label}:3: .*{message}"):
        load_detection_source(str(_darknet_data(tmp_path)))


def test_darknet_data_and_list_errors(tmp_path):
    paths = _yolo_set(tmp_path)
    (tmp_path / "train.txt").write_text(f"{paths[0]}\nimages/missing.png\n")
    with pytest.raises(AnnotationError, match="train.txt:2: images/missing.png does not exist"):
        load_detection_source(str(_darknet_data(tmp_path)))
    (tmp_path / "train.txt").write_text(f"{paths[0]}\n")
    (tmp_path / "obj.data").write_text("classes = 2\ntrain = train.txt\n")
    assert len(load_detection_source(str(tmp_path / "obj.data")).records) == 1
    with pytest.raises(AnnotationError, match="obj.data: no 'valid = <list of image paths>' entry for the val set"):
        load_detection_source(str(tmp_path / "obj.data"), "val")
    (tmp_path / "obj.data").write_text("classes = 2\ntrain train.txt\n")
    with pytest.raises(AnnotationError, match="obj.data:2: expected 'key = value', got 'train train.txt'"):
        load_detection_source(str(tmp_path / "obj.data"))
    with pytest.raises(AnnotationError, match=f"obj.data: classes = 3, but {tmp_path / 'obj.names'} names 2"):
        load_detection_source(str(_darknet_data(tmp_path, classes=3)))
    (tmp_path / "obj.names").write_text("cat\n\ndog\n")
    with pytest.raises(AnnotationError, match="obj.names:2: empty class name"):
        load_detection_source(str(_darknet_data(tmp_path)))
    (tmp_path / "obj.names").write_text("cat\n")
    with pytest.raises(AnnotationError, match="labels/a.txt:2: class id 1 is not one of 0..0"):
        load_detection_source(str(_darknet_data(tmp_path, classes=1)))
    # a list without names: numbered classes, or a trained model's (val / eval), whose range is checked
    assert load_detection_source(str(tmp_path / "train.txt"), class_names=("x", "y")).class_names == ("x", "y")
    with pytest.raises(AnnotationError, match="labels/a.txt:2: class id 1 is not one of 0..0"):
        load_detection_source(str(tmp_path / "train.txt"), class_names=("x",))
    (tmp_path / "negatives.txt").write_text("images/c.png\nimages/d.png\n")
    with pytest.raises(AnnotationError, match="negatives.txt: no image has a labelled box, and no names file says the classes"):
        load_detection_source(str(tmp_path / "negatives.txt"))
    with pytest.raises(ValueError, match="YOLO labels lie beside the images"):
        load_detection_source(str(tmp_path / "train.txt"), images_dir=str(tmp_path))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty: neither Pascal-VOC .xml files nor images"):
        load_detection_source(str(tmp_path / "empty"))


def test_detect_train_takes_a_darknet_data_file_and_its_valid_list(tmp_path, monkeypatch, capsys):
    from cspnet.cli import main
    from cspnet.detection import train as train_mod

    paths = _yolo_set(tmp_path)
    (tmp_path / "train.txt").write_text("".join(f"{p}\n" for p in paths))
    (tmp_path / "valid.txt").write_text(f"{paths[1]}\n")
    seen = {}

    def recording(model, train_set, val_set, *args, run_info=None, **kwargs):
        seen.update(train=train_set, val=val_set, data=run_info["data"])
        return types.SimpleNamespace(final={}, out_dir=tmp_path / "run", wall_s=0.0)

    monkeypatch.setattr(train_mod, "train_detector", recording)
    assert main(["detect", "train", "--model", "cspresnet10", "--data", str(_darknet_data(tmp_path, valid="valid.txt")),
                 "--img-size", "64", "--anchors", "yolov3", "--out", str(tmp_path / "run")]) == 0
    assert seen["train"].class_names == seen["val"].class_names == NAMES
    assert len(seen["train"]) == 4 and len(seen["val"]) == 1 and seen["data"]["val"]["split"] == "val"
    assert "(train) (4 images): 1 image(s) have no label file: read as negatives" in capsys.readouterr().err


def test_labels_rounded_to_6_decimals_past_the_edge_are_clipped_without_a_report(tmp_path):
    # a box from x 2 to the right edge of a 96 px image, written at 6 decimals as labelling tools do, ends
    # at 96.000048 px: clipped, but not counted as a box reaching out of the image; one 0.96 px out is
    path = tmp_path / "a.txt"
    path.write_text(f"0 {49 / 96:.6f} 0.5 {94 / 96:.6f} 0.5\n1 0.99 0.5 0.04 0.5\n")
    boxes, labels, report = D.load_yolo_labels(path, 96, 64, 2)
    assert labels.tolist() == [0, 1] and boxes[:, 2].tolist() == [96, 96]
    assert report.clipped == 1


def test_rounded_labels_on_a_phone_sized_photo_are_not_reported_as_clipped(tmp_path):
    # 6-decimal rounding overshoots by up to 5e-7 of the side: 0.002 px on a 4032-px photo, above a fixed 0.001 px
    rng = np.random.default_rng(0)
    x1 = rng.uniform(100, 4000, 200)
    lines = [f"0 {(a + 4032) / 2 / 4032:.6f} 0.5 {(4032 - a) / 4032:.6f} 0.5" for a in x1]
    path = tmp_path / "photo.txt"
    path.write_text("\n".join(lines) + "\n")
    boxes, _, report = D.load_yolo_labels(path, 4032, 3024, 1)
    assert (boxes[:, 2] > 4031.99).all() and report.clipped == 0
