"""Converters from timm / torchvision: our model computes exactly what the source model computes.

The source models are built with random weights by the source libraries themselves (nothing is
downloaded); their BatchNorm layers get random affine parameters and running statistics
measured on random images, so that every layer matters and activations keep a sane scale.
"""
import re
import subprocess
import sys

import pytest
import torch
from torch import nn

import cspnet
from cspnet.cli import main as cli_main
from cspnet.interop import convert_file, convert_state, get_conversion, rename_keys
from cspnet.weights import WeightsError, load_into, read_metadata

timm = pytest.importorskip("timm")  # the optional extra cspnet[interop]; part of the test extra
torchvision = pytest.importorskip("torchvision")

SIZE = 64


def calibrate(model: nn.Module, seed: int = 1, in_chans: int = 3) -> nn.Module:
    """Random BN affine parameters, running stats measured on random batches; returns it in eval."""
    g = torch.Generator().manual_seed(seed)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for bn in bns:
            bn.weight.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
            bn.bias.copy_(torch.randn(bn.num_features, generator=g) * 0.1)
            bn.reset_running_stats()
            bn.momentum = None  # cumulative average over the calibration batches
        model.train()
        for _ in range(2):
            model(torch.randn(2, in_chans, SIZE, SIZE, generator=g))
        for bn in bns:
            bn.momentum = 0.1
    return model.eval()


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def assert_same_function(source: nn.Module, ours: nn.Module) -> None:
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        want, got = source(x), ours(x)
    assert got.shape == want.shape
    assert want.std() > 0.05, "outputs too small for the comparison to mean anything"
    assert (got - want).abs().max().item() <= 1e-4


def assert_close_maps(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape
    # float rounding: 1e-4 of the map's scale (deep stage maps reach |x| ~ 5-10)
    assert (got - want).abs().max().item() <= 1e-4 * max(1.0, want.abs().max().item())


def _torchvision_densenets():
    names = ("densenet121", "densenet169", "densenet201")
    return [n for n in names if ("torchvision", n) in cspnet.interop.conversions()]


TIMM_CASES = ["cspresnet50", "cspresnext50", "cspdarknet53", "darknet53"]
TORCHVISION_CASES = ["resnet50", "resnext50_32x4d", *_torchvision_densenets()]


@pytest.mark.parametrize("name", TIMM_CASES)
def test_timm_weights_give_timm_outputs(name):
    source = calibrate(timm.create_model(name, pretrained=False))
    conv = get_conversion("timm", name)
    ours = cspnet.create_model(conv.model).eval()
    assert n_params(ours) == n_params(source)
    load_into(ours, convert_state("timm", name, source.state_dict()))
    assert_same_function(source, ours)


@pytest.mark.parametrize("name", TORCHVISION_CASES)
def test_torchvision_weights_give_torchvision_outputs(name):
    source = calibrate(getattr(torchvision.models, name)(weights=None))
    conv = get_conversion("torchvision", name)
    ours = cspnet.create_model(conv.model).eval()
    assert n_params(ours) == n_params(source)
    load_into(ours, convert_state("torchvision", name, source.state_dict()))
    assert_same_function(source, ours)


def test_every_densenet_has_a_torchvision_converter():
    # densenet121/169/201 are registered by the DenseNet family; each must take torchvision weights.
    registered = {n for n in ("densenet121", "densenet169", "densenet201") if n in cspnet.list_models()}
    assert registered == set(_torchvision_densenets())


def test_features_only_timm_variant_matches_timm_stage_maps():
    source = calibrate(timm.create_model("cspresnext50", pretrained=False))
    ours = cspnet.create_model("cspresnext50_timm", features_only=True, out_indices=(1, 2, 3, 4)).eval()
    state = {k: v for k, v in convert_state("timm", "cspresnext50", source.state_dict()).items() if not k.startswith("head.")}
    load_into(ours, state)
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        feats = ours(x)
        y = source.stem(x)
        for i, stage in enumerate(source.stages):
            y = stage(y)
            assert_close_maps(feats[i], y)


def test_shared_expansion_then_slice_equals_two_split_convs():
    """timm's one 1x1 conv + slice computes what the cfgs' two 1x1 convs compute (BN is per channel)."""
    from cspnet.blocks import DarkBlock, repeat_blocks
    from cspnet.layers import ConvBnAct
    from cspnet.stage import CrossStage

    def blocks(width):
        return repeat_blocks(lambda c, i: DarkBlock(c, c // 2, c), width, width, 2)

    sliced = CrossStage(32, blocks, base=ConvBnAct(16, 32, 1), split="slice", transition_chs=24)
    two_convs = CrossStage(16, blocks, split="conv", cross_chs=16, main_chs=16, transition_chs=24)
    stage = calibrate(nn.Sequential(nn.Conv2d(3, 16, 1), sliced))[1]
    state = {k: v for k, v in stage.state_dict().items() if not k.startswith("base.")}
    for key, value in stage.base.state_dict().items():
        state[f"cross.{key}"] = value[:16] if value.dim() else value
        state[f"main.{key}"] = value[16:] if value.dim() else value
    two_convs.load_state_dict(state)
    two_convs.eval()
    x = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        assert torch.allclose(two_convs(x), stage(x), atol=1e-5)


def test_unknown_source_key_is_named():
    state = timm.create_model("darknet53", pretrained=False, num_classes=3).state_dict()
    state["stages.0.extra.weight"] = torch.zeros(1)
    with pytest.raises(WeightsError, match=r"stages\.0\.extra\.weight"):
        convert_state("timm", "darknet53", state)
    with pytest.raises(WeightsError, match="no counterpart"):
        rename_keys({"a.b": torch.zeros(1)}, [(r"^c\.", "d.")], "test state")


def test_unknown_converter_lists_the_known_ones():
    with pytest.raises(ValueError, match="known: cspdarknet53, cspresnet50, cspresnext50, darknet53"):
        get_conversion("timm", "resnet18")
    with pytest.raises(ValueError, match="unknown source library 'keras'"):
        get_conversion("keras", "cspresnet50")


def test_convert_cli_writes_loadable_weights_with_metadata(tmp_path, capsys):
    from safetensors.torch import save_file

    source = calibrate(timm.create_model("cspdarknet53", pretrained=False, num_classes=5))
    src = tmp_path / "timm_cspdarknet53.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(src))
    out = tmp_path / "ours.safetensors"
    assert cli_main(["convert", "--from", "timm", "cspdarknet53", str(src), str(out)]) == 0
    assert "cspdarknet53_timm" in capsys.readouterr().out

    meta = read_metadata(out)
    assert meta["model"] == "cspdarknet53_timm" and meta["source"] == "timm:cspdarknet53"
    assert meta["num_classes"] == 5 and meta["input_size"] == 256
    assert meta["mean"] == [0.485, 0.456, 0.406] and meta["std"] == [0.229, 0.224, 0.225]
    ours = cspnet.create_model("cspdarknet53_timm", num_classes=5, pretrained=str(out)).eval()
    assert_same_function(source, ours)


def test_convert_cli_reads_pth_and_rejects_the_wrong_model(tmp_path, capsys):
    source = torchvision.models.resnet50(weights=None, num_classes=4)
    src = tmp_path / "resnet50.pth"
    torch.save(source.state_dict(), src)
    out = tmp_path / "r50.safetensors"
    assert cli_main(["convert", "--from", "torchvision", "resnext50_32x4d", str(src), str(out)]) == 2
    err = capsys.readouterr().err
    # ResNet-50's 3x3 convs are dense: the names and both shapes of the mis-fit tensor are given.
    assert "stages.0.blocks.0.conv2.conv.weight: file (64, 64, 3, 3) vs model (128, 4, 3, 3)" in err
    assert not out.exists()
    assert cli_main(["convert", "--from", "torchvision", "resnet50", str(src), str(out)]) == 0
    assert read_metadata(out)["model"] == "resnet50_tv"


def test_timm_training_checkpoint_with_its_argparse_options_is_read(tmp_path):
    # timm's CheckpointSaver stores the run's argparse.Namespace under "args" beside the state dict.
    import argparse

    from timm.utils import CheckpointSaver

    model = cspnet.create_model("cspresnet10", num_classes=5)
    args = argparse.Namespace(model="cspresnet10", lr=0.1, mean=None, input_size=[3, 224, 224], amp=True)
    saver = CheckpointSaver(model, torch.optim.SGD(model.parameters(), lr=0.1), args=args,
                            checkpoint_dir=str(tmp_path), recovery_dir=str(tmp_path), max_history=1)
    saver.save_checkpoint(0, metric=1.0)
    again = cspnet.create_model("cspresnet10", num_classes=5, pretrained=tmp_path / "model_best.pth.tar")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


def test_interop_does_not_need_timm_at_import():
    code = "import sys, cspnet, cspnet.interop, cspnet.cli; cspnet.interop.conversions(); assert 'timm' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_torchvision_legacy_densenet_file_converts(tmp_path):
    # torchvision's published DenseNet files name layers 'norm.1', 'conv.2' (its loader renames them) and,
    # like its ResNet files, predate BatchNorm's num_batches_tracked buffers (torch's BatchNorm fills them in).
    source = calibrate(torchvision.models.densenet121(weights=None))
    legacy = {re.sub(r"(denselayer\d+\.(?:norm|conv))([12])\.", r"\1.\2.", k): v
              for k, v in source.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert "features.denseblock1.denselayer1.norm.1.weight" in legacy
    torch.save(legacy, tmp_path / "densenet121.pth")
    out = convert_file("torchvision", "densenet121", tmp_path / "densenet121.pth", tmp_path / "ours.safetensors")
    assert_same_function(source, cspnet.create_model("densenet121", pretrained=out).eval())


def _save_source(model: nn.Module, path):
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


@pytest.mark.parametrize("library, name", [("timm", "cspresnext50"), ("torchvision", "resnet50")])
def test_rgb_weights_convert_for_grey_input_when_asked(tmp_path, capsys, library, name):
    if library == "timm":
        source = calibrate(timm.create_model(name, pretrained=False, num_classes=5))
    else:
        source = calibrate(getattr(torchvision.models, name)(weights=None, num_classes=5))
    model = get_conversion(library, name).model
    src = _save_source(source, tmp_path / "rgb.safetensors")
    rgb_file = convert_file(library, name, src, tmp_path / "rgb_ours.safetensors")
    # without asking, RGB weights do not go into a one-channel model: the tensor and the way to ask are named
    with pytest.raises(WeightsError, match=r"stem\.0\.conv\.weight: file \(64, 3, 7, 7\) vs model \(64, 1, 7, 7\)"
                                           r".*finetune=True.*--in-chans 1"):
        cspnet.create_model(model, num_classes=5, in_chans=1, pretrained=rgb_file)

    out = tmp_path / "grey.safetensors"
    assert cli_main(["convert", "--from", library, "--in-chans", "1", name, str(src), str(out)]) == 0
    printed = capsys.readouterr().out
    assert "summed over the colour channels" in printed and "num_classes=5, in_chans=1" in printed
    meta = read_metadata(out)
    assert meta["in_chans"] == 1 and len(meta["mean"]) == len(meta["std"]) == 1
    grey = cspnet.create_model(model, num_classes=5, in_chans=1, pretrained=out).eval()
    x = torch.randn(2, 1, SIZE, SIZE)
    with torch.no_grad():  # a grey image gives what the RGB model gives for it as three equal channels
        want, got = source(x.expand(-1, 3, -1, -1)), grey(x)
    assert want.std() > 0.05 and (got - want).abs().max().item() <= 1e-4


def test_a_grey_timm_model_converts_as_it_is(tmp_path):
    source = calibrate(timm.create_model("cspdarknet53", pretrained=False, num_classes=5, in_chans=1), in_chans=1)
    out = convert_file("timm", "cspdarknet53", _save_source(source, tmp_path / "grey.safetensors"), tmp_path / "ours.safetensors")
    assert read_metadata(out)["in_chans"] == 1
    ours = cspnet.create_model("cspdarknet53_timm", num_classes=5, in_chans=1, pretrained=out).eval()
    x = torch.randn(2, 1, SIZE, SIZE)
    with torch.no_grad():
        want, got = source(x), ours(x)
    assert want.std() > 0.05 and (got - want).abs().max().item() <= 1e-4


@pytest.mark.parametrize("feature_cls", [None, "hook", "getter"])  # FeatureListNet, FeatureHookNet, FeatureGetterNet
def test_timm_features_only_weights_give_timm_feature_maps(feature_cls):
    levels = (1, 2, 3, 4)  # level 0 differs: timm's is the ResNeXt stem conv before the pool, cspnet's after
    source = calibrate(timm.create_model("cspresnext50", pretrained=False, features_only=True, out_indices=levels,
                                         feature_cls=feature_cls))
    assert "head.fc.weight" not in source.state_dict()
    ours = cspnet.create_model("cspresnext50_timm", features_only=True, out_indices=levels).eval()
    load_into(ours, convert_state("timm", "cspresnext50", source.state_dict()))
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        for got, want in zip(ours(x), source(x), strict=True):
            assert_close_maps(got, want)


def test_timm_features_only_file_converts_to_a_backbone_file(tmp_path, capsys):
    # timm's features_only model holds the stages up to the last level asked for (here stages.0 and stages.1)
    source = calibrate(timm.create_model("cspdarknet53", pretrained=False, features_only=True, out_indices=(0, 1, 2)))
    assert "stages_1.conv_down.conv.weight" in source.state_dict() and "stages_2.conv_down.conv.weight" not in source.state_dict()
    out = tmp_path / "ours.safetensors"
    assert cli_main(["convert", "--from", "timm", "cspdarknet53", str(_save_source(source, tmp_path / "fo.safetensors")), str(out)]) == 0
    assert read_metadata(out)["num_classes"] == 0 and read_metadata(out)["last_level"] == 2
    # the printed call loads the file
    assert "create_model('cspdarknet53_timm', num_classes=0, features_only=True, out_indices=(0, 1, 2), pretrained=" in capsys.readouterr().out
    ours = cspnet.create_model("cspdarknet53_timm", features_only=True, out_indices=(0, 1, 2), pretrained=out).eval()
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        for got, want in zip(ours(x), source(x), strict=True):
            assert_close_maps(got, want)
    # a model that runs the stages the file lacks is refused, naming them
    with pytest.raises(WeightsError, match=r"missing: stages\.2\."):
        cspnet.create_model("cspdarknet53_timm", features_only=True, pretrained=out)


def test_a_timm_feature_wrapper_key_with_no_counterpart_is_named():
    state = timm.create_model("cspresnext50", pretrained=False, features_only=True).state_dict()
    state = {"neck_fpn.conv.weight": torch.zeros(1), **state}
    with pytest.raises(WeightsError, match=r"no counterpart in cspnet: neck_fpn\.conv\.weight$"):
        convert_state("timm", "cspresnext50", state)
