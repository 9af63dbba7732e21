"""Detection CLI paths a new user takes first: a short run's burn-in, predicting a folder, COCO ids and
per-class AP in the outputs, YOLO labels written at a few decimals."""
import json

import pytest

from cspnet.cli import main


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
