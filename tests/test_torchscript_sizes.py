"""A TorchScript export is traced at one input size; detectors run at others, as their eager forms do."""
from __future__ import annotations

import pytest
import torch

from cspnet.detection import create_detector
from cspnet.export import export_torchscript, load_torchscript


@pytest.mark.parametrize("neck", ["gfm"])
def test_a_torchscript_detector_runs_at_input_sizes_other_than_the_traced_one(neck, tmp_path):
    model = create_detector("cspresnet10", neck, num_classes=3, backbone_width=0.25, neck_width=32).eval()
    traced = load_torchscript(export_torchscript(model, tmp_path / "d.pt", 64))
    for size in (96, 100):  # each level's map differs from the traced one; 100 also rounds odd sides
        x = torch.randn(1, 3, size, size)
        with torch.no_grad():
            ref = model(x)
            out = traced(x)
        assert out.shape == ref.shape
        assert float((out - ref).abs().max() / ref.abs().max()) <= 1e-4
