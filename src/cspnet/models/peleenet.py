"""PeleeNet (Wang, Li & Ling, NeurIPS 2018) and CSPPeleeNet (paper §3.1, Tables 1 and 3).

PeleeNet: a stem block, four stages of two-way dense layers (growth 32, 3/4/8/6 layers, bottleneck widths
1/2/4/4 x 16) each ending with a 1x1 transition conv (128/256/512/704, no compression), 2x2 average pools
between stages, post-activation convs. The paper trained it with leaky ReLU (README: "PeleeNet LReLU"),
so ``act`` defaults to ``leaky``.

CSPPeleeNet has no released definition. This one is built from the paper's description (partial dense
block, partial transition, γ = the fraction of base channels that bypass) with the choices that reproduce
the paper's figures (docs/models_design.md): the base map is sliced, the partial transition keeps its
width at full resolution, the transition after the concat runs after the 2x2 pool (so it is the first
layer of the next stage, as csresnet50.cfg's next-stage 1x1). ``fusion="fusion_last"`` drops the
transition after the concat. ``fusion="fusion_first"`` has no partial transition and ends with PeleeNet's
own transition (1x1 at full resolution, then the pool; Table 1 ticks "trans." for it, "partial trans." for
the others), (1 − γ)·T wide: the width that puts Table 1's fusion-first rows on the paper's, not one the
paper states.

Which stages are partial (``csp_stages``) is the one choice on which the paper's figures disagree. The
headline ``csppeleenet`` makes stages 1-3 partial and leaves the last (7x7) one plain: that cuts PeleeNet's
heaviest layer, its first transition, as the paper's Fig. 7 shows. ``csppeleenet_table1`` makes stages
2-4 partial, the one reading with these widths that puts all nine rows of Table 1 within 3% (the
fusion-first rows among them); the γ / fusion ablation is built on it. Both give Table 3's CSPPeleeNet
figures at γ = 0.5.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from ..layers import ConvBnAct, SqueezeExcite, canonical_act
from ..net import StagedNet
from ..registry import ModelSpec, PaperFigures
from ..stage import CrossStage, Fusion, check_fusion, check_part_ratio
from .densenet import DenseBlock


class PeleeStem(nn.Module):
    """3x3/2 conv, then [2x2/2 max-pool | 1x1 -> 3x3/2] concatenated and fused by a 1x1 conv (stride 4)."""

    def __init__(self, in_chs: int, out_chs: int, act: str):
        super().__init__()
        self.stem1 = ConvBnAct(in_chs, out_chs, 3, 2, act=act)
        self.stem2a = ConvBnAct(out_chs, out_chs // 2, 1, act=act)
        self.stem2b = ConvBnAct(out_chs // 2, out_chs, 3, 2, act=act)
        self.pool = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.stem3 = ConvBnAct(2 * out_chs, out_chs, 1, act=act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem1(x)
        return self.stem3(torch.cat([self.pool(x), self.stem2b(self.stem2a(x))], 1))


class TwoWayDenseLayer(nn.Module):
    """PeleeNet's dense layer: two branches of growth/2 features, one 3x3 and one stacked 3x3-3x3 deep.

    ``se=True`` adds squeeze-and-excitation on the layer's new features (the SE PeleeNet variants).
    """

    def __init__(self, in_chs: int, growth_rate: int, mid_chs: int, act: str, se: bool = False):
        super().__init__()
        half = growth_rate // 2
        self.branch1a = ConvBnAct(in_chs, mid_chs, 1, act=act)
        self.branch1b = ConvBnAct(mid_chs, half, 3, act=act)
        self.branch2a = ConvBnAct(in_chs, mid_chs, 1, act=act)
        self.branch2b = ConvBnAct(mid_chs, half, 3, act=act)
        self.branch2c = ConvBnAct(half, half, 3, act=act)
        self.se = SqueezeExcite(growth_rate, act=act) if se else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        new = torch.cat([self.branch1b(self.branch1a(x)), self.branch2c(self.branch2b(self.branch2a(x)))], 1)
        return self.se(new) if self.se is not None else new


@dataclass(frozen=True)
class PeleeNetCfg:
    """PeleeNet's layout; ``fusion``/``part_ratio`` make the stages indexed by ``csp_stages`` CSP stages."""

    depths: tuple[int, ...] = (3, 4, 8, 6)
    bottleneck_widths: tuple[int, ...] = (1, 2, 4, 4)
    transition_chs: tuple[int, ...] = (128, 256, 512, 704)
    growth_rate: int = 32
    stem_chs: int = 32
    act: str = "leaky"
    se: bool = False
    fusion: Fusion = "none"
    part_ratio: float = 0.5
    csp_stages: tuple[int, ...] = (0, 1, 2)


def _make_blocks(cfg: PeleeNetCfg, index: int, act: str):
    mid = cfg.bottleneck_widths[index] * cfg.growth_rate // 2
    g = cfg.growth_rate

    def make_blocks(width: int):
        layers = [TwoWayDenseLayer(width + i * g, g, mid, act, cfg.se) for i in range(cfg.depths[index])]
        return DenseBlock(layers), width + cfg.depths[index] * g

    return make_blocks


def _pool() -> nn.Module:
    return nn.AvgPool2d(2, 2, ceil_mode=True)


def _pelee_stage(cfg: PeleeNetCfg, i: int, in_chs: int, down: nn.Module | None, act: str):
    """Stage ``i``; the transition to run after the next pool (csp); whether the stage ends with a pool."""
    last = i == len(cfg.depths) - 1
    fusion = cfg.fusion if i in cfg.csp_stages else "none"
    make_blocks = _make_blocks(cfg, i, act)
    t_chs = cfg.transition_chs[i]
    if fusion == "none":
        return CrossStage(in_chs, make_blocks, down=down, fusion="none", transition_chs=t_chs, act=act), None, False
    split = dict(down=down, split="slice", part_ratio=cfg.part_ratio, act=act)
    if fusion == "fusion_last":  # the partial transition keeps the dense block's width
        return CrossStage(in_chs, make_blocks, fusion="fusion_last", **split), None, False
    fused = in_chs + cfg.depths[i] * cfg.growth_rate
    if fusion == "fusion_first":  # concat -> 1x1 -> pool, (1 - γ)·T wide
        width = round((1 - cfg.part_ratio) * t_chs)
        conv = ConvBnAct(fused, width, 1, act=act)
        transition = conv if last else nn.Sequential(conv, _pool())
        stage = CrossStage(in_chs, make_blocks, fusion="fusion_first", transition=transition, transition_chs=width, **split)
        return stage, None, not last
    if last:
        return CrossStage(in_chs, make_blocks, fusion="csp", transition_chs=t_chs, **split), None, False
    # csp: transition -> concat -> (pool) -> transition; the second transition opens the next stage.
    return CrossStage(in_chs, make_blocks, fusion="csp", **split), ConvBnAct(fused, t_chs, 1, act=act), False


def build_peleenet(cfg: PeleeNetCfg, *, in_chans: int = 3, **net_kwargs) -> StagedNet:
    """Build PeleeNet (``fusion="none"``) or a CSPPeleeNet variant."""
    check_fusion(cfg.fusion)
    check_part_ratio(cfg.part_ratio)
    n = len(cfg.depths)
    if not (len(cfg.bottleneck_widths) == len(cfg.transition_chs) == n):
        raise ValueError("depths, bottleneck_widths and transition_chs must have one entry per stage")
    if not isinstance(cfg.csp_stages, (tuple, list)) or any(i not in range(n) for i in cfg.csp_stages):
        raise ValueError(f"csp_stages must be stage indices in [0, {n - 1}], got {cfg.csp_stages!r}")
    act = canonical_act(cfg.act)
    stem = PeleeStem(in_chans, cfg.stem_chs, act)
    stages, strides = [], []
    in_chs, pending, pooled = cfg.stem_chs, None, False
    for i in range(n):
        if i == 0 or pooled:  # the 2x2 pool between stages, unless the previous stage ended with it
            down = None
        else:
            down = _pool() if pending is None else nn.Sequential(_pool(), pending)
        stage, pending, pooled = _pelee_stage(cfg, i, in_chs, down, act)
        strides.append((2 if down is not None else 1) * (2 if pooled else 1))
        stages.append(stage)
        in_chs = pending.out_chs if pending is not None else stage.out_chs
    chs = [s.out_chs for s in stages]
    return StagedNet(stem, cfg.stem_chs, 4, stages, chs, strides, in_chans=in_chans, **net_kwargs)


PELEENET = PeleeNetCfg()
CSPPELEENET = PeleeNetCfg(fusion="csp")
CSPPELEENET_TABLE1 = PeleeNetCfg(fusion="csp", csp_stages=(1, 2, 3))

# Paper Table 1 (ImageNet, PeleeNet family): (fusion, γ) -> (top-1 %, BFLOPs). reference/paper.md §3.
# The γ / fusion rows are TABLE1_FAMILY built with ``fusion=`` and ``part_ratio=`` (γ = the bypassing fraction).
TABLE1_FAMILY = "csppeleenet_table1"
PAPER_TABLE1: dict[tuple[str, float | None], tuple[float, float]] = {
    ("none", None): (70.7, 1.017),
    ("fusion_first", 0.75): (68.4, 0.649), ("fusion_first", 0.5): (69.2, 0.755), ("fusion_first", 0.25): (70.0, 0.861),
    ("fusion_last", 0.75): (69.2, 0.716), ("fusion_last", 0.5): (70.6, 0.804), ("fusion_last", 0.25): (70.8, 0.902),
    ("csp", 0.75): (70.4, 0.800), ("csp", 0.5): (70.9, 0.888), ("csp", 0.25): (71.5, 0.986),
}

MODELS = (
    ModelSpec("peleenet", "peleenet", PELEENET, build_peleenet,
              PaperFigures(2.79, 1.017, 224, "paper Table 3", 70.7, bflops_decimals=3), default_input=224,
              description="PeleeNet (leaky ReLU, as the paper trained it)"),
    ModelSpec("peleenet_swish", "peleenet", dataclasses.replace(PELEENET, act="swish"), build_peleenet,
              PaperFigures(2.79, 1.017, 224, "paper Table 3", 71.5, bflops_decimals=3), default_input=224,
              description="PeleeNet with swish"),
    ModelSpec("sepeleenet_swish", "peleenet", dataclasses.replace(PELEENET, act="swish", se=True), build_peleenet,
              PaperFigures(2.81, 1.017, 224, "paper Table 3", 72.1, bflops_decimals=3), default_input=224,
              description="PeleeNet, swish, SE on every dense layer's new features"),
    ModelSpec("csppeleenet", "peleenet", CSPPELEENET, build_peleenet,
              PaperFigures(2.83, 0.888, 224, "paper Table 3", 70.9, bflops_decimals=3), twin="peleenet",
              default_input=224, description="CSPPeleeNet, γ=0.5, designed here (no official cfg)"),
    ModelSpec("csppeleenet_table1", "peleenet", CSPPELEENET_TABLE1, build_peleenet,
              PaperFigures(2.83, 0.888, 224, "paper Table 3", 70.9, bflops_decimals=3), twin="peleenet",
              default_input=224,
              description="CSPPeleeNet with stages 2-4 partial: the paper's Table 1 γ / fusion rows (designed here)"),
    ModelSpec("csppeleenet_swish", "peleenet", dataclasses.replace(CSPPELEENET, act="swish"), build_peleenet,
              PaperFigures(2.83, 0.888, 224, "paper Table 3", 71.7, bflops_decimals=3), twin="peleenet_swish",
              default_input=224, description="CSPPeleeNet with swish"),
    ModelSpec("secsppeleenet_swish", "peleenet", dataclasses.replace(CSPPELEENET, act="swish", se=True),
              build_peleenet, PaperFigures(2.85, 0.888, 224, "paper Table 3", 72.4, bflops_decimals=3),
              twin="sepeleenet_swish", default_input=224, description="CSPPeleeNet, swish, SE"),
)
