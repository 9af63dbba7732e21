"""Detection training end to end: a tiny detector overfits scenes; the CLI trains, resumes, evaluates, predicts."""
import contextlib
import json
import os
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from cspnet.cli import main
from cspnet.data.detection import DetectionDataset, coco_ground_truth, make_scenes
from cspnet.detection import create_detector
from cspnet.detection.train import DetectRecipe, evaluate_detector, load_detector, train_detector
from cspnet.engine.train import TrainConfig


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny detectors: see the fixture



@contextlib.contextmanager
def _killed_at_evaluation(monkeypatch, n: int):
    """Inside the block, the n-th `DetectionTask.evaluate` call raises, as a run killed in epoch n (after
    epoch n - 1 was checkpointed) would stop; the block must end so."""
    from cspnet.detection import train as train_mod

    evaluate, calls = train_mod.DetectionTask.evaluate, []

    def dying(self, model, dist):
        calls.append(1)
        if len(calls) == n:
            raise RuntimeError("killed")
        return evaluate(self, model, dist)

    monkeypatch.setattr(train_mod.DetectionTask, "evaluate", dying)
    try:
        with pytest.raises(RuntimeError, match="killed"):
            yield
    finally:
        monkeypatch.setattr(train_mod.DetectionTask, "evaluate", evaluate)


def test_tiny_detector_overfits_a_handful_of_scenes(tmp_path):
    size = 64
    records, names = make_scenes(4, seed=3, size=size, objects=(1, 3))
    train = DetectionDataset(records * 16, names, size)  # 64 images: 8 steps of 8 per epoch
    val = DetectionDataset(records, names, size)
    gt = coco_ground_truth(records, names)
    anchors = [(s * size / 256, s * size / 256) for s in (24, 32, 40, 48, 56, 64, 72, 80, 96)]
    det = create_detector("cspresnet10", "efm", num_classes=10, anchors=anchors, backbone_width=0.25, neck_width=64)
    cfg = TrainConfig(epochs=8, batch_size=8, optimizer="adamw", lr=3e-3, weight_decay=0.0, burn_in=5, grad_clip=10.0)
    result = train_detector(det, train, val, gt, tmp_path, cfg, DetectRecipe(eval_every=100), progress=False)
    assert result.final["AP50"] >= 0.9, result.history
    losses = [h["train_loss"] for h in result.history]
    assert losses[-1] < 0.5 * losses[0]
    assert (tmp_path / "detection_curves.png").is_file() and (tmp_path / "best.json").is_file()
    # the checkpoint rebuilds the same detector with the same weights
    loaded, run = load_detector(tmp_path)
    assert run["class_names"] == list(names) and run["img_size"] == size
    assert evaluate_detector(loaded, val, gt)["AP50"] == pytest.approx(result.final["AP50"])


def _cli_train(out, *extra):
    return main(["detect", "train", "--model", "cspresnet10", "--backbone-width", "0.25", "--neck-width", "32",
                 "--neck", "efm-sam", "--data", "scenes", "--num-scenes", "8", "--img-size", "64", "--batch-size", "4",
                 "--anchors", "auto", "--out", str(out), "--no-progress", "--burn-in", "1", *extra])


@pytest.mark.slow
def test_cli_train_resume_eval_predict(tmp_path, capsys, monkeypatch):
    from cspnet.weights import load_state

    straight, broken = tmp_path / "straight", tmp_path / "broken"
    assert _cli_train(straight, "--epochs", "2") == 0
    # a run killed during epoch 2 (after epoch 1 was checkpointed) and resumed ends with the same weights
    with _killed_at_evaluation(monkeypatch, 2):
        _cli_train(broken, "--epochs", "2")
    assert [json.loads(x)["epoch"] for x in (broken / "metrics.jsonl").read_text().splitlines()] == [1]
    assert _cli_train(broken, "--epochs", "3", "--resume") == 2  # another recipe: refused, not silently mixed
    assert "different recipe" in capsys.readouterr().err
    assert _cli_train(broken, "--epochs", "2", "--resume", "--box-loss", "giou") == 2  # another loss too
    assert "recipe.box_loss: checkpoint 'ciou' vs now 'giou'" in capsys.readouterr().err
    assert _cli_train(broken, "--epochs", "2", "--resume") == 0
    a, b = load_state(straight / "last.safetensors"), load_state(broken / "last.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    capsys.readouterr()

    assert main(["detect", "eval", "--checkpoint", str(straight)]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert {"AP", "AP50", "AP75", "APs", "APm", "APl"} <= set(metrics) and metrics["images"] == 8
    assert all(0 <= metrics[k] <= 1 for k in ("AP", "AP50", "AP75"))
    img = tmp_path / "scene.png"
    Image.fromarray(make_scenes(1, seed=9, size=80)[0][0].image).save(img)
    out = tmp_path / "pred"
    assert main(["detect", "predict", "--checkpoint", str(straight), str(img), "--out", str(out), "--conf", "0.0001"]) == 0
    dets = json.loads((out / "detections.json").read_text())
    classes = load_detector(straight)[1]["class_names"]
    assert dets[0]["width"] == 80 and dets[0]["detections"]
    for d in dets[0]["detections"]:
        x1, y1, x2, y2 = d["box"]
        assert 0 <= x1 <= x2 <= 80 and 0 <= y1 <= y2 <= 80 and classes[d["label"]] == d["class"]
    assert np.asarray(Image.open(out / "scene_det.png")).shape == (80, 80, 3)


def test_cli_train_starts_the_backbone_from_classifier_weights(tmp_path, capsys):
    from cspnet.darknet import save_darknet_weights
    from cspnet.darknet.mapping import native_records
    from cspnet.darknet.weights import read_header
    from cspnet.engine.checkpoint import model_metadata, read_checkpoint_record
    from cspnet.engine.models import model_record, rebuild_model
    from cspnet.weights import load_state, save_weights

    # an ImageNet classifier of the detector's backbone (cspresnet10 at width 0.25), in both file formats
    source = rebuild_model(model_record("cspresnet10", num_classes=1000, in_chans=3, width=0.25), seed=3)
    files = [save_weights(tmp_path / "in1k.safetensors", source, model_metadata(source)),
             save_darknet_weights(source, tmp_path / "in1k.weights")]
    body = {f"backbone.body.{k}": v for k, v in source.state_dict().items() if k.endswith(".weight") and not k.startswith("head.")}
    for path in files:
        out = tmp_path / path.suffix[1:]
        assert _cli_train(out, "--epochs", "1", "--lr", "1e-9", "--weight-decay", "0", "--backbone-weights", str(path)) == 0
        trained = load_state(out / "last.safetensors")
        assert all(torch.allclose(trained[k], v, rtol=0, atol=1e-6) for k, v in body.items()), path  # lr 1e-9: where it began
        assert read_checkpoint_record(out)["state"]["run"]["backbone_weights"] == str(path)
    assert "backbone convolutions" not in capsys.readouterr().err  # whole files: nothing to say
    # a Darknet file ending after 3 layers loads those and says so
    header = read_header(files[1].read_bytes()).nbytes
    records = native_records(create_detector("cspresnet10", "efm", backbone_width=0.25, neck_width=32).backbone.body)
    cut = tmp_path / "cut.weights"
    cut.write_bytes(files[1].read_bytes()[:header + 4 * sum(r.num_floats for r in records[:3])])
    assert _cli_train(tmp_path / "cut", "--epochs", "1", "--backbone-weights", str(cut)) == 0
    assert f"read 3 of {len(records)} backbone convolutions from {cut}; the rest keep their initialisation" in capsys.readouterr().err
    path.unlink()  # a resumed run takes its weights from the checkpoint
    assert _cli_train(out, "--epochs", "1", "--lr", "1e-9", "--weight-decay", "0", "--backbone-weights", str(path), "--resume") == 0
    wrong = rebuild_model(model_record("resnet10", num_classes=1000, in_chans=3, width=0.25), seed=3)
    save_weights(tmp_path / "r.safetensors", wrong, model_metadata(wrong))
    capsys.readouterr()
    assert _cli_train(tmp_path / "w", "--backbone-weights", str(tmp_path / "r.safetensors")) == 2
    assert "holds weights of model 'resnet10'" in capsys.readouterr().err


def test_cli_reports_bad_data_cleanly(tmp_path, capsys):
    bad = tmp_path / "broken.json"
    bad.write_text(json.dumps({"images": [], "annotations": [{"image_id": 1}], "categories": []}))
    assert main(["detect", "train", "--model", "cspresnet10", "--data", str(bad), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "broken.json" in err and "annotations[0]" in err
    assert main(["detect", "train", "--model", "cspresnet10", "--data", "nosuchset", "--out", str(tmp_path / "o")]) == 2
    assert "expected scenes or trees" in capsys.readouterr().err


def test_cli_bench_splits_latency(capsys):
    assert main(["detect", "bench", "--model", "cspresnet10", "--necks", "efm,gfm", "--img-size", "64", "--runs", "1",
                 "--neck-width", "32", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["detector"] for r in rows] == ["cspresnet10-efm", "cspresnet10-gfm"]
    for r in rows:
        assert all(r[f"{p}_ms"] > 0 for p in ("backbone", "neck", "head", "nms"))
        assert r["bflops"] > 0
    assert rows[0]["bflops"] != rows[1]["bflops"]


def test_bench_times_each_part_where_it_runs(monkeypatch):
    # Each part made slower by a known, different delay: the time must show up under that part's name.
    from cspnet.detection import bench

    det = create_detector("cspresnet10", "fpn", num_classes=2, backbone_width=0.25, neck_width=32)
    delays = {"backbone": 0.3, "neck": 0.2, "head": 0.1, "nms": 0.4}  # seconds, 100 ms apart
    for part in ("backbone", "neck", "head"):
        getattr(det, part).register_forward_pre_hook(lambda *args, delay=delays[part]: time.sleep(delay))
    postprocess = det.postprocess
    monkeypatch.setattr(det, "postprocess", lambda *a, **k: time.sleep(delays["nms"]) or postprocess(*a, **k))
    runs = 2
    start = time.perf_counter()
    result = bench.time_detector(det, 64, runs=runs)
    wall_ms = 1000 * (time.perf_counter() - start)
    for part, delay in delays.items():
        # the parts' own work takes a few ms; the margin is for a loaded machine, and half the delays' spacing
        assert 1000 * delay <= result[f"{part}_ms"] < 1000 * delay + 50, (part, result)
    # every timed pass (warm-up included) fits in the time the call took, measured from outside
    assert (bench.WARMUP + runs) * result["total_ms"] <= wall_ms
    assert result["fps"] == pytest.approx(1000 / result["total_ms"])


def test_load_detector_gives_tuple_backbone_options_back(tmp_path):
    # backbone_kwargs such as DenseNet's ``depths`` are tuples: stored as {"__tuple__": …} in the
    # checkpoint record, they must come back as tuples to rebuild the same detector.
    from cspnet.engine.checkpoint import save_checkpoint

    det = create_detector("densenet121", "fpn", num_classes=2, neck_width=32,
                          backbone_kwargs={"depths": (2, 3, 2, 2), "growth_rate": 8, "stem_chs": 16})
    save_checkpoint(tmp_path, model=det, state={"epoch": 0, "step": 0, "run": {"detector": det.cfg.to_dict()}})
    model, run = load_detector(tmp_path)
    assert model.cfg == det.cfg and run["detector"] == det.cfg.to_dict()
    assert all(torch.equal(a, b) for a, b in zip(det.state_dict().values(), model.state_dict().values()))


def test_cli_memory_efficient_detector_trains_the_same_weights(tmp_path):
    from cspnet.weights import load_state

    assert _cli_train(tmp_path / "plain", "--epochs", "1") == 0
    assert _cli_train(tmp_path / "lean", "--epochs", "1", "--memory-efficient") == 0
    plain, lean = load_state(tmp_path / "plain" / "last.safetensors"), load_state(tmp_path / "lean" / "last.safetensors")
    assert plain.keys() == lean.keys()
    for key in plain:
        torch.testing.assert_close(lean[key], plain[key], rtol=1e-4, atol=1e-5, msg=key)
    saved = json.loads((tmp_path / "lean" / "last.json").read_text())
    assert '"memory_efficient": true' in json.dumps(saved)


def _coco_files(tmp_path, name, n, seed, size=64):
    """A COCO JSON in ``tmp_path/ann`` of ``n`` scenes whose PNGs are in ``tmp_path/<name>_img`` (so --images is needed)."""
    records, names = make_scenes(n, seed=seed, size=size, objects=(1, 2))
    folder = tmp_path / f"{name}_img"
    folder.mkdir()
    for r in records:
        Image.fromarray(r.image).save(folder / r.file_name)
    gt = coco_ground_truth(records, names)
    (tmp_path / "ann").mkdir(exist_ok=True)
    path = tmp_path / "ann" / f"{name}.json"
    path.write_text(json.dumps(gt))
    return path, folder


def _cli_train_coco(out, data, images, *extra):
    return main(["detect", "train", "--model", "cspresnet10", "--backbone-width", "0.25", "--neck-width", "32",
                 "--neck", "efm", "--data", str(data), "--images", str(images), "--img-size", "64", "--batch-size", "4",
                 "--anchors", "yolov3", "--epochs", "1", "--out", str(out), "--no-progress", "--burn-in", "1", *extra])


def test_cli_eval_uses_the_recorded_validation_set(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative paths in train; eval from elsewhere must still find the data
    train, train_img = _coco_files(tmp_path, "train", 4, seed=1)
    val, val_img = _coco_files(tmp_path, "val", 2, seed=2)
    rel = [str(p.relative_to(tmp_path)) for p in (train, train_img, val, val_img)]
    assert _cli_train_coco("run", rel[0], rel[1], "--val-data", rel[2], "--val-images", rel[3]) == 0
    assert _cli_train_coco("noval", rel[0], rel[1]) == 0
    capsys.readouterr()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["detect", "eval", "--checkpoint", str(tmp_path / "run")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["images"] == 2 and str(val) in out["data"]
    assert main(["detect", "eval", "--checkpoint", str(tmp_path / "run"), "--split", "train"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["images"] == 4 and str(train) in out["data"]
    assert main(["detect", "eval", "--checkpoint", str(tmp_path / "noval")]) == 2
    assert "records no validation set; give --data" in capsys.readouterr().err
    assert main(["detect", "eval", "--checkpoint", str(tmp_path / "noval"), "--data", str(val), "--images", str(val_img)]) == 0
    assert json.loads(capsys.readouterr().out)["images"] == 2


def test_cli_train_refuses_a_folder_holding_a_run_without_resume(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "last.json").write_text('{"a": "checkpoint"}')
    assert _cli_train(out, "--epochs", "1") == 2
    assert "holds the checkpoints of a training run; continue it with --resume or train into another --out" in capsys.readouterr().err
    assert (out / "last.json").read_text() == '{"a": "checkpoint"}' and sorted(p.name for p in out.iterdir()) == ["last.json"]


_TRAIN = ["detect", "train", "--model", "cspresnet10", "--data", "scenes"]


@pytest.mark.parametrize("argv, option", [
    (_TRAIN + ["--eval-every", "0"], "--eval-every"), (_TRAIN + ["--img-size", "0"], "--img-size"),
    (_TRAIN + ["--img-size", "-64"], "--img-size"), (_TRAIN + ["--img-size", "100"], "--img-size"),
    (_TRAIN + ["--neck-width", "0"], "--neck-width"), (_TRAIN + ["--neck-width", "16"], "--neck-width"),
    (_TRAIN + ["--num-scenes", "0"], "--num-scenes"), (_TRAIN + ["--scene-size", "8"], "--scene-size"),
    (_TRAIN + ["--mosaic", "2"], "--mosaic"), (_TRAIN + ["--mosaic", "-1"], "--mosaic"), (_TRAIN + ["--vflip", "3"], "--vflip"),
    (_TRAIN + ["--label-smoothing", "nan"], "--label-smoothing"), (_TRAIN + ["--label-smoothing", "1"], "--label-smoothing"), (_TRAIN + ["--ema", "-0.5"], "--ema"),
    (_TRAIN + ["--weight-decay", "-1"], "--weight-decay"), (_TRAIN + ["--threads", "0"], "--threads"),
    (_TRAIN + ["--seed", "-1"], "--seed"), (_TRAIN + ["--anchors", "a,b"], "--anchors"),
    (_TRAIN + ["--anchors", "10,13,16,30"], "--anchors"), (_TRAIN + ["--lr", "0"], "--lr"), (_TRAIN + ["--epochs", "0"], "--epochs"),
    (["detect", "predict", "--checkpoint", "x", "a.png", "--out", "o", "--conf", "2"], "--conf"),
    (["detect", "predict", "--checkpoint", "x", "a.png", "--out", "o", "--iou", "0"], "--iou"),
    (["detect", "eval", "--checkpoint", "x", "--batch-size", "0"], "--batch-size"),
    (["detect", "bench", "--img-size", "100"], "--img-size"), (["detect", "bench", "--necks", ","], "--necks"),
    (["detect", "bench", "--necks", "fpn,nope"], "--necks"), (["detect", "bench", "--runs", "0"], "--runs"),
])
def test_cli_rejects_bad_option_values_naming_the_option(tmp_path, capsys, argv, option):
    if argv[1] == "train":
        argv = argv + ["--out", str(tmp_path / "o")]
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert f"argument {option}: expected" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_detector_refuses_a_neck_too_narrow_for_its_levels():
    with pytest.raises(ValueError, match="neck_width 16 leaves the finest of 3 levels fewer than 8 channels"):
        create_detector("cspresnet10", "efm", neck_width=16)
    with pytest.raises(ValueError, match="neck_width 0"):
        create_detector("cspresnet10", "efm", neck_width=0)


def test_cli_auto_anchors_need_boxes_and_ignore_crowd_ones(tmp_path, capsys):
    data, images = _coco_files(tmp_path, "train", 4, seed=1)
    gt = json.loads(data.read_text())
    assert gt["annotations"]
    for a in gt["annotations"]:  # evaluated as ignore regions, never trained on: no anchors from them either
        a["iscrowd"] = 1
    crowd = tmp_path / "ann" / "crowd.json"
    crowd.write_text(json.dumps(gt))
    empty = tmp_path / "ann" / "empty.json"
    empty.write_text(json.dumps({**gt, "annotations": []}))
    for path in (crowd, empty):
        assert _cli_train_coco(tmp_path / path.stem, path, images, "--anchors", "auto") == 2
        assert f"{path}: no boxes to fit anchors to (--anchors auto" in capsys.readouterr().err


def test_cli_train_finds_missing_images_before_training(tmp_path, capsys):
    train, train_img = _coco_files(tmp_path, "train", 4, seed=1)
    val, val_img = _coco_files(tmp_path, "val", 2, seed=2)
    missing = sorted(val_img.iterdir())[1]
    missing.unlink()
    out = tmp_path / "run"
    assert _cli_train_coco(out, train, train_img, "--val-data", str(val), "--val-images", str(val_img)) == 2
    err = capsys.readouterr().err
    assert f"{val}: image {missing} of the validation set does not exist (give the folder of its images with --val-images" in err
    assert not out.exists()  # found before training, not after an epoch
    assert _cli_train_coco(out, train, train_img, "--val-data", str(val)) == 2  # the images are not next to the JSON
    assert "of the validation set does not exist (give the folder of its images with --val-images" in capsys.readouterr().err
    assert _cli_train_coco(out, train, val_img) == 2
    assert f"{train}: image {val_img}/scene_train_1_00000.png of the training set does not exist (give the folder of its images with --images" in capsys.readouterr().err


def test_resume_with_another_input_size_names_only_what_differs(tmp_path):
    from cspnet.engine.checkpoint import CheckpointError, save_checkpoint

    records, names = make_scenes(4, seed=3, size=64)
    det = create_detector("cspresnet10", "efm", num_classes=10, backbone_width=0.25, neck_width=32)
    run = {"detector": det.cfg.to_dict(), "img_size": 64, "class_names": list(names)}
    save_checkpoint(tmp_path, model=det, state={"epoch": 0, "step": 0, "run": run})
    other = create_detector("cspresnet10", "efm", num_classes=10, anchors=[(s, s) for s in range(10, 100, 10)],
                            backbone_width=0.25, neck_width=32)
    cfg = TrainConfig(epochs=1, batch_size=4)
    with pytest.raises(CheckpointError, match="would not continue the same run") as e:
        train_detector(other, DetectionDataset(records, names, 96), None, None, tmp_path, cfg, resume=True, progress=False)
    message = str(e.value)
    assert "img_size: checkpoint 64 vs now 96" in message and "anchors: checkpoint" in message
    assert "neck_width" not in message and "backbone" not in message.split("(", 1)[1]


def _tiny_run(out, recipe: DetectRecipe, epochs: int, resume: bool = False):
    records, names = make_scenes(4, seed=3, size=64, objects=(1, 3))
    data = DetectionDataset(records, names, 64)
    torch.manual_seed(0)
    det = create_detector("cspresnet10", "panet", num_classes=10, backbone_width=0.25, neck_width=32)
    cfg = TrainConfig(epochs=epochs, batch_size=2, optimizer="adamw", lr=2e-3, seed=0)
    return train_detector(det, data, data, coco_ground_truth(records, names), out, cfg, recipe, progress=False, resume=resume)


def test_resumed_run_evaluates_the_epochs_an_uninterrupted_one_does(tmp_path, monkeypatch):
    from cspnet.engine.checkpoint import read_checkpoint_record

    recipe = DetectRecipe(eval_every=2)  # epochs 2 and 3 (the last) are evaluated
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    _tiny_run(straight, recipe, 3)
    with _killed_at_evaluation(monkeypatch, 2):  # the run is cut in epoch 2, after epoch 1 was checkpointed
        _tiny_run(broken, recipe, 3)
    _tiny_run(broken, recipe, 3, resume=True)
    histories = [[json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()] for out in (straight, broken)]
    assert [[h["epoch"] for h in rows if "val_AP50" in h] for rows in histories] == [[2, 3], [2, 3]]
    assert histories[0][1]["val_AP50"] == histories[1][1]["val_AP50"]
    assert read_checkpoint_record(straight, "best")["state"]["epoch"] == read_checkpoint_record(broken, "best")["state"]["epoch"]


@pytest.mark.parametrize("field, value", [
    ("eval_every", 0), ("eval_every", -1), ("eval_every", 1.5), ("eval_batch_size", 0), ("eval_conf", 2.0),
    ("eval_conf", float("nan")), ("eval_iou", 0.0), ("time_limit", -5.0), ("time_limit", 0), ("time_limit", float("nan")),
])
def test_detect_recipe_refuses_bad_values_naming_the_field(field, value):
    with pytest.raises(ValueError, match=f"DetectRecipe.{field} must be"):
        DetectRecipe(**{field: value})
    DetectRecipe(time_limit=3600, eval_conf=0.0, eval_iou=1.0, eval_every=3)  # the edges that make sense pass


def test_cli_run_cut_between_best_and_last_of_epoch_1_can_be_trained_again(tmp_path, capsys, monkeypatch):
    from cspnet.engine import train as engine_train

    out = tmp_path / "run"
    save = engine_train.save_checkpoint

    def dying(*args, **kwargs):  # killed after epoch 1's `best` committed, before its `last`
        if kwargs.get("name") == "last":
            raise RuntimeError("killed")
        return save(*args, **kwargs)

    monkeypatch.setattr(engine_train, "save_checkpoint", dying)
    with pytest.raises(RuntimeError, match="killed"):
        _cli_train(out, "--epochs", "1")
    monkeypatch.setattr(engine_train, "save_checkpoint", save)
    assert (out / "best.json").is_file() and not (out / "last.json").exists()
    assert _cli_train(out, "--epochs", "1", "--resume") == 2
    assert "nothing to resume; train again without --resume" in capsys.readouterr().err
    assert _cli_train(out, "--epochs", "1") == 0
    assert (out / "last.json").is_file()
    assert _cli_train(out, "--epochs", "1") == 2  # a finished run is still refused
    assert "continue it with --resume" in capsys.readouterr().err


def test_cli_checkpoint_every_keeps_the_steps_of_a_cut_epoch(tmp_path, monkeypatch):
    from cspnet.detection import train as train_mod
    from cspnet.engine.checkpoint import read_checkpoint_record

    prepare, calls = train_mod.DetectionTask.prepare, []

    def dying(self, batch, **kwargs):  # killed at the second of the epoch's two steps
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("killed")
        return prepare(self, batch, **kwargs)

    monkeypatch.setattr(train_mod.DetectionTask, "prepare", dying)
    with pytest.raises(RuntimeError, match="killed"):
        _cli_train(tmp_path, "--epochs", "1", "--checkpoint-every", "1")
    state = read_checkpoint_record(tmp_path)["state"]
    assert state["train_config"]["checkpoint_every"] == 1 and (state["step"], state["epoch"]) == (1, 0)


def test_time_limit_stop_says_where_the_run_resumes(tmp_path, monkeypatch):
    import time

    from cspnet.detection import train as train_mod

    prepare, calls = train_mod.DetectionTask.prepare, []

    def late(self, batch, **kwargs):  # the budget is spent when epoch 2 starts
        calls.append(1)
        if len(calls) == 3:
            self._deadline = time.monotonic() - 1
        return prepare(self, batch, **kwargs)

    monkeypatch.setattr(train_mod.DetectionTask, "prepare", late)
    with pytest.raises(train_mod.TimeBudgetSpent, match=r"resume continues the run from .*last\.json after step 2 \(1 epoch"):
        _tiny_run(tmp_path, DetectRecipe(time_limit=3600), 2)


def test_cli_predict_skips_unreadable_images_and_writes_the_others(tmp_path, capsys):
    _tiny_run(tmp_path / "run", DetectRecipe(), 1)
    good, bad = tmp_path / "scene.png", tmp_path / "bad.png"
    Image.fromarray(make_scenes(1, seed=9, size=64)[0][0].image).save(good)
    bad.write_text("not an image")
    out = tmp_path / "pred"
    argv = ["detect", "predict", "--checkpoint", str(tmp_path / "run"), str(bad), str(good), "--out", str(out)]
    assert main(argv) == 2  # as cspnet predict: an unreadable image is an error unless --skip-corrupt
    assert f"{bad}: cannot read image" in capsys.readouterr().err
    assert main([*argv, "--skip-corrupt"]) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert summary["images"] == 1 and len(summary["skipped"]) == 1 and str(bad) in summary["skipped"][0]
    assert f"skipped: {bad}: cannot read image" in captured.err
    assert [r["image"] for r in json.loads((out / "detections.json").read_text())] == [str(good)]
    assert (out / "scene_det.png").is_file() and not (out / "bad_det.png").exists()


def test_cli_train_loads_and_augments_in_the_workers_with_the_same_result(tmp_path, monkeypatch):
    """--workers 2 reads and augments the training images in 2 DataLoader processes; each image's draws come
    from its own seed (the loop's chunk seed + its place in the chunk), so the run equals --workers 0 to the bit."""
    from cspnet.data import detection as data_mod
    from cspnet.weights import load_state

    getitem, log = data_mod.DetectionDataset.__getitem__, tmp_path / "loaded_by.txt"

    def logged(self, i):
        if self.augment is not None:  # a training image (evaluation reads the validation set in the main process)
            with open(log, "a") as f:
                f.write(f"{os.getpid()}\n")
        return getitem(self, i)

    monkeypatch.setattr(data_mod.DetectionDataset, "__getitem__", logged)
    assert _cli_train(tmp_path / "w0", "--epochs", "1", "--workers", "0", "--device", "cpu") == 0
    loaded_by_w0 = set(log.read_text().split())
    log.unlink()
    assert _cli_train(tmp_path / "w2", "--epochs", "1", "--workers", "2", "--device", "cpu") == 0
    loaded_by_w2 = set(log.read_text().split())
    assert loaded_by_w0 == {str(os.getpid())}
    assert len(loaded_by_w2) == 2 and str(os.getpid()) not in loaded_by_w2  # the two steps' chunks, one per worker
    w0, w2 = (json.loads((tmp_path / run / "metrics.jsonl").read_text()) for run in ("w0", "w2"))
    for key in ("train_loss", "train_box", "train_obj", "train_cls", "val_AP", "val_AP50"):
        assert w0[key] == w2[key], key
    a, b = load_state(tmp_path / "w0" / "last.safetensors"), load_state(tmp_path / "w2" / "last.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_cli_train_bf16_on_the_cpu_and_refuses_fp16_there(tmp_path, capsys):
    from cspnet.engine.checkpoint import read_checkpoint_record

    assert _cli_train(tmp_path / "fp32", "--epochs", "1", "--device", "cpu") == 0
    assert _cli_train(tmp_path / "bf16", "--epochs", "1", "--device", "cpu", "--amp", "bf16") == 0
    fp32, bf16 = (json.loads((tmp_path / run / "metrics.jsonl").read_text()) for run in ("fp32", "bf16"))
    # the same images and weights computed in bfloat16: close to the float32 loss, yet not equal to it
    assert bf16["train_loss"] != fp32["train_loss"] and bf16["train_loss"] == pytest.approx(fp32["train_loss"], rel=0.05)
    assert read_checkpoint_record(tmp_path / "bf16")["state"]["train_config"]["amp"] == "bf16"
    capsys.readouterr()
    assert _cli_train(tmp_path / "fp16", "--epochs", "1", "--device", "cpu", "--amp", "fp16") == 2
    assert "fp16 mixed precision needs a CUDA device; use --amp bf16 on the CPU" in capsys.readouterr().err
    assert not (tmp_path / "fp16").exists()  # refused before the data is loaded


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cli_train_device_cuda_without_cuda_is_refused(tmp_path, capsys):
    assert _cli_train(tmp_path / "run", "--epochs", "1", "--device", "cuda") == 2
    assert "--device cuda asked for, but no CUDA device is available" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_time_limit_is_refused_under_ddp(tmp_path):
    # each process would stop at its own step and leave the others waiting in the gradient all-reduce
    from cspnet.engine.distributed import DistInfo

    records, names = make_scenes(4, seed=3, size=64)
    det = create_detector("cspresnet10", "efm", num_classes=10, backbone_width=0.25, neck_width=32)
    with pytest.raises(ValueError, match="DetectRecipe.time_limit needs a single process"):
        train_detector(det, DetectionDataset(records, names, 64), None, None, tmp_path, TrainConfig(epochs=1, batch_size=4),
                       DetectRecipe(time_limit=60), progress=False, dist=DistInfo(rank=0, world_size=2))
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_ddp_two_cpu_processes_match_one_process_with_accumulation(tmp_path):
    """2 gloo processes x 2 images == 1 process x 2 accumulated chunks of 2 (global batch 4), as for
    classification (tests/test_train_resume.py): without SyncBatchNorm each process normalises with the
    statistics of its own chunk, which the one-process run with --accum-steps 2 does too; each chunk's images
    are augmented from the same chunk seed in both; DDP's averaged gradient (g0 + g1) / 2 equals the
    accumulated g0 / 2 + g1 / 2. The BN running statistics are not compared (DDP keeps rank 0's, the
    reference saw both chunks), so neither are the validation metrics of the two runs."""
    from cspnet.data.detection import load_detection_source
    from cspnet.weights import load_state

    ddp, single = tmp_path / "ddp", tmp_path / "single"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    argv = ["detect", "train", "--model", "cspresnet10", "--backbone-width", "0.25", "--neck-width", "32", "--neck", "efm",
            "--data", "scenes", "--num-scenes", "8", "--img-size", "64", "--batch-size", "4", "--anchors", "yolov3",
            "--epochs", "1", "--burn-in", "1", "--no-progress", "--device", "cpu", "--threads", "1"]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "cspnet", *argv, "--out", str(ddp)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count('"out"') == 1  # rank 0 alone reports
    assert main([*argv, "--accum-steps", "2", "--out", str(single)]) == 0
    a, b = load_state(ddp / "last.safetensors"), load_state(single / "last.safetensors")
    params = [k for k in a if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    worst = max((a[k] - b[k]).abs().max().item() for k in params)
    assert worst <= 1e-6, f"parameters differ by up to {worst}"
    row, reference = (json.loads((run / "metrics.jsonl").read_text()) for run in (ddp, single))
    assert row["train_loss"] == pytest.approx(reference["train_loss"], rel=1e-6)
    # each process predicted half the validation set and rank 0 scored them together: the metrics are
    # those of the saved model scored in one process
    val = load_detection_source("scenes", "val", num_scenes=8, scene_size=64, seed=0)
    model, run = load_detector(ddp)
    again = evaluate_detector(model, DetectionDataset(val.records, val.class_names, 64), coco_ground_truth(val.records, val.class_names))
    assert again["AR100"] > 0  # something to compare: the model found some boxes
    for key in ("AP", "AP50", "AR100"):
        assert again[key] == pytest.approx(row[f"val_{key}"], rel=1e-6), key


def test_checkpoint_of_a_detector_that_held_untapped_stages_loads_and_resumes(tmp_path):
    # Before detectors kept only the backbone levels they tap, a darknet_ref detector held its stride-64
    # stage (stages.5), which no tap reads: its checkpoints hold that stage's weights, EMA and optimizer state.
    from cspnet.engine.checkpoint import load_checkpoint, save_checkpoint
    from cspnet.engine.ema import ModelEMA
    from cspnet.engine.models import build_model
    from cspnet.engine.optim import build_optimizer

    def detector():
        return create_detector("darknet_ref", "panet", num_classes=2, neck_width=32, backbone_width=0.25)

    old = detector()
    old.backbone.body = build_model("darknet_ref", num_classes=0, in_chans=3, width=0.25, options={"features_only": True})
    assert "backbone.body.stages.5.blocks.conv.weight" in old.state_dict()
    optimizer = build_optimizer(old, "sgd", 0.1, 1e-4)
    for p in old.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()  # momentum buffers, one per parameter
    ema = ModelEMA(old)
    ema.update(old)
    run = {"detector": old.cfg.to_dict()}
    save_checkpoint(tmp_path, model=old, optimizer=optimizer, ema=ema, state={"epoch": 1, "step": 1, "run": run})

    new = detector()
    assert len(new.backbone.body.stages) == 5 and new.backbone.body.deleted_stages == ("stages.5",)
    kept = {k: v for k, v in old.state_dict().items() if not k.startswith("backbone.body.stages.5.")}
    loaded, _ = load_detector(tmp_path)  # the EMA weights, through the EMA's state dict
    assert all(torch.equal(loaded.state_dict()[k], ema.module.state_dict()[k]) for k in kept)
    resumed = build_optimizer(new, "sgd", 0.1, 1e-4)
    load_checkpoint(tmp_path, model=new, optimizer=resumed, ema=ModelEMA(new))  # what resume loads
    assert all(torch.equal(new.state_dict()[k], v) for k, v in kept.items())
    old_params = dict(old.named_parameters())
    for name, p in new.named_parameters():
        assert torch.equal(resumed.state[p]["momentum_buffer"], optimizer.state[old_params[name]]["momentum_buffer"]), name


def test_detections_carry_the_datasets_coco_category_ids(tmp_path, monkeypatch):
    # COCO numbers its categories 1..90 with gaps, not 0..N-1: a detector that finds every box exactly scores AP 1
    # only if its class indices are written back as the file's ids.
    from cspnet.data.detection import load_coco

    images, annotations = [], []
    for image_id, cats in ((11, (90, 1, 5)), (12, (5, 90))):
        Image.new("RGB", (64, 64)).save(tmp_path / f"{image_id}.png")
        images.append({"id": image_id, "file_name": f"{image_id}.png", "width": 64, "height": 64})
        for k, cat in enumerate(cats):
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": cat,
                                "bbox": [4 + 20 * k, 6 + 15 * k, 14, 18]})
    (tmp_path / "instances.json").write_text(json.dumps({
        "images": images, "annotations": annotations,
        "categories": [{"id": c, "name": n} for c, n in ((5, "car"), (90, "toothbrush"), (1, "person"))]}))
    records, names, cat_ids, _ = load_coco(tmp_path / "instances.json", tmp_path)
    assert cat_ids == (1, 5, 90) and names == ("person", "car", "toothbrush")
    dataset = DetectionDataset(records, names, 64)
    truths = iter([{"boxes": torch.from_numpy(r.boxes), "scores": torch.linspace(0.9, 0.5, len(r.boxes)),
                    "labels": torch.from_numpy(r.labels)} for r in records])
    det = create_detector("cspresnet10", "fpn", num_classes=3, backbone_width=0.25, neck_width=32).eval()
    monkeypatch.setattr(det, "postprocess", lambda outputs, *args: [next(truths) for _ in outputs])
    gt = coco_ground_truth(records, names, cat_ids)
    metrics = evaluate_detector(det, dataset, gt, cat_ids)
    assert metrics["AP50"] == pytest.approx(1.0) and metrics["AP"] == pytest.approx(1.0)


def _non_square_coco(tmp_path):
    """Six 256 px scenes padded below to 256 wide x 320 high, as a COCO file: at a 64 px input their boxes shrink 5x."""
    records, names = make_scenes(6, seed=1, size=256)
    folder = tmp_path / "img"
    folder.mkdir()
    for r in records:
        Image.fromarray(np.pad(r.image, ((0, 64), (0, 0), (0, 0)))).save(folder / r.file_name)
        r.height = 320
    path = tmp_path / "tall.json"
    path.write_text(json.dumps(coco_ground_truth(records, names)))
    return ["--data", str(path), "--images", str(folder)]


@pytest.mark.parametrize("data", ["scenes", "coco"])
def test_cli_auto_anchors_are_in_input_pixels(tmp_path, monkeypatch, data):
    # Images larger than --img-size: the anchors must fit the boxes the detector is trained on, which are
    # letterboxed to the input size, not the boxes in the images' own pixels.
    from cspnet.detection import train as train_mod
    from cspnet.detection.head import fit_anchors

    seen = {}

    def no_training(model, train_set, *args, **kwargs):
        seen.update(model=model, train_set=train_set)
        return SimpleNamespace(final={}, out_dir=tmp_path / "run", wall_s=0.0)

    monkeypatch.setattr(train_mod, "train_detector", no_training)
    source = ["--data", "scenes", "--num-scenes", "6", "--scene-size", "256"] if data == "scenes" else _non_square_coco(tmp_path)
    assert main(["detect", "train", "--model", "cspresnet10", "--backbone-width", "0.25", "--neck-width", "32",
                 "--img-size", "64", "--anchors", "auto", "--out", str(tmp_path / "run"), "--no-progress", *source]) == 0
    train_set = seen["train_set"]
    assert {max(r.width, r.height) for r in train_set.records} == {256 if data == "scenes" else 320}
    plain = DetectionDataset(train_set.records, train_set.class_names, 64)  # the training targets, unaugmented
    boxes = torch.cat([plain[i][1]["boxes"] for i in range(len(plain))])
    expect = fit_anchors((boxes[:, 2:] - boxes[:, :2]).numpy(), 9)
    anchors = seen["model"].layout.anchors
    assert np.allclose(anchors, expect, atol=0.11) and max(max(a) for a in anchors) <= 64


def test_cli_eval_and_predict_run_the_folded_detector(tmp_path, capsys, monkeypatch):
    # eval and predict are inference only: the BatchNorms fold into the convs (~20 % faster), same figures
    from cspnet.detection import predict, train
    from cspnet.detection.metrics import coco_evaluate

    assert _cli_train(tmp_path / "run", "--epochs", "1") == 0
    unfused = load_detector(tmp_path / "run")[0]
    used, unfused_metrics = [], []
    real_predict, real_detect = train.predict_dataset, predict.detect_image

    def predict_dataset(model, dataset, *args, **kwargs):
        used.append(model)
        # the same data through the unfolded detector
        unfused_metrics.append(coco_evaluate(coco_ground_truth(dataset.records, dataset.class_names),
                                             real_predict(unfused, dataset, *args, **kwargs)))
        return real_predict(model, dataset, *args, **kwargs)

    monkeypatch.setattr(train, "predict_dataset", predict_dataset)
    monkeypatch.setattr(predict, "detect_image", lambda model, *a, **k: used.append(model) or real_detect(model, *a, **k))
    capsys.readouterr()
    assert main(["detect", "eval", "--checkpoint", str(tmp_path / "run")]) == 0
    metrics = json.loads(capsys.readouterr().out)
    img = tmp_path / "scene.png"
    Image.fromarray(make_scenes(1, seed=9, size=64)[0][0].image).save(img)
    assert main(["detect", "predict", "--checkpoint", str(tmp_path / "run"), str(img), "--out", str(tmp_path / "p")]) == 0
    assert len(used) == 2
    for model in used:
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    for key in ("AP", "AP50"):
        assert metrics[key] == pytest.approx(unfused_metrics[0][key], abs=1e-3)
