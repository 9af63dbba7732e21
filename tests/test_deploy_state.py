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


def _assign_new_memory(deployed, weights):
    # vector_to_parameters sets p.data: the Parameter and its version stay, the memory is new
    vector_to_parameters(torch.cat([w.reshape(-1) for w in weights]), deployed.parameters())


def _copy_through_data_then_repack(deployed, weights):
    # p.data.copy_ bumps the version of the .data tensor, not the Parameter's: only repack() can tell the layers
    for p, w in zip(deployed.parameters(), weights):
        p.data.copy_(w)
    deployed.repack()


def _copy_under_no_grad(deployed, weights):
    with torch.no_grad():
        for p, w in zip(deployed.parameters(), weights):
            p.copy_(w)


@onednn_only
@pytest.mark.parametrize("edit", [_assign_new_memory, _copy_through_data_then_repack, _copy_under_no_grad],
                         ids=["new memory", "through .data, repack()", "in place under no_grad"])
def test_a_deployed_model_computes_with_its_new_weights(edit):
    first = with_random_statistics(cspnet.create_model("cspresnet10"))
    second = with_random_statistics(cspnet.create_model("cspresnet10"))
    x = torch.randn(2, 3, 32, 32)
    deployed = deploy(first)
    deployed(x)  # packs the first model's weights
    assert any(isinstance(m, OneDnnConvAct) and m._packed is not None for m in deployed.modules())
    edit(deployed, [p.detach() for p in deploy(second).parameters()])
    with torch.no_grad():
        ref = second(x)
    assert rel_err(deployed(x), ref) <= 1e-4


def _winograd_new_memory(conv, deployed):
    vector_to_parameters(torch.randn(sum(p.numel() for p in conv.parameters())), conv.parameters())


def _winograd_through_data_then_repack(conv, deployed):
    conv.weight.data.mul_(2.0)
    deployed.repack()


@onednn_only
@pytest.mark.parametrize("edit", [_winograd_new_memory, _winograd_through_data_then_repack],
                         ids=["new memory", "through .data, repack()"])
def test_a_winograd_layer_computes_with_its_new_weights(edit):
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 24, 3, padding=1)
    layer = WinogradConvAct(OneDnnConvAct(ConvAct(conv, nn.ReLU()), ("relu", [])))
    deployed = DeployedModel(layer, channels_last=True).eval()
    x = torch.randn(1, 16, 14, 14).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        layer.run(x, F2x2)  # packs the transformed weights
    edit(conv, deployed)
    with torch.inference_mode():
        out = layer.run(x, F2x2)
    ref = F.relu(F.conv2d(x, conv.weight.detach(), conv.bias.detach(), padding=1))
    assert rel_err(out, ref) <= 1e-5


