"""Necks: the maps between the backbone and the YOLO head.

Every neck takes backbone maps ordered finest -> coarsest and returns one map per output level,
finest -> coarsest, with channels ``out_chs``. ``widths`` are the neck's channels per output level
(the cfgs use 128 / 256 / 512 at strides 8 / 16 / 32).

- `FPN`: a top-down path with ``spp`` on the top map. Neck ``fpn`` is ``in-progress/csresnext50-fpn-spp.cfg``
  (and the top-down half of the PANet cfgs): a 1x1 lateral conv on each backbone map, concat [lateral, up].
  Neck ``yolov3`` (``lateral=False``) is YOLOv3's own (``yolov3-spp.cfg``, ``cs*-yolo-spp.cfg``; ``spp=False``
  for plain YOLOv3): the backbone map itself, concat [up, backbone].
- `PANet`: FPN + a bottom-up path, exactly ``cfg/cs*-panet-spp.cfg`` (paper §5 table, 56.9M / 71.3 BFLOPs
  with CSPResNeXt-50 at 512). Modules are registered in the cfg's layer order.
- `EFM`: the paper's Exact Fusion Model (§3.2, Fig. 6c), designed from its prose (no cfg was released):
  each output scale s fuses backbone scales s-1, s and the top-down map of s+1, each compressed by
  Maxout before the concatenation, then a bottom-up path; variants with SAM and SPP (Table 2).
- `GFM`: global fusion (Fig. 6b): every scale fused into one map, which is redistributed to every scale.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import SPP, ConvBnAct, Maxout, recomputable_cat

# torch.fx records these calls as single nodes that run when the graph runs: the resampling helpers
# read the maps' sizes (odd sides round differently in backbone and neck), and recomputable_cat
# decides by the autograd mode (FX wraps a function by its name in the calling module).
torch.fx.wrap("upsample2")
torch.fx.wrap("crop_to")
torch.fx.wrap("resize_to")
torch.fx.wrap("recomputable_cat")

NECKS = ("fpn", "yolov3", "panet", "efm", "efm-sam", "efm-spp", "gfm")


def conv_stack(in_chs: int, width: int, num_convs: int, act: str) -> nn.Sequential:
    """YOLO's alternating 1x1 (``width``) / 3x3 (``2 * width``) convs, starting and ending with a 1x1.

    Five convs is the cfgs' block after every concatenation; three is the lighter block EFM / GFM use.
    """
    if num_convs % 2 == 0:
        raise ValueError(f"conv_stack needs an odd number of convs, got {num_convs}")
    layers, c = [], in_chs
    for i in range(num_convs):
        out, k = (width, 1) if i % 2 == 0 else (2 * width, 3)
        layers.append(ConvBnAct(c, out, k, act=act))
        c = out
    return nn.Sequential(*layers)


class SppConvs(nn.Sequential):
    """The cfgs' top block with SPP: 1x1 c, 3x3 2c, 1x1 c, SPP (13/9/5/identity), 1x1 c, 3x3 2c, 1x1 c."""

    def __init__(self, in_chs: int, width: int, act: str):
        super().__init__(
            ConvBnAct(in_chs, width, 1, act=act),
            ConvBnAct(width, 2 * width, 3, act=act),
            ConvBnAct(2 * width, width, 1, act=act),
            SPP((5, 9, 13)),
            ConvBnAct(4 * width, width, 1, act=act),
            ConvBnAct(width, 2 * width, 3, act=act),
            ConvBnAct(2 * width, width, 1, act=act),
        )


def upsample2(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Darknet ``[upsample] stride=2`` (nearest), to the spatial size of ``like``.

    Where the backbone's stride-2 step rounded an odd side up (n -> 2n - 1: strided convs, ceil-mode
    pools) this is exactly the 2x upsample with its last row / column dropped; where it rounded down
    (2n + 1 -> n: DenseNet transitions) it is a nearest resampling to 2n + 1.
    """
    return F.interpolate(x, size=like.shape[-2:], mode="nearest")


def crop_to(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Drop the last row / column of a map downsampled by 2 in the neck where ``like``, the
    backbone's map at that stride, is one cell smaller.

    The neck's stride-2 steps (3x3/2 convs, EFM's ceil-mode 2x2 pool) round an odd side up; DenseNet
    transitions (2x2 average pools) round it down, so on an input that is not a multiple of the
    stride the neck's map has one extra row / column, centred past the backbone's last cell.
    """
    return x[..., : like.shape[-2], : like.shape[-1]]


def resize_to(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Max-pool down or nearest-upsample ``x`` to the spatial size of ``like``, each side on its own.

    On a narrow input one side can stop shrinking (1 cell at every stride) while the other still
    halves, so a map may need pooling in height and nothing, or upsampling, in width.
    Under ``torch.jit.trace`` the sizes stay read from the maps, so a TorchScript export runs at
    other input sizes; the legacy (TorchScript-based) ONNX exporter refuses ``adaptive_max_pool2d``
    with a size read from a tensor, so it gets them as constants (its graph takes one input size).
    """
    size, have = list(like.shape[-2:]), list(x.shape[-2:])
    if torch.onnx.is_in_onnx_export():
        size, have = [int(s) for s in size], [int(a) for a in have]
    pooled = [min(a, b) for a, b in zip(have, size)]
    if pooled != have:
        x = F.adaptive_max_pool2d(x, pooled)
    if pooled != size:
        x = F.interpolate(x, size=size, mode="nearest")
    return x


def _check_levels(feats: list[torch.Tensor], n: int, name: str) -> None:
    if len(feats) != n:
        raise ValueError(f"{name} expects {n} backbone maps (finest first), got {len(feats)}")


class TopDownStep(nn.Module):
    """One top-down step: reduce the coarser map (1x1), upsample, concat with the backbone map, convs.

    With ``lateral`` (the ``-fpn-spp`` / ``-panet-spp`` cfgs) the backbone map first goes through a
    1x1 conv: ``conv 1x1 c; upsample; route <backbone>; conv 1x1 c; route -1,-3; 5 convs``.
    Without (YOLOv3, the ``-yolo-spp`` cfgs) it is concatenated as it is, after the upsampled map:
    ``conv 1x1 c; upsample; route -1,<backbone>; 5 convs``.
    """

    memory_efficient = False  # `cspnet.layers.memory_efficient`: rebuild the concat in backward

    def __init__(self, coarse_chs: int, backbone_chs: int, width: int, num_convs: int, act: str, lateral: bool = True):
        super().__init__()
        self.reduce = ConvBnAct(coarse_chs, width, 1, act=act)
        self.lateral = ConvBnAct(backbone_chs, width, 1, act=act) if lateral else None
        self.convs = conv_stack(width + (width if lateral else backbone_chs), width, num_convs, act)

    def forward(self, coarse: torch.Tensor, backbone: torch.Tensor) -> torch.Tensor:
        if self.lateral is None:
            parts = [upsample2(self.reduce(coarse), backbone), backbone]
        else:
            lat = self.lateral(backbone)
            parts = [lat, upsample2(self.reduce(coarse), lat)]
        return self.convs(recomputable_cat(parts, 1, self.memory_efficient))


class BottomUpStep(nn.Module):
    """One PANet bottom-up step: 3x3/2 conv of the finer map, concat with the top-down map, convs.

    In the cfg: ``route -4; conv 3x3/2 c; route -1,<top-down map>; 5 convs``.
    """

    memory_efficient = False  # `cspnet.layers.memory_efficient`: rebuild the concat in backward

    def __init__(self, fine_chs: int, td_chs: int, width: int, num_convs: int, act: str):
        super().__init__()
        self.down = ConvBnAct(fine_chs, width, 3, 2, act=act)
        self.convs = conv_stack(width + td_chs, width, num_convs, act)

    def forward(self, fine: torch.Tensor, td: torch.Tensor) -> torch.Tensor:
        return self.convs(recomputable_cat([crop_to(self.down(fine), td), td], 1, self.memory_efficient))


class FPN(nn.Module):
    """Top-down feature pyramid (with the SPP block on the top map when ``spp``): the ``-fpn-spp`` cfg's
    with ``lateral``, YOLOv3's without (see `TopDownStep`)."""

    def __init__(self, in_chs: list[int], widths: list[int], act: str = "leaky", spp: bool = True, num_convs: int = 5,
                 lateral: bool = True):
        super().__init__()
        if len(in_chs) != len(widths):
            raise ValueError(f"FPN: {len(in_chs)} backbone maps for {len(widths)} output widths")
        self.num_inputs = len(in_chs)
        self.top = SppConvs(in_chs[-1], widths[-1], act) if spp else conv_stack(in_chs[-1], widths[-1], num_convs, act)
        # coarse -> fine, the cfg's order
        self.steps = nn.ModuleList(
            TopDownStep(widths[i + 1], in_chs[i], widths[i], num_convs, act, lateral)
            for i in reversed(range(len(in_chs) - 1))
        )
        self.out_chs = list(widths)

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        _check_levels(feats, self.num_inputs, "FPN")
        outs = [self.top(feats[-1])]
        for step, backbone in zip(self.steps, reversed(feats[:-1])):
            outs.append(step(outs[-1], backbone))
        return outs[::-1]


class PANet(nn.Module):
    """PANet with SPP as in ``cfg/csresnext50-panet-spp.cfg`` (identical neck in the csdarknet53 /
    csresnet50 cfgs): the FPN top-down path, then a bottom-up path of 3x3/2 convs and 5-conv blocks.

    Heads read the top-down map at the finest level and the bottom-up maps above it.
    """

    def __init__(self, in_chs: list[int], widths: list[int], act: str = "leaky", spp: bool = True, num_convs: int = 5):
        super().__init__()
        self.topdown = FPN(in_chs, widths, act, spp, num_convs)
        self.bottomup = nn.ModuleList(
            BottomUpStep(widths[i], widths[i + 1], widths[i + 1], num_convs, act) for i in range(len(widths) - 1)
        )
        self.out_chs = list(widths)

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        td = self.topdown(feats)
        outs = [td[0]]
        for step, t in zip(self.bottomup, td[1:]):
            outs.append(step(outs[-1], t))
        return outs


def compress(in_chs: int, width: int) -> tuple[nn.Module, int]:
    """EFM's channel compression: Maxout down to ``width`` channels (identity if already narrower)."""
    if in_chs <= width:
        return nn.Identity(), in_chs
    return Maxout(width), width


class SpatialAttention(nn.Module):
    """SAM (ThunderNet §3.3, as Darknet's ``[sam]``): ``x * sigmoid(BN(conv1x1(x)))``.

    ThunderNet computes the attention from its RPN map; a one-stage detector has none, so the map
    attends to itself (point-wise attention, one weight per position and channel).
    """

    def __init__(self, chs: int):
        super().__init__()
        self.attn = ConvBnAct(chs, chs, 1, act="logistic")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.attn(x)


class EFMNode(nn.Module):
    """Fuse, for output scale s: backbone s-1 (max-pooled to s), backbone s and top-down s+1
    (upsampled), each Maxout-compressed to ``width``, concatenated, then a 3-conv block."""

    memory_efficient = False  # `cspnet.layers.memory_efficient`: rebuild the concat in backward

    def __init__(self, finer_chs: int, own_chs: int, coarser_chs: int | None, width: int, act: str, spp: bool):
        super().__init__()
        self.finer, c1 = compress(finer_chs, width)
        self.own, c2 = compress(own_chs, width)
        if coarser_chs is None:
            self.coarser, c3 = None, 0
        else:
            self.coarser, c3 = compress(coarser_chs, width)
        cat = c1 + c2 + c3
        # EFM (SPP): the top node's fused map goes through the cfgs' SPP block instead of the 3 convs.
        self.convs = SppConvs(cat, width, act) if spp else conv_stack(cat, width, 3, act)

    def forward(self, finer: torch.Tensor, own: torch.Tensor, coarser: torch.Tensor | None) -> torch.Tensor:
        # Maxout and max-pooling commute (both are maxima), so compressing before the 2x2 pool is
        # the same map at a quarter of the pooling work.
        parts = [crop_to(F.max_pool2d(self.finer(finer), 2, 2, ceil_mode=True), own), self.own(own)]
        if self.coarser is not None:
            parts.append(upsample2(self.coarser(coarser), own))
        return self.convs(recomputable_cat(parts, 1, self.memory_efficient))


class EFM(nn.Module):
    """Exact Fusion Model (paper §3.2, Fig. 6c), designed from the text; see docs/detection.md.

    Takes ``L + 1`` backbone maps (the extra, finest one is scale s-1 of the first output) and returns
    ``L`` maps. Top-down: node s fuses [B(s-1)↓, B(s), T(s+1)↑], Maxout-compressed; bottom-up as PANet
    with 3-conv blocks. ``sam`` adds spatial attention on every output (EFM (SAM), the paper's final
    head); ``spp`` puts the SPP block in the top node (EFM (SPP)).
    """

    def __init__(self, in_chs: list[int], widths: list[int], act: str = "leaky", sam: bool = False, spp: bool = False):
        super().__init__()
        if len(in_chs) != len(widths) + 1:
            raise ValueError(f"EFM needs one more backbone map than outputs: {len(in_chs)} maps for {len(widths)} outputs")
        self.num_inputs = len(in_chs)
        n = len(widths)
        # top-down nodes, coarse -> fine; node for output i reads backbone maps i (finer) and i + 1 (own)
        self.nodes = nn.ModuleList(
            EFMNode(in_chs[i], in_chs[i + 1], None if i == n - 1 else widths[i + 1], widths[i], act, spp and i == n - 1)
            for i in reversed(range(n))
        )
        self.bottomup = nn.ModuleList(BottomUpStep(widths[i], widths[i + 1], widths[i + 1], 3, act) for i in range(n - 1))
        self.attention = nn.ModuleList(SpatialAttention(w) for w in widths) if sam else None
        self.out_chs = list(widths)

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        _check_levels(feats, self.num_inputs, "EFM")
        n = len(self.out_chs)
        td: list[torch.Tensor] = []
        for node, i in zip(self.nodes, reversed(range(n))):
            td.append(node(feats[i], feats[i + 1], td[-1] if td else None))
        td = td[::-1]
        outs = [td[0]]
        for step, t in zip(self.bottomup, td[1:]):
            outs.append(step(outs[-1], t))
        if self.attention is not None:
            outs = [sam(x) for sam, x in zip(self.attention, outs)]
        return outs


class GFM(nn.Module):
    """Global Fusion Model (paper Fig. 6b, the ThunderNet-style ablation of Table 2).

    Every backbone map is reduced (1x1) and resized to the middle level, the concatenation is
    fused into one global map (1x1 + 3x3), and that map is redistributed: resized to each level,
    concatenated with the level's own reduced map, and refined by a 3-conv block.
    """

    memory_efficient = False  # `cspnet.layers.memory_efficient`: rebuild the concats in backward

    def __init__(self, in_chs: list[int], widths: list[int], act: str = "leaky"):
        super().__init__()
        if len(in_chs) != len(widths):
            raise ValueError(f"GFM: {len(in_chs)} backbone maps for {len(widths)} output widths")
        self.num_inputs = len(in_chs)
        self.mid = len(widths) // 2
        g = widths[self.mid]
        self.reduce = nn.ModuleList(ConvBnAct(c, w, 1, act=act) for c, w in zip(in_chs, widths))
        self.fuse = nn.Sequential(ConvBnAct(sum(widths), g, 1, act=act), ConvBnAct(g, g, 3, act=act))
        self.refine = nn.ModuleList(conv_stack(w + g, w, 3, act) for w in widths)
        self.out_chs = list(widths)

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        _check_levels(feats, self.num_inputs, "GFM")
        reduced = [r(x) for r, x in zip(self.reduce, feats)]
        ref = reduced[self.mid]
        glob = self.fuse(recomputable_cat([resize_to(x, ref) for x in reduced], 1, self.memory_efficient))
        return [refine(recomputable_cat([x, resize_to(glob, x)], 1, self.memory_efficient))
                for refine, x in zip(self.refine, reduced)]


def neck_inputs(neck: str, num_levels: int) -> int:
    """How many backbone maps a neck reads for ``num_levels`` outputs (EFM also reads scale s-1)."""
    return num_levels + 1 if neck.startswith("efm") else num_levels


def build_neck(neck: str, in_chs: list[int], widths: list[int], act: str = "leaky", spp: bool | None = None) -> nn.Module:
    """Build neck ``neck`` (one of `NECKS`). ``spp=None`` takes each neck's default: on for FPN, YOLOv3
    and PANet (the official ``-fpn-spp`` / ``-yolo-spp`` / ``-panet-spp`` cfgs), on for EFM (SPP) only,
    off otherwise."""
    if neck in ("fpn", "yolov3"):
        return FPN(in_chs, widths, act, spp=True if spp is None else spp, lateral=neck == "fpn")
    if neck == "panet":
        return PANet(in_chs, widths, act, spp=True if spp is None else spp)
    if neck in ("efm", "efm-sam", "efm-spp"):
        use_spp = (neck == "efm-spp") if spp is None else spp
        return EFM(in_chs, widths, act, sam=neck == "efm-sam", spp=use_spp)
    if neck == "gfm":
        if spp:
            raise ValueError("neck 'gfm' has no SPP variant")
        return GFM(in_chs, widths, act)
    raise ValueError(f"unknown neck {neck!r}; expected one of {', '.join(NECKS)}")
