"""Layer-level behaviour: in-place residual adds and the conv-output BatchNorm."""
import pytest
import torch
from torch import nn

from cspnet.blocks import DarkBlock
from cspnet.export import fuse
from cspnet.layers import ConvBnAct, ConvOutputBatchNorm2d, Shortcut, darknet_add, memory_efficient


@pytest.mark.parametrize("shortcut_shape", [(2, 8, 6, 6), (2, 12, 6, 6), (2, 8, 12, 12)])
def test_inplace_shortcut_adds_into_x_unless_backward_needs_it(shortcut_shape):
    x, s = torch.randn(2, 8, 6, 6), torch.randn(*shortcut_shape)
    expected = darknet_add(x.clone(), s)
    for add in (Shortcut(inplace=True), Shortcut(inplace=True, x_saved_for_backward=True)):
        with torch.no_grad():
            x_copy = x.clone()
            out = add(x_copy, s)
        assert out.data_ptr() == x_copy.data_ptr() and torch.equal(out, expected)  # full-width add: x itself

    # While autograd records, x saved by its own layer's backward (a leaky ReLU output) is left alone ...
    xg = torch.randn(2, 8, 6, 6, requires_grad=True)
    y = nn.functional.leaky_relu(xg, 0.1)
    before = y.detach().clone()
    out = Shortcut(inplace=True, x_saved_for_backward=True)(y, s)
    assert out.data_ptr() != y.data_ptr() and torch.equal(y.detach(), before)
    out.square().sum().backward()
    reference = xg.grad.clone()
    # ... and a temporary (a BN output, which no backward keeps) is added into, with the same gradients.
    xg.grad = None
    bn = nn.BatchNorm2d(8)
    for inplace in (False, True):
        xg.grad = None
        y = bn(nn.functional.leaky_relu(xg, 0.1))
        out = Shortcut(inplace=inplace)(y, s)
        assert (out.data_ptr() == y.data_ptr()) == inplace
        out.square().sum().backward()
        if not inplace:
            reference = xg.grad.clone()
    assert torch.allclose(xg.grad, reference)

    # A partial residual (fewer shortcut channels) still concatenates, leaving x untouched.
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        out = Shortcut(inplace=True)(x, torch.ones(2, 4, 6, 6))
    assert torch.equal(out[:, 4:], x[:, 4:]) and torch.equal(out[:, :4], x[:, :4] + 1)


def test_blocks_give_the_same_output_with_and_without_autograd():
    torch.manual_seed(0)
    block = calibrated(DarkBlock(8, 4, 8))
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        fast = block(x)
    assert torch.allclose(fast, block(x).detach(), rtol=1e-5, atol=1e-6)


def calibrated(module: nn.Module) -> nn.Module:
    """``module`` in eval mode with BatchNorm statistics and affine parameters far from the defaults."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 2.0)
                m.bias.uniform_(-1.0, 1.0)
        module.train()(torch.randn(16, module_in_chs(module), 6, 6) * 3 + 1)
    return module.eval()


def module_in_chs(module: nn.Module) -> int:
    return next(m for m in module.modules() if isinstance(m, nn.Conv2d)).in_channels


@pytest.mark.parametrize("where", ["conv", "bn", "bn_pre", "memory_efficient"])
def test_hooks_see_the_real_conv_output_though_the_bn_works_in_place(where):
    layer = calibrated(ConvBnAct(3, 8, 3, act="leaky")).eval()
    side = int((ConvOutputBatchNorm2d.IN_PLACE_MIN_NUMEL / 8) ** 0.5) + 1  # the BN would work in place
    x = torch.randn(1, 3, side, side)
    kept = []
    if where == "conv":
        layer.conv.register_forward_hook(lambda module, inputs, output: kept.append(output))
    elif where == "bn":  # e.g. BN-statistics calibration reading the BN's input
        layer.bn.register_forward_hook(lambda module, inputs, output: kept.append(inputs[0]))
    elif where == "bn_pre":
        layer.bn.register_forward_pre_hook(lambda module, inputs: kept.append(inputs[0]))
    else:  # a memory-efficient model being validated
        memory_efficient(layer)
        layer.conv.register_forward_hook(lambda module, inputs, output: kept.append(output))
    with torch.no_grad():
        out = layer(x)
        assert torch.equal(kept[0], layer.conv(x))
        reference = calibrated(ConvBnAct(3, 8, 3, act="leaky")).eval()
        reference.load_state_dict(layer.state_dict())
        assert torch.allclose(out, reference(x), rtol=1e-5, atol=1e-5)


def test_conv_output_batchnorm_is_batchnorm_and_conv_bn_act_normalizes_in_place_only_in_eval_without_autograd():
    torch.manual_seed(0)
    layer = calibrated(ConvBnAct(3, 8, 3, act="leaky"))
    assert isinstance(layer.bn, ConvOutputBatchNorm2d) and isinstance(layer.bn, nn.BatchNorm2d)
    reference = nn.BatchNorm2d(8).eval()
    reference.load_state_dict(layer.bn.state_dict())  # same parameters and buffers, same keys
    side = int((ConvOutputBatchNorm2d.IN_PLACE_MIN_NUMEL / 8) ** 0.5) + 1  # one 8-channel map just above it
    y = torch.randn(1, 8, side, side) * 4 + 2
    expected = reference(y)
    with torch.no_grad():
        y_copy = y.clone()
        assert torch.equal(layer.bn(y_copy), expected) and torch.equal(y_copy, y)  # as a module: never in place
        assert layer.bn.can_normalize_in_place(y)
        out = layer.bn.normalize_in_place(y_copy)
        assert out.data_ptr() == y_copy.data_ptr() and torch.allclose(out, expected, rtol=1e-5, atol=1e-5)
        assert not layer.bn.can_normalize_in_place(y[:, :, :5, :5])  # below the threshold
    assert not layer.bn.can_normalize_in_place(y)  # recording autograd
    with torch.no_grad():
        assert not layer.bn.train().can_normalize_in_place(y)
    # ConvBnAct takes the in-place form exactly when the BN may
    calls = []
    real = layer.bn.normalize_in_place
    layer.bn.normalize_in_place = lambda t: calls.append(t.shape) or real(t)
    x = torch.randn(1, 3, side, side)
    with torch.no_grad():
        layer.eval()(x)
        layer.eval()(x[:, :, :9, :9])
        layer.train()(x[:, :, :9, :9])
    layer.eval()(x[:, :, :9, :9])
    assert calls == [(1, 8, side, side)]


def test_conv_bn_act_layers_fold_and_match_with_the_inplace_batchnorm():
    torch.manual_seed(0)
    layer = calibrated(ConvBnAct(3, 8, 3, act="leaky"))
    x = torch.randn(2, 3, 9, 9)
    with torch.no_grad():
        fast = layer(x)
    slow = layer(x).detach()
    assert torch.allclose(fast, slow, rtol=1e-5, atol=1e-5)
    fused = fuse(nn.Sequential(layer))  # fuse replaces the ConvBnAct children of a model
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    with torch.no_grad():
        assert torch.allclose(fused(x), slow, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("swap", ["sync", "identity"])
def test_conv_bn_act_runs_with_its_batchnorm_swapped_for_another_kind(swap):
    # SyncBatchNorm for DDP, or a BN removed by hand: neither has the in-place form
    layer = calibrated(ConvBnAct(3, 8, 3, act="leaky")).eval()
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        expected = layer.act(layer.bn(layer.conv(x))) if swap == "sync" else layer.act(layer.conv(x))
        if swap == "sync":
            layer = nn.SyncBatchNorm.convert_sync_batchnorm(nn.Sequential(layer))[0].eval()
        else:
            layer.bn = nn.Identity()
        assert torch.allclose(layer(x), expected, atol=1e-6)
