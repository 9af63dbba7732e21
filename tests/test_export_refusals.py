"""Exports that would write a file no loader reads, or overwrite the wrong thing, are refused before anything
is written, with a message saying why."""
from __future__ import annotations

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
