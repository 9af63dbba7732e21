"""MobileNet-v2 and CSPMobileNet-v2, exact to ``mobilenet-v2.cfg`` and ``csmobilenet-v2.cfg`` (224x224, ReLU).

Both cfgs put the 64-wide blocks at stride 8 (torchvision's MobileNetV2 has them at 16), which is part of
what the README's 0.858 / 0.764 BFLOPs count. Stage ``i`` holds every block of stride ``2 * 2**i``.

csmobilenet-v2.cfg builds each stage from the previous stage's 1x1 expansion conv (the *base*):

- part 1 (cross path): a 3x3 depthwise stride-2 conv of the base (stage 1: a stride-1 grouped 3x3, 32 -> 16);
- part 2 (main path): a 3x3 stride-2 conv with two filters per group (``groups = C``, C -> 2C), a linear
  1x1 projection, then inverted-residual blocks whose 3x3 also doubles its width (1x1 -> 3C, 3x3 -> 6C);
- the concat ``[part 2, part 1]`` feeds a 1x1 conv (ReLU), which is both the stage's transition and the next
  stage's expansion: the paper's *fusion first*. The last stage's transition is the 1x1 -> 640 before the pool.

Module order equals cfg layer order, so Darknet weights map by walking the convolutions.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from ..layers import ConvBnAct, Shortcut, canonical_act
from ..net import StageDilation, StagedNet, dilate_stages
from ..registry import ModelSpec, PaperFigures
from ..stage import CrossStage, Fusion, check_fusion


class InvertedResidual(nn.Module):
    """1x1 expansion (optional) -> 3x3 grouped conv (groups = its input width) -> linear 1x1 projection.

    ``dw_chs`` is the 3x3's output width: equal to ``mid_chs`` for a depthwise conv (MobileNet-v2),
    ``2 * mid_chs`` in csmobilenet-v2. The input is added back when it has the output's shape.
    ``dilation`` is the 3x3's (see `cspnet.net.dilate_stages`).
    """

    def __init__(self, in_chs: int, mid_chs: int | None, dw_chs: int, out_chs: int, stride: int = 1, act: str = "relu",
                 dilation: int = 1):
        super().__init__()
        mid = mid_chs if mid_chs is not None else in_chs
        self.conv_exp = ConvBnAct(in_chs, mid, 1, act=act) if mid_chs is not None else None
        self.conv_dw = ConvBnAct(mid, dw_chs, 3, stride, groups=mid, act=act, dilation=dilation)
        self.conv_pwl = ConvBnAct(dw_chs, out_chs, 1, act="linear")
        self.add = Shortcut(inplace=True) if stride == 1 and in_chs == out_chs else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv_exp(x) if self.conv_exp is not None else x
        y = self.conv_pwl(self.conv_dw(y))
        return self.add(y, x) if self.add is not None else y


@dataclass(frozen=True)
class MobileStageCfg:
    """A stage: its first block's stride, every block's output width, and (CSP) the base width.

    ``base_chs`` is the 1x1 conv that ends the previous stage (csmobilenet-v2), 0 in the plain model.
    """

    stride: int
    widths: tuple[int, ...]
    base_chs: int = 0


@dataclass(frozen=True)
class MobileNetV2Cfg:
    stages: tuple[MobileStageCfg, ...]
    stem_chs: int = 32
    head_chs: int = 1280  # the 1x1 conv before the pool
    expansion: int = 6
    act: str = "relu"
    fusion: Fusion = "none"


def _plain_stage(cfg: MobileNetV2Cfg, s: MobileStageCfg, in_chs: int, first: bool, last: bool, act: str,
                 d: StageDilation) -> CrossStage:
    def make_blocks(width: int):
        blocks, c = [], width
        for i, out in enumerate(s.widths):
            mid = c if first and i == 0 else c * cfg.expansion  # the first block has no expansion (t = 1)
            stride, dilation = (d.stride, d.first_dilation) if i == 0 else (1, d.dilation)  # the first downsamples
            blocks.append(InvertedResidual(c, mid, mid, out, stride, act, dilation))
            c = out
        return nn.Sequential(*blocks), c

    return CrossStage(in_chs, make_blocks, fusion="none", transition_chs=cfg.head_chs if last else None, act=act)


def _csp_stage(cfg: MobileNetV2Cfg, s: MobileStageCfg, in_chs: int, first: bool, next_chs: int, act: str,
               d: StageDilation) -> CrossStage:
    half = cfg.expansion // 2
    main_out = s.widths[0]
    # both split layers downsample: dilated, they keep the previous dilation
    if first:
        # Stage 1 (cfg layers 1-5): cross = grouped 3x3 32 -> 16; main = 1x1 32, depthwise 3x3, 1x1 -> 16.
        cross_chs = in_chs // 2
        cross = ConvBnAct(in_chs, cross_chs, 3, d.stride, groups=cross_chs, act=act, dilation=d.first_dilation)
        main = InvertedResidual(in_chs, in_chs, in_chs, main_out, d.stride, act, d.first_dilation)
    else:
        cross_chs = in_chs
        cross = ConvBnAct(in_chs, in_chs, 3, d.stride, groups=in_chs, act=act, dilation=d.first_dilation)
        main = InvertedResidual(in_chs, None, 2 * in_chs, main_out, d.stride, act, d.first_dilation)

    def make_blocks(width: int):
        blocks, c = [], width
        for out in s.widths[1:]:
            blocks.append(InvertedResidual(c, c * half, c * cfg.expansion, out, 1, act, d.dilation))
            c = out
        return (nn.Sequential(*blocks) if blocks else nn.Identity()), c

    return CrossStage(
        in_chs, make_blocks, fusion="fusion_first", split="conv", cross=cross, main=main,
        cross_chs=cross_chs, main_chs=main_out, transition_chs=next_chs, act=act,
    )


def build_mobilenet_v2(cfg: MobileNetV2Cfg, *, in_chans: int = 3, output_stride: int | None = None,
                       **net_kwargs) -> StagedNet:
    """Build MobileNet-v2 (``fusion="none"``) or CSPMobileNet-v2 (``fusion="fusion_first"``)."""
    check_fusion(cfg.fusion)
    if cfg.fusion not in ("none", "fusion_first"):
        raise ValueError(f"MobileNet-v2 follows its cfgs: fusion must be 'none' or 'fusion_first', got {cfg.fusion!r}")
    act = canonical_act(cfg.act)
    stem = ConvBnAct(in_chans, cfg.stem_chs, 3, 2, act=act)
    dilations = dilate_stages(2, [s.stride for s in cfg.stages], output_stride)
    stages, chs = [], []
    in_chs = cfg.stem_chs
    n = len(cfg.stages)
    for i, (s, d) in enumerate(zip(cfg.stages, dilations)):
        if cfg.fusion == "none":
            stage = _plain_stage(cfg, s, in_chs, i == 0, i == n - 1, act, d)
        else:
            next_chs = cfg.stages[i + 1].base_chs if i + 1 < n else cfg.head_chs
            stage = _csp_stage(cfg, s, in_chs, i == 0, next_chs, act, d)
        stages.append(stage)
        chs.append(stage.out_chs)
        in_chs = stage.out_chs
    return StagedNet(stem, cfg.stem_chs, 2, stages, chs, [d.stride for d in dilations], in_chans=in_chans,
                     output_stride=output_stride, **net_kwargs)


MOBILENET_V2 = MobileNetV2Cfg(
    (
        MobileStageCfg(1, (16,)),
        MobileStageCfg(2, (24, 24)),
        MobileStageCfg(2, (32, 32, 32, 64, 64, 64, 64)),
        MobileStageCfg(2, (96, 96, 96)),
        MobileStageCfg(2, (160, 160, 160, 320)),
    )
)
# csmobilenet-v2.cfg: the same block widths, each stage's first block being its main path (no expansion,
# a stride-2 3x3 with two filters per group), stage bases 48 / 72 / 192 / 288 and a 640-wide head conv.
CSPMOBILENET_V2 = MobileNetV2Cfg(
    tuple(dataclasses.replace(s, base_chs=b) for s, b in zip(MOBILENET_V2.stages, (32, 48, 72, 192, 288))),
    head_chs=640,
    fusion="fusion_first",
)

MODELS = (
    ModelSpec("mobilenet_v2", "mobilenet", MOBILENET_V2, build_mobilenet_v2,
              PaperFigures(3.47, 0.858, 224, "repo README", 67.0, bflops_decimals=3), darknet_cfg="mobilenet-v2.cfg",
              default_input=224, description="MobileNet-v2 (mobilenet-v2.cfg)"),
    ModelSpec("cspmobilenet_v2", "mobilenet", CSPMOBILENET_V2, build_mobilenet_v2,
              PaperFigures(2.51, 0.764, 224, "repo README", 67.7, bflops_decimals=3), twin="mobilenet_v2",
              darknet_cfg="csmobilenet-v2.cfg", default_input=224, description="CSPMobileNet-v2 (csmobilenet-v2.cfg)"),
)
