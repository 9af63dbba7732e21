"""Official Darknet detector weights from the command line: ``cspnet darknet convert`` of a detector cfg writes a
native detector file, which ``cspnet detect predict / eval --weights`` run with its recorded input size, COCO class
names and category ids.

No official weights exist here: a randomly initialised detector of csresnext50-panet-spp.cfg (the smallest
released detector cfg, 57M weights) writes them. The cfg's [net] size is cut from 416 to `SIZE` so that every
forward pass is cheap; the detector runs at any multiple of 32.
"""
import json
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from cspnet.cli import main
from cspnet.darknet import build_model, convert_weights
from cspnet.darknet.convert import detector_for_cfg
from cspnet.darknet.weights import DarknetWeightsError, write_weights
from cspnet.data.detection import COCO_CATEGORY_IDS, COCO_CLASSES, coco_ground_truth, make_scenes
from cspnet.detection import create_detector
from cspnet.detection.detector import Detector
from cspnet.detection.head import YOLOV3_ANCHORS
from cspnet.weights import load_model, read_metadata
from test_detection_cfg import CFG_ROOT, randomize

CFG = "csresnext50-panet-spp"
SIZE = 128


def cfg_at(path: Path, size: int, edit=lambda text: text) -> Path:
    """The official detector cfg with its [net] width and height set to ``size`` (and ``edit`` applied), at ``path``."""
    text = (CFG_ROOT / "cfg" / f"{CFG}.cfg").read_text()
    path.write_text(edit(re.sub(r"(?m)^(width|height)=\d+$", rf"\g<1>={size}", text)))
    return path


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The official cfg, a .weights file written by a random detector of it (weights that carry the image to the
    outputs), and the file `cspnet darknet convert` made of them."""
    root = tmp_path_factory.mktemp("darknet_detector")
    det = create_detector("cspresnext50", "panet", num_classes=80)
    g = torch.Generator().manual_seed(0)
    randomize(det, g)
    # residual sums grow with depth: scale the (linear) predictors so that the raw maps are O(1), and the boxes
    # and scores those of a detector (at 1e4, every box is degenerate or the whole image)
    with torch.no_grad():
        scale = max(level.abs().max() for level in det.eval().forward_raw(torch.rand(1, 3, 64, 64, generator=g)))
        for pred in det.head.preds:
            pred.weight.mul_(4 / scale)
    weights = write_weights(det.darknet_records(), root / f"{CFG}.weights")
    cfg = cfg_at(root / f"{CFG}.cfg", SIZE)
    out = root / "det.safetensors"
    assert main(["darknet", "convert", str(cfg), str(weights), str(out)]) == 0
    return SimpleNamespace(cfg=cfg, out=out, det=det.eval())


@pytest.mark.slow
def test_the_converted_file_rebuilds_the_detector_that_wrote_the_weights(converted):
    model = load_model(converted.out)
    assert isinstance(model, Detector) and model.model_name == "cspresnext50-panet" and not model.training
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expect, got = converted.det.forward_raw(x), model.forward_raw(x)
        assert (expect[0][0] - expect[0][1]).abs().max() > 0.1  # the image reaches the outputs
        for e, g in zip(expect, got):
            torch.testing.assert_close(g, e)
        torch.testing.assert_close(model(x), converted.det(x))  # decoded with the cfg's anchors and strides
    meta = read_metadata(converted.out)
    assert meta["class_names"] == list(COCO_CLASSES) and meta["category_ids"] == list(COCO_CATEGORY_IDS)
    assert meta["input_size"] == [SIZE, SIZE] and meta["num_classes"] == 80 and meta["letterbox"] is True
    assert meta["anchors"] == [list(a) for a in YOLOV3_ANCHORS] and meta["strides"] == [8, 16, 32]
    assert meta["darknet_cfg"] == f"{CFG}.cfg" and meta["darknet_records_read"] == meta["darknet_records_total"]


@pytest.mark.slow
def test_predict_with_weights_names_coco_classes_and_category_ids(converted, tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for name, (h, w) in (("a.png", (96, 128)), ("b.png", (80, 60))):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(images / name)
    capsys.readouterr()
    assert main(["detect", "predict", "--weights", str(converted.out), str(images), "--out", str(tmp_path / "out")]) == 0
    assert json.loads(capsys.readouterr().out)["images"] == 2
    written = json.loads((tmp_path / "out" / "detections.json").read_text())
    detections = [d for image in written for d in image["detections"]]
    assert detections  # random weights at 0.25: boxes everywhere
    for d in detections:
        assert d["class"] == COCO_CLASSES[d["label"]] and d["category_id"] == COCO_CATEGORY_IDS[d["label"]]


@pytest.fixture
def coco_file(tmp_path):
    """Two generated scenes as a COCO file with COCO's 80 categories (the scenes' objects as its first classes)."""
    records, _ = make_scenes(2, seed=3, size=96)
    (tmp_path / "img").mkdir()
    for r in records:
        Image.fromarray(r.image).save(tmp_path / "img" / r.file_name)
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(coco_ground_truth(records, COCO_CLASSES, COCO_CATEGORY_IDS)))
    return path


@pytest.mark.slow
def test_eval_with_weights_scores_a_coco_file(converted, coco_file, capsys):
    capsys.readouterr()
    assert main(["detect", "eval", "--weights", str(converted.out), "--data", str(coco_file),
                 "--images", str(coco_file.parent / "img")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["weights"] == str(converted.out) and report["images"] == 2
    assert {"AP", "AP50", "AP75", "APs", "APm", "APl"} <= set(report)
    assert [row["category_id"] for row in report["per_class"]] == list(COCO_CATEGORY_IDS)


@pytest.mark.slow
def test_eval_with_weights_refuses_data_of_other_classes(converted, capsys):
    assert main(["detect", "eval", "--weights", str(converted.out), "--data", "scenes", "--num-scenes", "2",
                 "--scene-size", "64"]) == 2
    err = capsys.readouterr().err
    assert "scenes has classes" in err and f"the detector of {converted.out} predicts ['person', 'bicycle'" in err


def test_eval_with_weights_needs_data(tmp_path, capsys):
    # refused before the file is read: it need not exist
    assert main(["detect", "eval", "--weights", str(tmp_path / "det.safetensors")]) == 2
    assert "a weights file records no data set to evaluate on; give --data" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["eval", "predict"])
def test_exactly_one_of_checkpoint_and_weights(command, tmp_path, capsys):
    Image.new("RGB", (32, 32)).save(tmp_path / "x.png")
    args = ["detect", command, *(["--data", "scenes"] if command == "eval" else [str(tmp_path / "x.png"), "--out", str(tmp_path)])]
    with pytest.raises(SystemExit) as both:
        main([*args, "--checkpoint", str(tmp_path), "--weights", str(tmp_path / "det.safetensors")])
    assert both.value.code == 2
    assert "argument --weights: not allowed with argument --checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit) as neither:
        main(args)
    assert neither.value.code == 2
    assert "one of the arguments --checkpoint --weights is required" in capsys.readouterr().err
    assert main([*args, "--weights", str(tmp_path / "det.safetensors"), "--name", "best"]) == 2
    assert "--name picks a checkpoint of a run (--checkpoint RUN_DIR)" in capsys.readouterr().err


def test_weights_must_be_a_detector_file(tmp_path, capsys):
    image = tmp_path / "x.png"
    Image.new("RGB", (32, 32)).save(image)
    darknet_file = tmp_path / f"{CFG}.weights"
    darknet_file.write_bytes(b"\0" * 20)
    assert main(["detect", "predict", "--weights", str(darknet_file), str(image), "--out", str(tmp_path)]) == 2
    assert f"{darknet_file}: a Darknet weights file; convert it first: cspnet darknet convert" in capsys.readouterr().err
    classifier = tmp_path / "resnet10.safetensors"
    assert main(["export", "resnet10", "--format", "safetensors", "--out", str(classifier)]) == 0
    assert main(["detect", "predict", "--weights", str(classifier), str(image), "--out", str(tmp_path)]) == 2
    assert f"{classifier}: records no detector (metadata 'config' with a neck); it holds model 'resnet10'" in capsys.readouterr().err


@pytest.mark.slow
def test_convert_refuses_a_detector_file_that_is_cut_short(converted, tmp_path, capsys):
    records = converted.det.darknet_records()
    backbone = sum(r.name.startswith("backbone.") for r in records)
    cut = write_weights(records[:backbone], tmp_path / f"{CFG}.weights")
    out = tmp_path / "det.safetensors"
    assert main(["darknet", "convert", str(converted.cfg), str(cut), str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{cut}: expected" in err and f"the file ends exactly after the first {backbone} of {len(records)}" in err
    # read as the partial file it is (up to the neck's first layer), it holds a backbone, not a detector
    neck_layer = build_model(converted.cfg).weight_records()[backbone].layer
    assert main(["darknet", "convert", str(converted.cfg), str(cut), str(out), "--cutoff", str(neck_layer)]) == 2
    err = capsys.readouterr().err
    assert f"{cut}: holds the first {backbone} of the {len(records)} weighted layers of {CFG}.cfg; a detector needs them all" in err
    assert not out.exists()


def test_convert_refuses_anchors_the_detector_would_decode_otherwise(tmp_path):
    # the stride-8 [yolo] layer lists its anchors largest first: its raw map's anchor blocks are in that order
    cfg = cfg_at(tmp_path / f"{CFG}.cfg", SIZE, lambda text: text.replace("mask = 0,1,2", "mask = 2,1,0"))
    # refused before the weights file is read: it need not exist
    with pytest.raises(DarknetWeightsError, match=r"csresnext50-panet-spp.cfg:\d+: the \[yolo\] layer at stride 8 "
                                                  r"decodes anchors \[\(33.0, 23.0\), \(16.0, 30.0\), \(10.0, 13.0\)\]"):
        convert_weights(cfg, tmp_path / f"{CFG}.weights", tmp_path / "det.safetensors")


def test_convert_asks_for_the_backbone_and_neck_a_cfg_name_does_not_say(tmp_path, capsys):
    cfg = cfg_at(tmp_path / "my-detector.cfg", SIZE)
    # refused before the weights file is read: it need not exist
    assert main(["darknet", "convert", str(cfg), str(tmp_path / "x.weights"), str(tmp_path / "det.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "my-detector.cfg: a detector cfg whose name does not say its backbone" in err
    assert "give --model BACKBONE and --neck panet|fpn|yolov3" in err


@pytest.mark.parametrize("cfg, backbone, neck", [
    ("csresnext50-panet-spp.cfg", "cspresnext50", "panet"),
    ("csresnext50-panet-spp-original-optimal.cfg", "cspresnext50", "panet"),
    ("csdarknet53-panet-spp.cfg", "cspdarknet53", "panet"),
    ("csresnet50-elastic-panet-spp.cfg", "cspresnet50_elastic", "panet"),
    ("csresnext50-fpn-spp.cfg", "cspresnext50", "fpn"),
    ("csresnext50-yolo-spp.cfg", "cspresnext50", "yolov3"),
    ("yolov3-spp.cfg", "darknet53", "yolov3"),
    ("csresnext50.cfg", "cspresnext50", None),
    ("my-detector.cfg", None, None),
])
def test_a_detector_cfg_name_says_its_backbone_and_neck(cfg, backbone, neck):
    assert detector_for_cfg(cfg) == (backbone, neck)


def test_weights_of_a_runs_export_predict_what_its_checkpoint_predicts(tmp_path, capsys, one_thread):
    run = tmp_path / "run"
    assert main(["detect", "train", "--model", "cspresnet10", "--backbone-width", "0.25", "--neck-width", "32", "--neck",
                 "fpn", "--data", "scenes", "--num-scenes", "4", "--img-size", "64", "--batch-size", "4", "--anchors",
                 "yolov3", "--epochs", "1", "--burn-in", "1", "--out", str(run), "--no-progress"]) == 0
    exported = tmp_path / "det.safetensors"
    assert main(["export", "--checkpoint", str(run), "--format", "safetensors", "--out", str(exported)]) == 0
    records, _ = make_scenes(2, seed=5, size=80)
    for r in records:
        Image.fromarray(r.image).save(tmp_path / r.file_name)
    images = [str(tmp_path / r.file_name) for r in records]
    for source, out in ((["--checkpoint", str(run)], "by_run"), (["--weights", str(exported)], "by_file")):
        assert main(["detect", "predict", *source, *images, "--out", str(tmp_path / out), "--conf", "0"]) == 0
    by_run, by_file = ([image["detections"] for image in json.loads((tmp_path / out / "detections.json").read_text())]
                       for out in ("by_run", "by_file"))
    assert by_run[0] and by_file == by_run
