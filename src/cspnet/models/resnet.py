"""ResNet / ResNeXt and their CSP forms, exact to the official Darknet cfgs.

``resnet50.cfg``, ``resnext50.cfg``, ``resnet10.cfg``, ``csresnet50.cfg`` and ``csresnext50.cfg``
in WongKinYiu/CrossStagePartialNetworks, and the ``-omega`` cfgs of the CSP two (the same networks
with Mish). As in those cfgs there are no projection shortcuts:
a block whose input is narrower (or larger) than its output adds it partially (Darknet's
``[shortcut]``, see `cspnet.layers.darknet_add`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from torch import nn

from ..blocks import BasicBlock, ResidualBlock, repeat_blocks
from ..layers import ConvBnAct, canonical_act
from ..net import StageDilation, StagedNet, dilate_stages
from ..registry import ModelSpec, PaperFigures
from ..stage import CrossStage, Fusion, check_fusion


@dataclass(frozen=True)
class ResStageCfg:
    """One stage. ``out_chs``/``mid_chs`` are the blocks' output and inner widths.

    CSP stages also give the cfg's explicit widths: ``down_chs`` (a 1x1 before the strided 3x3,
    as in csresnet50; 0 means one grouped 3x3 stride-2 conv keeping the input width, as in
    csresnext50), ``cross_chs`` / ``main_chs`` (the two split convs), ``split_act`` (``None``:
    the model's activation) and ``transition_chs`` (0: no transition after the concat).
    """

    depth: int
    out_chs: int
    mid_chs: int
    stride: int = 2
    down_chs: int = 0
    cross_chs: int = 0
    main_chs: int = 0
    split_act: str | None = None
    transition_chs: int = 0


@dataclass(frozen=True)
class ResNetCfg:
    stages: tuple[ResStageCfg, ...]
    block: Literal["bottleneck", "basic"] = "bottleneck"
    groups: int = 1
    stem_chs: int = 64
    act: str = "leaky"
    fusion: Fusion = "none"


def _make_block(cfg: ResNetCfg, stage: ResStageCfg, in_chs: int, stride: int, act: str,
                first_dilation: int = 1, dilation: int = 1) -> nn.Module:
    """A block; ``first_dilation`` is its first 3x3's (the stage's downsampling conv in a plain stage's first block)."""
    if cfg.block == "basic":
        return BasicBlock(in_chs, stage.out_chs, stride, act, dilation, first_dilation)
    # the bottleneck's one 3x3 is its first
    return ResidualBlock(in_chs, stage.mid_chs, stage.out_chs, stride, cfg.groups, act, dilation=first_dilation)


def _plain_stage(cfg: ResNetCfg, s: ResStageCfg, in_chs: int, act: str, make_block, d: StageDilation) -> CrossStage:
    def block(c: int, i: int) -> nn.Module:
        if i == 0:  # the block that downsamples
            return make_block(cfg, s, c, d.stride, act, d.first_dilation, d.dilation)
        return make_block(cfg, s, c, 1, act, d.dilation, d.dilation)

    def make_blocks(width: int):
        return repeat_blocks(block, width, s.out_chs, s.depth)

    return CrossStage(in_chs, make_blocks, fusion="none")


def _csp_stage(cfg: ResNetCfg, s: ResStageCfg, in_chs: int, act: str, make_block, d: StageDilation) -> CrossStage:
    if not (s.cross_chs and s.main_chs):
        raise ValueError("a CSP stage needs cross_chs and main_chs; this config describes a plain model")
    if s.stride == 1:
        down, base_chs = None, in_chs
    elif s.down_chs:
        down = nn.Sequential(
            ConvBnAct(in_chs, s.down_chs, 1, act=act),
            ConvBnAct(s.down_chs, s.down_chs, 3, d.stride, act=act, dilation=d.first_dilation),
        )
        base_chs = s.down_chs
    else:
        down = ConvBnAct(in_chs, in_chs, 3, d.stride, groups=cfg.groups, act=act, dilation=d.first_dilation)
        base_chs = in_chs

    def make_blocks(width: int):
        return repeat_blocks(lambda c, i: make_block(cfg, s, c, 1, act, d.dilation, d.dilation), width, s.out_chs, s.depth)

    fused = s.out_chs + s.cross_chs
    transition = {"csp": s.transition_chs or None, "fusion_first": s.transition_chs or fused, "fusion_last": None}[cfg.fusion]
    return CrossStage(
        base_chs, make_blocks, down=down, fusion=cfg.fusion, split="conv",
        cross_chs=s.cross_chs, main_chs=s.main_chs, split_act=s.split_act or act,
        transition_chs=transition, act=act,
    )


def build_resnet(cfg: ResNetCfg, *, in_chans: int = 3, make_block=_make_block, output_stride: int | None = None,
                 **net_kwargs) -> StagedNet:
    """Build a (CSP)ResNe(X)t; ``make_block(cfg, stage, in_chs, stride, act, first_dilation, dilation)`` builds
    each block (ELASTIC swaps it)."""
    check_fusion(cfg.fusion)
    if cfg.fusion == "fusion_last" and not any(s.transition_chs for s in cfg.stages):
        # fusion last drops the transition after the concat; these stages have none to drop
        raise ValueError("fusion_last would build the same network as csp: this config's stages have no transition "
                         "after the concat (the next stage's first 1x1 conv plays that part, as in csresnet50.cfg)")
    act = canonical_act(cfg.act)
    stem = nn.Sequential(ConvBnAct(in_chans, cfg.stem_chs, 7, 2, act=act), nn.MaxPool2d(2, 2, ceil_mode=True))
    dilations = dilate_stages(4, [s.stride for s in cfg.stages], output_stride)
    stages, chs = [], []
    in_chs = cfg.stem_chs
    for s, d in zip(cfg.stages, dilations):
        stage_fn = _plain_stage if cfg.fusion == "none" else _csp_stage
        stage = stage_fn(cfg, s, in_chs, act, make_block, d)
        stages.append(stage)
        chs.append(stage.out_chs)
        in_chs = stage.out_chs
    return StagedNet(stem, cfg.stem_chs, 4, stages, chs, [d.stride for d in dilations], in_chans=in_chans,
                     output_stride=output_stride, **net_kwargs)


def _bottleneck_stages(mids: tuple[int, ...], outs: tuple[int, ...], depths: tuple[int, ...]) -> tuple[ResStageCfg, ...]:
    return tuple(ResStageCfg(d, o, m, stride=1 if i == 0 else 2) for i, (d, o, m) in enumerate(zip(depths, outs, mids)))


RESNET50 = ResNetCfg(_bottleneck_stages((64, 128, 256, 512), (256, 512, 1024, 2048), (3, 4, 6, 3)))
RESNEXT50 = ResNetCfg(_bottleneck_stages((128, 256, 512, 1024), (256, 512, 1024, 2048), (3, 4, 6, 3)), groups=32)
RESNET10 = ResNetCfg(
    tuple(ResStageCfg(1, c, c, stride=1 if i == 0 else 2) for i, c in enumerate((64, 128, 256, 512))), block="basic"
)

# csresnet50.cfg: stage 1 reads the stem map through two 1x1 convs (128 cross, 64 main) and its
# first block adds the 64-channel main part into the first 64 of 128 channels (partial residual).
# Later stages downsample with 1x1 + 3x3/2; their split convs are linear in stages 2-3. There is no
# transition after the concats of stages 1-3 (the next stage's 1x1 plays it); stage 4 ends with 1x1 -> 1024.
CSPRESNET50 = ResNetCfg(
    (
        ResStageCfg(3, 128, 64, stride=1, cross_chs=128, main_chs=64),
        ResStageCfg(3, 256, 128, down_chs=128, cross_chs=256, main_chs=256, split_act="linear"),
        ResStageCfg(5, 512, 256, down_chs=256, cross_chs=512, main_chs=512, split_act="linear"),
        ResStageCfg(2, 1024, 512, down_chs=512, cross_chs=1024, main_chs=1024, transition_chs=1024),
    ),
    fusion="csp",
)
# csresnext50.cfg: ResNeXt blocks without bottleneck (mid = out, 3x3 groups 32), downsampling by a
# grouped 3x3/2 conv, and a 1x1 transition after every concat.
CSPRESNEXT50 = ResNetCfg(
    (
        ResStageCfg(3, 128, 128, stride=1, cross_chs=128, main_chs=64, transition_chs=256),
        ResStageCfg(3, 256, 256, cross_chs=256, main_chs=256, split_act="linear", transition_chs=512),
        ResStageCfg(5, 512, 512, cross_chs=512, main_chs=512, split_act="linear", transition_chs=1024),
        ResStageCfg(2, 1024, 1024, cross_chs=1024, main_chs=1024, transition_chs=2048),
    ),
    groups=32,
    fusion="csp",
)
# CSPResNet-10 has no cfg (paper Table 3: 2.73M / 1.905 BFLOPs). Built the way csresnet50 applies
# CSP to resnet50: two 1x1 split convs, the basic blocks on the main part only, a partial
# transition, the concat feeding the next stage's 1x1 + 3x3/2 downsampling; see docs/models_design.md.
CSPRESNET10 = ResNetCfg(
    (
        ResStageCfg(1, 64, 64, stride=1, cross_chs=64, main_chs=64),
        ResStageCfg(1, 64, 64, down_chs=64, cross_chs=64, main_chs=64, split_act="linear"),
        ResStageCfg(1, 128, 128, down_chs=128, cross_chs=128, main_chs=128, split_act="linear"),
        ResStageCfg(1, 256, 256, down_chs=128, cross_chs=256, main_chs=256),
    ),
    block="basic",
    fusion="csp",
)

MODELS = (
    ModelSpec("resnet50", "resnet", RESNET50, build_resnet, PaperFigures(22.73, 9.74, 256, "repo README", 75.8),
              darknet_cfg="resnet50.cfg", description="ResNet-50 as in resnet50.cfg (pool before the classifier)"),
    ModelSpec("cspresnet50", "resnet", CSPRESNET50, build_resnet, PaperFigures(21.57, 8.97, 256, "repo README", 76.6),
              twin="resnet50", darknet_cfg="csresnet50.cfg", description="CSPResNet-50 (csresnet50.cfg)"),
    ModelSpec("resnext50", "resnet", RESNEXT50, build_resnet, PaperFigures(22.19, 10.11, 256, "repo README", 77.8),
              darknet_cfg="resnext50.cfg", description="ResNeXt-50 32x4d as in resnext50.cfg"),
    ModelSpec("cspresnext50", "resnet", CSPRESNEXT50, build_resnet, PaperFigures(20.50, 7.93, 256, "repo README", 77.9),
              twin="resnext50", darknet_cfg="csresnext50.cfg", description="CSPResNeXt-50 (csresnext50.cfg)"),
    # -omega: the same convolutions with Mish, so the README's params / BFLOPs hold; top-1 from the
    # repo's imagenet/results.md (trained with CutMix, Mosaic and label smoothing too)
    ModelSpec("cspresnet50_omega", "resnet", dataclasses.replace(CSPRESNET50, act="mish"), build_resnet,
              PaperFigures(21.57, 8.97, 256, "repo README, results.md", 78.1), darknet_cfg="csresnet50-omega.cfg",
              description="CSPResNet-50 with Mish (csresnet50-omega.cfg)"),
    ModelSpec("cspresnext50_omega", "resnet", dataclasses.replace(CSPRESNEXT50, act="mish"), build_resnet,
              PaperFigures(20.50, 7.93, 256, "repo README, results.md", 79.8), darknet_cfg="csresnext50-omega.cfg",
              description="CSPResNeXt-50 with Mish (csresnext50-omega.cfg)"),
    ModelSpec("resnet10", "resnet", RESNET10, build_resnet,
              PaperFigures(5.24, 2.273, 256, "repo README", 63.5, bflops_decimals=3),
              darknet_cfg="resnet10.cfg", description="ResNet-10 (resnet10.cfg)"),
    ModelSpec("cspresnet10", "resnet", CSPRESNET10, build_resnet,
              PaperFigures(2.73, 1.905, 256, "paper Table 3", 65.3, bflops_decimals=3),
              twin="resnet10", description="CSPResNet-10, designed here (no official cfg)"),
)
