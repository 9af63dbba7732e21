"""Every export (ONNX, TorchScript, safetensors) carries one metadata record: the model's identity, its
input size, and what is known of its inputs and outputs (class names, category ids, mean / std, width),
taken from the training run or the weights file exported. Each format is read back with its own library."""
from __future__ import annotations

import json

import pytest
import torch

from cspnet.cli import main as cli_main
from cspnet.export import export_onnx, export_safetensors, export_torchscript, onnx_session
from cspnet.registry import create_model


def onnx_record(path) -> dict:
    import onnx

    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    return json.loads(props["cspnet"])


def torchscript_record(path) -> dict:
    extra = {"cspnet.json": ""}
    with pytest.warns(FutureWarning):  # torch.jit is deprecated in the pinned torch
        torch.jit.load(str(path), _extra_files=extra)
    return json.loads(extra["cspnet.json"])


def safetensors_record(path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()["cspnet"])


READERS = {".onnx": onnx_record, ".pt": torchscript_record, ".safetensors": safetensors_record}


def test_exports_of_a_classification_run_carry_its_classes_normalisation_size_and_width(tmp_path, capsys):
    run = tmp_path / "run"
    assert cli_main(["train", "--model", "cspresnet10", "--width", "0.25", "--data", "digits", "--img-size", "16",
                     "--epochs", "1", "--train-limit", "40", "--batch-size", "20", "--no-progress", "--threads", "1",
                     "--out", str(run)]) == 0
    data = json.loads((run / "last.json").read_text())["state"]["run"]["data"]
    for suffix, read in READERS.items():
        path = tmp_path / f"m{suffix}"
        assert cli_main(["export", "--checkpoint", str(run), "--out", str(path)]) == 0
        record = read(path)
        assert record["class_names"] == data["classes"] == [str(d) for d in range(10)]
        assert record["mean"] == data["mean"] and record["std"] == data["std"] and len(record["mean"]) == 1
        assert record["input_size"] == 16 and record["width"] == 0.25
        assert record["model"] == "cspresnet10" and record["num_classes"] == 10 and record["in_chans"] == 1
    capsys.readouterr()


def test_a_detector_exported_from_a_runs_weights_file_takes_the_runs_size_and_classes(tmp_path, capsys):
    run = tmp_path / "det"
    assert cli_main(["detect", "train", "--model", "cspresnet10", "--backbone-width", "0.25", "--neck-width", "32",
                     "--neck", "fpn", "--data", "scenes", "--num-scenes", "2", "--img-size", "32", "--batch-size", "2",
                     "--anchors", "yolov3", "--epochs", "1", "--no-progress", "--threads", "1", "--out", str(run)]) == 0
    trained = json.loads((run / "best.json").read_text())["state"]["run"]
    for suffix, read in READERS.items():
        path = tmp_path / f"d{suffix}"
        # no --input-size: the run's 32 px, not the 416 px default of a detector without a record
        assert cli_main(["export", "cspresnet10", "--detector", "fpn", "--weights", str(run / "best.safetensors"),
                         "--out", str(path)]) == 0
        record = read(path)
        assert record["input_size"] == 32 and record["class_names"] == trained["class_names"]
        assert record["category_ids"] == trained["category_ids"] and record["letterbox"] is True
        assert record["mean"] == [0.0] * 3 and record["std"] == [1.0] * 3  # RGB in [0, 1], not normalised
        assert trained["detector"]["anchors"] is None  # --anchors yolov3: the default anchors, recorded resolved
        assert record["anchors"] == [[10, 13], [16, 30], [33, 23], [30, 61], [62, 45], [59, 119], [116, 90],
                                     [156, 198], [373, 326]]
        assert record["anchor_masks"] == [[0, 1, 2], [3, 4, 5], [6, 7, 8]] and record["strides"] == [8, 16, 32]
    assert onnx_session(tmp_path / "d.onnx").get_inputs()[0].shape[2:] == [32, 32]
    capsys.readouterr()


def test_a_converted_files_preprocessing_carries_into_its_exports_and_re_exports(tmp_path, capsys):
    torchvision = pytest.importorskip("torchvision")
    from cspnet.interop import convert_file

    source = tmp_path / "resnet50.pth"
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), source)
    converted = convert_file("torchvision", "resnet50", source, tmp_path / "resnet50_tv.safetensors")
    preprocessing = {k: safetensors_record(converted)[k] for k in ("mean", "std", "crop_pct", "interpolation", "source")}
    assert preprocessing["source"] == "torchvision:resnet50"
    again = tmp_path / "again.safetensors"
    assert cli_main(["export", "resnet50_tv", "--weights", str(converted), "--out", str(again)]) == 0
    assert safetensors_record(again)["input_size"] == 224  # the file's, kept
    for path in (tmp_path / "m.onnx", tmp_path / "m.pt"):
        assert cli_main(["export", "resnet50_tv", "--weights", str(again), "--input-size", "32", "--out", str(path)]) == 0
        record = READERS[path.suffix](path)
        assert {k: record[k] for k in preprocessing} == preprocessing
        assert record["input_size"] == 32  # what the graph was traced at
    capsys.readouterr()


def test_library_exports_record_the_metadata_given_beside_the_models_own(tmp_path):
    model = create_model("cspresnet10", num_classes=3).eval()
    given = {"class_names": ["a", "b", "c"], "mean": [0.5] * 3, "std": [0.25] * 3, "model": "stale name"}
    records = [
        onnx_record(export_onnx(model, tmp_path / "m.onnx", (32, 48), metadata=given)),
        torchscript_record(export_torchscript(model, tmp_path / "m.pt", (32, 48), metadata=given)),
        safetensors_record(export_safetensors(model, tmp_path / "m.safetensors", metadata=given)),
    ]
    for record in records:
        assert record["class_names"] == ["a", "b", "c"] and record["std"] == [0.25] * 3
        assert record["model"] == "cspresnet10" and record["num_classes"] == 3  # the model's own identity wins
    assert records[0]["input_size"] == records[1]["input_size"] == [32, 48]


def test_a_width_scaled_models_export_rebuilds_from_the_file_alone(tmp_path, capsys):
    from cspnet.detection import create_detector
    from cspnet.engine.models import build_model
    from cspnet.export import run_onnx
    from cspnet.weights import WeightsError, load_model

    model = build_model("cspresnet10", num_classes=3, in_chans=1, width=0.25, options={"act": "mish"}).eval()
    path = export_safetensors(model, tmp_path / "m.safetensors", metadata={"width": 0.25, "options": {"act": "mish"}})
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        ref = model(x)
        assert torch.equal(load_model(path)(x), ref)
    with pytest.raises(WeightsError, match=r"another configuration of 'cspresnet10'.*load_model\(path\) rebuilds"):
        create_model("cspresnet10", num_classes=3, in_chans=1, pretrained=path)  # builds the registered widths
    onnx_path = tmp_path / "m.onnx"
    assert cli_main(["export", "cspresnet10", "--weights", str(path), "--input-size", "32", "--out", str(onnx_path)]) == 0
    (out,) = run_onnx(onnx_session(onnx_path), x)
    assert float((out - ref).abs().max() / ref.abs().max()) <= 1e-4
    assert onnx_record(onnx_path)["width"] == 0.25
    assert cli_main(["export", "cspresnet50", "--weights", str(path), "--out", str(onnx_path)]) == 2
    assert "holds weights of model 'cspresnet10'" in capsys.readouterr().err

    detector = create_detector("cspresnet10", "fpn", num_classes=3, anchors=[(4, 5)] * 3, backbone_width=0.25,
                               neck_width=32).eval()
    xd = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(load_model(export_safetensors(detector, tmp_path / "d.safetensors"))(xd), detector(xd))
