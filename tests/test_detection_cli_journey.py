"""Detection CLI paths a new user takes first: a short run's burn-in, predicting a folder, COCO ids and
per-class AP in the outputs, YOLO labels written at a few decimals."""
import json

import pytest
import torch
from PIL import Image

from cspnet.cli import main
from cspnet.data.detection import coco_ground_truth, make_scenes


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny detectors: see the fixture


def _train(out, *extra):
    return main(["detect", "train", "--model", "cspresnet10", "--backbone-width", "0.25", "--neck-width", "32",
                 "--neck", "fpn", "--data", "scenes", "--num-scenes", "8", "--img-size", "64", "--batch-size", "4",
                 "--anchors", "yolov3", "--epochs", "1", "--ema", "0", "--out", str(out), "--no-progress", *extra])


def test_default_burn_in_is_capped_at_half_a_short_run_with_a_note(tmp_path, capsys):
    # 8 scenes, batch 4, 1 epoch: 2 optimizer steps, far fewer than the default burn-in of 100
    assert _train(tmp_path / "run") == 0
    err = capsys.readouterr().err
    assert "burn-in of 100 steps is more than half of this run's 2 optimizer steps; warming up for 1" in err
    assert json.loads((tmp_path / "run" / "last.json").read_text())["state"]["train_config"]["burn_in"] == 100


@pytest.fixture(scope="module")
def coco_run(tmp_path_factory):
    """A one-epoch run on a COCO file whose category ids are not the class indices, and its image folder
    (the images spread over a subfolder)."""
    root = tmp_path_factory.mktemp("coco")
    records, names = make_scenes(8, seed=1, size=64)
    category_ids = [10 * k + 3 for k in range(len(names))]
    (root / "img" / "more").mkdir(parents=True)
    for k, r in enumerate(records):
        r.file_name = f"more/{r.file_name}" if k % 2 else r.file_name
        Image.fromarray(r.image).save(root / "img" / r.file_name)
    (root / "instances.json").write_text(json.dumps(coco_ground_truth(records, names, category_ids)))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["detect", "train", "--model", "cspresnet10", "--backbone-width", "0.25", "--neck-width", "32",
                     "--neck", "fpn", "--data", str(root / "instances.json"), "--images", str(root / "img"),
                     "--val-data", str(root / "instances.json"), "--val-images", str(root / "img"), "--img-size", "64",
                     "--batch-size", "4", "--anchors", "yolov3", "--epochs", "1", "--burn-in", "1", "--ema", "0",
                     "--out", str(root / "run"), "--no-progress"]) == 0
    finally:
        torch.set_num_threads(threads)
    return root, records, names, category_ids


def test_predict_takes_folders_as_cspnet_predict_does(coco_run, tmp_path, capsys):
    root, records, _, _ = coco_run
    capsys.readouterr()
    assert main(["detect", "predict", "--checkpoint", str(root / "run"), str(root / "img"), "--out", str(tmp_path)]) == 0
    assert json.loads(capsys.readouterr().out)["images"] == len(records)
    written = json.loads((tmp_path / "detections.json").read_text())
    assert sorted(e["image"] for e in written) == sorted(str(root / "img" / r.file_name) for r in records)
    (tmp_path / "empty").mkdir()
    assert main(["detect", "predict", "--checkpoint", str(root / "run"), str(tmp_path / "empty"), "--out", str(tmp_path)]) != 0
    assert f"{tmp_path / 'empty'}: no image files in this folder" in capsys.readouterr().err


def test_predict_writes_the_runs_coco_category_ids(coco_run, tmp_path):
    root, records, names, category_ids = coco_run
    assert main(["detect", "predict", "--checkpoint", str(root / "run"), str(root / "img" / records[0].file_name),
                 "--out", str(tmp_path), "--conf", "0"]) == 0
    detections = json.loads((tmp_path / "detections.json").read_text())[0]["detections"]
    assert detections
    for d in detections:
        assert d["class"] == names[d["label"]] and d["category_id"] == category_ids[d["label"]]


def test_per_class_ap_of_a_perfect_detector_on_one_class():
    from cspnet.detection.metrics import coco_evaluate

    records, names = make_scenes(4, seed=2, size=64)
    category_ids = [10 * k + 3 for k in range(len(names))]
    gt = coco_ground_truth(records, names, category_ids)
    found = {a["category_id"] for a in gt["annotations"]}
    kept = min(found)  # every box of this category found exactly, none of the others
    perfect = [{"image_id": a["image_id"], "category_id": kept, "bbox": a["bbox"], "score": 0.9}
               for a in gt["annotations"] if a["category_id"] == kept]
    rows = {row["category_id"]: row for row in coco_evaluate(gt, perfect, per_class=True)["per_class"]}
    assert [rows[c]["class"] for c in category_ids] == list(names)
    for cid, row in rows.items():
        expected = 1.0 if cid == kept else 0.0 if cid in found else -1.0
        assert row["AP"] == pytest.approx(expected) and row["AP50"] == pytest.approx(expected), row
    assert {row["AP"] for row in coco_evaluate(gt, [], per_class=True)["per_class"]} <= {0.0, -1.0}


def test_eval_prints_and_writes_per_class_ap_and_coco_results(coco_run, tmp_path, capsys):
    from pycocotools.cocoeval import COCOeval

    from cspnet.detection.metrics import coco_from_dict

    root, records, names, category_ids = coco_run
    capsys.readouterr()
    assert main(["detect", "eval", "--checkpoint", str(root / "run"), "--json-out", str(tmp_path / "eval.json"),
                 "--results-out", str(tmp_path / "results.json")]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert json.loads((tmp_path / "eval.json").read_text()) == printed
    results = json.loads((tmp_path / "results.json").read_text())
    assert results and {d["category_id"] for d in results} <= set(category_ids)
    # the results file scored by pycocotools itself, one category at a time, gives the per-class figures
    gt = coco_from_dict(json.loads((root / "instances.json").read_text()))
    assert [row["category_id"] for row in printed["per_class"]] == category_ids
    for row in printed["per_class"]:
        ev = COCOeval(gt, gt.loadRes(results), iouType="bbox")
        ev.params.catIds = [row["category_id"]]
        ev.evaluate(), ev.accumulate(), ev.summarize()
        assert (row["AP"], row["AP50"]) == pytest.approx((round(ev.stats[0], 4), round(ev.stats[1], 4)), abs=1e-4), row
    assert any(row["AP50"] > 0 for row in printed["per_class"])  # something to compare


def test_per_class_ap_of_a_class_with_only_crowd_boxes_is_minus_1_with_or_without_detections():
    from cspnet.detection.metrics import coco_evaluate

    gt = {"images": [{"id": 1, "width": 64, "height": 64, "file_name": "a.png"}],
          "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [4, 4, 20, 20], "area": 400, "iscrowd": 0},
                          {"id": 2, "image_id": 1, "category_id": 2, "bbox": [30, 30, 20, 20], "area": 400, "iscrowd": 1}]}
    found_a = [{"image_id": 1, "category_id": 1, "bbox": [4, 4, 20, 20], "score": 0.9}]
    for detections in ([], found_a):
        rows = {row["class"]: row for row in coco_evaluate(gt, detections, per_class=True)["per_class"]}
        assert rows["b"]["AP"] == rows["b"]["AP50"] == -1.0, detections
