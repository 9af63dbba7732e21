"""What a deployed model holds besides the weights it computes with: packed copies of its weights, which must
follow the weights however they change, and the torch.compile wrapper, which must stay out of its state dict."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import vector_to_parameters

import cspnet
from cspnet.export import ConvAct, DeployedModel, OneDnnConvAct, deploy, onednn_available
from cspnet.winograd import F2x2, WinogradConvAct

onednn_only = pytest.mark.skipif(not onednn_available(), reason="packed weights belong to the oneDNN deploy path")


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out - ref).abs().max() / ref.abs().max())


def with_random_statistics(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model.eval()


@onednn_only
def test_a_deployed_model_repacks_weights_given_new_memory():
    # vector_to_parameters sets p.data: the Parameter and its version stay, the memory is new.
    first = with_random_statistics(cspnet.create_model("cspresnet10"))
    second = with_random_statistics(cspnet.create_model("cspresnet10"))
    x = torch.randn(2, 3, 32, 32)
    deployed = deploy(first)
    deployed(x)  # packs the first model's weights
    assert any(isinstance(m, OneDnnConvAct) and m._packed is not None for m in deployed.modules())
    weights = torch.cat([p.reshape(-1) for p in deploy(second).parameters()])  # channels-last: no view(-1)
    vector_to_parameters(weights, deployed.parameters())
    with torch.no_grad():
        ref = second(x)
    assert rel_err(deployed(x), ref) <= 1e-4


@onednn_only
def test_a_winograd_layer_repacks_weights_given_new_memory():
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 24, 3, padding=1)
    layer = WinogradConvAct(OneDnnConvAct(ConvAct(conv, nn.ReLU()), ("relu", [])))
    x = torch.randn(1, 16, 14, 14).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        layer.run(x, F2x2)  # packs the transformed weights
    new = torch.randn(sum(p.numel() for p in layer.parameters()))
    vector_to_parameters(new, layer.parameters())
    with torch.inference_mode():
        out = layer.run(x, F2x2)
    ref = F.relu(F.conv2d(x, conv.weight.detach(), conv.bias.detach(), padding=1))
    assert rel_err(out, ref) <= 1e-5


@onednn_only
def test_repack_makes_a_deployed_model_follow_an_edit_through_data():
    # p.data.copy_ bumps the version of the .data tensor, not the Parameter's: only repack() can tell the layers.
    first = with_random_statistics(cspnet.create_model("cspresnet10"))
    second = with_random_statistics(cspnet.create_model("cspresnet10"))
    x = torch.randn(2, 3, 32, 32)
    deployed = deploy(first)
    deployed(x)  # packs the first model's weights
    for p, q in zip(deployed.parameters(), deploy(second).parameters()):
        p.data.copy_(q)
    deployed.repack()
    with torch.no_grad():
        ref = second(x)
    assert rel_err(deployed(x), ref) <= 1e-4


@onednn_only
def test_a_deployed_model_follows_an_in_place_edit_under_no_grad():
    first = with_random_statistics(cspnet.create_model("cspresnet10"))
    second = with_random_statistics(cspnet.create_model("cspresnet10"))
    x = torch.randn(2, 3, 32, 32)
    deployed = deploy(first)
    deployed(x)
    with torch.no_grad():
        for p, q in zip(deployed.parameters(), deploy(second).parameters()):
            p.copy_(q)
        ref = second(x)
    assert rel_err(deployed(x), ref) <= 1e-4


@onednn_only
def test_repack_drops_a_winograd_layers_transformed_weights():
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 24, 3, padding=1)
    layer = WinogradConvAct(OneDnnConvAct(ConvAct(conv, nn.ReLU()), ("relu", [])))
    deployed = DeployedModel(layer, channels_last=True).eval()
    x = torch.randn(1, 16, 14, 14).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        layer.run(x, F2x2)  # packs the transformed weights
    conv.weight.data.mul_(2.0)
    deployed.repack()
    with torch.inference_mode():
        out = layer.run(x, F2x2)
    ref = F.relu(F.conv2d(x, conv.weight.detach(), conv.bias.detach(), padding=1))
    assert rel_err(out, ref) <= 1e-5
