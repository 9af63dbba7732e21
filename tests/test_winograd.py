"""Winograd 3×3 convolution (cspnet.winograd) and deploy(winograd=True).

The transforms are compiled by inductor on first use, so these tests pick small channel
counts and keep to a few input shapes; the rows rule (`MIN_ROWS`) decides the batch size.
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cspnet
from cspnet import winograd
from cspnet.export import ConvAct, OneDnnConvAct, deploy, onednn_available, use_winograd
from cspnet.winograd import F2x2, F4x4, WinogradConvAct, choose_algorithm, transform_weight

pytestmark = pytest.mark.skipif(not onednn_available(), reason="Winograd runs on the oneDNN deploy path")

# Batches whose maps give MIN_ROWS tiles: 28×28 in 4×4 blocks has 49 per image, 14×14 in 2×2 has 49.
BATCH = -(-winograd.MIN_ROWS // 49)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out - ref).abs().max() / ref.abs().max())


@torch.no_grad()
def float64_conv(x, conv: nn.Conv2d, act) -> torch.Tensor:
    return act(F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), padding=1)).float()


def winograd_layer(in_chs: int, out_chs: int, act: nn.Module, post_op) -> tuple[WinogradConvAct, nn.Conv2d]:
    torch.manual_seed(0)
    conv = nn.Conv2d(in_chs, out_chs, 3, padding=1)
    return WinogradConvAct(OneDnnConvAct(ConvAct(conv, act), post_op)), conv


@pytest.mark.parametrize("algorithm", [F2x2, F4x4], ids=lambda a: a.name)
def test_transforms_reproduce_a_convolution_of_one_tile(algorithm):
    # The three matrices alone, on one tile, in float64: Aᵀ[(G g Gᵀ) ⊙ (Bᵀ d B)]A is the m×m
    # valid convolution of the (m+2)×(m+2) tile d with the 3×3 filter g.
    torch.manual_seed(0)
    b_t, g_mat, a_t = (torch.tensor(t, dtype=torch.float64) for t in (
        algorithm.input_transform, algorithm.filter_transform, algorithm.output_transform))
    d = torch.randn(algorithm.tile, algorithm.tile, dtype=torch.float64)
    g = torch.randn(3, 3, dtype=torch.float64)
    y = a_t @ ((g_mat @ g @ g_mat.T) * (b_t @ d @ b_t.T)) @ a_t.T
    ref = F.conv2d(d[None, None], g[None, None])[0, 0]
    assert y.shape == (algorithm.step, algorithm.step)
    assert torch.allclose(y, ref, atol=1e-12)


def test_transform_weight_layout():
    w = torch.randn(5, 3, 3, 3)
    u = transform_weight(w, F2x2)
    assert u.shape == (16, 5, 3)
    # Point (0, 0) of F(2×2): G's first row is (1, 0, 0), so U₀₀ = g[0, 0].
    assert torch.equal(u[0], w[:, :, 0, 0])


def test_choose_algorithm_follows_the_measured_rules():
    assert choose_algorithm(BATCH, 28, 28) is F4x4  # sides divide by 4
    assert choose_algorithm(BATCH, 14, 14) is F2x2  # by 2 only
    assert choose_algorithm(BATCH, 7, 7) is None  # odd: padding would waste 31 %
    assert choose_algorithm(1, 28, 28) is None  # too few tiles per GEMM
    assert not winograd.wide_enough(64, 64) and winograd.wide_enough(64, 128) and winograd.wide_enough(128, 128)


@pytest.mark.parametrize("size, algorithm", [(28, F4x4), (14, F2x2)], ids=["F4x4", "F2x2"])
@pytest.mark.parametrize("act, post_op", [
    (nn.LeakyReLU(0.1), ("leaky_relu", [0.1])), (nn.ReLU(), ("relu", [])), (nn.Identity(), ("none", [])),
], ids=["leaky", "relu", "linear"])
def test_winograd_layer_matches_a_float64_convolution(size, algorithm, act, post_op):
    layer, conv = winograd_layer(16, 24, act, post_op)
    x = torch.randn(BATCH, 16, size, size).contiguous(memory_format=torch.channels_last)
    assert choose_algorithm(BATCH, size, size) is algorithm
    with torch.inference_mode():
        out = layer(x)
    assert algorithm.name in layer._packed  # the Winograd path ran, not the fallback
    assert out.shape == (BATCH, 24, size, size) and out.is_contiguous(memory_format=torch.channels_last)
    ref = float64_conv(x, conv, act)
    # F(2×2) is as exact as the direct float32 kernel; F(4×4)'s larger coefficients cost ~10×.
    assert rel_err(out, ref) <= (2e-6 if algorithm is F2x2 else 5e-5)


def test_winograd_layer_falls_back_where_it_would_lose_or_cannot_run():
    layer, conv = winograd_layer(16, 24, nn.LeakyReLU(0.1), ("leaky_relu", [0.1]))
    small = torch.randn(1, 16, 28, 28)  # one image: too few tiles
    with torch.inference_mode():
        out = layer(small)
    assert layer._packed == {}
    assert rel_err(out, float64_conv(small, conv, nn.LeakyReLU(0.1))) <= 2e-6
    x = torch.randn(BATCH, 16, 14, 14, requires_grad=True)
    out = layer(x)  # autograd: the conv's own path, which has a backward
    out.sum().backward()
    assert x.grad is not None and layer._packed == {}
    with pytest.raises(ValueError, match="3x3, stride-1"):
        WinogradConvAct(OneDnnConvAct(ConvAct(nn.Conv2d(4, 4, 3, stride=2, padding=1), nn.ReLU()), ("relu", [])))


def test_winograd_weights_follow_a_move_or_cast():
    layer, conv = winograd_layer(16, 24, nn.ReLU(), ("relu", []))
    x = torch.randn(BATCH, 16, 14, 14).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        layer(x)
        assert layer._packed
        with torch.no_grad():
            conv.weight.mul_(2)
        layer.float()  # a move or cast: _apply drops the packed copies
        assert layer._packed == {}
        assert rel_err(layer(x), float64_conv(x, conv, nn.ReLU())) <= 2e-6
        # An edit in place (load_state_dict copies in place) with no move or cast: packed again.
        with torch.no_grad():
            conv.weight.mul_(0.5)
        assert rel_err(layer(x), float64_conv(x, conv, nn.ReLU())) <= 2e-6


def test_deploy_with_winograd_matches_eager():
    torch.manual_seed(0)
    model = cspnet.create_model("cspdarknet53").eval()
    x = torch.randn(BATCH, 3, 112, 112)  # stage 3's 128→128 convs run on 14×14 maps: F(2×2)
    with torch.no_grad():
        ref = model(x)
    deployed = deploy(model, winograd=True)
    layers = [m for m in deployed.modules() if isinstance(m, WinogradConvAct)]
    # The 3×3 convs of the blocks in stages 3-5 (128, 256, 512 wide); stage 2's 64→64 are too thin.
    assert [m.layer.layer.conv.in_channels for m in layers] == [128] * 8 + [256] * 8 + [512] * 4
    out = deployed(x)
    assert any(m._packed for m in layers)
    assert rel_err(out, ref) <= 1e-4
    with pytest.raises(ValueError, match="oneDNN"):
        deploy(model, winograd=True, onednn=False)


def test_use_winograd_skips_thin_strided_and_grouped_convs():
    convs = nn.Sequential(
        ConvAct(nn.Conv2d(64, 64, 3, padding=1), nn.ReLU()),  # too thin
        ConvAct(nn.Conv2d(128, 128, 3, stride=2, padding=1), nn.ReLU()),  # strided
        ConvAct(nn.Conv2d(128, 128, 3, padding=1, groups=32), nn.ReLU()),  # grouped
        ConvAct(nn.Conv2d(128, 128, 1), nn.ReLU()),  # 1×1
        ConvAct(nn.Conv2d(128, 128, 3, padding=1), nn.ReLU()),  # the one
    )
    net = nn.Sequential(*[OneDnnConvAct(c, ("relu", [])) for c in convs])
    assert use_winograd(net) == 1
    assert [type(m).__name__ for m in net] == ["OneDnnConvAct"] * 4 + ["WinogradConvAct"]
