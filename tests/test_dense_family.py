"""DenseNet / PeleeNet / MobileNet-v2 / ELASTIC families against numbers we did not choose.

- torchvision's DenseNets (parameter counts, and outputs once their weights are copied across);
- the official cfgs' README params / BFLOPs (that the cfg models compute what their cfgs compute, layer for
  layer, is tested for every model with a ``darknet_cfg`` in test_darknet_weights.py);
- the paper's Tables 1 and 3 (CSPPeleeNet, the fusion ablation, the ELASTIC DenseNets).

Counting conventions (docs/models_design.md): the README and the PeleeNet rows count conv + classifier
weights only (``Profile.conv_params``); the ELASTIC DenseNet rows are ELASTIC's PyTorch counts, every
parameter including BN (``Profile.params``). BFLOPs = 2 x conv/linear multiply-adds.
"""
import functools

import pytest
import torch
import torchvision
from torch import nn

import cspnet
from cspnet.analysis.layers import layer_costs
from cspnet.layers import ConvBnAct
from cspnet.models.densenet import DenseLayer, ElasticDenseLayer
from cspnet.models.elastic import ElasticBlock, elastic_dark_block
from cspnet.models.peleenet import TABLE1_FAMILY
from cspnet.stage import CrossStage


@functools.lru_cache(maxsize=None)
def _cached_profile(name, size, options):
    return cspnet.profile(cspnet.create_model(name, **dict(options)), size)


def _profile(name, size, **kw):
    """Profile a registered model once per (name, size, options) for the whole module."""
    return _cached_profile(name, size, tuple(sorted(kw.items())))


def _close(value, target, tol):
    return abs(value / target - 1) <= tol


# -- DenseNet: torchvision's parameters, module for module -----------------------------------------

@pytest.mark.parametrize("name", ["densenet121", "densenet169", "densenet201"])
def test_plain_densenet_has_torchvision_parameters(name):
    ours = cspnet.create_model(name)
    tv = getattr(torchvision.models, name)()
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in tv.parameters())
    # Same tensors in the same order: a converter can pair the two state dicts position by position.
    assert [t.shape for t in ours.state_dict().values()] == [t.shape for t in tv.state_dict().values()]


def test_densenet264_32_is_torchvision_densenet_with_that_layout():
    tv = torchvision.models.DenseNet(growth_rate=32, block_config=(6, 12, 64, 48), num_init_features=64)
    ours = cspnet.create_model("densenet264_32")
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in tv.parameters())


def test_densenet121_with_torchvision_weights_computes_torchvision_outputs():
    tv = torchvision.models.densenet121().eval()
    for m in tv.modules():  # non-trivial BN statistics, so a misplaced norm would show
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    ours = cspnet.create_model("densenet121").eval()
    ours.load_state_dict(dict(zip(ours.state_dict(), tv.state_dict().values())))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), tv(x), rtol=1e-5, atol=1e-5)


# -- CSPDenseNet ----------------------------------------------------------------------------------

def test_cspdensenet_partial_dense_block_sees_only_part_two():
    model = cspnet.create_model("cspdensenet121", part_ratio=0.75)
    for stage, in_chs in zip(model.stages, [64, 128, 256, 512]):
        assert isinstance(stage, CrossStage) and stage.split == "slice"
        cross = round(0.75 * in_chs)
        assert stage.cross_chs == cross
        assert stage.blocks.layers[0].norm1.num_features == in_chs - cross
    # transition -> concat -> transition, with DenseNet's widths between stages
    assert [s.out_chs for s in model.stages] == [128, 256, 512, 1024]


def test_cspdensenet_fusions():
    costs = {}
    for fusion in ("csp", "fusion_first", "fusion_last"):
        model = cspnet.create_model("cspdensenet121", fusion=fusion, num_classes=5).eval()
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 5)
        assert [s.out_chs for s in model.stages] == [128, 256, 512, 1024]  # DenseNet's widths between stages
        costs[fusion] = _profile("cspdensenet121", 224, fusion=fusion).bflops
    # fusion first drops the partial transition, fusion last the transition after the concat
    assert costs["fusion_first"] < costs["csp"] and costs["fusion_last"] < costs["csp"]


def test_elastic_dense_layer_has_dense_layer_parameters():
    a, b = DenseLayer(96, 32), ElasticDenseLayer(96, 32)
    assert sum(p.numel() for p in b.parameters()) == sum(p.numel() for p in a.parameters())
    x = torch.randn(1, 96, 7, 7)  # odd sizes stay defined (allenai's model special-cases 7x7)
    assert b(x).shape == (1, 32, 7, 7)
    assert cspnet.profile(nn.Sequential(b), 8, in_chans=96).macs * 8 == cspnet.profile(nn.Sequential(a), 8, in_chans=96).macs * 5


def test_elastic_densenets_match_the_paper():
    # Paper Table 3: DenseNet-201-Elastic 19.48M / 8.77, CSPDenseNet-201-Elastic 20.17M / 7.13 (224x224).
    base = _profile("densenet201_elastic", 224)
    csp = _profile("cspdensenet201_elastic", 224)
    assert round(base.params / 1e6, 2) == 19.48  # ELASTIC counts every parameter (its PyTorch model)
    assert round(csp.params / 1e6, 2) == 20.17
    assert _close(base.bflops, 8.77, 0.03) and _close(csp.bflops, 7.13, 0.03)
    assert _close(csp.bflops / base.bflops, 7.13 / 8.77, 0.01)  # the paper's -19%


def _randomize_bn_stats(module: nn.Module) -> nn.Module:
    """Eval mode with BatchNorm statistics and affine parameters away from the identity."""
    gen = torch.Generator().manual_seed(0)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen))
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=gen))
    return module.eval()


def test_elastic_low_branch_pool_keeps_the_last_row_and_column_of_an_odd_map():
    # ELASTIC's 2x2 pool of the low-resolution branch is ceil-mode: a 5x5 map pools to 3x3 and its last
    # row / column (pixel (4, 4) among them) still reach the low branch instead of being dropped.
    layer = _randomize_bn_stats(ElasticDenseLayer(8, 8))
    seen = []
    layer.conv1_d.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[-2:]))
    x = torch.randn(1, 8, 5, 5)
    with torch.no_grad():
        layer(x)
    assert seen == [(3, 3)]  # ceil(5 / 2)
    low = []
    layer.conv2_d.register_forward_hook(lambda m, args, out: low.append(out))
    x2 = x.clone()
    x2[..., 4, 4] += 10.0
    with torch.no_grad():
        layer(x), layer(x2)
    assert not torch.allclose(low[-2], low[-1])


def test_elastic_layer_upsamples_its_low_branch_bilinearly():
    # ELASTIC (allenai/elastic) adds the low branch upsampled x2 bilinear (align_corners=False) to the full
    # branch; recompose the layer's forward from its submodules with torch's own pool and upsample.
    layer = _randomize_bn_stats(ElasticDenseLayer(8, 8))
    x = torch.randn(2, 8, 8, 8)
    with torch.no_grad():
        h = layer.act1(layer.norm1(x))
        full = layer.conv2(layer.act2(layer.norm2(layer.conv1(h))))
        low = layer.conv2_d(layer.act2_d(layer.norm2_d(layer.conv1_d(nn.AvgPool2d(2, 2)(h)))))
        expected = full + nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)(low)
        torch.testing.assert_close(layer(x), expected)


# -- Official cfgs: layer for layer ---------------------------------------------------------------

@pytest.mark.parametrize("name,params_m,bflops", [("mobilenet_v2", 3.47, 0.858), ("cspmobilenet_v2", 2.51, 0.764)])
def test_mobilenet_readme_figures(name, params_m, bflops):
    p = _profile(name, 224)
    assert round(p.conv_params / 1e6, 2) == params_m
    assert round(p.bflops, 3) == bflops


@pytest.mark.parametrize(
    "name,bflops", [("cspdarknet53_elastic", 7.74), ("cspresnet50_elastic", 9.36), ("cspresnext50_elastic", 5.45)]
)
def test_elastic_cfg_readme_bflops(name, bflops):
    assert round(_profile(name, 256).bflops, 2) == bflops


def test_elastic_block_halves_and_odd_sizes():
    block = elastic_dark_block(64, 64, 64, "leaky").eval()
    assert isinstance(block, ElasticBlock)
    assert block.full[0].conv.in_channels == 32 and block.low[0].conv.in_channels == 32
    x = torch.randn(1, 64, 7, 7)  # Darknet pads the 2x2 pool (7 -> 4); the x2 upsample is cropped back to 7
    assert block(x).shape == x.shape
    # The low half really runs at half resolution: perturbing one input pixel of it moves a 2x2+ patch.
    with torch.no_grad():
        y0 = block(x)
        x2 = x.clone()
        x2[:, 32:, 0, 0] += 1.0
        changed = (block(x2) - y0).abs().sum(1)[0] > 0
    assert changed[:2, :2].all()


# -- PeleeNet / CSPPeleeNet: paper Tables 1 and 3 (224x224) -------------------------------------------

@pytest.mark.parametrize(
    "name,params_m,bflops",
    [("peleenet", 2.79, 1.017), ("csppeleenet", 2.83, 0.888), ("peleenet_swish", 2.79, 1.017),
     ("sepeleenet_swish", 2.81, 1.017), ("csppeleenet_swish", 2.83, 0.888), ("secsppeleenet_swish", 2.85, 0.888)],
)
def test_peleenet_table3(name, params_m, bflops):
    p = _profile(name, 224)
    assert _close(p.conv_params / 1e6, params_m, 0.02), p.conv_params  # conv weights, as the README counts
    assert _close(p.bflops, bflops, 0.02), p.bflops


TABLE1 = {  # fusion: BFLOPs at γ = 0.75, 0.5, 0.25
    "csp": (0.800, 0.888, 0.986),
    "fusion_last": (0.716, 0.804, 0.902),
    "fusion_first": (0.649, 0.755, 0.861),
}


@pytest.mark.parametrize("fusion", sorted(TABLE1))
@pytest.mark.parametrize("index", [0, 1, 2])
def test_table1_bflops_within_3_percent(fusion, index):
    gamma = (0.75, 0.5, 0.25)[index]
    assert _close(_profile(TABLE1_FAMILY, 224, fusion=fusion, part_ratio=gamma).bflops, TABLE1[fusion][index], 0.03)


@pytest.mark.parametrize("name", ["csppeleenet", TABLE1_FAMILY])
def test_table1_orderings(name):
    # The paper's qualitative findings: computation falls as γ grows (γ = the bypassing fraction), and
    # fusion first < fusion last < CSPPeleeNet < PeleeNet at every γ.
    pelee = _profile("peleenet", 224).bflops
    for gamma in (0.75, 0.5, 0.25):
        ff, fl, csp = (_profile(name, 224, fusion=f, part_ratio=gamma).bflops
                       for f in ("fusion_first", "fusion_last", "csp"))
        assert ff < fl < csp < pelee
    costs = [_profile(name, 224, part_ratio=g).bflops for g in (0.25, 0.5, 0.75)]
    assert costs[0] > costs[1] > costs[2]


def test_csppeleenet_stage_layout():
    model = cspnet.create_model("csppeleenet", fusion="fusion_last")
    assert [s.fusion for s in model.stages] == ["fusion_last", "fusion_last", "fusion_last", "none"]
    model = cspnet.create_model(TABLE1_FAMILY)
    assert [s.fusion for s in model.stages] == ["none", "csp", "csp", "csp"]
    model = cspnet.create_model(TABLE1_FAMILY, fusion="fusion_first", part_ratio=0.75)
    assert [s.fusion for s in model.stages] == ["none", "fusion_first", "fusion_first", "fusion_first"]
    # fusion first ends with a (1 - γ)·T wide transition at full resolution, then the pool (stride 2 inside)
    assert [(f.num_chs, f.reduction) for f in model.feature_info][1:] == [(128, 4), (64, 16), (128, 32), (176, 32)]
    transition = model.stages[1].transition
    assert isinstance(transition[0], ConvBnAct) and isinstance(transition[1], nn.AvgPool2d)
    with pytest.raises(ValueError, match=r"option csp_stages=3 has the wrong type"):
        cspnet.create_model("csppeleenet", csp_stages=3)
    with pytest.raises(ValueError, match="csp_stages"):
        cspnet.create_model("csppeleenet", csp_stages=(1, 4))


def test_only_a_partial_first_stage_cuts_peleenets_transition_bottleneck():
    # Paper Fig. 7: CSPPeleeNet cuts the peak at PeleeNet's transition layers. The heaviest layer of PeleeNet
    # is its first stage's transition; the headline CSPPeleeNet makes that stage partial and cuts it, while
    # with it plain (csp_stages=(1, 2, 3), the stage set that fits all nine Table 1 rows, docs/models_design.md)
    # the peak stays exactly where and what it was.
    pelee = layer_costs(cspnet.create_model("peleenet"), 224).peak_bflops
    ours = layer_costs(cspnet.create_model("csppeleenet"), 224).peak_bflops
    later = layer_costs(cspnet.create_model(TABLE1_FAMILY), 224).peak_bflops
    assert pelee.name == "stages.0.transition.conv"
    assert ours.bflops < 0.8 * pelee.bflops
    assert (later.name, later.bflops) == (pelee.name, pelee.bflops)


def test_csppeleenet_feature_pyramid():
    model = cspnet.create_model("csppeleenet", features_only=True)
    assert [(f.num_chs, f.reduction) for f in model.feature_info] == [
        (32, 4), (128, 4), (256, 8), (512, 16), (704, 32)]


# -- PeleeNet's concat orders, which the official PeleeNet weights depend on ------------------------------
# The PeleeNet paper's reference code (Robert-JunWang/PeleeNet): the stem block concatenates
# [max-pool branch, conv branch]; a two-way dense layer outputs [its input, branch 1 (one 3x3),
# branch 2 (two 3x3)], the input coming first from the dense block.

def test_pelee_stem_concatenates_the_pool_branch_first():
    model = _randomize_bn_stats(cspnet.create_model("peleenet"))
    stem, chs = model.stem, model.feature_info[0].num_chs  # stem_chs
    seen = []
    stem.stem3.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        stem(x)
        first = stem.stem1(x)
        torch.testing.assert_close(seen[0][:, :chs], stem.pool(first))
        torch.testing.assert_close(seen[0][:, chs:], stem.stem2b(stem.stem2a(first)))


def test_two_way_dense_layer_puts_the_one_3x3_branch_first():
    from cspnet.models.peleenet import TwoWayDenseLayer

    layer = _randomize_bn_stats(TwoWayDenseLayer(8, 32, 16, "leaky"))  # growth 32: two branches of 16
    x = torch.randn(1, 8, 6, 6)
    with torch.no_grad():
        y = layer(x)
        torch.testing.assert_close(y[:, :16], layer.branch1b(layer.branch1a(x)))
        torch.testing.assert_close(y[:, 16:], layer.branch2c(layer.branch2b(layer.branch2a(x))))


def test_dense_block_keeps_its_input_channels_first():
    from cspnet.models.densenet import DenseBlock
    from cspnet.models.peleenet import TwoWayDenseLayer

    layers = [TwoWayDenseLayer(8, 32, 16, "leaky"), TwoWayDenseLayer(40, 32, 16, "leaky")]
    block = _randomize_bn_stats(DenseBlock(layers))
    x = torch.randn(1, 8, 6, 6)
    with torch.no_grad():
        y = block(x)
        first = layers[0](x)
        second = layers[1](torch.cat([x, first], 1))
    assert y.shape[1] == 8 + 2 * 32
    torch.testing.assert_close(y, torch.cat([x, first, second], 1))


# -- CrossStage: custom split layers (csmobilenet-v2) -------------------------------------------------

def test_crossstage_custom_split_layers_need_widths_and_both_modules():
    blocks = lambda w: (nn.Identity(), w)  # noqa: E731
    conv = ConvBnAct(8, 8, 3, 2, groups=8)
    with pytest.raises(ValueError, match="cross/main"):
        CrossStage(8, blocks, cross=conv, transition_chs=8)
    with pytest.raises(ValueError, match="cross/main"):
        CrossStage(8, blocks, cross=conv, main=ConvBnAct(8, 4, 3, 2), cross_chs=8, transition_chs=8)
    with pytest.raises(ValueError, match="cross/main"):
        CrossStage(8, blocks, split="slice", cross=conv, main=conv, cross_chs=8, main_chs=8, transition_chs=8)
    stage = CrossStage(8, blocks, fusion="fusion_first", cross=conv, main=ConvBnAct(8, 4, 3, 2), cross_chs=8,
                       main_chs=4, transition_chs=6)
    assert stage(torch.randn(1, 8, 8, 8)).shape == (1, 6, 4, 4)


# -- The Reference models: designed on darknet.cfg's budget, 256x256 (README figures) ------------------

REFERENCE = {  # name: (conv params in M, BFLOPs, sign of the README's BFLOPs difference to Darknet Ref.)
    "cspdensenet_ref": (3.48, 0.886, -1),
    "csppeleenet_ref": (4.10, 1.103, +1),
    "cspdensenetb_ref": (1.38, 0.631, -1),
    "csppeleenetb_ref": (2.01, 0.897, -1),
}


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_reference_models_land_on_the_readme(name):
    params_m, bflops, sign = REFERENCE[name]
    p = _profile(name, 256)
    assert _close(p.conv_params / 1e6, params_m, 0.03), p.conv_params
    assert _close(p.bflops, bflops, 0.03), p.bflops
    darknet_ref = _profile("darknet_ref", 256)
    assert p.conv_params < darknet_ref.conv_params / 1.7  # README: -44% ... -81% parameters
    assert (p.bflops > darknet_ref.bflops) == (sign > 0)
    model = cspnet.create_model(name)
    assert model.feature_info[-1].reduction == 64  # darknet.cfg's total stride


# -- benchmarks/fusion_first_layouts.py: its analytic counts are the profiler's on every buildable layout ----

@pytest.mark.parametrize("gamma", [0.25, 0.5, 0.75])
def test_fusion_first_layout_counts_equal_the_profiler(gamma, benchmark_script):
    script = benchmark_script("fusion_first_layouts")
    Layout = script.Layout
    assert script.layout_macs(Layout(partial=()), "csp", gamma) == _profile("peleenet", 224).macs
    for fusion in ("fusion_first", "fusion_last", "csp"):
        for csp_stages in ((0, 1, 2), (1, 2, 3), (0, 1, 2, 3)):
            layout = Layout(partial=csp_stages, transition_at="pooled" if fusion == "csp" else "full")
            measured = _profile("csppeleenet", 224, fusion=fusion, part_ratio=gamma, csp_stages=csp_stages).macs
            assert script.layout_macs(layout, fusion, gamma) == measured, (fusion, csp_stages)


def test_fusion_first_layouts_report(tmp_path, benchmark_script):
    script = benchmark_script("fusion_first_layouts")
    out = tmp_path / "ff.md"
    assert script.main(["--out", str(out), "--top", "3"]) == 0
    text = out.read_text()
    assert "- Readings enumerated: 5,760." in text
    # the implemented readings are the model code's (the profiler's counts above)
    assert "- `csppeleenet_table1` (`Layout()`, the ablation's): fusion first worst row 2.7%, 0.637 / 0.734 / 0.861" in text
    assert "- `csppeleenet` (`HEADLINE`, first stage partial as in Fig. 7): fusion first worst row" in text
    # the one reading with the implemented widths that fits all nine rows leaves the first stage plain
    assert ("readings that keep all nine rows within 3%: 1.\n  - partial=(1, 2, 3), split=slice, growth=fixed, "
            "bottleneck=fixed, transition_at=full, transition_width=scaled, last_transition=True\n") in text
    assert "first stage partial (paper Fig. 7" in text and "bottleneck widths: 0." in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and "%" in line.split("|")[1]]
    errors = [float(line.split("|")[1].strip().rstrip("%")) for line in rows[:3]]
    assert errors == sorted(errors) and errors[0] <= 3.0  # ranked, and the best fits are within the target
