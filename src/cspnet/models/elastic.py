"""ELASTIC variants (Wang et al., CVPR 2019) of CSPDarknet-53, CSPResNet-50, CSPResNeXt-50 and (CSP)DenseNet-201.

The three Darknet ones are exact to ``csdarknet53-elastic.cfg``, ``csresnet50-elastic.cfg`` and
``csresnext50-elastic.cfg``: every residual block becomes an `ElasticBlock` — its input is sliced into two
halves (``[route] groups=2 group_id=0/1``); the first half runs the block's body at full resolution, the second
a 2x2/2 max-pool, the body, and a x2 upsample; the two are concatenated and added to the block input
(``[shortcut] from=-10/-12``). Each half-body is the block's body at half the width (and half the groups,
so a ResNeXt group keeps its width). The stages around the blocks are the CSP stages of
`cspnet.models.darknet` / `cspnet.models.resnet`, whose configs are reused.

DenseNet-201-Elastic is allenai/elastic's ``densenet201_elastic`` (blocks 10-20-40-30, `ElasticDenseLayer`);
CSPDenseNet-201-Elastic has no published definition: it is CSPDenseNet-201 (blocks 6-12-48-32 as
Darknet's ``densenet201.cfg``, γ = 0.75) with ELASTIC dense layers (docs/models_design.md).
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import ConvBnAct, Shortcut, contiguous_like, make_act
from ..net import OutputStrideError, StagedNet
from ..registry import ModelSpec, PaperFigures
from .darknet import CSPDARKNET53, DarkStageCfg, DarknetCfg, build_darknet
from .densenet import CSPDENSENET201, DenseNetCfg, build_densenet
from .resnet import CSPRESNET50, CSPRESNEXT50, ResNetCfg, ResStageCfg, build_resnet

torch.fx.wrap("contiguous_like")  # one torch.fx node: it decides by the memory format at run time


class ElasticBlock(nn.Module):
    """Half the channels at full resolution, half at half resolution, concat, residual add, activation.

    ``full`` and ``low`` are the two half-width bodies (``low`` sees the 2x2/2 max-pooled second half).
    The upsampled low-resolution map is cropped to the full one's size, which is Darknet's x2
    upsample for even sizes and keeps odd sizes (a 7x7 map pools to 4x4 with Darknet's padding) defined.
    """

    def __init__(self, full: nn.Module, low: nn.Module, act: str = "linear"):
        super().__init__()
        self.full = full
        self.pool = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.low = low
        self.add = Shortcut(inplace=True)
        self.act = make_act(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = x.shape[1] // 2
        full = self.full(contiguous_like(x[:, :half], x))
        low = self.low(self.pool(contiguous_like(x[:, half:], x)))
        low = F.interpolate(low, scale_factor=2.0, mode="nearest")[:, :, : full.shape[2], : full.shape[3]]
        return self.act(self.add(torch.cat([full, low], 1), x))


def _halves(make_body, width: int) -> tuple[nn.Module, nn.Module]:
    if width % 2:
        raise ValueError(f"an ELASTIC block needs an even width, got {width}")
    return make_body(width // 2), make_body(width // 2)


def _check_undilated(dilation: int) -> None:
    if dilation != 1:
        raise OutputStrideError("an ELASTIC block's half-resolution branch (a 2x2/2 max-pool, then a x2 upsample) "
                                "has no dilated form, so ELASTIC models are built with output_stride=32 only")


def elastic_dark_block(in_chs: int, mid_chs: int, out_chs: int, act: str, dilation: int = 1) -> ElasticBlock:
    """csdarknet53-elastic.cfg block: per half, 1x1 (mid/2) -> 3x3; add without activation."""
    _check_undilated(dilation)
    if in_chs != out_chs:
        raise ValueError(f"an ELASTIC Darknet block keeps its width, got {in_chs} -> {out_chs}")

    def body(h: int) -> nn.Module:
        return nn.Sequential(ConvBnAct(h, mid_chs // 2, 1, act=act), ConvBnAct(mid_chs // 2, h, 3, act=act))

    return ElasticBlock(*_halves(body, out_chs), act="linear")


def elastic_res_block(cfg: ResNetCfg, stage: ResStageCfg, in_chs: int, stride: int, act: str,
                      first_dilation: int = 1, dilation: int = 1) -> ElasticBlock:
    """cs(resnet50|resnext50)-elastic.cfg block: per half, 1x1 -> 3x3 (groups/2) -> 1x1 linear; add, act."""
    _check_undilated(dilation)
    if stride != 1 or in_chs != stage.out_chs or stage.mid_chs != stage.out_chs:
        raise ValueError("an ELASTIC ResNe(X)t block keeps its width (no stride, no bottleneck)")
    groups = max(1, cfg.groups // 2)

    def body(h: int) -> nn.Module:
        return nn.Sequential(
            ConvBnAct(h, h, 1, act=act), ConvBnAct(h, h, 3, groups=groups, act=act), ConvBnAct(h, h, 1, act="linear")
        )

    return ElasticBlock(*_halves(body, stage.out_chs), act=act)


def build_elastic_darknet(cfg: DarknetCfg, **kwargs) -> StagedNet:
    """A CSPDarknet whose blocks are `ElasticBlock`s."""
    return build_darknet(cfg, make_block=elastic_dark_block, **kwargs)


def build_elastic_resnet(cfg: ResNetCfg, **kwargs) -> StagedNet:
    """A CSPResNe(X)t whose blocks are `ElasticBlock`s."""
    return build_resnet(cfg, make_block=elastic_res_block, **kwargs)


# csdarknet53-elastic.cfg = csdarknet53.cfg except stage 1's block, which has no bottleneck (1x1 64 -> 32 per half).
CSPDARKNET53_ELASTIC = dataclasses.replace(
    CSPDARKNET53, stages=(DarkStageCfg(1, 64, 64, 1.0, cross_chs=64),) + CSPDARKNET53.stages[1:]
)


def _elastic_res_stages(stages: tuple[ResStageCfg, ...]) -> tuple[ResStageCfg, ...]:
    # cs(resnet50|resnext50)-elastic.cfg: blocks keep their width (mid = out), and stage 1's part 2 is as
    # wide as its blocks (128, not 64), so no block is a partial residual.
    return tuple(
        dataclasses.replace(s, mid_chs=s.out_chs, main_chs=s.out_chs if i == 0 else s.main_chs) for i, s in enumerate(stages)
    )


CSPRESNET50_ELASTIC = dataclasses.replace(CSPRESNET50, stages=_elastic_res_stages(CSPRESNET50.stages))
CSPRESNEXT50_ELASTIC = dataclasses.replace(CSPRESNEXT50, stages=_elastic_res_stages(CSPRESNEXT50.stages))
DENSENET201_ELASTIC = DenseNetCfg((10, 20, 40, 30), elastic=True)
CSPDENSENET201_ELASTIC = dataclasses.replace(CSPDENSENET201, elastic=True)

MODELS = (
    ModelSpec("cspdarknet53_elastic", "elastic", CSPDARKNET53_ELASTIC, build_elastic_darknet,
              PaperFigures(None, 7.74, 256, "repo README", 76.1), twin="cspdarknet53",
              darknet_cfg="csdarknet53-elastic.cfg", description="CSPDarknet-53-Elastic (csdarknet53-elastic.cfg)"),
    ModelSpec("cspresnet50_elastic", "elastic", CSPRESNET50_ELASTIC, build_elastic_resnet,
              PaperFigures(None, 9.36, 256, "repo README", 76.8), twin="cspresnet50",
              darknet_cfg="csresnet50-elastic.cfg", description="CSPResNet-50-Elastic (csresnet50-elastic.cfg)"),
    ModelSpec("cspresnext50_elastic", "elastic", CSPRESNEXT50_ELASTIC, build_elastic_resnet,
              PaperFigures(None, 5.45, 256, "repo README", 77.2), twin="cspresnext50",
              darknet_cfg="csresnext50-elastic.cfg", description="CSPResNeXt-50-Elastic (csresnext50-elastic.cfg)"),
    ModelSpec("densenet201_elastic", "elastic", DENSENET201_ELASTIC, build_densenet,
              PaperFigures(19.48, 8.77, 224, "paper Table 3", 77.9, params_kind="all"),
              default_input=224, description="DenseNet-201-Elastic (allenai/elastic densenet201_elastic, blocks 10-20-40-30)"),
    ModelSpec("cspdensenet201_elastic", "elastic", CSPDENSENET201_ELASTIC, build_densenet,
              PaperFigures(20.17, 7.13, 224, "paper Table 3", 77.9, params_kind="all"), twin="densenet201_elastic",
              default_input=224, description="CSPDenseNet-201-Elastic, designed here: CSPDenseNet-201, ELASTIC layers, γ=0.75"),
)
