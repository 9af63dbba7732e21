"""Native PANet-SPP and YOLOv3-SPP detectors against the official Darknet cfgs: weights, BFLOPs and outputs.

Numbers we did not choose: the conv-weight counts and BFLOPs computed from the cfgs (paper.md §5
table; paper Table 4 prints 56.9M / 71.3 at 512 and 100.6 at 608 for CSPResNeXt50-PANet-SPP; the
pytorch-branch README the BFLOPs of the -YOLO-SPP models, paper.md §2.3), and
the outputs of the cfg built layer by layer by `cspnet.darknet` (an independent reading of the cfg),
with weights that carry the image to the outputs (`randomize`), compared relative to their scale.
"""
from pathlib import Path

import pytest
import torch

from cspnet import profile
from cspnet.darknet.build import build_model
from cspnet.darknet.mapping import copy_records
from cspnet.darknet.weights import DarknetWeightsError, write_weights
from cspnet.detection import create_detector
from cspnet.models.darknet import CSPDARKNET53, DarkStageCfg

CFG_ROOT = Path(__file__).resolve().parents[2] / "shared" / "darknet-cfg"
# 6 x 6 cells at stride 32, so that the SPP block's 5 / 9 / 13 max-pools give three different maps
# (at 64, a 2 x 2 map, all three are its maximum and their order in the concat cannot be seen).
SIZE = 192


def randomize(darknet: torch.nn.Module, g: torch.Generator) -> None:
    """He-scaled conv weights and random BatchNorm terms and statistics.

    With PyTorch's default init (and BN in eval) the signal dies over the 100+ layers: the YOLO
    inputs are then almost only the prediction biases, and a miswired neck (an SPP concat in the
    wrong order) matched the cfg within any absolute tolerance.
    """
    with torch.no_grad():
        for m in darknet.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.weight.normal_(0.0, (2.0 / m.weight[0].numel()) ** 0.5, generator=g)
            elif isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.uniform_(-0.1, 0.1, generator=g)
                m.running_mean.uniform_(-0.1, 0.1, generator=g)
                m.running_var.uniform_(0.5, 1.5, generator=g)


def assert_same_outputs(darknet: torch.nn.Module, det: torch.nn.Module, x: torch.Tensor) -> None:
    """The cfg's YOLO inputs and the detector's raw head maps agree to a tolerance relative to their
    scale (residual sums make it grow with depth), for a batch of two images that give different maps."""
    darknet.eval()
    det.eval()
    with torch.no_grad():
        expect, got = darknet(x), det.forward_raw(x)
    # finest first, as the detector's: the PANet cfgs list their YOLO layers so, the YOLOv3 ones coarsest first
    expect = sorted(expect, key=lambda t: -t.shape[-1])
    n, _, h, w = x.shape
    assert [tuple(t.shape) for t in got] == [(n, 255, h // s, w // s) for s in det.strides]
    for e, o in zip(expect, got):
        scale = e.abs().max()
        assert (e[0] - e[1]).abs().max() > 0.01 * scale  # the image reaches the outputs
        torch.testing.assert_close(o / scale, e / scale, rtol=0, atol=1e-5)


# backbone, cfg, conv weights, BFLOPs at 512 (computed from the cfg)
NATIVE = [
    ("cspresnext50", "cfg/csresnext50-panet-spp.cfg", 56_853_440, 71.291),
    ("cspdarknet53", "cfg/csdarknet53-panet-spp.cfg", 64_296_032, 91.046),
    ("cspresnet50", "cfg/csresnet50-panet-spp.cfg", 58_256_832, 74.647),
    ("cspresnet50_elastic", "in-progress/csresnet50-elastic-panet-spp.cfg", 66_485_696, 76.224),
]


def test_detector_refuses_darknet_weights_named_for_another_backbone(tmp_path):
    # the leaky detector's weights have the Mish detector's shapes: they would load and compute something else
    det = create_detector("cspdarknet53_omega", "panet", num_classes=80)
    with pytest.raises(DarknetWeightsError, match="named for csdarknet53.cfg.*'cspdarknet53'"):
        det.load_darknet_weights(tmp_path / "csdarknet53-panet-spp.weights")


@pytest.mark.slow
@pytest.mark.parametrize("backbone, cfg, conv_params, bflops", NATIVE)
def test_native_panet_spp_matches_official_cfg(backbone, cfg, conv_params, bflops, tmp_path):
    det = create_detector(backbone, "panet", num_classes=80)
    prof = profile(det, 512)
    assert prof.conv_params == conv_params
    assert prof.bflops == pytest.approx(bflops, abs=5e-4)
    if backbone == "cspresnext50":  # paper Table 4, printed rounded
        assert round(prof.conv_params / 1e6, 1) == 56.9 and round(prof.bflops, 1) == 71.3
        # conv layers; Darknet's total, paper Table 4's 100.6, adds maxpools and shortcuts (test_darknet_cli)
        assert round(profile(det, 608).bflops, 2) == 100.53

    # The same weights in the cfg built by cspnet.darknet give the same three YOLO inputs: the neck
    # and head are the cfg's, layer for layer, and `darknet_records` is the .weights order.
    darknet = build_model(CFG_ROOT / cfg, input_size=SIZE)
    g = torch.Generator().manual_seed(0)
    randomize(darknet, g)
    if backbone == "cspresnext50":  # through a real .weights file, as an official one would be read
        det.load_darknet_weights(write_weights(darknet, tmp_path / "csresnext50-panet-spp.weights"))
    else:
        copy_records(darknet.weight_records(), det.darknet_records())
    assert_same_outputs(darknet, det, torch.rand(2, 3, SIZE, SIZE, generator=g))


# pytorch-branch/cfg/csdarknet53-yolo-spp.cfg lays stage 1 out as the later stages (32-ch parts, a
# 32-ch block without bottleneck), not as csdarknet53.cfg does (64-ch parts, a 64 -> 32 -> 64 block)
PYTORCH_BRANCH_CSPDARKNET53 = {"stages": (DarkStageCfg(1, 64, 32, 1.0, cross_chs=32),) + CSPDARKNET53.stages[1:]}

# The top-down necks. yolov3: YOLOv3's path (``[route] layers=-1, <backbone>``: no lateral conv, the
# upsampled map first); fpn: the -fpn-spp cfg's (a 1x1 lateral conv, concat [lateral, up]).
# backbone, its config overrides, neck, cfg, conv weights and BFLOPs at 512 (computed from the cfg),
# the pytorch-branch README's BFLOPs at 512 (paper.md §2.3; it has none for the csresnext50 cfgs,
# only for the csresnext50c ones)
TOP_DOWN = [
    ("darknet53", {}, "yolov3", "pytorch-branch/cfg/yolov3-spp.cfg", 62_944_352, 100.307, 100.343),
    ("cspdarknet53", PYTORCH_BRANCH_CSPDARKNET53, "yolov3", "pytorch-branch/cfg/csdarknet53-yolo-spp.cfg",
     48_955_488, 75.477, 75.513),
    ("cspresnext50", {}, "yolov3", "in-progress/csresnext50-yolo-spp.cfg", 41_534_400, 58.540, None),
    ("cspresnext50", {}, "fpn", "in-progress/csresnext50-fpn-spp.cfg", 41_616_320, 58.809, None),
]


@pytest.mark.slow
@pytest.mark.parametrize("backbone, backbone_kwargs, neck, cfg, conv_params, bflops, readme_bflops", TOP_DOWN,
                         ids=[Path(row[3]).stem for row in TOP_DOWN])
def test_native_top_down_necks_match_official_cfgs(backbone, backbone_kwargs, neck, cfg, conv_params, bflops,
                                                   readme_bflops, tmp_path):
    # neck "yolov3" needs Detector to know it (DEFAULT_WIDTH, cfg_layer_order)
    det = create_detector(backbone, neck, num_classes=80, backbone_kwargs=backbone_kwargs)
    prof = profile(det, 512)
    assert prof.conv_params == conv_params
    assert prof.bflops == pytest.approx(bflops, abs=5e-4)
    if readme_bflops is not None:  # the README's BFLOPs are 0.036-0.040 above the cfgs' conv BFLOPs (paper.md §2.3)
        assert 0.035 < readme_bflops - prof.bflops < 0.041
    if backbone == "darknet53":  # paper Table 4, YOLOv3 (SPP): 62.9M
        assert round(prof.conv_params / 1e6, 1) == 62.9

    darknet = build_model(CFG_ROOT / cfg, input_size=SIZE)
    g = torch.Generator().manual_seed(0)
    randomize(darknet, g)
    if backbone == "darknet53":  # through a real .weights file, as the official yolov3-spp.weights would be read
        det.load_darknet_weights(write_weights(darknet, tmp_path / "yolov3-spp.weights"))
    else:
        copy_records(darknet.weight_records(), det.darknet_records())
    assert_same_outputs(darknet, det, torch.rand(2, 3, SIZE, SIZE, generator=g))
