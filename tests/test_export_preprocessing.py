"""An export records what another runtime needs to make the model's input and read its output: a detector's
letterbox rule (pad value, position, resize) and output columns, a classification run's resize and crop, a
Darknet-converted file's normalisation. Read back from ONNX files; the detector's rule is then followed in numpy
and run in onnxruntime, which must give the detector's own output on a non-square image."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from cspnet.cli import main as cli_main
from cspnet.darknet import build_model, write_weights
from cspnet.data.detection import letterbox
from cspnet.detection import create_detector
from cspnet.export import export_onnx, onnx_session

from test_darknet_weights import SIZE, official, randomize


def onnx_record(path) -> dict:
    import onnx

    return json.loads({p.key: p.value for p in onnx.load(str(path)).metadata_props}["cspnet"])


def letterbox_as_recorded(image: np.ndarray, record: dict) -> np.ndarray:
    """``image`` (H x W x 3 uint8) as the record says the detector takes it, as a (1, 3, S, S) float array."""
    assert record["letterbox_pad_value"] == 114
    assert record["letterbox_position"].startswith("top-left: the image at (0, 0), the padding on the right and bottom")
    size = record["input_size"]
    height, width = image.shape[:2]
    ratio = size / max(height, width)
    resized = np.asarray(Image.fromarray(image).resize((round(width * ratio), round(height * ratio)), Image.BILINEAR))
    canvas = np.full((size, size, 3), record["letterbox_pad_value"], np.uint8)
    canvas[:resized.shape[0], :resized.shape[1]] = resized
    x = (canvas.astype(np.float32) / 255 - np.float32(record["mean"])) / np.float32(record["std"])
    return x.transpose(2, 0, 1)[None].copy()


def test_a_detector_export_records_its_letterbox_and_output_layout_and_following_them_reproduces_it(tmp_path):
    torch.manual_seed(0)
    model = create_detector("cspresnet10", "fpn", num_classes=3, backbone_width=0.25, neck_width=32).eval()
    record = onnx_record(export_onnx(model, tmp_path / "d.onnx", 64))
    assert record["letterbox"] is True and record["mean"] == [0.0] * 3 and record["std"] == [1.0] * 3
    layout = record["output_layout"]
    assert layout["columns"] == ["x1", "y1", "x2", "y2", "objectness", "class probabilities (num_classes columns)"]
    assert layout["shape"] == "(batch, rows, 5 + num_classes)"

    image = np.random.default_rng(0).integers(0, 256, (40, 90, 3), dtype=np.uint8)  # wide: padding at the bottom
    exported = onnx_session(tmp_path / "d.onnx").run(None, {"input": letterbox_as_recorded(image, record)})[0]
    boxed, _ = letterbox(image, 64)  # what cspnet detect predict / eval feed the detector
    with torch.no_grad():
        own = model(torch.from_numpy(boxed).permute(2, 0, 1)[None].float().div(255)).numpy()
    assert exported.shape == own.shape == (1, exported.shape[1], 5 + 3)
    assert np.abs(exported - own).max() <= 1e-4 * max(1.0, np.abs(own).max())


def test_a_classification_runs_export_records_its_resize_and_crop(tmp_path, capsys):
    run = tmp_path / "run"
    assert cli_main(["train", "--model", "cspresnet10", "--width", "0.25", "--data", "digits", "--img-size", "16",
                     "--epochs", "1", "--train-limit", "40", "--batch-size", "20", "--no-progress", "--threads", "1",
                     "--out", str(run)]) == 0
    assert cli_main(["export", "--checkpoint", str(run), "--out", str(tmp_path / "c.onnx")]) == 0
    record = onnx_record(tmp_path / "c.onnx")
    assert record["crop_pct"] == 1.0 and record["interpolation"] == "bilinear"
    assert record["resize"].startswith("shorter side to input_size, longer side floor(longer * input_size / shorter)")
    assert "centre crop of input_size x input_size" in record["resize"] and "letterbox" not in record
    capsys.readouterr()


def test_a_darknet_converted_files_exports_record_mean_0_and_std_1(tmp_path, capsys):
    darknet = randomize(build_model(official("darknet_ref"), SIZE), seed=7)
    weights = write_weights(darknet, tmp_path / "darknet.weights")
    converted = tmp_path / "darknet_ref.safetensors"
    assert cli_main(["darknet", "convert", str(official("darknet_ref")), str(weights), str(converted)]) == 0
    assert cli_main(["export", "darknet_ref", "--weights", str(converted), "--input-size", "32",
                     "--out", str(tmp_path / "r.onnx")]) == 0
    record = onnx_record(tmp_path / "r.onnx")
    assert record["source"] == "darknet" and record["mean"] == [0.0] * 3 and record["std"] == [1.0] * 3
    capsys.readouterr()
