"""ResNet-50 and ResNeXt-50 32x4d laid out as torchvision builds them, to take its ImageNet weights.

The cfg-faithful ``resnet50`` / ``resnext50`` cannot: the Darknet cfgs have no projection
shortcuts (the first block of a stage adds its input partially), pool 2x2 after the stem and
use leaky ReLU. torchvision's ResNets (v1.5: stride on the 3x3) project with a strided 1x1
conv + BN, pool 3x3/2 with padding 1, and use ReLU. These variants are built from the same
`ResidualBlock` (``projection=True``) and plain `CrossStage` as ``resnet50``.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..blocks import ResidualBlock, repeat_blocks
from ..layers import ConvBnAct, canonical_act
from ..net import StageDilation, StagedNet, dilate_stages
from ..registry import ModelSpec
from ..stage import CrossStage


@dataclass(frozen=True)
class TvResNetCfg:
    """torchvision's ``ResNet(Bottleneck, depths, groups, width_per_group)``.

    ``planes_chs`` are torchvision's ``planes`` per stage (a stage outputs 4x as many channels);
    ``width_per_group`` is per 64 planes, as in torchvision, so scaling the planes scales every width.
    """

    depths: tuple[int, ...] = (3, 4, 6, 3)
    groups: int = 1
    width_per_group: int = 64
    stem_chs: int = 64
    planes_chs: tuple[int, ...] = (64, 128, 256, 512)
    act: str = "relu"


def _stage(cfg: TvResNetCfg, act: str, in_chs: int, mid: int, out: int, depth: int, d: StageDilation) -> CrossStage:
    def block(c: int, i: int) -> ResidualBlock:
        # the first block downsamples; dilated, its 3x3 keeps the previous dilation (replace_stride_with_dilation)
        stride, dilation = (d.stride, d.first_dilation) if i == 0 else (1, d.dilation)
        return ResidualBlock(c, mid, out, stride, cfg.groups, act, projection=True, dilation=dilation)

    return CrossStage(in_chs, lambda width: repeat_blocks(block, width, out, depth), fusion="none")


def build_tv_resnet(cfg: TvResNetCfg, *, in_chans: int = 3, output_stride: int | None = None, **net_kwargs) -> StagedNet:
    """Build a `StagedNet` with torchvision's ResNet layout (see the module docstring)."""
    act = canonical_act(cfg.act)
    if len(cfg.planes_chs) != len(cfg.depths):
        raise ValueError(f"planes_chs {cfg.planes_chs} needs one entry per stage of depths {cfg.depths}")
    stem = nn.Sequential(ConvBnAct(in_chans, cfg.stem_chs, 7, 2, act=act), nn.MaxPool2d(3, 2, 1))
    dilations = dilate_stages(4, [1] + [2] * (len(cfg.depths) - 1), output_stride)
    stages, chs = [], []
    in_chs = cfg.stem_chs
    for depth, planes, d in zip(cfg.depths, cfg.planes_chs, dilations):
        mid, out = planes * cfg.width_per_group // 64 * cfg.groups, planes * 4
        stages.append(_stage(cfg, act, in_chs, mid, out, depth, d))
        chs.append(out)
        in_chs = out
    return StagedNet(stem, cfg.stem_chs, 4, stages, chs, [d.stride for d in dilations], in_chans=in_chans,
                     output_stride=output_stride, **net_kwargs)


MODELS = (
    ModelSpec("resnet50_tv", "torchvision", TvResNetCfg(), build_tv_resnet, default_input=224,
              description="ResNet-50 laid out as torchvision's resnet50 (takes its weights)"),
    ModelSpec("resnext50_tv", "torchvision", TvResNetCfg(groups=32, width_per_group=4), build_tv_resnet,
              default_input=224, description="ResNeXt-50 32x4d laid out as torchvision's resnext50_32x4d (takes its weights)"),
)
