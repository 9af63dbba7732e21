"""Necks on inputs whose sides are not multiples of the coarsest stride: the maps a neck fuses agree in size."""
import pytest
import torch

from cspnet.detection import create_detector
from cspnet.detection.necks import resize_to, upsample2


def raw_and_backbone_sizes(det, hw):
    det.eval()
    x = torch.rand(1, 3, *hw)
    with torch.no_grad():
        maps = det.backbone(x)
        raw = det.forward_raw(x)
    return [tuple(r.shape[-2:]) for r in raw], [tuple(m.shape[-2:]) for m in maps[-len(raw):]]


# DenseNet transitions (2x2 average pools) round an odd side down (25 -> 12); the bottom-up path's
# 3x3/2 convs round it up (25 -> 13): the two maps fused at stride 32 differed by one cell.
@pytest.mark.parametrize("backbone, neck, hw", [
    ("cspdensenet121", "panet", (400, 400)),
    ("cspdensenet121", "efm-sam", (400, 400)),
    ("cspdensenet_ref", "efm-sam", (400, 400)),
    ("densenet121", "panet", (100, 76)),
    ("densenet121", "efm", (100, 76)),
])
def test_bottom_up_paths_take_backbones_that_round_down(backbone, neck, hw):
    det = create_detector(backbone, neck, num_classes=2, backbone_width=0.25, neck_width=64)
    raw, backbone_maps = raw_and_backbone_sizes(det, hw)
    assert raw == backbone_maps  # one head cell per backbone cell at every stride
    assert any(h % 2 or w % 2 for h, w in backbone_maps[:-1])  # an odd side was halved (the case at stake)


# On a 16-pixel-wide input the width stops at one cell from stride 16 on while the height still
# halves: GFM's resize compared only the widths and left the 8 x 1 map unresized against 16 x 1.
@pytest.mark.parametrize("hw", [(40, 16), (256, 16)])
def test_gfm_resizes_height_and_width_each(hw):
    det = create_detector("cspresnet10", "gfm", num_classes=2, backbone_width=0.25, neck_width=32)
    raw, backbone_maps = raw_and_backbone_sizes(det, hw)
    assert raw == backbone_maps


def test_resize_to_pools_and_upsamples_each_side_on_its_own():
    x = torch.arange(8.0).view(1, 1, 4, 2)
    out = resize_to(x, torch.zeros(1, 1, 2, 4))  # height pooled 4 -> 2, width upsampled 2 -> 4
    assert out.tolist() == [[[[2.0, 2.0, 3.0, 3.0], [6.0, 6.0, 7.0, 7.0]]]]
    tall = torch.arange(8.0).view(1, 1, 8, 1)
    assert resize_to(tall, torch.zeros(1, 1, 16, 1)).flatten().tolist() == tall.flatten().repeat_interleave(2).tolist()


def test_upsample2_onto_an_odd_side_rounded_up_is_darknets_2x_upsample():
    x = torch.arange(13.0).view(1, 1, 1, 13)
    twice = x.repeat_interleave(2, dim=-1)[..., :25]
    assert torch.equal(upsample2(x, torch.zeros(1, 1, 1, 25)), twice)
