"""DenseNet and CSPDenseNet (paper §3.1, Fig. 2-3), plus the ELASTIC dense layer.

The plain DenseNets hold exactly torchvision's parameters (densenet121: 7,978,856 with 1000 classes),
module for module, so torchvision weights map onto them by renaming keys. DenseNet is pre-activation:
every convolution is preceded by BN + activation, and the last stage ends with BN + activation (norm5).

CSPDenseNet (paper Fig. 3b, Eq. x_T / x_U): the base map is sliced into x0' (the first γ·C channels,
bypassing) and x0'' (the rest); only x0'' goes through the dense layers (the *partial dense block*);
``x_T = w_T * [x0'', x1, ..., xk]`` is the partial transition (BN-act-1x1 conv, keeping its width) and
``x_U = w_U * [x_T, x0']`` the transition (BN-act-1x1 conv with DenseNet's compression θ). The 2x2
average pool that ends DenseNet's transition layer is the ``down`` of the next stage, so stage ``i``'s
output is at stride ``4 * 2**i`` (a usable feature pyramid) with the same arithmetic as torchvision.
See docs/models_design.md for the design and how it lands on the paper's CSPDenseNet-201-Elastic.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import ConvBnAct, bn_act, canonical_act, fx_leaf, make_act, recomputable_cat, saving_recipes
from ..net import StagedNet
from ..registry import ModelSpec, PaperFigures
from ..stage import CrossStage, Fusion, check_fusion, check_part_ratio

torch.fx.wrap("recomputable_cat")  # one torch.fx node: it decides by the autograd mode at run time


class BnAct(nn.Sequential):
    """BatchNorm + activation: DenseNet's pre-activation, and its final ``norm5``."""

    memory_efficient = False  # `cspnet.layers.memory_efficient`

    def __init__(self, chs: int, act: str = "relu"):
        super().__init__()
        self.norm = nn.BatchNorm2d(chs)
        self.act = make_act(act)

    @fx_leaf
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return bn_act(x, self.norm, self.act, self.memory_efficient)


class BnActConv(nn.Sequential):
    """Pre-activation 1x1 convolution: DenseNet's transition (``norm, relu, conv``) without its pool."""

    memory_efficient = False  # `cspnet.layers.memory_efficient`

    def __init__(self, in_chs: int, out_chs: int, act: str = "relu"):
        super().__init__()
        self.norm = nn.BatchNorm2d(in_chs)
        self.act = make_act(act)
        self.conv = nn.Conv2d(in_chs, out_chs, 1, bias=False)

    @fx_leaf
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = bn_act(x, self.norm, self.act, self.memory_efficient)
        with saving_recipes(self.memory_efficient):
            return self.conv(x)


class DenseLayer(nn.Module):
    """BN-act-1x1 conv (``bn_size * growth``) -> BN-act-3x3 conv (``growth``); returns the new features."""

    branches = 1  # the bottleneck width ``bn_size * growth`` is split over this many branches
    memory_efficient = False  # `cspnet.layers.memory_efficient`

    def __init__(self, in_chs: int, growth_rate: int, bn_size: int = 4, act: str = "relu"):
        super().__init__()
        mid = bn_size * growth_rate // self.branches
        self.norm1 = nn.BatchNorm2d(in_chs)
        self.act1 = make_act(act)
        self.conv1 = nn.Conv2d(in_chs, mid, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(mid)
        self.act2 = make_act(act)
        self.conv2 = nn.Conv2d(mid, growth_rate, 3, padding=1, bias=False)

    @fx_leaf
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        recompute = self.memory_efficient
        x = bn_act(x, self.norm1, self.act1, recompute)
        with saving_recipes(recompute):
            x = self.conv1(x)
        x = bn_act(x, self.norm2, self.act2, recompute)
        with saving_recipes(recompute):
            return self.conv2(x)


class ElasticDenseLayer(DenseLayer):
    """The ELASTIC dense layer (Wang et al., CVPR 2019; allenai/elastic ``_DenseLayerElastic``).

    After the shared BN-act, two branches of half the bottleneck width each make ``growth`` features:
    one at full resolution (`DenseLayer`'s layers), one on a 2x2 average-pooled map (the ``_d``
    layers), upsampled back (bilinear); they are summed. It holds exactly a `DenseLayer`'s number of
    parameters; multiply-adds are 5/8 of it.
    """

    branches = 2

    def __init__(self, in_chs: int, growth_rate: int, bn_size: int = 4, act: str = "relu"):
        super().__init__(in_chs, growth_rate, bn_size, act)
        mid = self.conv1.out_channels
        self.pool = nn.AvgPool2d(2, 2, ceil_mode=True)
        self.conv1_d = nn.Conv2d(in_chs, mid, 1, bias=False)
        self.norm2_d = nn.BatchNorm2d(mid)
        self.act2_d = make_act(act)
        self.conv2_d = nn.Conv2d(mid, growth_rate, 3, padding=1, bias=False)

    @fx_leaf
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        recompute = self.memory_efficient
        x = bn_act(x, self.norm1, self.act1, recompute)
        with saving_recipes(recompute):
            full, low = self.conv1(x), self.conv1_d(self.pool(x))
        full, low = bn_act(full, self.norm2, self.act2, recompute), bn_act(low, self.norm2_d, self.act2_d, recompute)
        with saving_recipes(recompute):
            full, low = self.conv2(full), self.conv2_d(low)
        # Upsampling to the full map's size is the x2 upsample for even sizes and stays defined for odd ones.
        return full + F.interpolate(low, size=full.shape[-2:], mode="bilinear", align_corners=False)


class DenseBlock(nn.Module):
    """Dense connectivity: layer ``i`` reads the concat of the block input and all earlier outputs.

    ``layers`` are modules mapping the running concat to new features; the block returns
    ``[x, x1, ..., xk]`` (paper Eq. 1: ``x_k = w_k * [x0, x1, ..., x_{k-1}]``).
    """

    memory_efficient = False  # `cspnet.layers.memory_efficient`: rebuild each concat from the features

    def __init__(self, layers: list[nn.Module]):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for layer in self.layers:
            features.append(layer(recomputable_cat(features, 1, self.memory_efficient) if len(features) > 1 else x))
        return recomputable_cat(features, 1, self.memory_efficient)


@dataclass(frozen=True)
class DenseNetCfg:
    """A DenseNet-BC: ``depths`` dense layers per stage, growth ``growth_rate``, transition compression θ.

    ``fusion`` / ``part_ratio`` (γ, the fraction of base channels that bypass the dense block) make it a
    CSPDenseNet; ``elastic`` uses `ElasticDenseLayer` in every stage but the last (as allenai/elastic,
    whose last stage runs at 7x7).
    """

    depths: tuple[int, ...]
    growth_rate: int = 32
    stem_chs: int = 64
    bn_size: int = 4
    compression: float = 0.5
    act: str = "relu"
    fusion: Fusion = "none"
    part_ratio: float = 0.5
    elastic: bool = False


def _dense_blocks(cfg: DenseNetCfg, depth: int, elastic: bool, act: str):
    layer_cls = ElasticDenseLayer if elastic else DenseLayer

    def make_blocks(width: int):
        layers = [layer_cls(width + i * cfg.growth_rate, cfg.growth_rate, cfg.bn_size, act) for i in range(depth)]
        return DenseBlock(layers), width + depth * cfg.growth_rate

    return make_blocks


def _dense_stage(cfg: DenseNetCfg, index: int, in_chs: int, act: str) -> CrossStage:
    last = index == len(cfg.depths) - 1
    depth = cfg.depths[index]
    total = in_chs + depth * cfg.growth_rate  # what a plain dense block outputs
    out_chs = total if last else int(total * cfg.compression)  # DenseNet's transition width
    down = nn.AvgPool2d(2, 2) if index else None  # the pool that ends the previous transition layer
    make_blocks = _dense_blocks(cfg, depth, cfg.elastic and not last, act)
    # The last stage ends with norm5 (BN + act) instead of a transition conv.
    transition = BnAct(out_chs, act) if last else BnActConv(total, out_chs, act)
    if cfg.fusion == "none":
        return CrossStage(in_chs, make_blocks, down=down, fusion="none", transition=transition, transition_chs=out_chs)

    cross_chs = int(round(cfg.part_ratio * in_chs))  # CrossStage's slice rule
    main_out = total - cross_chs  # [x0'', x1, ..., xk]
    conv_fn = partial(BnActConv, act=act)
    if cfg.fusion == "fusion_last" and not last:
        # x_T alone makes the next stage's input, so it takes DenseNet's compression.
        pt_chs = out_chs - cross_chs
        if pt_chs < 1:
            raise ValueError(f"part_ratio {cfg.part_ratio} leaves no room for the partial transition of stage {index}")
        return CrossStage(
            in_chs, make_blocks, down=down, fusion="fusion_last", split="slice", part_ratio=cfg.part_ratio,
            partial_transition_chs=pt_chs, conv_fn=conv_fn,
        )
    # csp keeps x_T's width (paper: "transition -> concatenation -> transition"); the last stage of every
    # CSP variant ends like DenseNet, with norm5 after the concat (built as csp with a norm-only transition).
    fusion = "csp" if cfg.fusion == "fusion_last" else cfg.fusion
    return CrossStage(
        in_chs, make_blocks, down=down, fusion=fusion, split="slice", part_ratio=cfg.part_ratio,
        partial_transition_chs=main_out, conv_fn=conv_fn, transition=transition, transition_chs=out_chs,
    )


def build_densenet(cfg: DenseNetCfg, *, in_chans: int = 3, **net_kwargs) -> StagedNet:
    """Build a (CSP)DenseNet from its config."""
    check_fusion(cfg.fusion)
    check_part_ratio(cfg.part_ratio)
    if not 0 < cfg.compression <= 1:
        raise ValueError(f"compression must lie in (0, 1], got {cfg.compression}")
    act = canonical_act(cfg.act)
    # torchvision: conv0 7x7/2, norm0, relu0, pool0 (3x3/2 max-pool, padding 1).
    stem = nn.Sequential(ConvBnAct(in_chans, cfg.stem_chs, 7, 2, act=act), nn.MaxPool2d(3, 2, 1))
    stages, chs = [], []
    in_chs = cfg.stem_chs
    for i in range(len(cfg.depths)):
        stage = _dense_stage(cfg, i, in_chs, act)
        stages.append(stage)
        chs.append(stage.out_chs)
        in_chs = stage.out_chs
    strides = [1] + [2] * (len(stages) - 1)
    # The stem maps s pixels to ceil(s / 4); stage i's unpadded 2x2 average pool (i >= 1) halves the map
    # i - 1 times before it and needs 2 of its pixels.
    min_sizes = [1] + [4 * (2 ** i - 1) + 1 for i in range(1, len(stages))]
    return StagedNet(stem, cfg.stem_chs, 4, stages, chs, strides, in_chans=in_chans,
                     stage_min_input_sizes=min_sizes, **net_kwargs)


DENSENET121 = DenseNetCfg((6, 12, 24, 16))
DENSENET169 = DenseNetCfg((6, 12, 32, 32))
DENSENET201 = DenseNetCfg((6, 12, 48, 32))
DENSENET264_32 = DenseNetCfg((6, 12, 64, 48))
# γ = 0.75: the value that lands CSPDenseNet-201-Elastic on the paper's figures (docs/models_design.md).
CSPDENSENET121 = DenseNetCfg((6, 12, 24, 16), fusion="csp", part_ratio=0.75)
CSPDENSENET169 = DenseNetCfg((6, 12, 32, 32), fusion="csp", part_ratio=0.75)
CSPDENSENET201 = DenseNetCfg((6, 12, 48, 32), fusion="csp", part_ratio=0.75)

_TV = "torchvision's parameters, module for module"
MODELS = (
    ModelSpec("densenet121", "densenet", DENSENET121, build_densenet, default_input=224,
              description=f"DenseNet-121 (k=32), {_TV}"),
    ModelSpec("densenet169", "densenet", DENSENET169, build_densenet, default_input=224,
              description=f"DenseNet-169 (k=32), {_TV}"),
    ModelSpec("densenet201", "densenet", DENSENET201, build_densenet, default_input=224,
              description=f"DenseNet-201 (k=32), {_TV}"),
    ModelSpec("densenet264_32", "densenet", DENSENET264_32, build_densenet,
              PaperFigures(27.21, 11.03, 224, "paper Table 3", 77.8), default_input=224,
              description="DenseNet-264 (k=32, blocks 6-12-64-48); the paper's 27.21M is not this layout's 32.94M"),
    ModelSpec("cspdensenet121", "densenet", CSPDENSENET121, build_densenet, twin="densenet121", default_input=224,
              description="CSPDenseNet-121: partial dense blocks, γ=0.75, transition -> concat -> transition"),
    ModelSpec("cspdensenet169", "densenet", CSPDENSENET169, build_densenet, twin="densenet169", default_input=224,
              description="CSPDenseNet-169: partial dense blocks, γ=0.75, transition -> concat -> transition"),
    ModelSpec("cspdensenet201", "densenet", CSPDENSENET201, build_densenet, twin="densenet201", default_input=224,
              description="CSPDenseNet-201: partial dense blocks, γ=0.75, transition -> concat -> transition"),
)
