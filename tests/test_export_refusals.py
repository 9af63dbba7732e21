"""Exports that would write a file no loader reads, or overwrite the wrong thing, are refused before anything
is written, with a message saying why."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import cspnet
from cspnet.darknet import DarknetNet, parse_cfg_text
from cspnet.export import export_safetensors, fuse

TINY_CFG = ("[net]\nwidth=8\nheight=8\nchannels=3\n"
            "[convolutional]\nfilters=4\nsize=3\npad=1\nbatch_normalize=1\nactivation=leaky\n")


@pytest.mark.parametrize("fused", [
    lambda: fuse(cspnet.create_model("cspresnet10")),  # ConvBnAct -> ConvAct
    lambda: fuse(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))),  # a plain (conv, BN) pair
    lambda: fuse(DarknetNet(parse_cfg_text(TINY_CFG, "tiny.cfg"))),  # a Darknet [convolutional] layer
], ids=["registered", "sequential", "darknet"])
def test_export_safetensors_refuses_a_model_fused_in_place(fused, tmp_path):
    path = tmp_path / "m.safetensors"
    with pytest.raises(ValueError, match=r"a fused model \(cspnet.fuse\).*save the model before fusing it"):
        export_safetensors(fused(), path)
    assert not path.exists()
    export_safetensors(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), path)  # unfused: written
    assert path.exists()


def test_export_cli_refuses_a_suffix_that_contradicts_format_and_a_folder_before_building(tmp_path, monkeypatch, capsys):
    from cspnet.cli import export as export_cli
    from cspnet.cli import main as cli_main

    monkeypatch.setattr(export_cli, "_build", lambda args: pytest.fail("the model was built"))
    for fmt, out, named in (("torchscript", "b.onnx", "onnx"), ("safetensors", "c.onnx", "onnx"), ("onnx", "d.pt", "torchscript")):
        assert cli_main(["export", "cspresnet10", "--format", fmt, "--out", str(tmp_path / out)]) == 2
        assert f"--out {out} names a {named} file, but --format is {fmt}" in capsys.readouterr().err
        assert not (tmp_path / out).exists()
    folder = tmp_path / "m.onnx"
    folder.mkdir()
    assert cli_main(["export", "cspresnet10", "--out", str(folder)]) == 2
    assert "is a folder; give the path of the file to write" in capsys.readouterr().err


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc, where no file can be created")
def test_export_onnx_stops_at_a_path_it_cannot_write(monkeypatch):
    from cspnet import export

    monkeypatch.setattr(export, "_export_onnx_dynamo", lambda *a: pytest.fail("exported again with the dynamo exporter"))
    with pytest.raises(OSError, match="/proc/m.onnx"):
        export.export_onnx(cspnet.create_model("cspresnet10", num_classes=2), "/proc/m.onnx", 32)


def test_a_compiled_deployed_model_holds_each_tensor_once_and_saves(tmp_path):
    from cspnet.export import deploy
    from cspnet.weights import load_state, save_weights

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
    deployed = deploy(model, compile="eager")  # the eager backend: torch.compile's plumbing without codegen
    assert deployed.compiled is not None
    assert all(k.startswith("model.") for k in deployed.state_dict())
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        assert torch.allclose(deployed(x), model(x), atol=1e-5)
    saved = load_state(save_weights(tmp_path / "d.safetensors", deployed))
    assert saved.keys() == deploy(model).state_dict().keys()
