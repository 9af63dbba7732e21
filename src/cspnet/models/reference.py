"""The paper's small "Reference" models: CSPDenseNet Ref., CSPPeleeNet Ref. and their "b" forms.

The paper never defines them; they sit beside the Darknet Reference model (``darknet.cfg``: 7.31M conv
weights, 0.96 BFLOPs at 256x256) and serve as the backbones of the paper's fastest detectors. They are
designed here as CSP networks on the Darknet Reference *budget and shape*: 256x256 input and a total stride
of 64 (five stages after a stride-4 stem, as darknet.cfg's six 2x2 max-pools), so the widest layers run at
4x4 where parameters are cheap in computation. CSPDenseNet Ref. uses `cspnet.models.densenet` stages (γ = 0.5,
no transition compression, leaky ReLU), CSPPeleeNet Ref. `cspnet.models.peleenet` stages (CSP in all but the
last stage). Depths and widths were chosen to land on the README's params / BFLOPs; the gaps are in
docs/models_design.md.
"""
from __future__ import annotations

from ..registry import ModelSpec, PaperFigures
from .densenet import DenseNetCfg, build_densenet
from .peleenet import PeleeNetCfg, build_peleenet


def _dense_ref(depths: tuple[int, ...]) -> DenseNetCfg:
    return DenseNetCfg(depths, growth_rate=32, stem_chs=16, compression=1.0, act="leaky", fusion="csp", part_ratio=0.5)


CSPDENSENET_REF = _dense_ref((1, 2, 4, 5, 14))
CSPDENSENETB_REF = _dense_ref((1, 1, 2, 4, 5))
CSPPELEENET_REF = PeleeNetCfg(
    depths=(3, 4, 7, 6, 5), bottleneck_widths=(1, 2, 4, 4, 4), transition_chs=(128, 256, 512, 512, 1024),
    fusion="csp", csp_stages=(0, 1, 2, 3),
)
CSPPELEENETB_REF = PeleeNetCfg(
    depths=(3, 5, 6, 4, 4), bottleneck_widths=(1, 2, 4, 4, 4), transition_chs=(64, 128, 256, 384, 512),
    fusion="csp", csp_stages=(0, 1, 2, 3),
)

_SRC = "repo README (designed here)"
MODELS = (
    ModelSpec("cspdensenet_ref", "reference", CSPDENSENET_REF, build_densenet,
              PaperFigures(3.48, 0.886, 256, _SRC, 65.7, bflops_decimals=3), twin="darknet_ref",
              description="CSPDenseNet Reference: stride 64, 5 partial dense stages (1-2-4-5-14), k=32"),
    ModelSpec("cspdensenetb_ref", "reference", CSPDENSENETB_REF, build_densenet,
              PaperFigures(1.38, 0.631, 256, _SRC, 64.2, bflops_decimals=3), twin="darknet_ref",
              description="CSPDenseNetb Reference: stride 64, 5 partial dense stages (1-1-2-4-5), k=32"),
    ModelSpec("csppeleenet_ref", "reference", CSPPELEENET_REF, build_peleenet,
              PaperFigures(4.10, 1.103, 256, _SRC, 68.9, bflops_decimals=3), twin="darknet_ref",
              description="CSPPeleeNet Reference: stride 64, two-way dense stages 3-4-7-6-5, last stage plain"),
    ModelSpec("csppeleenetb_ref", "reference", CSPPELEENETB_REF, build_peleenet,
              PaperFigures(2.01, 0.897, 256, _SRC, 67.8, bflops_decimals=3), twin="darknet_ref",
              description="CSPPeleeNetb Reference: stride 64, two-way dense stages 3-5-6-4-4, last stage plain"),
)
