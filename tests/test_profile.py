"""cspnet.profile's counting rules."""
from pathlib import Path

import pytest
import torch

import cspnet
from cspnet.darknet import build_model

CFG_ROOT = Path(__file__).resolve().parents[2] / "shared" / "darknet-cfg" / "cfg"


@pytest.mark.parametrize("name", ["darknet53", "cspresnext50"])
def test_native_model_and_its_cfg_have_the_same_cio(name):
    # The native classifier is an nn.Linear, the cfg's a 1x1 conv on the pooled 1x1 map: the same traffic.
    native = cspnet.profile(cspnet.create_model(name), 64)
    built = build_model(CFG_ROOT / cspnet.get_spec(name).darknet_cfg, 64)
    from_cfg = cspnet.profile(built, 64, built.in_chans)
    assert native.macs == from_cfg.macs
    assert native.cio == from_cfg.cio


def test_linear_cio_is_its_input_plus_its_output():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 1), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                              torch.nn.Linear(8, 5))
    p = cspnet.profile(net, 4, in_chans=3)
    assert p.cio == (3 * 16 + 8 * 16) + (8 + 5)

