"""Native PANet-SPP detectors against the official Darknet cfgs: weights, BFLOPs and outputs.

Numbers we did not choose: the conv-weight counts and BFLOPs computed from the cfgs (paper.md §5
table; paper Table 4 prints 56.9M / 71.3 at 512 and 100.6 at 608 for CSPResNeXt50-PANet-SPP), and
the outputs of the cfg built layer by layer by `cspnet.darknet` (an independent reading of the cfg),
with weights that carry the image to the outputs (`randomize`), compared relative to their scale.
"""
from pathlib import Path

import pytest
import torch

from cspnet import profile
from cspnet.darknet.build import build_model
from cspnet.darknet.mapping import copy_records
from cspnet.darknet.weights import write_weights
from cspnet.detection import create_detector

CFG_ROOT = Path(__file__).resolve().parents[2] / "shared" / "darknet-cfg" / "cfg"
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
    ("cspresnext50", "csresnext50-panet-spp.cfg", 56_853_440, 71.291),
    ("cspdarknet53", "csdarknet53-panet-spp.cfg", 64_296_032, 91.046),
    ("cspresnet50", "csresnet50-panet-spp.cfg", 58_256_832, 74.647),
]


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
