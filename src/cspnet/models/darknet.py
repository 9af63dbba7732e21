"""Darknet-53, CSPDarknet-53 and the Darknet Reference model, exact to the official cfgs.

``darknet53.cfg``, ``csdarknet53.cfg``, ``csdarknet53-omega.cfg`` (the same network with Mish; its
``-gamma`` cfg differs only in training options, so its weights load into cspdarknet53) and
``darknet.cfg`` in WongKinYiu/CrossStagePartialNetworks.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from torch import nn

from ..blocks import DarkBlock, repeat_blocks
from ..layers import ConvBnAct, canonical_act
from ..net import StageDilation, StagedNet, dilate_stages
from ..registry import ModelSpec, PaperFigures
from ..stage import CrossStage, Fusion, Split, check_fusion, check_part_ratio


@dataclass(frozen=True)
class DarkStageCfg:
    """One stage: a 3x3/2 conv to ``out_chs``, then ``depth`` Darknet blocks.

    ``block_chs`` is the blocks' width and ``mid_ratio`` their 1x1 width relative to it. CSP
    stages also give ``cross_chs``, the width of the cross path (0 for a plain stage).
    """

    depth: int
    out_chs: int
    block_chs: int
    mid_ratio: float = 0.5
    cross_chs: int = 0


@dataclass(frozen=True)
class DarknetCfg:
    stages: tuple[DarkStageCfg, ...]
    stem_chs: int = 32
    act: str = "leaky"
    fusion: Fusion = "none"
    split: Split = "conv"
    part_ratio: float = 0.5


def _dark_stage(cfg: DarknetCfg, s: DarkStageCfg, in_chs: int, act: str, make_block, d: StageDilation) -> CrossStage:
    down = ConvBnAct(in_chs, s.out_chs, 3, d.stride, act=act, dilation=d.first_dilation)

    def make_blocks(width: int):
        mid = int(width * s.mid_ratio)
        return repeat_blocks(lambda c, i: make_block(c, mid, width, act, d.dilation), width, width, s.depth)

    if cfg.fusion == "none":
        return CrossStage(s.out_chs, make_blocks, down=down, fusion="none")
    if not s.cross_chs:
        raise ValueError("a CSP stage needs cross_chs; this config describes a plain model")
    conv_ratio = s.cross_chs / (s.cross_chs + s.block_chs)
    if cfg.split == "conv" and abs(cfg.part_ratio - conv_ratio) > 1e-9:
        # the conv split's widths are the cfg's, so γ would change nothing: refuse rather than ignore it
        raise ValueError(f"part_ratio={cfg.part_ratio} with split='conv': this config's split convs have fixed widths "
                         f"({s.cross_chs} cross, {s.block_chs} blocks, γ = {conv_ratio:g}); use split='slice' to split by γ")
    transition = None if cfg.fusion == "fusion_last" else s.out_chs
    return CrossStage(
        s.out_chs, make_blocks, down=down, fusion=cfg.fusion, split=cfg.split, part_ratio=cfg.part_ratio,
        cross_chs=s.cross_chs, main_chs=s.block_chs, transition_chs=transition, act=act,
    )


def build_darknet(cfg: DarknetCfg, *, in_chans: int = 3, make_block=DarkBlock, output_stride: int | None = None,
                  **net_kwargs) -> StagedNet:
    """Build a (CSP)Darknet; ``make_block(in_chs, mid_chs, out_chs, act, dilation)`` builds each block (ELASTIC
    swaps it)."""
    check_fusion(cfg.fusion)
    check_part_ratio(cfg.part_ratio)
    act = canonical_act(cfg.act)
    stem = ConvBnAct(in_chans, cfg.stem_chs, 3, 1, act=act)
    dilations = dilate_stages(1, [2] * len(cfg.stages), output_stride)
    stages, chs = [], []
    in_chs = cfg.stem_chs
    for s, d in zip(cfg.stages, dilations):
        stage = _dark_stage(cfg, s, in_chs, act, make_block, d)
        stages.append(stage)
        chs.append(stage.out_chs)
        in_chs = stage.out_chs
    return StagedNet(stem, cfg.stem_chs, 1, stages, chs, [d.stride for d in dilations], in_chans=in_chans,
                     output_stride=output_stride, **net_kwargs)


@dataclass(frozen=True)
class DarknetRefCfg:
    """darknet.cfg: a 3x3 conv, then six (2x2 max-pool, 3x3 conv) stages."""

    widths: tuple[int, ...] = (16, 32, 64, 128, 256, 512, 1024)
    act: str = "leaky"


def build_darknet_ref(cfg: DarknetRefCfg, *, in_chans: int = 3, **net_kwargs) -> StagedNet:
    act = canonical_act(cfg.act)
    stem = ConvBnAct(in_chans, cfg.widths[0], 3, 1, act=act)
    stages = []
    for c_in, c_out in zip(cfg.widths[:-1], cfg.widths[1:]):
        # Darknet's 2x2/2 max-pool pads the right/bottom edge, i.e. ceil mode.
        pool = nn.MaxPool2d(2, 2, ceil_mode=True)
        stages.append(CrossStage(c_in, lambda w, c_out=c_out: (ConvBnAct(w, c_out, 3, act=act), c_out), down=pool, fusion="none"))
    n = len(stages)
    return StagedNet(stem, cfg.widths[0], 1, stages, list(cfg.widths[1:]), [2] * n, in_chans=in_chans, **net_kwargs)


DARKNET53 = DarknetCfg(
    tuple(DarkStageCfg(d, c, c) for d, c in zip((1, 2, 8, 8, 4), (64, 128, 256, 512, 1024)))
)
# csdarknet53.cfg: two 1x1 split convs, then blocks, a partial transition, concat [blocks, cross]
# and a 1x1 transition. Stage 1 keeps full-width parts (64) with a bottleneck block (64 -> 32 -> 64);
# later stages split C into C/2 + C/2 and their blocks have no bottleneck.
CSPDARKNET53 = DarknetCfg(
    (DarkStageCfg(1, 64, 64, 0.5, cross_chs=64),)
    + tuple(DarkStageCfg(d, c, c // 2, 1.0, cross_chs=c // 2) for d, c in zip((2, 8, 8, 4), (128, 256, 512, 1024))),
    fusion="csp",
)

MODELS = (
    ModelSpec("darknet53", "darknet", DARKNET53, build_darknet, PaperFigures(41.57, 18.57, 256, "repo README", 77.2),
              darknet_cfg="darknet53.cfg", description="Darknet-53 classifier (darknet53.cfg)"),
    ModelSpec("cspdarknet53", "darknet", CSPDARKNET53, build_darknet,
              PaperFigures(27.61, 13.07, 256, "repo README", 77.2), twin="darknet53",
              darknet_cfg="csdarknet53.cfg", description="CSPDarknet-53 (csdarknet53.cfg)"),
    # -omega: csdarknet53.cfg's convolutions with Mish, so the README's params / BFLOPs hold; top-1 from
    # the repo's imagenet/results.md (trained with CutMix, Mosaic and label smoothing too)
    ModelSpec("cspdarknet53_omega", "darknet", dataclasses.replace(CSPDARKNET53, act="mish"), build_darknet,
              PaperFigures(27.61, 13.07, 256, "repo README, results.md", 78.7), darknet_cfg="csdarknet53-omega.cfg", description="CSPDarknet-53 with Mish (csdarknet53-omega.cfg)"),
    ModelSpec("darknet_ref", "darknet", DarknetRefCfg(), build_darknet_ref,
              PaperFigures(7.31, 0.96, 256, "repo README", 61.1), darknet_cfg="darknet.cfg",
              description="Darknet Reference model (darknet.cfg)"),
)
