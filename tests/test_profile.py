"""cspnet.profile's counting rules: CIO of linear layers, FLOPs of every layer, and its input checks."""
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


def test_flops_all_counts_the_pools_written_as_tensor_ops():
    from cspnet.layers import SPP, Maxout, SqueezeExcite

    spp = cspnet.profile(torch.nn.Sequential(SPP((5, 9, 13))), 8, in_chans=2)
    assert spp.flops_all == 2 * 64 * (5 * 5 + 9 * 9 + 13 * 13)  # one per window element, three stride-1 pools
    maxout = cspnet.profile(torch.nn.Sequential(Maxout(3)), 4, in_chans=8)  # groups of 3, 3 and 2 (+ -inf)
    assert maxout.flops_all == 3 * 16 * 3
    se = SqueezeExcite(16)
    p = cspnet.profile(torch.nn.Sequential(se), 4, in_chans=16)
    convs = 2 * (16 * 8 + 8 * 16)  # fc1 and fc2 on the 1x1 squeezed map
    assert p.flops_all == convs + 8 + (16 * 16 + 16 + 16 * 16)  # act; mean, sigmoid, scaling


def test_native_model_and_its_cfg_have_the_same_flops_all():
    # The native ClassifierHead pools with F.adaptive_avg_pool2d, the cfg with an [avgpool] module.
    native = cspnet.profile(cspnet.create_model("darknet53"), 64)
    built = build_model(CFG_ROOT / "darknet53.cfg", 64)
    assert native.flops_all == cspnet.profile(built, 64, built.in_chans).flops_all


def test_profile_names_the_model_and_the_input_it_cannot_run_on():
    small = cspnet.create_model("cspdensenet_ref")  # its unpadded pools need 61x61
    with pytest.raises(ValueError, match=r"cspdensenet_ref cannot run on a 31x31 input with 3 channel\(s\): .*at least 61"):
        cspnet.profile(small, 31)
    # a wrong channel count is no size problem: no hint of downsampling (torch's message speaks of 'size')
    conv = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3))
    with pytest.raises(ValueError, match=r"Sequential cannot run on a 16x16 input with 4 channel\(s\)") as info:
        cspnet.profile(conv, 16, in_chans=4)
    assert "too small" not in str(info.value) and "downsampling" not in str(info.value)


@pytest.mark.parametrize("in_chans", [0, -1, 2.5, "3", True])
def test_profile_refuses_in_chans_that_is_no_positive_integer(in_chans):
    with pytest.raises(ValueError, match=f"in_chans must be a positive integer, got {in_chans!r}"):
        cspnet.profile(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3)), 16, in_chans=in_chans)


def test_profile_takes_any_integer_type_for_sizes_but_not_a_bool():
    np = pytest.importorskip("numpy")
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1))
    want = cspnet.profile(net, (16, 12), in_chans=3)
    got = cspnet.profile(net, (np.int64(16), np.int32(12)), in_chans=np.int64(3))
    assert (got.input_size, got.macs, got.cio) == ((16, 12), want.macs, want.cio)
    assert type(got.input_size[0]) is int
    assert cspnet.profile(net, np.int64(16), in_chans=3).input_size == (16, 16)
    for bad in (True, (16, True), 16.0, "16"):
        with pytest.raises(ValueError, match="input size must be one or two positive integers"):
            cspnet.profile(net, bad, in_chans=3)


def test_flops_all_counts_batchnorm_as_two_per_element():
    # Docstring rule: BatchNorm is a scale and a shift, 2 FLOPs per element: 2 · (4 channels · 3 · 3) = 72.
    assert cspnet.profile(torch.nn.Sequential(torch.nn.BatchNorm2d(4)), 3, in_chans=4).flops_all == 2 * 4 * 3 * 3 == 72


def test_flops_all_counts_a_pooling_window_of_k_by_k_for_an_int_kernel():
    # Docstring rule: one FLOP per window element and output element; an int kernel k is a k x k window.
    # Max pool 3x3 / 1, pad 1, on 2 x 4 x 4: 2 · 16 outputs · 9 = 288.
    assert cspnet.profile(torch.nn.Sequential(torch.nn.MaxPool2d(3, 1, 1)), 4, in_chans=2).flops_all == 2 * 16 * 9 == 288
    # Average pool 2x2 / 2 on 1 x 4 x 4: 4 outputs · 4 = 16 (the same rule for an average pool).
    assert cspnet.profile(torch.nn.Sequential(torch.nn.AvgPool2d(2, 2)), 4, in_chans=1).flops_all == 4 * 4 == 16
