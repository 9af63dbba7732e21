"""Bad input gets a clear ValueError."""
import re

import pytest
import torch

import cspnet
from cspnet.layers import darknet_add, make_act


def test_unknown_model_suggests_close_matches():
    with pytest.raises(ValueError, match="did you mean cspresnext50"):
        cspnet.create_model("cspresnex50")


def test_unknown_option_names_the_valid_ones():
    with pytest.raises(ValueError, match="unknown option"):
        cspnet.create_model("cspdarknet53", widht=2)


def test_option_of_the_wrong_type_is_named():
    # Without the check these fail deep in a builder ("'int' object is not iterable").
    with pytest.raises(ValueError, match=r"option stages=3 has the wrong type"):
        cspnet.create_model("cspdarknet53", stages=3)
    with pytest.raises(ValueError, match=r"option depths=\(3, 'a', 8, 6\) has the wrong type"):
        cspnet.create_model("peleenet", depths=[3, "a", 8, 6])
    with pytest.raises(ValueError, match=r"option se='yes'"):
        cspnet.create_model("peleenet", se="yes")
    # JSON gives lists and ints: they become the config's tuples and floats.
    model = cspnet.create_model("csppeleenet", depths=[1, 1, 1, 1], part_ratio=1 - 0.5, csp_stages=[0])
    assert model.model_cfg.depths == (1, 1, 1, 1) and model.model_cfg.csp_stages == (0,)
    assert cspnet.create_model("csppeleenet", growth_rate=16).model_cfg.growth_rate == 16


def test_list_models_and_profile_take_what_timm_users_pass_or_say_why_not():
    assert cspnet.list_models(["resnet10", "cspresnet1*"]) == ["cspresnet10", "resnet10"]
    with pytest.raises(ValueError, match="pattern must be"):
        cspnet.list_models(None)
    with pytest.raises(ValueError, match="input size must be one or two positive integers"):
        cspnet.profile(cspnet.create_model("resnet10"), 64.0)


def test_fusion_last_that_would_equal_csp_is_refused():
    with pytest.raises(ValueError, match="fusion_last would build the same network as csp"):
        cspnet.create_model("cspresnet10", fusion="fusion_last")
    # where the cfg has a transition after the concat, fusion last drops it
    last = cspnet.profile(cspnet.create_model("cspresnext50", fusion="fusion_last"), 256)
    assert last.params < cspnet.profile(cspnet.create_model("cspresnext50"), 256).params


def test_run_settings_are_not_model_options():
    from cspnet.engine.models import build_model

    for key in ("num_classes", "in_chans", "pretrained"):
        with pytest.raises(ValueError, match=f"'{key}'.*cannot be model options"):
            build_model("resnet10", num_classes=10, in_chans=1, options={key: 5})


def test_wrong_input_channels_and_rank():
    model = cspnet.create_model("resnet10").eval()
    with pytest.raises(ValueError, match="3 input channels"):
        model(torch.randn(1, 1, 64, 64))
    with pytest.raises(ValueError, match="rank 4"):
        model(torch.randn(3, 64, 64))


def test_gamma_outside_open_interval():
    with pytest.raises(ValueError, match=re.escape("part_ratio (γ) must lie in (0, 1), got 1.0")):
        cspnet.create_model("cspdarknet53", split="slice", part_ratio=1.0)


def test_gamma_with_the_cfgs_fixed_split_widths_is_refused_not_ignored():
    # csdarknet53.cfg's split convs fix both parts' widths: a conv-split γ other than theirs would change nothing
    with pytest.raises(ValueError, match="fixed widths.*split='slice'"):
        cspnet.create_model("cspdarknet53", part_ratio=0.25)
    sizes = {g: sum(p.numel() for p in cspnet.create_model("cspdarknet53", split="slice", part_ratio=g).parameters())
             for g in (0.25, 0.75)}
    assert sizes[0.25] > sizes[0.75]


def test_unknown_activation():
    with pytest.raises(ValueError, match="did you mean mish"):
        cspnet.create_model("cspdarknet53", act="mihs")
    with pytest.raises(ValueError, match="unknown activation"):
        make_act("gelu")


def test_plain_config_cannot_be_made_csp_by_a_flag():
    with pytest.raises(ValueError, match="plain model"):
        cspnet.create_model("resnet50", fusion="csp")


def test_shortcut_shape_mismatch():
    with pytest.raises(ValueError, match="cannot be added"):
        darknet_add(torch.zeros(1, 4, 8, 8), torch.zeros(1, 4, 6, 3))
    # The plain cfg ResNets have no projection shortcuts: a 240x320 input gives 15x20 onto 8x10.
    model = cspnet.create_model("resnet10").eval()
    with pytest.raises(ValueError, match="multiples of 32 always work"):
        model(torch.zeros(1, 3, 240, 320))
    assert model(torch.zeros(1, 3, 224, 320)).shape == (1, 1000)


def test_out_indices_and_frozen_stages_ranges():
    with pytest.raises(ValueError, match="out_indices"):
        cspnet.create_model("resnet10", features_only=True, out_indices=(9,))
    with pytest.raises(ValueError, match="frozen_stages"):
        cspnet.create_model("resnet10", frozen_stages=7)


def test_create_detector_is_part_of_the_public_api():
    from cspnet.detection import create_detector

    assert cspnet.create_detector is create_detector
    with pytest.raises(ValueError, match="unknown model"):
        cspnet.create_detector("nosuchnet")
