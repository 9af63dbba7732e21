"""`output_stride`: the last stages dilate instead of downsampling, for dense prediction."""
import pytest
import torch
from torch import nn

import cspnet
from cspnet.net import OutputStrideError
from cspnet.registry import get_spec

SIZE = 64  # a multiple of 32: every level's map is exactly SIZE // reduction

# The families whose stages downsample with a strided conv; every other registered model refuses.
DILATABLE_FAMILIES = {"resnet", "darknet", "timm", "torchvision", "mobilenet"}
POOLING = {"darknet_ref"}  # darknet.cfg: max-pool stages
SUPPORTED = [n for n in cspnet.list_models() if get_spec(n).family in DILATABLE_FAMILIES and n not in POOLING]
UNSUPPORTED = [n for n in cspnet.list_models() if n not in SUPPORTED]


def test_the_families_timm_dilates_are_supported():
    # timm's cspresnet50 / cspresnext50 / cspdarknet53 / darknet53, their cfg forms and plain twins, MobileNet-v2
    for name in ("cspresnet50", "cspresnext50", "cspdarknet53", "resnet50", "resnext50", "darknet53", "resnet50_tv",
                 "cspresnet50_timm", "cspdarknet53_timm", "mobilenet_v2", "cspmobilenet_v2"):
        assert name in SUPPORTED
    assert {"densenet121", "peleenet", "darknet_ref", "cspresnet50_elastic", "cspdensenet_ref"} <= set(UNSUPPORTED)


def _meta_levels(name: str, **kwargs):
    """feature_info and the maps' shapes, computed on the meta device (no weights, no arithmetic)."""
    with torch.device("meta"):
        model = cspnet.create_model(name, features_only=True, **kwargs).eval()
        with torch.no_grad():
            maps = model(torch.empty(1, 3, SIZE, SIZE))
    return model, [tuple(m.shape) for m in maps]


@pytest.mark.parametrize("output_stride", [32, 16, 8])
@pytest.mark.parametrize("name", SUPPORTED)
def test_feature_info_reports_the_strides_of_the_maps(name, output_stride):
    plain, _ = _meta_levels(name)
    model, shapes = _meta_levels(name, output_stride=output_stride)
    # once a level reaches output_stride, every deeper level stays there
    want = [min(r, output_stride) for r in plain.feature_info.reduction()]
    assert model.feature_info.reduction() == want
    assert model.feature_info.channels() == plain.feature_info.channels()
    assert shapes == [(1, c, SIZE // r, SIZE // r) for c, r in zip(model.feature_info.channels(), want)]

    with torch.device("meta"):
        last = cspnet.create_model(name, features_only=True, out_indices=(-1,), output_stride=output_stride)
        classifier = cspnet.create_model(name, output_stride=output_stride)
        x = torch.empty(1, 3, SIZE, SIZE)
        with torch.no_grad():
            assert [tuple(m.shape) for m in last(x)] == shapes[-1:]
            assert tuple(classifier.forward_features(x).shape) == shapes[-1]
            assert tuple(classifier(x).shape) == (1, 1000)


@pytest.mark.parametrize("name", SUPPORTED)
def test_dilated_levels_sampled_at_the_old_stride_are_the_strided_levels(name):
    """A dilated stage keeps its receptive field: sampled every k pixels (k = the stride it gave up), its map is the
    strided stage's map, exactly (up to float rounding) - which holds only if the downsampling conv keeps the previous
    dilation and the convs after it take the new one. os=8 dilates two stages (x2 with first dilation 1, x4 with 2)."""
    strided = cspnet.create_model(name, features_only=True).eval()
    dilated = cspnet.create_model(name, features_only=True, output_stride=8).eval()
    dilated.load_state_dict(strided.state_dict())
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        want, got = strided(x), dilated(x)
    steps = [a // b for a, b in zip(strided.feature_info.reduction(), dilated.feature_info.reduction())]
    assert steps[-2:] == [2, 4]
    for step, w, g in zip(steps, want, got):
        assert g.shape[-1] == w.shape[-1] * step
        assert w.abs().max() > 0
        assert (g[..., ::step, ::step] - w).abs().max() <= 1e-4 * w.abs().max()


@pytest.mark.parametrize("name", SUPPORTED)
def test_output_stride_32_builds_the_network_as_designed(name):
    torch.manual_seed(0)
    designed = cspnet.create_model(name).eval()
    torch.manual_seed(0)
    os32 = cspnet.create_model(name, output_stride=32).eval()
    assert str(os32) == str(designed)  # every conv's stride, padding and dilation
    assert all(m.dilation == (1, 1) for m in designed.modules() if isinstance(m, nn.Conv2d))
    a, b = designed.state_dict(), os32.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        assert torch.equal(designed(x), os32(x))


@pytest.mark.parametrize("name", UNSUPPORTED)
def test_models_that_downsample_by_pooling_refuse_with_their_name(name):
    with torch.device("meta"), pytest.raises(OutputStrideError, match=rf"model '{name}'.*(pool|ELASTIC)"):
        cspnet.create_model(name, output_stride=16)


def test_output_stride_32_on_a_stride_64_model_is_refused():
    with torch.device("meta"), pytest.raises(OutputStrideError, match="reaches stride 64"):
        cspnet.create_model("darknet_ref", output_stride=32)


@pytest.mark.parametrize("value", [4, 12, 64, 16.0, "16", True])
def test_output_stride_values_other_than_8_16_32_are_refused(value):
    with torch.device("meta"), pytest.raises(ValueError, match=r"model 'resnet10': output_stride must be one of \(8, 16, 32\)"):
        cspnet.create_model("resnet10", output_stride=value)


def test_dilated_backbone_exports_and_runs_channels_last():
    model = cspnet.create_model("cspresnet10", features_only=True, out_indices=(2, 3, 4), output_stride=8).eval()
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        want = model(x)
        exported = torch.export.export(model, (x,)).module()
        for w, g in zip(want, exported(x)):
            torch.testing.assert_close(g, w)
        model_cl = model.to(memory_format=torch.channels_last)
        for w, g in zip(want, model_cl(x.contiguous(memory_format=torch.channels_last))):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)
    assert [m.shape[-1] for m in want] == [SIZE // 8] * 3


# -- independent references: timm's and torchvision's own dilated networks ------------------------------------------

TIMM_CASES = ["cspresnet50", "cspresnext50", "cspdarknet53", "darknet53"]


@pytest.mark.parametrize("output_stride", [16, 8])
@pytest.mark.parametrize("name", TIMM_CASES)
def test_timm_weights_give_timms_dilated_feature_maps(name, output_stride):
    timm = pytest.importorskip("timm")
    from test_interop import calibrate

    from cspnet.interop import convert_state, get_conversion
    from cspnet.weights import load_into

    source = calibrate(timm.create_model(name, pretrained=False, output_stride=output_stride))
    ours = cspnet.create_model(get_conversion("timm", name).model, features_only=True, output_stride=output_stride).eval()
    state = convert_state("timm", name, source.state_dict())
    load_into(ours, {k: v for k, v in state.items() if not k.startswith("head.")})
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        want = source.forward_intermediates(x, intermediates_only=True)[-len(source.stages):]  # the stage outputs
        got = ours(x)[-len(ours.stages):]
    assert [w.shape[-1] for w in want][-1] == SIZE // output_stride
    for w, g in zip(want, got):
        assert g.shape == w.shape
        assert w.std() > 0.05, "maps too small for the comparison to mean anything"
        # float rounding: 1e-4 of the map's scale (deep stage maps reach |x| ~ 5-10)
        assert (g - w).abs().max().item() <= 1e-4 * max(1.0, w.abs().max().item())


@pytest.mark.parametrize("output_stride, replace", [(16, [False, False, True]), (8, [False, True, True])])
def test_torchvision_resnet50_with_replace_stride_with_dilation(output_stride, replace):
    torchvision = pytest.importorskip("torchvision")
    from test_interop import calibrate

    from cspnet.interop import convert_state
    from cspnet.weights import load_into

    source = calibrate(torchvision.models.resnet50(weights=None, replace_stride_with_dilation=replace))
    ours = cspnet.create_model("resnet50_tv", output_stride=output_stride).eval()
    load_into(ours, convert_state("torchvision", "resnet50", source.state_dict()))
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        want, got = source(x), ours(x)
        assert ours.forward_features(x).shape[-1] == SIZE // output_stride
    assert want.std() > 0.05
    assert (got - want).abs().max().item() <= 1e-4
