"""Detection data: built-in scenes and trees, COCO / VOC loaders, sanitising, letterbox and augmentation."""
import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cspnet.data import detection as D
from cspnet.data.detection import (
    AnnotationError,
    AugmentCfg,
    DetectionDataset,
    coco_ground_truth,
    load_coco,
    load_voc,
    make_scenes,
    sanitize_boxes,
    tree_tiles,
)
from cspnet.detection.metrics import coco_evaluate
from conftest import write_idx


def test_scenes_are_seeded_exact_and_non_overlapping():
    a, names = make_scenes(4, seed=5, size=96)
    b, _ = make_scenes(4, seed=5, size=96)
    c, _ = make_scenes(4, seed=6, size=96)
    assert len(names) == 10
    for ra, rb in zip(a, b):
        assert np.array_equal(ra.image, rb.image) and np.array_equal(ra.boxes, rb.boxes)
    assert not all(np.array_equal(ra.image, rc.image) for ra, rc in zip(a, c))
    for r in a:
        assert r.image.shape == (96, 96, 3) and r.image.dtype == np.uint8
        assert 2 <= len(r.boxes) <= 5 and set(r.labels.tolist()) <= set(range(10))
        assert np.all(r.boxes[:, :2] >= 0) and np.all(r.boxes[:, 2:] <= 96) and np.all(r.boxes[:, 2:] > r.boxes[:, :2])
        for i in range(len(r.boxes)):
            for j in range(i):
                p, q = r.boxes[i], r.boxes[j]
                assert p[0] >= q[2] or p[2] <= q[0] or p[1] >= q[3] or p[3] <= q[1]


def test_scene_boxes_are_the_pasted_objects_extent(monkeypatch):
    # On a black background the pasted pixels are exactly the non-black ones: none outside the
    # boxes, and every box edge touches one (the box is tight).
    monkeypatch.setattr(D, "_textures", lambda: [np.zeros((512, 512), np.uint8)])
    recs, _ = make_scenes(4, seed=2, size=64)
    for rec in recs:
        img = rec.image.max(-1).astype(float)
        inside = np.zeros(img.shape, bool)
        for x0, y0, x1, y1 in rec.boxes.astype(int):
            inside[y0:y1, x0:x1] = True
            for edge in (img[y0, x0:x1], img[y1 - 1, x0:x1], img[y0:y1, x0], img[y0:y1, x1 - 1]):
                assert edge.max() > 0
        assert img[~inside].max() == 0


def test_scenes_fall_back_to_sklearn_digits(fashion_root):
    recs, names = make_scenes(2, seed=0, size=64)
    assert names == tuple(str(i) for i in range(10)) and len(recs) == 2


def test_scenes_read_fashion_mnist_where_the_classification_loader_does(fashion_root):
    from cspnet.data.classification import FASHION_MNIST_CLASSES, DataError

    fashion_root.mkdir()
    for prefix, label in (("train", 4), ("t10k", 7)):
        write_idx(fashion_root / f"{prefix}-images-idx3-ubyte.gz", 2051, np.full((3, 28, 28), 255))
        write_idx(fashion_root / f"{prefix}-labels-idx1-ubyte.gz", 2049, np.full(3, label))
    recs, names = make_scenes(2, seed=0, size=64, split="val")
    assert names == FASHION_MNIST_CLASSES and {int(x) for r in recs for x in r.labels} == {7}
    D.object_images.cache_clear()
    write_idx(fashion_root / "train-labels-idx1-ubyte.gz", 2051, np.full(3, 4))  # wrong magic: an error, not digits
    with pytest.raises(DataError, match="not an IDX file"):
        make_scenes(2, seed=0, size=64)


def test_tree_tiles_from_the_deepforest_wheel():
    train, names = tree_tiles("train")
    val, _ = tree_tiles("val")
    assert names == ("Tree",)
    # 2299x2472 -> 6 x 7 full tiles (last ones flush with the edge), SOAP_061 -> 1
    assert len(train) == 43 and all(r.image.shape == (400, 400, 3) for r in train)
    # validation tiles do not overlap: the 279 + 61 hand-drawn trees are each counted once
    assert len(val) == 13 and sum(len(r.boxes) for r in val) == 279 + 61
    for r in train + val:
        assert np.all(r.boxes[:, 2] <= r.width) and np.all(r.boxes[:, 3] <= r.height) and np.all(r.boxes >= 0)
        assert np.all(r.labels == 0)


def test_sanitize_clips_and_counts_degenerate_boxes():
    boxes = np.array([[-5, 10, 20, 30], [10, 10, 50, 50], [90, 90, 120, 95], [40, 40, 40.5, 60], [30, 30, 10, 10]], np.float32)
    clipped, keep, rep = sanitize_boxes(boxes, 100, 100)
    assert keep.tolist() == [True, True, True, False, False]
    assert rep.clipped == 2 and rep.dropped == 2
    assert clipped[0].tolist() == [0, 10, 20, 30] and clipped[2].tolist() == [90, 90, 100, 95]


def _coco(tmp_path, annotations, images=None):
    images = images or [{"id": 1, "file_name": "a.png", "width": 100, "height": 80},
                        {"id": 2, "file_name": "b.png", "width": 50, "height": 50}]
    data = {"images": images, "annotations": annotations,
            "categories": [{"id": 7, "name": "cat"}, {"id": 3, "name": "dog"}]}
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    return path


def test_coco_loader_maps_categories_clips_and_drops(tmp_path):
    path = _coco(tmp_path, [
        {"id": 1, "image_id": 1, "category_id": 7, "bbox": [10, 10, 20, 30]},
        {"id": 2, "image_id": 1, "category_id": 3, "bbox": [90, 70, 30, 30]},  # reaches out: clipped
        {"id": 3, "image_id": 2, "category_id": 3, "bbox": [10, 10, 0, 5]},  # zero width: dropped
        {"id": 4, "image_id": 2, "category_id": 7, "bbox": [5, 5, 10, 10], "iscrowd": 1},
    ])
    records, names, cat_ids, report = load_coco(path, tmp_path)
    assert names == ("dog", "cat") and cat_ids == (3, 7)  # sorted by id
    assert report.clipped == 1 and report.dropped == 1 and report.dropped_where == ["annotations[2]"]
    r1, r2 = sorted(records, key=lambda r: r.image_id)
    assert r1.boxes.tolist() == [[10, 10, 30, 40], [90, 70, 100, 80]] and r1.labels.tolist() == [1, 0]
    assert r2.crowd.tolist() == [True]
    gt = coco_ground_truth(records, names, cat_ids)
    assert sorted(a["category_id"] for a in gt["annotations"]) == [3, 7, 7]
    assert [a["iscrowd"] for a in gt["annotations"] if a["image_id"] == 2] == [1]


def test_coco_ground_truth_keeps_the_annotated_area_for_the_size_ranges(tmp_path):
    # COCO's 'area' is the mask's: this 40 x 40 box (medium by its box) holds a small object
    path = _coco(tmp_path, [
        {"id": 1, "image_id": 1, "category_id": 7, "bbox": [10, 10, 40, 40], "area": 600.0},
        {"id": 2, "image_id": 1, "category_id": 3, "bbox": [90, 70, 30, 30]},  # no area: the clipped box's
    ])
    records, names, cat_ids, _ = load_coco(path, tmp_path)
    gt = coco_ground_truth(records, names, cat_ids)
    assert [a["area"] for a in gt["annotations"]] == [600.0, 100.0]
    detections = [{"image_id": 1, "category_id": 7, "bbox": [10, 10, 40, 40], "score": 0.9},
                  {"image_id": 1, "category_id": 3, "bbox": [90, 70, 10, 10], "score": 0.9}]
    stats = coco_evaluate(gt, detections)
    assert stats["APs"] == pytest.approx(1.0) and stats["APm"] == -1.0  # both objects are small
    with pytest.raises(AnnotationError, match=r"annotations\[0\]: 'area' must be a finite number >= 0"):
        load_coco(_coco(tmp_path, [{"id": 1, "image_id": 1, "category_id": 7, "bbox": [1, 1, 5, 5], "area": "big"}]))


@pytest.mark.parametrize("bad, message", [
    ({"id": 9, "image_id": 1, "category_id": 7, "bbox": [1, 2, 3]}, "annotations\\[1\\]: 'bbox' must be 4 finite numbers"),
    ({"id": 9, "image_id": 5, "category_id": 7, "bbox": [1, 2, 3, 4]}, "annotations\\[1\\]: image_id 5 is not in 'images'"),
    ({"id": 9, "image_id": 1, "category_id": 1, "bbox": [1, 2, 3, 4]}, "annotations\\[1\\]: category_id 1"),
    ({"id": 9, "image_id": 1, "category_id": 7, "bbox": [1, 2, "x", 4]}, "annotations\\[1\\]"),
])
def test_coco_loader_names_file_and_bad_entry(tmp_path, bad, message):
    path = _coco(tmp_path, [{"id": 1, "image_id": 1, "category_id": 7, "bbox": [1, 1, 5, 5]}, bad])
    with pytest.raises(AnnotationError, match=message) as e:
        load_coco(path)
    assert str(path) in str(e.value)


def test_coco_loader_rejects_broken_files(tmp_path):
    path = tmp_path / "x.json"
    path.write_text("{not json")
    with pytest.raises(AnnotationError, match="not a readable JSON"):
        load_coco(path)
    path = _coco(tmp_path, [], images=[{"id": 1, "file_name": "a.png", "width": 0, "height": 5}])
    with pytest.raises(AnnotationError, match="images\\[0\\]"):
        load_coco(path)


def _voc(path: Path, objects: str, filename="img.png", size=(60, 40)):
    path.write_text(f"<annotation><filename>{filename}</filename><size><width>{size[0]}</width>"
                    f"<height>{size[1]}</height></size>{objects}</annotation>")


def _obj(name, box):
    return f"<object><name>{name}</name><bndbox><xmin>{box[0]}</xmin><ymin>{box[1]}</ymin><xmax>{box[2]}</xmax><ymax>{box[3]}</ymax></bndbox></object>"


def test_voc_loader(tmp_path):
    Image.new("RGB", (60, 40)).save(tmp_path / "img.png")
    Image.new("RGB", (60, 40)).save(tmp_path / "two.jpg")
    # VOC numbers pixels from 1, both ends inclusive: the whole 60 x 40 image is 1..60 x 1..40
    _voc(tmp_path / "img.xml", _obj("b", (1, 1, 60, 40)) + _obj("a", (50, 30, 70, 45)))
    _voc(tmp_path / "two.xml", _obj("a", (5, 5, 5, 5.5)) + _obj("a", (5, 5, 25, 25)), filename="two.tif")
    records, names, report = load_voc(sorted(tmp_path.glob("*.xml")))
    assert names == ("a", "b")
    assert records[0].boxes.tolist() == [[0, 0, 60, 40], [49, 29, 60, 40]] and records[0].labels.tolist() == [1, 0]
    assert records[1].path.endswith("two.jpg")  # the .tif named in the XML is found under another suffix
    assert records[1].boxes.tolist() == [[4, 4, 5, 5.5], [4, 4, 25, 25]]  # a one-pixel object is a 1 x 1.5 box
    assert report.clipped == 1 and report.dropped == 0
    zero_based, _, _ = load_voc([tmp_path / "img.xml"], one_based=False)
    assert zero_based[0].boxes.tolist() == [[1, 1, 60, 40], [50, 30, 60, 40]]
    with pytest.raises(AnnotationError, match="class 'b' is not one of"):
        load_voc(sorted(tmp_path.glob("*.xml")), class_names=("a",))


@pytest.mark.parametrize("objects, message", [
    (_obj("a", (1, 2, 3, 4)) + _obj("a", (1, "two", 3, 4)), "object\\[1\\] \\(a\\) needs numeric bndbox"),
    (_obj("", (1, 2, 3, 4)), "object\\[0\\] has no <name>"),
])
def test_voc_loader_names_file_and_object(tmp_path, objects, message):
    Image.new("RGB", (60, 40)).save(tmp_path / "img.png")
    _voc(tmp_path / "img.xml", objects)
    with pytest.raises(AnnotationError, match=message) as e:
        load_voc([tmp_path / "img.xml"])
    assert "img.xml" in str(e.value)
    (tmp_path / "bad.xml").write_text("<annotation><object>")
    with pytest.raises(AnnotationError, match="bad.xml: not a readable XML"):
        load_voc([tmp_path / "bad.xml"])


def _record(w=100, h=50, box=(60, 10, 90, 20)):
    img = np.zeros((h, w, 3), np.uint8)
    img[box[1]:box[3], box[0]:box[2]] = 255
    return D.DetectionRecord(0, "r.png", w, h, np.array([box], np.float32), np.array([3]), image=img)


def test_letterbox_scales_boxes_and_keeps_ratio():
    ds = DetectionDataset([_record()], tuple("abcd"), img_size=64)
    image, target = ds[0]
    assert image.shape == (3, 64, 64) and target["ratio"] == pytest.approx(0.64)
    torch.testing.assert_close(target["boxes"], torch.tensor([[38.4, 6.4, 57.6, 12.8]]))
    assert image[:, 40:, :].max() == pytest.approx(114 / 255)  # padding at the bottom
    assert image[:, 8:12, 40:56].min() > 0.9  # the white object is under its box


@pytest.mark.parametrize("hflip, vflip, expect", [
    (1.0, 0.0, [64 - 50.0, 10.0, 64 - 30.0, 20.0]),  # mirrored left to right only
    (0.0, 1.0, [30.0, 64 - 20.0, 50.0, 64 - 10.0]),  # top to bottom only
    (1.0, 1.0, [64 - 50.0, 64 - 20.0, 64 - 30.0, 64 - 10.0]),
])
def test_augmentation_flips_are_exact(hflip, vflip, expect):
    flip_only = AugmentCfg(mosaic=0, scale=0, translate=0, hflip=hflip, vflip=vflip, hue=0, saturation=0, brightness=0)
    ds = DetectionDataset([_record(64, 64, (30, 10, 50, 20))], tuple("abcd"), img_size=64, augment=flip_only)
    image, target = ds[0]
    torch.testing.assert_close(target["boxes"], torch.tensor([expect]))
    x0, y0, x1, y1 = (int(v) for v in expect)
    assert image[:, y0:y1, x0:x1].min() == 1.0 and image.sum() == 3 * 10 * 20  # the pixels moved with the box


def test_augmented_boxes_stay_valid():
    torch.manual_seed(0)
    recs, names = make_scenes(6, seed=1, size=64)
    ds = DetectionDataset(recs, names, img_size=64, augment=AugmentCfg(mosaic=0.5))
    for i in range(12):
        image, target = ds[i % 6]
        b = target["boxes"]
        assert image.shape == (3, 64, 64) and 0 <= image.min() and image.max() <= 1
        assert len(b) == len(target["labels"])
        assert torch.all(b >= 0) and torch.all(b <= 64) and torch.all(b[:, 2:] - b[:, :2] >= D.AUGMENTED_MIN_SIDE)


def test_default_augmentation_keeps_every_box_on_its_object():
    # One solid object per image, each in its own colour channel; colour jitter off. A mosaic box that
    # reached outside the window used to be carried back into view by the affine, over grey fill.
    rng = np.random.default_rng(0)
    records = []
    for k, (w, h) in enumerate([(200, 120), (120, 200), (300, 90)]):
        img = np.zeros((h, w, 3), np.uint8)
        x0, y0 = int(rng.integers(0, w // 2)), int(rng.integers(0, h // 2))
        x1, y1 = x0 + int(rng.integers(20, w // 2)), y0 + int(rng.integers(20, h // 2))
        img[y0:y1, x0:x1, k] = 255
        records.append(D.DetectionRecord(k, "x.png", w, h, np.array([[x0, y0, x1, y1]], np.float32), np.array([k]), image=img))
    ds = DetectionDataset(records, ("a", "b", "c"), 64, AugmentCfg(hue=0, saturation=0, brightness=0))
    checked = 0
    for seed in range(150):
        torch.manual_seed(seed)
        image, target = ds[seed % 3]
        for box, label in zip(target["boxes"].tolist(), target["labels"].tolist()):
            # the interior, one pixel in from each side (the resampled edges are blurred)
            x0, y0, x1, y1 = math.ceil(box[0] + 1), math.ceil(box[1] + 1), math.floor(box[2] - 1), math.floor(box[3] - 1)
            if x1 > x0 and y1 > y0:
                checked += 1
                assert image[label, y0:y1, x0:x1].min() > 0.5, (seed, box)
    assert checked > 100


def test_dataset_rejects_sizes_the_strides_cannot_divide():
    with pytest.raises(ValueError, match="multiple of 32"):
        DetectionDataset([_record()], ("a",), img_size=100)


def test_an_image_of_another_size_than_declared_is_an_error(tmp_path):
    Image.new("RGB", (50, 50)).save(tmp_path / "b.png")
    Image.new("RGB", (40, 80)).save(tmp_path / "a.png")  # the JSON says 100 x 80
    records, names, _, _ = load_coco(_coco(tmp_path, []), tmp_path)
    ds = DetectionDataset(sorted(records, key=lambda r: r.image_id), names, 64)
    assert ds[1][0].shape == (3, 64, 64)
    with pytest.raises(AnnotationError, match="image .*a.png is 40 x 80 pixels, the annotations declare 100 x 80") as e:
        ds[0]
    assert str(tmp_path / "instances.json") in str(e.value)


def test_coco_loader_needs_images_and_categories(tmp_path):
    path = _coco(tmp_path, [])
    data = json.loads(path.read_text())
    for key, message in (("images", "no images"), ("categories", "no categories")):
        path.write_text(json.dumps({**data, key: []}))
        with pytest.raises(AnnotationError, match=f"instances.json: {message}"):
            load_coco(path)


def test_unreadable_images_name_the_annotation_file_and_the_image(tmp_path, monkeypatch):
    (tmp_path / "img.png").write_bytes(b"not a png")
    (tmp_path / "img.xml").write_text("<annotation><filename>img.png</filename></annotation>")  # no <size>: read the image
    with pytest.raises(AnnotationError, match=f"img.xml: image {tmp_path / 'img.png'} cannot be read"):
        load_voc([tmp_path / "img.xml"])
    Image.new("RGB", (100, 80)).save(tmp_path / "a.png")
    records, *_ = load_coco(_coco(tmp_path, []), tmp_path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL's decompression-bomb guard (not an OSError)
    with pytest.raises(AnnotationError, match=f"instances.json: image {tmp_path / 'a.png'} cannot be read"):
        next(r for r in records if r.file_name == "a.png").load()


def test_tree_tiles_leave_pils_decompression_bomb_guard_alone(monkeypatch):
    # the largest bundled photo (2299 x 2472) is far below PIL's default guard (89.5 M pixels)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 6_000_000)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        tree_tiles("train")
    assert Image.MAX_IMAGE_PIXELS == 6_000_000


def test_a_16_bit_image_is_scaled_to_8_bits_not_clipped(tmp_path):
    ramp = np.linspace(0, 65535, 32 * 32).round().astype(np.uint16).reshape(32, 32)
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    record = D.DetectionRecord(0, "g16.png", 32, 32, np.zeros((0, 4), np.float32), np.zeros(0, np.int64),
                               path=str(tmp_path / "g16.png"))
    from cspnet.detection.predict import _read_rgb

    for image in (record.load(), _read_rgb(tmp_path / "g16.png")):  # training / evaluation, and predict
        assert image.shape == (32, 32, 3) and np.abs(image[..., 0].astype(int) - (ramp / 257).round()).max() <= 1


def _phone_photo(path: Path) -> tuple[int, int, int, int]:
    """A photo stored 120 x 80 with EXIF orientation 6 (a viewer shows it turned 90 degrees clockwise,
    80 x 120), a white rectangle on black; returns the rectangle's box in the upright image."""
    stored = np.zeros((80, 120, 3), np.uint8)
    stored[10:30, 5:45] = 255  # rows 10..30, columns 5..45 of the stored pixels
    im = Image.fromarray(stored)
    exif = im.getexif()
    exif[0x0112] = 6
    im.save(path, exif=exif.tobytes())
    # turned clockwise, stored row y becomes upright column 79 - y and stored column x upright row x
    return 80 - 30, 5, 80 - 10, 45


def test_a_phone_photo_loads_upright_with_its_boxes_on_the_object(tmp_path):
    box = _phone_photo(tmp_path / "photo.png")
    x0, y0, x1, y1 = box
    path = _coco(tmp_path, [{"id": 1, "image_id": 1, "category_id": 7, "bbox": [x0, y0, x1 - x0, y1 - y0]}],
                 images=[{"id": 1, "file_name": "photo.png", "width": 80, "height": 120}])  # as a viewer shows it
    [record], *_ = load_coco(path)
    image = record.load()
    assert image.shape == (120, 80, 3)
    assert image[y0:y1, x0:x1].min() == 255 and image.sum() == 255 * 3 * (x1 - x0) * (y1 - y0)  # the object, only it
    # annotations of the stored pixels' size do not fit the upright image: the error says why
    path = _coco(tmp_path, [], images=[{"id": 1, "file_name": "photo.png", "width": 120, "height": 80}])
    with pytest.raises(AnnotationError, match="is 80 x 120 pixels upright \\(its EXIF orientation turns the stored 120 x 80\\), "
                                              "the annotations declare 120 x 80"):
        load_coco(path)[0][0].load()
    # a VOC file without <size> takes the upright size from the image
    (tmp_path / "photo.xml").write_text(f"<annotation><filename>photo.png</filename>{_obj('a', (x0 + 1, y0 + 1, x1, y1))}</annotation>")
    [record], _, _ = load_voc([tmp_path / "photo.xml"])
    assert (record.width, record.height) == (80, 120) and record.load()[y0:y1, x0:x1].min() == 255


def test_predict_reads_and_draws_a_phone_photo_upright(tmp_path):
    from cspnet.detection import create_detector
    from cspnet.detection.predict import predict_files

    box = _phone_photo(tmp_path / "photo.png")
    det = create_detector("cspresnet10", "efm", num_classes=1, backbone_width=0.25, neck_width=32)
    ratio = 64 / 120  # the upright photo's longer side is its height
    found = {"boxes": torch.tensor([box], dtype=torch.float32) * ratio, "scores": torch.tensor([0.9]), "labels": torch.tensor([0])}
    det.postprocess = lambda outputs, *args: [found]
    [result] = predict_files(det, [tmp_path / "photo.png"], tmp_path / "out", 64, ("rect",))
    assert (result["width"], result["height"]) == (80, 120)
    assert result["detections"][0]["box"] == pytest.approx(list(box), abs=0.01)
    drawn = np.asarray(Image.open(result["drawn"]))
    assert drawn.shape == (120, 80, 3)
    x0, y0, x1, y1 = box
    # the red frame around the white object (its label is written in the box's top rows)
    assert tuple(drawn[y0 + 20, x0]) == (255, 0, 0) and drawn[y0 + 15:y1 - 5, x0 + 5:x1 - 5].min() == 255


def _only_affine(monkeypatch, ds, translate, scale):
    """Make ``ds``'s scale / translate step this one (no random draw)."""
    monkeypatch.setattr(ds.geometric, "make_params", lambda inputs: dict(angle=0.0, translate=translate, scale=scale, shear=(0.0, 0.0)))


_NO_FLIPS_NO_COLOUR = dict(hflip=0, vflip=0, hue=0, saturation=0, brightness=0)


@pytest.mark.parametrize("sliver, translate, scale, why", [
    ((2, 20, 30, 40), (-29, 0), 1.0, "1 px wide"),  # cut to [0, 20, 1, 40]
    ((2, 0, 30, 64), (-27, 0), 1.0, "aspect 64 / 3"),  # cut to [0, 0, 3, 64]: 11% of its area, but a needle
    ((22, 22, 42, 42), (-49, 0), 2.0, "7.5% of its scaled area"),  # 40 x 40 at scale 2, cut to 3 x 40
])
def test_augmentation_drops_boxes_cut_to_slivers(monkeypatch, sliver, translate, scale, why):
    image = np.zeros((64, 64, 3), np.uint8)
    whole = (46, 28, 54, 36)  # stays in view, whole
    record = D.DetectionRecord(0, "r.png", 64, 64, np.array([sliver, whole], np.float32), np.array([0, 1]), image=image)
    ds = DetectionDataset([record], ("sliver", "whole"), 64, AugmentCfg(mosaic=0, **_NO_FLIPS_NO_COLOUR))
    _only_affine(monkeypatch, ds, translate, scale)
    boxes = ds[0][1]["boxes"]
    assert ds[0][1]["labels"].tolist() == [1], why
    assert torch.all(boxes[:, 2:] - boxes[:, :2] >= 8 * scale - 1e-4)


def test_a_box_the_mosaic_window_cuts_to_a_sliver_is_dropped(monkeypatch):
    # One 64 x 64 image in all four mosaic tiles; the window's left edge at x = 37 cuts the top-left
    # tile's 40 x 40 box to 3 x 40, 7.5% of it (sides and aspect would pass); the top-right tile's copy
    # keeps 37 x 40 and the small box next to it is whole.
    image = np.zeros((64, 64, 3), np.uint8)
    record = D.DetectionRecord(0, "r.png", 64, 64, np.array([[0, 0, 40, 40], [44, 10, 60, 30]], np.float32),
                               np.array([0, 1]), image=image)
    ds = DetectionDataset([record], ("big", "small"), 64, AugmentCfg(mosaic=1, **_NO_FLIPS_NO_COLOUR))
    _only_affine(monkeypatch, ds, (0, 0), 1.0)
    real_randint = torch.randint

    def window_at_37_0(low, *args, **kwargs):  # the picks of the other tiles (record 0), then the window centre
        return torch.tensor([69, 32]) if args and args[-1] == (2,) else real_randint(low, *args, **kwargs)

    monkeypatch.setattr(torch, "randint", window_at_37_0)
    target = ds[0][1]
    assert target["labels"].tolist() == [1, 0]
    assert target["boxes"].tolist() == [[7, 10, 23, 30], [27, 0, 64, 40]]


def test_kept_after_augmentation_rules():
    before = np.array([[20, 20]] * 5, np.float32)
    boxes = np.array([[0, 0, 2, 20], [0, 0, 1.9, 20], [0, 0, 2.5, 50.1], [0, 0, 6.3, 6.3], [0, 0, 6.4, 6.4]], np.float32)
    assert D.kept_after_augmentation(before, boxes, 1.0).tolist() == [True, False, False, False, True]
    assert D.kept_after_augmentation(before[3:], boxes[3:], 0.5).tolist() == [True, True]  # 10% of 10 x 10


def test_upright_size_reads_png_headers_without_decoding_the_pixels(tmp_path, monkeypatch):
    # YOLO labels need every image's size at load; decoding each PNG to look for EXIF made that 1000x slower
    from PIL import PngImagePlugin

    plain = Image.new("RGB", (30, 20))
    plain.save(tmp_path / "plain.png")
    exif = plain.getexif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees, so the upright image is 20 wide
    plain.save(tmp_path / "turned.png", exif=exif)

    def no_decoding(self):
        raise AssertionError("the pixels were decoded")

    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", no_decoding)
    with Image.open(tmp_path / "plain.png") as im:
        assert D.upright_size(im) == (30, 20)
    with Image.open(tmp_path / "turned.png") as im:
        assert D.upright_size(im) == (20, 30)


def test_crowd_boxes_are_scored_as_ignore_regions_but_never_trained_on(tmp_path):
    Image.new("RGB", (100, 80)).save(tmp_path / "a.png")
    path = _coco(tmp_path, [
        {"id": 1, "image_id": 1, "category_id": 7, "bbox": [10, 10, 20, 30]},
        {"id": 2, "image_id": 1, "category_id": 3, "bbox": [50, 20, 40, 40], "iscrowd": 1},
    ], images=[{"id": 1, "file_name": "a.png", "width": 100, "height": 80}])
    records, names, cat_ids, _ = load_coco(path, tmp_path)
    assert names == ("dog", "cat") and records[0].is_crowd().tolist() == [False, True]
    _, target = DetectionDataset(records, names, 64)[0]  # 100 px -> 64: ratio 0.64
    torch.testing.assert_close(target["boxes"], torch.tensor([[10.0, 10, 30, 40]]) * 0.64)
    assert target["labels"].tolist() == [1]
    # the mosaic's tiles come without their crowd boxes too: only cats are ever trained on
    mosaic = DetectionDataset(records, names, 64, AugmentCfg(mosaic=1.0))
    torch.manual_seed(0)
    labels = torch.cat([mosaic[0][1]["labels"] for _ in range(20)])
    assert len(labels) and labels.unique().tolist() == [1]
    assert [a["iscrowd"] for a in coco_ground_truth(records, names, cat_ids)["annotations"]] == [0, 1]


def test_voc_difficult_objects_are_ignore_regions_not_targets(tmp_path):
    Image.new("RGB", (60, 40)).save(tmp_path / "img.png")
    difficult = _obj("car", (5, 5, 30, 30)).replace("</name>", "</name><difficult>1</difficult>")
    _voc(tmp_path / "img.xml", difficult + _obj("car", (35, 10, 55, 35)))
    records, names, _ = load_voc([tmp_path / "img.xml"])
    r = records[0]
    assert r.is_crowd().tolist() == [True, False]
    _, target = DetectionDataset(records, names, 64)[0]  # 60 px -> 64
    torch.testing.assert_close(target["boxes"], torch.from_numpy(r.boxes[1:]) * 64 / 60)
    gt = coco_ground_truth(records, names)
    assert [a["iscrowd"] for a in gt["annotations"]] == [1, 0]
    # as VOC scores them: a missed difficult object is no miss, a found one no false positive
    found = [{"image_id": r.image_id, "category_id": 0, "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
              "score": s} for (x0, y0, x1, y1), s in zip(r.boxes, (0.9, 0.8))]
    assert coco_evaluate(gt, found[1:])["AP50"] == pytest.approx(1.0)
    assert coco_evaluate(gt, found)["AP50"] == pytest.approx(1.0)
