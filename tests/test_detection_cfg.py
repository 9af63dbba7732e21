"""Native PANet-SPP detectors against the official Darknet cfgs: weights, BFLOPs and outputs.

Numbers we did not choose: the conv-weight counts and BFLOPs computed from the cfgs (paper.md §5
table; paper Table 4 prints 56.9M / 71.3 at 512 and 100.6 at 608 for CSPResNeXt50-PANet-SPP), and
the outputs of the cfg built layer by layer by `cspnet.darknet` (an independent reading of the cfg).
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
    darknet = build_model(CFG_ROOT / cfg, input_size=64)
    g = torch.Generator().manual_seed(0)
    for m in darknet.modules():
        if isinstance(m, torch.nn.BatchNorm2d):  # non-trivial BN statistics
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) * 0.2 - 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    if backbone == "cspresnext50":  # through a real .weights file, as an official one would be read
        det.load_darknet_weights(write_weights(darknet, tmp_path / "csresnext50-panet-spp.weights"))
    else:
        copy_records(darknet.weight_records(), det.darknet_records())
    darknet.eval()
    det.eval()
    x = torch.rand(1, 3, 64, 64, generator=g)
    with torch.no_grad():
        expect, got = darknet(x), det.forward_raw(x)
    assert [tuple(t.shape) for t in got] == [(1, 255, 8, 8), (1, 255, 4, 4), (1, 255, 2, 2)]
    for e, o in zip(expect, got):
        assert e.abs().max() > 0
        torch.testing.assert_close(o, e, rtol=1e-4, atol=1e-4)
