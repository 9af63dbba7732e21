"""Conv-weight params and Darknet BFLOPs at 256x256, measured on the native models, against the
official README (WongKinYiu/CrossStagePartialNetworks) to its printed precision."""
import pytest

import cspnet
from cspnet.modeltable import model_rows

README_256 = {  # name: (conv params in M, BFLOPs) as printed in the README
    "darknet53": (41.57, 18.57),
    "cspdarknet53": (27.61, 13.07),
    "resnet50": (22.73, 9.74),
    "cspresnet50": (21.57, 8.97),
    "resnext50": (22.19, 10.11),
    "cspresnext50": (20.50, 7.93),
    "darknet_ref": (7.31, 0.96),
}


@pytest.mark.parametrize("name", sorted(README_256))
def test_readme_params_and_bflops(name):
    params_m, bflops = README_256[name]
    p = cspnet.profile(cspnet.create_model(name), 256)
    assert round(p.conv_params / 1e6, 2) == params_m
    assert round(p.bflops, 2) == bflops


def test_resnet10_counts_shortcuts_like_its_darknet_build():
    # README: 5.24M / 2.273. Conv layers alone give 2.2722; the Darknet build behind that figure also
    # counted one FLOP per [shortcut] output element (darknet53's 18.57 does not: it would read 18.58).
    p = cspnet.profile(cspnet.create_model("resnet10"), 256)
    assert round(p.conv_params / 1e6, 2) == 5.24
    assert round(p.bflops, 3) == 2.272
    assert round(p.bflops + p.shortcut_adds / 1e9, 3) == 2.273
    d = cspnet.profile(cspnet.create_model("darknet53"), 256)
    assert round(d.bflops + d.shortcut_adds / 1e9, 2) == 18.58  # so the README did not count them there


def test_cspresnet10_lands_near_the_paper():
    # No cfg exists; designed as csresnet50 applies CSP to resnet50 (docs/models.md). Paper: 2.73M / 1.905.
    p = cspnet.profile(cspnet.create_model("cspresnet10"), 256)
    assert abs(p.conv_params / 1e6 - 2.73) / 2.73 < 0.01
    assert abs(p.bflops - 1.905) / 1.905 < 0.05


def test_models_table_marks_every_cfg_model_as_matching():
    rows = {r.name: r for n in [*README_256, "resnet10", "cspresnet10"] for r in model_rows(n, with_twins=False)}
    for name in README_256:
        assert rows[name].matches_paper == "conv", name
    assert rows["resnet10"].matches_paper == "conv+shortcut"
    assert rows["cspresnet10"].matches_paper == ""


def test_csp_saves_computation_against_its_twin():
    # The paper's promise: CSP cuts computation >= 10% (BFLOPs) on the large models (README: -30/-8/-22%).
    for csp, saving in (("cspdarknet53", 0.29), ("cspresnet50", 0.07), ("cspresnext50", 0.21)):
        twin = cspnet.get_spec(csp).twin
        a = cspnet.profile(cspnet.create_model(csp), 256).bflops
        b = cspnet.profile(cspnet.create_model(twin), 256).bflops
        assert 1 - a / b > saving


def test_profile_cio_rule_on_a_single_conv():
    import torch

    conv = torch.nn.Conv2d(3, 8, 3, padding=1)
    p = cspnet.profile(torch.nn.Sequential(conv), 16, in_chans=3)
    assert p.cio == 3 * 16 * 16 + 8 * 16 * 16
    assert p.macs == 8 * 16 * 16 * 3 * 9
    assert p.conv_params == 8 * 3 * 9 and p.params == 8 * 3 * 9 + 8
