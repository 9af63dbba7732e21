"""The CSP models exactly as timm builds them, so that timm's ImageNet weights load unchanged.

timm's ``cspnet.py`` departs from the official Darknet cfgs (docs/interop.md lists every
difference): each CSP stage computes its base map with **one** 1x1 expansion conv and slices
it in two, the expansion conv of the ResNe(X)t stages is linear, the first stage of
cspresnet50/cspresnext50 is twice as wide and has full residuals, the stem pools 3x3/2, and the
activation is PyTorch's LeakyReLU (slope 0.01, not Darknet's 0.1). These configs mirror timm's
``CspStagesCfg`` fields and build the stages from the shared `CrossStage` and blocks:
``base`` = the expansion conv, ``split="slice"`` = timm's ``x.split(exp_chs // 2)``.

Only the concat order differs in form: timm concatenates ``[cross, blocks]``, `CrossStage`
``[blocks, cross]``; the converter (`cspnet.interop.timm`) swaps the input halves of the
transition conv, which gives the same function.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from torch import nn

from ..blocks import DarkBlock, ResidualBlock, repeat_blocks
from ..layers import ConvBnAct, canonical_act
from ..net import StageDilation, StagedNet, dilate_stages
from ..registry import ModelSpec
from ..stage import CrossStage
from .darknet import DARKNET53, build_darknet

TIMM_ACT = "leaky_0.01"  # timm's act_layer='leaky_relu' is nn.LeakyReLU() with the default slope


@dataclass(frozen=True)
class TimmStageCfg:
    """One timm ``CrossStage`` (timm's field names).

    ``expand_ratio``: the expansion conv's width is ``out_chs * expand_ratio``; it is sliced in
    half. ``block_ratio``: the blocks' width is ``out_chs * block_ratio``. ``bottle_ratio``: the
    blocks' inner width relative to theirs. ``down_growth``: the 3x3 stride-2 conv widens to
    ``out_chs`` (else it keeps the input width).
    """

    depth: int
    out_chs: int
    stride: int
    expand_ratio: float
    block_ratio: float
    bottle_ratio: float
    groups: int = 1
    down_growth: bool = False


@dataclass(frozen=True)
class TimmCspCfg:
    """A timm CSP model: stem conv (+ optional 3x3/2 max-pool), then CSP stages."""

    stages: tuple[TimmStageCfg, ...]
    block: Literal["bottleneck", "dark"]
    stem_chs: int
    stem_kernel: int
    stem_stride: int
    stem_pool: bool
    cross_linear: bool  # no activation on the expansion conv
    act: str = TIMM_ACT


def _stage(cfg: TimmCspCfg, s: TimmStageCfg, in_chs: int, act: str, d: StageDilation) -> CrossStage:
    if s.stride != 1:
        down_chs = s.out_chs if s.down_growth else in_chs
        down = ConvBnAct(in_chs, down_chs, 3, d.stride, groups=s.groups, act=act, dilation=d.first_dilation)
    else:
        down, down_chs = None, in_chs
    exp_chs = int(round(s.out_chs * s.expand_ratio))
    base = ConvBnAct(down_chs, exp_chs, 1, act="linear" if cfg.cross_linear else act)
    block_chs = int(round(s.out_chs * s.block_ratio))
    mid_chs = int(round(block_chs * s.bottle_ratio))

    def make_block(c: int, i: int) -> nn.Module:
        if cfg.block == "bottleneck":
            return ResidualBlock(c, mid_chs, block_chs, 1, s.groups, act, dilation=d.dilation)
        return DarkBlock(c, mid_chs, block_chs, act, d.dilation)

    def make_blocks(width: int):
        return repeat_blocks(make_block, width, block_chs, s.depth)

    return CrossStage(
        exp_chs, make_blocks, down=down, base=base, fusion="csp", split="slice", part_ratio=0.5,
        partial_transition_chs=exp_chs // 2, transition_chs=s.out_chs, act=act,
    )


def build_timm_csp(cfg: TimmCspCfg, *, in_chans: int = 3, output_stride: int | None = None, **net_kwargs) -> StagedNet:
    """Build a `StagedNet` with timm's CSP layout (see the module docstring)."""
    if cfg.block not in ("bottleneck", "dark"):
        raise ValueError(f"block must be 'bottleneck' or 'dark', got {cfg.block!r}")
    act = canonical_act(cfg.act)
    stem: nn.Module = ConvBnAct(in_chans, cfg.stem_chs, cfg.stem_kernel, cfg.stem_stride, act=act)
    if cfg.stem_pool:
        stem = nn.Sequential(stem, nn.MaxPool2d(3, 2, 1))
    stem_stride = cfg.stem_stride * (2 if cfg.stem_pool else 1)
    dilations = dilate_stages(stem_stride, [s.stride for s in cfg.stages], output_stride)
    stages, chs = [], []
    in_chs = cfg.stem_chs
    for s, d in zip(cfg.stages, dilations):
        stages.append(_stage(cfg, s, in_chs, act, d))
        chs.append(s.out_chs)
        in_chs = s.out_chs
    return StagedNet(stem, cfg.stem_chs, stem_stride, stages, chs, [d.stride for d in dilations], in_chans=in_chans,
                     output_stride=output_stride, **net_kwargs)


def _stages(depths, out_chs, strides, expand, block, bottle, groups=1, down_growth=False) -> tuple[TimmStageCfg, ...]:
    """Per-stage configs from timm-style arguments: a tuple gives one value per stage, a scalar all."""
    n = len(depths)

    def per_stage(v):
        return v if isinstance(v, tuple) else (v,) * n

    return tuple(
        TimmStageCfg(d, c, st, e, b, bt, groups, down_growth)
        for d, c, st, e, b, bt in zip(depths, out_chs, per_stage(strides), per_stage(expand), per_stage(block), per_stage(bottle))
    )


# The model_cfgs of timm/models/cspnet.py (timm 1.0.31), stage arguments after timm's padding to tuples.
CSPRESNET50_TIMM = TimmCspCfg(
    _stages((3, 3, 5, 2), (128, 256, 512, 1024), (1, 2, 2, 2), expand=2.0, block=1.0, bottle=0.5),
    block="bottleneck", stem_chs=64, stem_kernel=7, stem_stride=2, stem_pool=True, cross_linear=True,
)
CSPRESNEXT50_TIMM = TimmCspCfg(
    _stages((3, 3, 5, 2), (256, 512, 1024, 2048), (1, 2, 2, 2), expand=1.0, block=0.5, bottle=1.0, groups=32),
    block="bottleneck", stem_chs=64, stem_kernel=7, stem_stride=2, stem_pool=True, cross_linear=True,
)
CSPDARKNET53_TIMM = TimmCspCfg(
    _stages((1, 2, 8, 8, 4), (64, 128, 256, 512, 1024), 2, expand=(2.0, 1.0, 1.0, 1.0, 1.0),
            block=(1.0, 0.5, 0.5, 0.5, 0.5), bottle=(0.5, 1.0, 1.0, 1.0, 1.0), down_growth=True),
    block="dark", stem_chs=32, stem_kernel=3, stem_stride=1, stem_pool=False, cross_linear=False,
)
# timm's darknet53 is darknet53.cfg layer for layer; only the activation slope differs.
DARKNET53_TIMM = dataclasses.replace(DARKNET53, act=TIMM_ACT)

MODELS = (
    ModelSpec("cspresnet50_timm", "timm", CSPRESNET50_TIMM, build_timm_csp,
              description="CSPResNet-50 laid out as timm's cspresnet50 (takes its weights)"),
    ModelSpec("cspresnext50_timm", "timm", CSPRESNEXT50_TIMM, build_timm_csp,
              description="CSPResNeXt-50 laid out as timm's cspresnext50 (takes its weights)"),
    ModelSpec("cspdarknet53_timm", "timm", CSPDARKNET53_TIMM, build_timm_csp, twin="darknet53_timm",
              description="CSPDarknet-53 laid out as timm's cspdarknet53 (takes its weights)"),
    ModelSpec("darknet53_timm", "timm", DARKNET53_TIMM, build_darknet,
              description="Darknet-53 with timm's activation slope (takes timm's darknet53 weights)"),
)
