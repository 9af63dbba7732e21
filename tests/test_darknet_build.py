"""Networks built from the official cfgs: every cfg runs, the published figures come out, and each
layer computes what Darknet's C code computes (checked against loops written from that code)."""
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import cspnet
from cspnet.darknet import DarknetCfgError, DarknetNet, YoloLayer, build_model, parse_cfg, parse_cfg_text
from cspnet.darknet.info import summarize

CFG_ROOT = Path(__file__).resolve().parents[2] / "shared" / "darknet-cfg"
# Fails to build where Darknet fails too (share_index with unequal inputs); see test_darknet_cfg.py.
BROKEN = {"yolov3-spp-matrix.cfg"}
ALL_CFGS = sorted(p for p in CFG_ROOT.rglob("*.cfg") if p.name not in BROKEN)




def test_all_official_cfgs_are_here():
    assert len(ALL_CFGS) + len(BROKEN) == 57


@pytest.mark.parametrize("path", ALL_CFGS, ids=lambda p: str(p.relative_to(CFG_ROOT)))
def test_every_cfg_runs_with_the_shapes_it_declares(path):
    model = build_model(path, 64).eval()  # 64 = a multiple of 32 every cfg accepts; [net] sizes: see figures test
    x = torch.randn(1, model.in_chans, 64, 64)
    with torch.no_grad():
        outs = model.forward_layers(x, keep=range(len(model.layers)))
    for i, layer in enumerate(model.layers):
        assert tuple(outs[i].shape[1:]) == layer.out_shape, f"layer {i} ({layer.kind}, line {layer.line})"
        assert torch.isfinite(outs[i]).all(), f"layer {i} ({layer.kind}, line {layer.line})"
    if model.yolo_indices:
        assert all(outs[i].shape[1] == 255 for i in model.yolo_indices)  # 3 anchors x (80 COCO classes + 5)
        assert sorted(model.layers[i].stride for i in model.yolo_indices) == [8, 16, 32]
    else:
        assert model.layers[-1].out_shape == (1000, 1, 1)  # an ImageNet classifier


# (cfg, input size, conv-weight params in M, BFLOPs, decimals compared). Figures: the official README
# where it prints them, else the cfg-computed values of reference/paper.md §5.
FIGURES = [
    ("cfg/csdarknet53.cfg", 256, 27.61, 13.07, 2),
    ("cfg/csdarknet53-omega.cfg", 256, 27.61, 13.07, 2),
    ("cfg/darknet53.cfg", 256, 41.57, 18.57, 2),
    ("cfg/csresnet50.cfg", 256, 21.57, 8.97, 2),
    ("cfg/resnet50.cfg", 256, 22.734, 9.999, 3),  # 1000-way conv before the pool (§5)
    ("in-progress/darknet/icfg/resnet50-leaky.cfg", 256, 22.73, 9.74, 2),  # pool first: the README's 9.74
    ("cfg/csresnext50.cfg", 256, 20.50, 7.93, 2),
    ("cfg/resnext50.cfg", 256, 22.19, 10.11, 2),
    ("cfg/csmobilenet-v2.cfg", 224, 2.51, 0.764, 3),
    ("cfg/mobilenet-v2.cfg", 224, 3.47, 0.858, 3),
    ("cfg/enetb0.cfg", 224, 4.81, 0.915, 3),
    ("cfg/darknet.cfg", 256, 7.31, 0.96, 2),
    ("cfg/resnet10.cfg", 256, 5.24, 2.272, 3),  # README 2.273 also counts shortcut adds
    ("cfg/res2netlite72.cfg", 224, 20.922, 5.184, 3),  # README 5.19; §5 computes 5.184
    ("cfg/csdarknet53-elastic.cfg", 256, None, 7.74, 2),
    ("cfg/csresnet50-elastic.cfg", 256, None, 9.36, 2),
    ("cfg/csresnext50-elastic.cfg", 256, None, 5.45, 2),
    ("pytorch-branch/cfg/csresnext50-panet-spp.cfg", 512, 56.853, 71.29, 2),
    ("pytorch-branch/cfg/csresnext50-panet-spp.cfg", 608, 56.853, 100.53, 2),
    ("cfg/csdarknet53-panet-spp.cfg", 512, 64.296, 91.05, 2),
    ("cfg/csresnet50-panet-spp.cfg", 512, 58.257, 74.65, 2),
    ("pytorch-branch/cfg/yolov3-spp.cfg", 608, 62.944, 141.45, 2),
]


@pytest.mark.parametrize("cfg, size, params_m, bflops, decimals", FIGURES, ids=lambda v: str(v))
def test_params_and_bflops_match_the_published_figures(cfg, size, params_m, bflops, decimals):
    with torch.device("meta"):  # the profiler needs shapes only
        model = build_model(CFG_ROOT / cfg, size)
    p = cspnet.profile(model, size)
    if params_m is not None:
        assert round(p.conv_params / 1e6, len(str(params_m).split(".")[1])) == params_m
    assert round(p.bflops, decimals) == bflops
    # README "56.9M / 71.3 BFLOPs" and "62.9M" (detectors) at their printed precision
    if "panet-spp" in cfg and size == 512 and "csresnext50" in cfg:
        assert (round(p.conv_params / 1e6, 1), round(p.bflops, 1)) == (56.9, 71.3)


@pytest.mark.parametrize("path", [p for p in ALL_CFGS if "elastic-panet" not in p.name],
                         ids=lambda p: str(p.relative_to(CFG_ROOT)))
def test_every_cfg_builds_at_its_net_size(path):
    with torch.device("meta"):  # shape inference only; the forward at 64 above checks it against real runs
        model = build_model(path)
    net = parse_cfg(path).net
    assert model.input_size == (net.get_int("height"), net.get_int("width"))
    assert all(min(layer.out_shape) >= 1 for layer in model.layers)


# -- layer semantics against loops transcribed from darknet's C code -----------------------------
NET = "[net]\nwidth={w}\nheight={h}\nchannels={c}\n"


def tiny(text: str, w=7, h=7, c=3) -> DarknetNet:
    return DarknetNet(parse_cfg_text(NET.format(w=w, h=h, c=c) + text, "tiny.cfg")).eval()


def darknet_maxpool(x, size, stride_x, stride_y, pad):
    # forward_maxpool_layer: out = (w + pad - size) / stride + 1, window origin -pad/2, out-of-range = -FLT_MAX
    n, c, h, w = x.shape
    oh, ow = (h + pad - size) // stride_y + 1, (w + pad - size) // stride_x + 1
    out = torch.empty(n, c, oh, ow)
    off = -(pad // 2)
    for i in range(oh):
        for j in range(ow):
            best = torch.full((n, c), float("-inf"))
            for a in range(size):
                for b in range(size):
                    y0, x0 = off + i * stride_y + a, off + j * stride_x + b
                    if 0 <= y0 < h and 0 <= x0 < w:
                        best = torch.maximum(best, x[:, :, y0, x0])
            out[:, :, i, j] = best
    return out


@pytest.mark.parametrize("opts, size, sx, sy, pad", [
    ("size=2\nstride=2", 2, 2, 2, 1),            # resnet stem / darknet.cfg: odd maps round up
    ("size=2\nstride=1", 2, 1, 1, 1),            # yolov3-tiny's same-size 2x2 pool (pad on the right only)
    ("size=3\nstride=2", 3, 2, 2, 2),
    ("size=5\nstride=1", 5, 1, 1, 4),            # SPP
    ("size=3\nstride=2\npadding=0", 3, 2, 2, 0),
    ("size=3\nstride=1\npadding=3", 3, 1, 1, 3),  # odd padding: one more on the right/bottom
    ("size=2\nstride_x=2\nstride_y=1", 2, 2, 1, 1),
])
def test_maxpool_matches_darknet(opts, size, sx, sy, pad):
    model = tiny(f"[maxpool]\n{opts}\n")
    x = torch.randn(2, 3, 7, 7)
    with torch.no_grad():
        y = model(x)
    ref = darknet_maxpool(x, size, sx, sy, pad)
    assert model.layers[0].out_shape == tuple(ref.shape[1:])
    torch.testing.assert_close(y, ref, rtol=0, atol=0)


def test_maxpool_depth_is_maxout_over_channel_groups():
    model = tiny("[maxpool]\nmaxpool_depth=1\nout_channels=2\n", c=6)
    x = torch.randn(1, 6, 7, 7)
    ref = torch.stack([torch.maximum(torch.maximum(x[:, g], x[:, g + 2]), x[:, g + 4]) for g in range(2)], 1)
    torch.testing.assert_close(model(x), ref, rtol=0, atol=0)
    # forward_maxpool_layer: output g is the max over input channels k = g, g + N, ... < C, whole groups or not
    for n in (3, 4, 7):
        model = tiny(f"[maxpool]\nmaxpool_depth=1\nout_channels={n}\n", c=7)
        x = torch.randn(2, 7, 7, 7)
        assert model.layers[0].out_shape == (n, 7, 7)
        torch.testing.assert_close(model(x), torch.stack([x[:, g::n].amax(1) for g in range(n)], 1), rtol=0, atol=0)
    with pytest.raises(DarknetCfgError, match=r"tiny.cfg:7: layer 0 \[maxpool\]: out_channels=8 exceeds the 7 input channels"):
        tiny("[maxpool]\nmaxpool_depth=1\nout_channels=8\n", c=7)


def test_conv_padding_stride_and_default_activation():
    model = tiny(
        "[convolutional]\nfilters=4\nsize=3\nstride=2\npad=1\n"                       # pad=1: size/2 -> 4x4
        "[convolutional]\nfilters=4\nsize=3\nstride=1\nactivation=linear\n"           # no pad -> 2x2
        "[route]\nlayers=0\n[convolutional]\nfilters=4\nsize=1\nstride=1\npadding=1\nactivation=linear\n"  # -> 6x6
        "[route]\nlayers=0\n[convolutional]\nfilters=4\nsize=3\nstride_x=2\nstride_y=1\npad=1\nactivation=linear\n",
    )
    assert [layer.out_shape for layer in model.layers] == [(4, 4, 4), (4, 2, 2), (4, 4, 4), (4, 6, 6), (4, 4, 4), (4, 4, 2)]
    first = model.layers[0]
    assert first.conv.bias is not None and first.bn is None  # no batch_normalize: the conv has a bias
    with torch.no_grad():
        y = first(torch.randn(1, 3, 7, 7) * 10)
    assert (y > 0).all() and (y < 1).all()  # darknet's default conv activation is logistic


def test_dilated_conv_pads_by_padding_times_dilation(tmp_path):
    text = ("[convolutional]\nfilters=2\nsize=3\nstride=2\npad=1\ndilation=2\nactivation=linear\n"
            "[convolutional]\nfilters=2\nsize=1\ndilation=3\nactivation=linear\n")  # 1x1: dilation ignored
    model = tiny(text, w=9, h=9)
    conv = model.layers[0].conv
    assert [layer.out_shape for layer in model.layers] == [(2, 5, 5), (2, 5, 5)] and model.layers[1].conv.dilation == (1, 1)
    # im2col_cpu_ext with dilation 2 and padding 1 * 2 is an undilated 5x5 conv (zeros between the taps) padded by 2
    spread = torch.zeros(2, 3, 5, 5)
    spread[:, :, ::2, ::2] = conv.weight.detach()
    x = torch.randn(1, 3, 9, 9)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_layers(x, keep=[0])[0], F.conv2d(x, spread, conv.bias, 2, 2))
    (tmp_path / "d.cfg").write_text(NET.format(w=9, h=9, c=3) + text)
    assert [row.detail.split() for row in summarize(tmp_path / "d.cfg")[0]] == [["2", "3", "x", "3/", "2", "d2"],
                                                                               ["2", "1", "x", "1/", "1"]]
    with pytest.raises(DarknetCfgError, match=r"tiny.cfg:9: layer 0 \[convolutional\]: dilation=2 needs padding \(size - 1\) / 2"):
        tiny("[convolutional]\nfilters=2\nsize=3\npadding=0\ndilation=2\n")


def test_batchnorm_uses_darknet_eps_and_rolling_stats():
    model = tiny("[convolutional]\nfilters=2\nsize=1\nbatch_normalize=1\nactivation=linear\n", c=1)
    layer = model.layers[0]
    with torch.no_grad():
        layer.conv.weight.fill_(1.0)
        layer.bn.weight.copy_(torch.tensor([2.0, 3.0]))
        layer.bn.bias.copy_(torch.tensor([0.5, -1.0]))
        layer.bn.running_mean.copy_(torch.tensor([1.0, 2.0]))
        layer.bn.running_var.copy_(torch.tensor([4.0, 0.0]))
    x = torch.full((1, 1, 7, 7), 3.0)
    y = model(x)[0, :, 0, 0]
    # darknet normalize_cpu + scale_bias + add_bias: (x - mean) / sqrt(var + .00001) * scale + bias
    expected = torch.tensor([(3 - 1) / (4 + 1e-5) ** 0.5 * 2 + 0.5, (3 - 2) / (0 + 1e-5) ** 0.5 * 3 - 1.0])
    torch.testing.assert_close(y, expected)


def test_route_groups_take_group_of_each_listed_layer():
    model = tiny("[convolutional]\nfilters=4\nsize=1\n[convolutional]\nfilters=6\nsize=1\n"
                 "[route]\nlayers=-2,-1\ngroups=2\ngroup_id=1\n")
    x = torch.randn(1, 3, 7, 7)
    outs = model.forward_layers(x, keep=[0, 1, 2])
    # forward_route_layer copies input_size/groups values from offset group_id*input_size/groups of each input
    torch.testing.assert_close(outs[2], torch.cat([outs[0][:, 2:4], outs[1][:, 3:6]], 1), rtol=0, atol=0)
    assert model.layers[2].out_shape == (5, 7, 7)


def test_shortcut_is_darknets_partial_and_subsampled_add():
    model = tiny(
        "[convolutional]\nfilters=6\nsize=1\nactivation=linear\n"                  # 0: 6x8x8
        "[convolutional]\nfilters=4\nsize=1\nstride=2\nactivation=linear\n"        # 1: 4x4x4
        "[shortcut]\nfrom=0\nactivation=leaky\n"                                   # 2: add 0 subsampled, 4 of 6 channels
        "[convolutional]\nfilters=8\nsize=1\nactivation=linear\n"                  # 3: 8x4x4
        "[shortcut]\nfrom=1\n",                                                    # 4: add the 4-channel map into 8
        w=8, h=8)
    outs = model.forward_layers(torch.randn(2, 3, 8, 8), keep=range(5))
    # shortcut_cpu: out[k, j*sample, i*sample] += add[k, j*stride, i*stride] over min(c) channels
    added = outs[1] + outs[0][:, :4, ::2, ::2]
    torch.testing.assert_close(outs[2], torch.where(added > 0, added, 0.1 * added))
    ref = outs[3].clone()
    ref[:, :4] += outs[1]
    torch.testing.assert_close(outs[4], ref)


def test_a_layer_that_cannot_run_at_another_input_size_names_its_cfg_line():
    # a padded 3x3/2 conv rounds 8 -> 4 and 7 -> 4, an unpadded 2x2/2 maxpool 8 -> 4 but 7 -> 3: their route
    # fits the 8x8 the shapes were checked at only
    model = tiny("[convolutional]\nfilters=2\nsize=1\n"                               # 0, line 5
                 "[convolutional]\nfilters=2\nsize=3\nstride=2\npad=1\n"              # 1, line 8
                 "[route]\nlayers=-2\n"                                               # 2, line 13
                 "[maxpool]\nsize=2\nstride=2\npadding=0\n"                          # 3, line 15
                 "[route]\nlayers=-1,-3\n", w=8, h=8)                                 # 4, line 19
    assert model(torch.randn(1, 3, 8, 8)).shape == (1, 4, 4, 4)
    with pytest.raises(RuntimeError, match=r"^tiny.cfg:19: layer 4 \[route\] cannot run on layer 3 2x3x3, layer 1 2x4x4 "
                       r"at input 7x7 \(shapes were checked at 8x8; build_model\(cfg, input_size\) checks another size\): "
                       r"Sizes of tensors must match"):
        model(torch.randn(1, 3, 7, 7))
    # out of memory is no shape error: it passes as torch raised it
    model.layers[4].register_forward_pre_hook(lambda *_: (_ for _ in ()).throw(torch.OutOfMemoryError("no memory")))
    for size in (8, 7):
        with pytest.raises(torch.OutOfMemoryError, match="^no memory$"):
            model(torch.randn(1, 3, size, size))
    model.layers[4]._forward_pre_hooks.clear()  # the CPU allocator's failure is a plain RuntimeError
    model.layers[4].register_forward_pre_hook(lambda *_: (_ for _ in ()).throw(RuntimeError("DefaultCPUAllocator: can't allocate memory")))
    with pytest.raises(RuntimeError, match="^DefaultCPUAllocator"):
        model(torch.randn(1, 3, 7, 7))


def test_connected_upsample_scale_channels_and_sam():
    model = tiny(
        "[convolutional]\nfilters=4\nsize=1\nactivation=linear\n"      # 0: 4x2x2
        "[avgpool]\n"                                                   # 1: 4x1x1
        "[scale_channels]\nfrom=0\n"                                    # 2: map 0 scaled per channel
        "[sam]\nfrom=0\n"                                               # 3: map 0 x map 2
        "[upsample]\nstride=2\nscale=0.5\n"                             # 4: 4x4x4
        "[connected]\noutput=5\nactivation=linear\n"                    # 5: 5x1x1
        "[connected]\noutput=3\nbatch_normalize=1\nactivation=relu\n",  # 6: 3x1x1
        w=2, h=2)
    with torch.no_grad():
        for bn in (model.layers[6].bn,):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 3, 2, 2)
    outs = model.forward_layers(x, keep=range(7))
    o = outs
    torch.testing.assert_close(o[2], o[0] * o[1])
    torch.testing.assert_close(o[3], o[0] * o[2])
    torch.testing.assert_close(o[4], 0.5 * o[3].repeat_interleave(2, 2).repeat_interleave(2, 3))
    fc5 = model.layers[5].fc
    torch.testing.assert_close(o[5][:, :, 0, 0], o[4].flatten(1) @ fc5.weight.T + fc5.bias)
    fc6, bn6 = model.layers[6].fc, model.layers[6].bn
    pre = o[5].flatten(1) @ fc6.weight.T
    ref = torch.relu((pre - bn6.running_mean) / (bn6.running_var + 1e-5).sqrt() * bn6.weight + bn6.bias)
    torch.testing.assert_close(model(x), ref)


def test_dropout_softmax_cost_pass_logits_in_eval():
    model = tiny("[convolutional]\nfilters=10\nsize=1\n[avgpool]\n[dropout]\nprobability=.5\n[softmax]\ngroups=1\n[cost]\n")
    x = torch.randn(3, 3, 7, 7)
    outs = model.forward_layers(x, keep=[1])
    torch.testing.assert_close(model(x), outs[1].flatten(1), rtol=0, atol=0)
    assert model.train()(x).shape == (3, 10)


def test_yolo_layers_expose_anchors_mask_and_settings():
    with torch.device("meta"):
        model = build_model(CFG_ROOT / "cfg" / "csresnext50-panet-spp-original-optimal.cfg").eval()
        outs = model(torch.zeros(2, 3, 512, 512))
    assert [tuple(t.shape) for t in outs] == [(2, 255, 64, 64), (2, 255, 32, 32), (2, 255, 16, 16)]
    yolos = [model.layers[i] for i in model.yolo_indices]
    assert all(isinstance(y, YoloLayer) for y in yolos)
    assert [y.mask for y in yolos] == [(0, 1, 2), (3, 4, 5), (6, 7, 8)]
    assert yolos[0].anchors == ((12, 16), (19, 36), (40, 28)) and yolos[2].anchors == ((142, 110), (192, 243), (459, 401))
    assert len(yolos[0].all_anchors) == 9
    assert [y.stride for y in yolos] == [8, 16, 32]  # 512 / 64, 512 / 32, 512 / 16
    y = yolos[0]
    assert (y.num_classes, y.scale_x_y, y.iou_loss, y.iou_normalizer, y.nms_kind) == (80, 1.2, "ciou", 0.07, "greedynms")
    assert (y.ignore_thresh, y.truth_thresh, y.iou_thresh, y.jitter) == (0.7, 1.0, 0.213, 0.3)
    assert y.options["uc_normalizer"] == "0.07"


def test_trains_end_to_end_through_every_layer_kind():
    model = tiny(
        "[convolutional]\nfilters=8\nsize=3\npad=1\nbatch_normalize=1\nactivation=mish\n"   # 0
        "[route]\nlayers=-1\ngroups=2\ngroup_id=1\n"                                        # 1: 4 ch
        "[convolutional]\nfilters=8\nsize=3\nstride=2\npad=1\nbatch_normalize=1\nactivation=swish\n"  # 2: 8x4x4
        "[shortcut]\nfrom=0\nactivation=leaky\n"                                             # 3
        "[avgpool]\n[convolutional]\nfilters=8\nsize=1\nactivation=logistic\n"              # 4, 5
        "[scale_channels]\nfrom=3\n"                                                         # 6
        "[convolutional]\nfilters=8\nsize=1\nactivation=logistic\n[sam]\nfrom=6\n"          # 7, 8
        "[maxpool]\nsize=2\nstride=1\n[upsample]\nstride=2\n"                              # 9, 10: 8x8x8
        "[route]\nlayers=-1,0\n[dropout]\nprobability=0.1\n"                                # 11, 12
        "[convolutional]\nfilters=14\nsize=1\nactivation=linear\n"                          # 13
        "[yolo]\nmask=0,1\nanchors=1,2,3,4,5,6\nnum=3\nclasses=2\n",                        # 14
        w=8, h=8).train()
    out = model(torch.randn(2, 3, 8, 8))
    assert isinstance(out, list) and out[0].shape == (2, 14, 8, 8)
    out[0].square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    assert model.layers[14].stride == 1 and model.layers[14].anchors == ((1, 2), (3, 4))


def test_yolo_stride_is_the_x_stride_when_the_strides_differ():
    # YoloLayer.stride is documented as input pixels per cell along x (width); stride_hw is (y, x).
    # A 1x1 conv with stride_x=4, stride_y=2 maps 64x64 to h = 63 // 2 + 1 = 32, w = 63 // 4 + 1 = 16:
    # 64 / 32 = 2 along y, 64 / 16 = 4 along x. One mask entry and 2 classes need 1 * (2 + 5) = 7 filters.
    model = tiny(
        "[convolutional]\nfilters=7\nsize=1\nstride_x=4\nstride_y=2\nactivation=linear\n"
        "[yolo]\nmask=0\nanchors=10,13\nnum=1\nclasses=2\n",
        w=64, h=64,
    )
    yolo = model.layers[1]
    assert isinstance(yolo, YoloLayer) and model.layers[0].out_shape == (7, 32, 16)
    assert yolo.stride_hw == (2, 4) and yolo.stride == 4
