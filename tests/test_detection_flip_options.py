"""`cspnet detect train`'s flip options: --hflip, the digits scenes' default, and what a run records of them."""
import json
import types

import numpy as np
import pytest

from cspnet.cli import main
from cspnet.data import detection as D
from conftest import write_idx


pytestmark = pytest.mark.usefixtures("one_thread")


def _fake_fashion_mnist(root):
    root.mkdir()
    for prefix in ("train", "t10k"):
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", 2051, np.full((3, 28, 28), 255))
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", 2049, np.arange(3))


_TRAIN = ["detect", "train", "--model", "cspresnet10", "--backbone-width", "0.25", "--neck-width", "32", "--neck", "efm",
          "--data", "scenes", "--num-scenes", "4", "--img-size", "64", "--batch-size", "4", "--anchors", "yolov3",
          "--no-progress", "--burn-in", "1", "--epochs", "1"]


def _augmentation(monkeypatch, tmp_path, *extra):
    """What `detect train` would train with: its training set's AugmentCfg and the run's data record."""
    from cspnet.detection import train as train_mod

    seen = {}

    def recording(model, train_set, *args, run_info=None, **kwargs):
        seen.update(augment=train_set.augment, data=run_info["data"])
        return types.SimpleNamespace(final={}, out_dir=tmp_path / "run", wall_s=0.0)

    monkeypatch.setattr(train_mod, "train_detector", recording)
    assert main(_TRAIN + ["--out", str(tmp_path / "run"), *extra]) == 0
    return seen["augment"], seen["data"]


def test_hflip_option_and_the_digit_scenes_default(monkeypatch, tmp_path, fashion_root):
    augment, data = _augmentation(monkeypatch, tmp_path)  # no Fashion-MNIST: digits, which a mirror changes
    assert augment.hflip == 0.0 and data["augment"]["hflip"] == 0.0
    augment, data = _augmentation(monkeypatch, tmp_path, "--hflip", "0.3", "--vflip", "0.2", "--mosaic", "0.1")
    assert (augment.hflip, augment.vflip, augment.mosaic) == (0.3, 0.2, 0.1)
    assert data["augment"] == {**data["augment"], "hflip": 0.3, "vflip": 0.2, "mosaic": 0.1}
    _, data = _augmentation(monkeypatch, tmp_path, "--no-augment")
    assert data["augment"] is None
    _fake_fashion_mnist(fashion_root)  # clothes keep their label when mirrored
    D.object_images.cache_clear()
    augment, _ = _augmentation(monkeypatch, tmp_path)
    assert augment.hflip == 0.5


@pytest.mark.parametrize("value", ["1.5", "-0.1", "nan", "x"])
def test_hflip_must_be_a_probability(capsys, tmp_path, value):
    with pytest.raises(SystemExit):
        main(_TRAIN + ["--out", str(tmp_path / "run"), "--hflip", value])
    assert f"argument --hflip: expected a number in [0, 1], got '{value}'" in capsys.readouterr().err


def test_resume_with_other_flips_is_refused(tmp_path, capsys, fashion_root):
    out = str(tmp_path / "run")
    assert main(_TRAIN + ["--out", out, "--hflip", "0.5"]) == 0
    capsys.readouterr()
    assert main(_TRAIN + ["--out", out, "--resume"]) == 2  # the digits' default, 0, is another augmentation
    assert "data.augment: checkpoint {" in capsys.readouterr().err
    assert main(_TRAIN + ["--out", out, "--resume", "--hflip", "0.5", "--epochs", "1"]) == 0


def test_a_run_recorded_before_its_augmentation_resumes_with_the_augmentation_it_had(tmp_path, capsys, fashion_root):
    # Versions before data.augment flipped horizontally with probability 0.5 and recorded no augmentation.
    out = tmp_path / "run"
    assert main(_TRAIN + ["--out", str(out), "--hflip", "0.5", "--vflip", "0.2"]) == 0
    record = json.loads((out / "last.json").read_text())
    del record["state"]["run"]["data"]["augment"]
    (out / "last.json").write_text(json.dumps(record))
    capsys.readouterr()
    assert main(_TRAIN + ["--out", str(out), "--resume", "--vflip", "0.2"]) == 2  # the digits' default hflip, 0
    err = capsys.readouterr().err
    assert "last.json: data.augment: the run was written before its augmentation was recorded" in err
    assert "'hflip': 0.0" in err
    assert main(_TRAIN + ["--out", str(out), "--resume", "--hflip", "0.5", "--vflip", "0.2"]) == 0
    assert main(_TRAIN + ["--out", str(out), "--resume", "--no-augment"]) == 0  # --no-augment was not recorded either
