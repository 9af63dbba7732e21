"""Necks on inputs whose sides are not multiples of the coarsest stride: the maps a neck fuses agree in size;
what EFM's nodes and SAM compute."""
import pytest
import torch
import torch.nn.functional as F

from cspnet.detection import create_detector
from cspnet.detection.necks import EFM, SpatialAttention, resize_to, upsample2


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


EFM_IN, EFM_WIDTHS = [24, 48, 96, 128], [16, 32, 64]  # every map wider than its node: all compressed by Maxout


def _efm_maps(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, c, 32 >> i, 32 >> i, generator=g) for i, c in enumerate(EFM_IN)]  # strides 4 .. 32


def _efm_node_inputs_and_outputs(efm, feats):
    """Per output level i: the concatenation node i fuses, and its output (the top-down map of scale i)."""
    fused, node_out, n = {}, {}, len(EFM_WIDTHS)
    hooks = []
    for i in range(n):
        node = efm.nodes[n - 1 - i]  # the nodes run coarse -> fine
        hooks.append(node.convs.register_forward_pre_hook(lambda m, args, i=i: fused.__setitem__(i, args[0])))
        hooks.append(node.register_forward_hook(lambda m, args, out, i=i: node_out.__setitem__(i, out)))
    with torch.no_grad():
        outs = efm(feats)
    for h in hooks:
        h.remove()
    return fused, node_out, outs


def test_efm_node_s_fuses_the_max_pooled_backbone_map_of_scale_s_minus_1():
    # Paper §3.2: output scale s assembles backbone s-1 (here Maxout-compressed, then 2x2 max-pooled), s and s+1.
    torch.manual_seed(0)
    efm = EFM(EFM_IN, EFM_WIDTHS).eval()
    feats = _efm_maps()
    fused, node_out, outs = _efm_node_inputs_and_outputs(efm, feats)
    for i, width in enumerate(EFM_WIDTHS):
        finer = feats[i]  # Maxout: output channel g is the max over input channels g, g + width, ...
        compressed = torch.stack([finer[:, g::width].amax(1) for g in range(width)], 1)
        torch.testing.assert_close(fused[i][:, :width], F.max_pool2d(compressed, 2), rtol=0, atol=0)
    # one pixel of the scale s-1 map raised: node s sees it in the one cell pooling it, and the stride-s output moves
    for i in range(len(EFM_WIDTHS)):
        bumped = [f.clone() for f in feats]
        bumped[i][:, :, 5, 2] += 100.0
        fused2, node_out2, outs2 = _efm_node_inputs_and_outputs(efm, bumped)
        moved = (fused2[i] != fused[i]).any(0).any(0).nonzero().tolist()
        assert moved == [[2, 1]], i
        assert not torch.allclose(node_out2[i], node_out[i]), i
        if i == 0:  # the stride-4 map reaches the outputs only through the stride-8 node
            assert not torch.allclose(outs2[0], outs[0])


def test_sam_is_x_times_the_sigmoid_of_its_attention_conv():
    torch.manual_seed(0)
    sam = SpatialAttention(8).eval()
    bn = sam.attn.bn
    with torch.no_grad():  # BatchNorm statistics and affine away from the identity
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2), bn.weight.uniform_(0.5, 2), bn.bias.uniform_(-1, 1)
    x = torch.randn(2, 8, 5, 6)
    with torch.no_grad():
        conv = F.conv2d(x, sam.attn.conv.weight)
        gate = torch.sigmoid((conv - bn.running_mean[:, None, None]) / torch.sqrt(bn.running_var[:, None, None] + bn.eps)
                             * bn.weight[:, None, None] + bn.bias[:, None, None])
        out = sam(x)
        torch.testing.assert_close(out, x * gate)
        assert (out - x).abs().max() > 0.1  # not the identity
        sam.attn.conv.weight.neg_()
        assert (sam(x) - out).abs().max() > 0.1  # the attention is the conv's


def test_efm_sam_applies_attention_to_every_output():
    torch.manual_seed(0)
    with_sam = EFM(EFM_IN, EFM_WIDTHS, sam=True).eval()
    plain = EFM(EFM_IN, EFM_WIDTHS).eval()
    missing, unexpected = plain.load_state_dict(with_sam.state_dict(), strict=False)
    assert not missing and unexpected and all(k.startswith("attention.") for k in unexpected)
    feats = _efm_maps()
    with torch.no_grad():
        for x, y, sam in zip(plain(feats), with_sam(feats), with_sam.attention):
            torch.testing.assert_close(y, x * sam.attn(x))
            assert (y - x).abs().max() > 0.1 * x.abs().max()  # not the identity
