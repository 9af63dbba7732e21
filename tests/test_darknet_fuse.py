"""fuse / deploy / exports of networks built from Darknet cfgs: every [convolutional] layer's BatchNorm is folded
into its conv (shared convs once), and the folded network computes what the cfg's network computes."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from cspnet.darknet import DarknetNet, build_model, parse_cfg_text
from cspnet.export import ConvAct, OneDnnConvAct, deploy, export_torchscript, fuse, load_torchscript, onednn_available

CFG = Path(__file__).resolve().parents[2] / "shared" / "darknet-cfg" / "cfg" / "csresnext50.cfg"
SHARED = ("[net]\nwidth=16\nheight=16\nchannels=3\n"
          "[convolutional]\nfilters=8\nsize=3\npad=1\nbatch_normalize=1\nactivation=leaky\n"
          "[convolutional]\nfilters=8\nsize=3\npad=1\nbatch_normalize=1\nactivation=mish\n"
          "[convolutional]\nshare_index=-1\nfilters=8\nsize=3\npad=1\nbatch_normalize=1\nactivation=relu\n"
          "[convolutional]\nfilters=4\nsize=1\nactivation=linear\n")


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out - ref).abs().max() / ref.abs().max())


def with_random_statistics(model: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return model.eval()


def batchnorms(model: nn.Module) -> int:
    return sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def test_fuse_folds_every_batchnorm_of_an_official_cfg_and_deploy_and_torchscript_compute_the_same(tmp_path):
    if not CFG.is_file():
        pytest.skip(f"{CFG} is not here")
    model = with_random_statistics(build_model(CFG, 64))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
    assert batchnorms(model) > 0
    fused = fuse(copy.deepcopy(model))
    assert batchnorms(fused) == 0
    with torch.no_grad():
        assert rel_err(fused(x), ref) <= 1e-4
    deployed = deploy(model)
    assert batchnorms(deployed) == 0
    if onednn_available():
        assert sum(isinstance(m, OneDnnConvAct) for m in deployed.modules()) > 0
    assert rel_err(deployed(x), ref) <= 1e-4
    traced = load_torchscript(export_torchscript(model, tmp_path / "m.pt", 64))
    assert "batch_norm" not in str(traced.inlined_graph)
    with torch.no_grad():
        assert rel_err(traced(x), ref) <= 1e-4


def test_layers_sharing_a_conv_share_its_folded_conv_and_keep_their_own_activations():
    model = with_random_statistics(DarknetNet(parse_cfg_text(SHARED, "shared.cfg")))
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        ref = model(x)
    fused = fuse(model)
    second, third = fused.layers[1], fused.layers[2]
    assert isinstance(second.conv, ConvAct) and isinstance(third.conv, ConvAct)
    assert second.conv.conv is third.conv.conv  # one folded conv, as one set of weights
    assert isinstance(second.conv.act, nn.Mish) and isinstance(third.conv.act, nn.ReLU)
    assert batchnorms(fused) == 0 and isinstance(fused.layers[3].conv, nn.Conv2d)  # no BN: left as it is
    with torch.no_grad():
        assert rel_err(fused(x), ref) <= 1e-5
    assert rel_err(deploy(fused)(x), ref) <= 1e-5


def test_writing_weights_of_a_fused_network_is_refused_by_name(tmp_path):
    from cspnet.darknet import write_weights

    net = fuse(build_model(parse_cfg_text(SHARED)))
    with pytest.raises(ValueError, match=r"layer 0 \[convolutional\].*folded into the convolution \(cspnet.fuse\)"):
        write_weights(net, tmp_path / "fused.weights")
    assert not (tmp_path / "fused.weights").exists()
