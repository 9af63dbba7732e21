"""CrossStage on its own: every fusion strategy, both split modes, γ, gradients, and `none`."""
import re

import pytest
import torch
from torch import nn

import cspnet
from cspnet.blocks import DarkBlock, repeat_blocks
from cspnet.layers import ConvBnAct
from cspnet.stage import FUSIONS, CrossStage


def dark_blocks(depth=2):
    return lambda w: repeat_blocks(lambda c, i: DarkBlock(c, c // 2, w), w, w, depth)


def make(fusion, split="conv", part_ratio=0.5, base=32, transition=48):
    return CrossStage(
        base, dark_blocks(), fusion=fusion, split=split, part_ratio=part_ratio,
        transition_chs=None if fusion in ("fusion_last",) else transition,
    )


@pytest.mark.parametrize("split", ["conv", "slice"])
@pytest.mark.parametrize("fusion", [f for f in FUSIONS if f != "none"])
def test_shapes_and_gradients_reach_both_parts(fusion, split):
    stage = make(fusion, split).train()
    x = torch.randn(2, 32, 8, 8, requires_grad=True)
    y = stage(x)
    assert y.shape == (2, stage.out_chs, 8, 8)
    expected = 48 if fusion != "fusion_last" else stage.main_chs + stage.cross_chs
    assert stage.out_chs == expected
    y.square().mean().backward()
    if split == "conv":
        assert stage.cross.conv.weight.grad.abs().sum() > 0
        assert stage.main.conv.weight.grad.abs().sum() > 0
    else:  # both channel ranges of the base map receive gradient, through different paths
        g = x.grad.abs().sum((0, 2, 3))
        assert (g[: stage.cross_chs] > 0).all() and (g[stage.cross_chs :] > 0).all()
    assert all(p.grad is not None for p in stage.parameters())


@pytest.mark.parametrize("gamma,cross", [(0.25, 8), (0.5, 16), (0.75, 24)])
def test_slice_split_follows_gamma_and_bypasses_blocks(gamma, cross):
    stage = make("fusion_last", "slice", gamma).eval()
    assert (stage.cross_chs, stage.main_chs) == (cross, 32 - cross)
    x = torch.randn(1, 32, 8, 8)
    with torch.no_grad():
        y = stage(x)
    # concat order [block path, cross path]: the last γ·C output channels are the untouched part 1
    torch.testing.assert_close(y[:, -cross:], x[:, :cross])


def test_fusion_strategies_have_the_paper_transitions():
    assert make("csp").partial_transition is not None and make("csp").transition is not None
    assert make("fusion_first").partial_transition is None and make("fusion_first").transition is not None
    assert make("fusion_last").partial_transition is not None and make("fusion_last").transition is None


def test_gamma_lowers_computation_in_slice_mode():
    from cspnet.profile import profile

    macs = [profile(make("fusion_last", "slice", g), 16, in_chans=32).macs for g in (0.25, 0.5, 0.75)]
    assert macs[0] > macs[1] > macs[2]


def test_none_is_the_plain_stage():
    down = ConvBnAct(16, 32, 3, 2)
    stage = CrossStage(32, dark_blocks(), down=down, fusion="none").eval()
    plain = nn.Sequential(stage.down, stage.blocks).eval()
    assert stage.cross is None and stage.main is None and stage.partial_transition is None
    x = torch.randn(2, 16, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(stage(x), plain(x))
    assert stage.out_chs == 32


def test_channels_last_slice_matches_contiguous():
    stage = make("csp", "slice").eval()
    x = torch.randn(2, 32, 8, 8)
    with torch.no_grad():
        a = stage(x)
        b = stage.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.1, 1.5, "half"])
def test_part_ratio_outside_open_interval_is_rejected(bad):
    with pytest.raises(ValueError, match=re.escape(f"part_ratio (γ) must lie in (0, 1), got {bad!r}")):
        make("csp", "slice", bad)


def test_part_ratio_that_rounds_a_slice_to_no_channels_is_rejected():
    # γ in (0, 1) but too small for an 8-channel base: round(0.05 * 8) = 0 bypassing channels
    with pytest.raises(ValueError, match=re.escape("part_ratio 0.05 leaves an empty part of a 8-channel base")):
        make("csp", "slice", 0.05, base=8)


def test_bad_fusion_split_and_missing_transition():
    with pytest.raises(ValueError, match="unknown fusion 'fusion_middle'; expected one of csp, "):
        make("fusion_middle")
    with pytest.raises(ValueError, match="unknown split 'chunk'; expected one of conv, slice"):
        make("csp", "chunk")
    with pytest.raises(ValueError, match=re.escape("fusion_first needs a transition after the concat (transition_chs)")):
        CrossStage(32, dark_blocks(), fusion="fusion_first")
    with pytest.raises(ValueError, match="fusion_last has no transition after the concat"):
        CrossStage(32, dark_blocks(), fusion="fusion_last", transition_chs=32)


def test_maxout_groups_channels_like_darknet_maxpool_depth():
    from cspnet.layers import Maxout

    # output channel g = max over input channels g, g+N, g+2N, ... (darknet forward_maxpool_layer)
    x = torch.tensor([0.0, 0.0, 0.0, 0.0, 9.0]).view(1, 5, 1, 1)
    assert Maxout(3)(x).flatten().tolist() == [0.0, 9.0, 0.0]
    x = torch.randn(2, 12, 4, 4)
    expected = torch.stack([x[:, g::4] for g in range(4)], 1).amax(2)
    torch.testing.assert_close(Maxout(4)(x), expected)


def test_slice_split_width_rounds_gamma_times_c():
    # The slice split is round(γ·C) wide (docs, stage.py), the rule CSPDenseNet's builder sizes its widths by:
    # γ = 0.3 of 32 channels is 9.6, so 10 channels bypass, not int()'s 9.
    stage = CrossStage(32, dark_blocks(), split="slice", part_ratio=0.3, transition_chs=48)
    assert (stage.cross_chs, stage.main_chs) == (10, 22)
    model = cspnet.create_model("cspdensenet121", part_ratio=0.3).eval()  # widths computed with round() there
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 1000)


def test_conv_split_default_widths_follow_gamma():
    # γ is the fraction that bypasses: a conv split of 32 channels at γ = 0.25 gives the cross conv
    # round(0.25·32) = 8 outputs and the main (block) conv the other 24.
    stage = CrossStage(32, dark_blocks(), split="conv", part_ratio=0.25, transition_chs=48)
    assert (stage.cross.conv.out_channels, stage.main.conv.out_channels) == (8, 24)
    assert (stage.cross_chs, stage.main_chs) == (8, 24)
