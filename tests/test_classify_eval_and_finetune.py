"""`cspnet eval` on a folder the run never saw, top-5 of few classes, the refusal to resume a finished run
for more epochs, and training with the input statistics a pretrained file records."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from cspnet.cli import main

TINY = ["--width", "0.25", "--img-size", "16", "--batch-size", "8", "--threads", "1", "--no-progress"]


def colour_folder(root, per_class, seed=0):
    """Three classes (red, green, blue): each image noise with one strong channel, as an audit's gen_cls.py made them."""
    rng = np.random.default_rng(seed)
    for c, name in enumerate(("red", "green", "blue")):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            a = rng.integers(0, 60, (20, 24, 3), dtype=np.uint8)
            a[..., c] = rng.integers(150, 255, (20, 24), dtype=np.uint8)
            Image.fromarray(a).save(root / name / f"{i:03d}.png")
    return root


def test_eval_scores_every_image_of_a_folder_the_run_never_saw(tmp_path, capsys):
    own, other, out = colour_folder(tmp_path / "own", 10), colour_folder(tmp_path / "other", 7, seed=1), tmp_path / "run"
    assert main(["train", "--model", "resnet10", *TINY, "--data", str(own), "--epochs", "1", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(out), "--data", str(other), "--no-progress"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert result["images"] == sum(map(sum, result["confusion"])) == 21 and result["split"] == "every image"
    assert "scoring 21 image(s), every image" in captured.err
    assert result["top5"] is None  # three classes: every label is in the top 5, so the figure would say nothing
    # asked for, a share of another folder is held out as asked
    assert main(["eval", "--checkpoint", str(out), "--data", str(other), "--val-fraction", "0.5", "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["images"] == 12  # round(3.5) = 4 of each class
    # the run's own folder keeps its recorded hold-out: 1 of each class's 10
    assert main(["eval", "--checkpoint", str(out), "--data", str(own), "--no-progress"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["images"] == 3 and result["split"] == "the 0.1 held out"
    # training on a folder held out whole is refused, naming the option
    assert main(["train", "--model", "resnet10", *TINY, "--data", str(other), "--val-fraction", "1.0",
                 "--out", str(tmp_path / "none")]) == 2
    assert "no training images (--val-fraction 1.0 holds out every image)" in capsys.readouterr().err


def test_resume_for_more_epochs_is_refused_saying_how_to_train_further(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--model", "resnet10", *TINY, "--data", "digits", "--train-limit", "64", "--test-limit", "20"]
    assert main([*args, "--epochs", "1", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main([*args, "--epochs", "2", "--out", str(out), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "epochs: checkpoint 1 vs now 2" in err and "the run finished its 1 epochs" in err
    assert f"--pretrained {out / 'last.safetensors'} --out NEW_DIR --epochs 2" in err
    # the way it names works: a new run from the finished run's weights
    assert main([*args, "--epochs", "2", "--pretrained", str(out / "last.safetensors"), "--out", str(tmp_path / "more")]) == 0
    # another difference than the epoch count gets no such hint
    assert main([*args, "--epochs", "1", "--lr", "0.5", "--out", str(out), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "lr: checkpoint 0.1 vs now 0.5" in err and "--pretrained" not in err


def _pretrained_file(path, in_chans=3, **stats):
    from cspnet.engine.models import model_record, rebuild_model
    from cspnet.weights import model_metadata, save_weights

    source = rebuild_model(model_record("resnet10", num_classes=3, in_chans=in_chans, width=0.25), seed=1)
    return save_weights(path, source, {**model_metadata(source), **stats})


def test_train_normalises_with_the_statistics_a_pretrained_file_records(tmp_path, capsys):
    from cspnet.engine.checkpoint import read_checkpoint_record
    from cspnet.engine.classify import load_classifier

    folder = colour_folder(tmp_path / "imgs", 6)
    # as `cspnet darknet convert` writes it: Darknet feeds plain [0, 1] RGB
    darknet_like = _pretrained_file(tmp_path / "dk.safetensors", mean=[0.0] * 3, std=[1.0] * 3)
    args = ["train", "--model", "resnet10", *TINY, "--data", str(folder), "--epochs", "1"]
    assert main([*args, "--pretrained", str(darknet_like), "--out", str(tmp_path / "dk")]) == 0
    assert f"mean [0.0, 0.0, 0.0], std [1.0, 1.0, 1.0] (recorded in {darknet_like})" in capsys.readouterr().err
    _, run = load_classifier(tmp_path / "dk")  # what eval, predict and export normalise with
    assert run["data"]["mean"] == [0.0] * 3 and run["data"]["std"] == [1.0] * 3
    # resuming takes them from the checkpoint, not from the file, named or not
    darknet_like.unlink()
    assert main([*args, "--pretrained", str(darknet_like), "--out", str(tmp_path / "dk"), "--resume"]) == 0
    assert main([*args, "--out", str(tmp_path / "dk"), "--resume"]) == 0
    assert f"std [1.0, 1.0, 1.0] (the run's, as it started from {darknet_like})" in capsys.readouterr().err
    # grey data: the colour channels' average, as the first conv is summed over them
    rgb = _pretrained_file(tmp_path / "rgb.safetensors", mean=[0.3, 0.6, 0.9], std=[1.0, 2.0, 3.0])
    assert main([*args, "--in-chans", "1", "--pretrained", str(rgb), "--out", str(tmp_path / "grey")]) == 0
    data = read_checkpoint_record(tmp_path / "grey")["state"]["run"]["data"]
    assert data["mean"] == pytest.approx([0.6]) and data["std"] == pytest.approx([2.0])
    # a file that records none keeps the data's own (ImageNet's for an RGB folder)
    plain = _pretrained_file(tmp_path / "plain.safetensors")
    assert main([*args, "--pretrained", str(plain), "--out", str(tmp_path / "plain")]) == 0
    assert "mean [0.485, 0.456, 0.406], std [0.229, 0.224, 0.225] (the data's own)" in capsys.readouterr().err
    bad = _pretrained_file(tmp_path / "bad.safetensors", mean=[0.0, 0.0], std=[1.0, 1.0])
    assert main([*args, "--pretrained", str(bad), "--out", str(tmp_path / "bad")]) == 2
    assert "bad.safetensors: metadata 'mean' [0.0, 0.0] / 'std' [1.0, 1.0] are not one or three" in capsys.readouterr().err
    # a run's own checkpoint weights (what the resume hint suggests): the statistics the run trained with
    assert main([*args, "--pretrained", str(tmp_path / "dk" / "last.safetensors"), "--out", str(tmp_path / "again")]) == 0
    assert "mean [0.0, 0.0, 0.0], std [1.0, 1.0, 1.0]" in capsys.readouterr().err
    assert read_checkpoint_record(tmp_path / "again")["state"]["run"]["data"]["mean"] == [0.0] * 3
