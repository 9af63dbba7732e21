"""The YOLOv3 head: anchors per scale, the box parametrisation (encode / decode) and the 1x1 predictors.

Box parametrisation (Darknet ``get_yolo_box``): a prediction at grid cell ``(gx, gy)`` of a level with
stride ``s``, for an anchor of size ``(pw, ph)`` pixels, is

    x = (sigmoid(tx) * k - (k - 1) / 2 + gx) * s        y likewise
    w = pw * exp(tw)                                    h likewise

with ``k = scale_x_y`` (1.0 in the ``*-panet-spp.cfg`` files, 1.05-1.2 in the "optimal" cfg). The raw
map of a level has ``A * (5 + C)`` channels in Darknet's order: for each anchor, ``tx ty tw th obj
cls_0 … cls_{C-1}`` (``entry_index`` in darknet ``yolo_layer.c``), so Darknet weights fit unchanged.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..layers import ConvBnAct

# The nine COCO anchors of every official cfg (yolov3 / *-panet-spp), in input pixels, with the
# masks that give anchors 0-2 to stride 8, 3-5 to stride 16 and 6-8 to stride 32.
YOLOV3_ANCHORS: tuple[tuple[float, float], ...] = (
    (10, 13), (16, 30), (33, 23), (30, 61), (62, 45), (59, 119), (116, 90), (156, 198), (373, 326),
)
# Exponent cap for the width / height: exp(8) ~ 3000 anchors wide, beyond any image; keeps a
# diverging early step from producing inf boxes (and NaN IoU losses).
MAX_LOG_SCALE = 8.0


@dataclass(frozen=True)
class AnchorLayout:
    """Anchor sizes (pixels of the network input) and which of them each output level predicts.

    ``masks[i]`` lists the anchors of level ``i`` (stride ``strides[i]``), as the cfgs' ``mask=``.
    """

    anchors: tuple[tuple[float, float], ...]
    masks: tuple[tuple[int, ...], ...]
    strides: tuple[int, ...]

    def __post_init__(self):
        if len(self.masks) != len(self.strides):
            raise ValueError(f"{len(self.masks)} anchor masks for {len(self.strides)} output levels")
        for i, (w, h) in enumerate(self.anchors):
            if not (w > 0 and h > 0):
                raise ValueError(f"anchor {i} has a non-positive size ({w}, {h})")
        used = sorted(a for m in self.masks for a in m)
        if used != list(range(len(self.anchors))):
            raise ValueError(f"anchor masks {self.masks} must use each of the {len(self.anchors)} anchors exactly once")

    @property
    def num_levels(self) -> int:
        return len(self.strides)

    def num_anchors(self, level: int) -> int:
        return len(self.masks[level])

    def level_anchors(self, level: int) -> torch.Tensor:
        """``(A, 2)`` anchor sizes in pixels for one level."""
        return torch.tensor([self.anchors[a] for a in self.masks[level]], dtype=torch.float32)

    def all_anchors(self) -> torch.Tensor:
        return torch.tensor(self.anchors, dtype=torch.float32)


def anchor_pairs(anchors) -> tuple[tuple[float, float], ...]:
    """``anchors`` as positive ``(width, height)`` float pairs, or a clear error."""
    if not all(isinstance(a, (tuple, list)) and len(a) == 2 for a in anchors):
        raise ValueError(f"anchors must be (width, height) pairs, got {anchors!r}")
    pairs = tuple((float(w), float(h)) for w, h in anchors)
    if not all(w > 0 and h > 0 for w, h in pairs):
        raise ValueError(f"anchor sizes must be positive, got {pairs}")
    return pairs


def make_anchor_layout(
    anchors: tuple[tuple[float, float], ...] | list | None, strides: tuple[int, ...]
) -> AnchorLayout:
    """Spread ``anchors`` (default: the cfgs' nine COCO anchors) over ``strides``, smallest first.

    Anchors are sorted by area and split into equal groups, the finest stride taking the smallest,
    which is how the cfgs' masks 0,1,2 / 3,4,5 / 6,7,8 are laid out.
    """
    strides = tuple(strides)
    if not strides or any(not isinstance(s, int) or s < 1 for s in strides) or list(strides) != sorted(set(strides)):
        raise ValueError(f"strides must be increasing positive integers, finest first (e.g. (8, 16, 32)), got {strides}")
    if anchors is None:
        anchors, which = YOLOV3_ANCHORS, "the cfgs' 9 COCO anchors (the default)"
    else:
        anchors = anchor_pairs(anchors)
        which = f"{len(anchors)} anchors"
    if len(anchors) % len(strides):
        raise ValueError(f"{which} cannot be split evenly over {len(strides)} levels (strides {strides}); give anchors=")
    anchors = tuple(sorted(anchors, key=lambda wh: wh[0] * wh[1]))
    per = len(anchors) // len(strides)
    masks = tuple(tuple(range(i * per, (i + 1) * per)) for i in range(len(strides)))
    return AnchorLayout(anchors, masks, tuple(strides))


def level_scale_x_y(scale_x_y: float | tuple[float, ...] | list[float], num_levels: int) -> tuple[float, ...]:
    """``scale_x_y`` for each output level, finest first: one positive number for every level, or one
    per level (``csresnext50-panet-spp-original-optimal.cfg``: 1.2 / 1.1 / 1.05)."""
    values = tuple(scale_x_y) if isinstance(scale_x_y, (tuple, list)) else (scale_x_y,) * num_levels
    if len(values) != num_levels:
        raise ValueError(f"scale_x_y gives {len(values)} values for {num_levels} output levels; give one, or one per level")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in values):
        raise ValueError(f"scale_x_y must be positive (Darknet uses 1.0-1.2), got {scale_x_y}")
    return tuple(float(v) for v in values)


def fit_anchors(wh, k: int = 9, seed: int = 0) -> tuple[tuple[float, float], ...]:
    """``k`` anchor sizes from training box sizes ``wh`` (N, 2) pixels by k-means (scikit-learn),
    sorted by area, as Darknet's ``calc_anchors`` does for a new data set."""
    import numpy as np
    from sklearn.cluster import KMeans

    wh = np.asarray(wh, dtype=np.float64).reshape(-1, 2)
    if not len(wh):
        raise ValueError("no boxes to fit anchors to")
    if len(wh) < k:
        raise ValueError(f"need at least {k} boxes to fit {k} anchors, got {len(wh)}")
    centres = KMeans(n_clusters=k, n_init=10, random_state=seed).fit(wh).cluster_centers_
    centres = sorted(centres.tolist(), key=lambda c: c[0] * c[1])
    return tuple((round(w, 1), round(h, 1)) for w, h in centres)


def encode_boxes(
    boxes: torch.Tensor, cells: torch.Tensor, anchors: torch.Tensor, stride: float, scale_x_y: float = 1.0,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Raw targets ``(tx, ty, tw, th)`` (logits) that `decode_boxes` maps back to ``boxes``.

    ``boxes`` are ``(M, 4)`` xyxy pixels, ``cells`` the ``(M, 2)`` integer grid cells ``(gx, gy)``
    holding each box, ``anchors`` the ``(M, 2)`` anchor sizes. The sigmoid offset is clamped into
    ``(eps, 1 - eps)``, so a centre on a cell border still has a finite logit.
    """
    cxy = (boxes[:, :2] + boxes[:, 2:]) / 2
    wh = (boxes[:, 2:] - boxes[:, :2]).clamp(min=eps)
    offset = (cxy / stride - cells + (scale_x_y - 1) / 2) / scale_x_y
    txy = torch.logit(offset.clamp(eps, 1 - eps))
    twh = torch.log(wh / anchors)
    return torch.cat([txy, twh], dim=1)


def decode_boxes(
    t: torch.Tensor, cells: torch.Tensor, anchors: torch.Tensor, stride: float, scale_x_y: float = 1.0
) -> torch.Tensor:
    """xyxy pixel boxes from raw ``(…, 4)`` predictions at ``cells`` with ``anchors`` (broadcasting)."""
    cxy = (torch.sigmoid(t[..., :2]) * scale_x_y - (scale_x_y - 1) / 2 + cells) * stride
    wh = torch.exp(t[..., 2:4].clamp(max=MAX_LOG_SCALE)) * anchors
    return torch.cat([cxy - wh / 2, cxy + wh / 2], dim=-1)


def split_level(raw: torch.Tensor, num_anchors: int) -> torch.Tensor:
    """``(N, A*(5+C), H, W)`` -> ``(N, A, H, W, 5+C)`` (Darknet's channel order, anchor-major)."""
    n, ch, h, w = raw.shape
    if ch % num_anchors:
        raise ValueError(f"head output with {ch} channels cannot hold {num_anchors} anchors")
    return raw.view(n, num_anchors, ch // num_anchors, h, w).permute(0, 1, 3, 4, 2)


def grid_cells(h: int, w: int, device=None) -> torch.Tensor:
    """``(H, W, 2)`` tensor of ``(gx, gy)``."""
    gy, gx = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    return torch.stack([gx, gy], dim=-1).float()


def decode_level(raw: torch.Tensor, anchors: torch.Tensor, stride: float, scale_x_y: float = 1.0) -> torch.Tensor:
    """Decode one level: ``(N, A*H*W, 5+C)`` rows ``[x1, y1, x2, y2, objectness, class probs…]``.

    Rows run anchor-major, then row, then column (the order of ``split_level``).
    """
    a = anchors.shape[0]
    p = split_level(raw, a)
    n, _, h, w, _ = p.shape
    cells = grid_cells(h, w, raw.device)[None, None]
    boxes = decode_boxes(p[..., :4], cells, anchors.to(raw)[None, :, None, None, :], stride, scale_x_y)
    scores = torch.sigmoid(p[..., 4:])
    return torch.cat([boxes, scores], dim=-1).reshape(n, a * h * w, -1)


class YoloHead(nn.Module):
    """Per output level: a 3x3 conv (``mid_chs``) then a 1x1 linear predictor with bias.

    This is the pair that precedes every ``[yolo]`` section of the cfgs (e.g. 3x3 256 -> 1x1 255 at
    stride 8 in csresnext50-panet-spp.cfg). ``mid_chs`` entries of 0 drop the 3x3 conv.
    """

    def __init__(
        self,
        in_chs: list[int],
        num_anchors: list[int],
        num_classes: int,
        mid_chs: list[int] | None = None,
        act: str = "leaky",
        prior_prob: float = 0.01,
    ):
        super().__init__()
        if len(in_chs) != len(num_anchors):
            raise ValueError(f"head: {len(in_chs)} input maps for {len(num_anchors)} anchor groups")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        mid_chs = [2 * c for c in in_chs] if mid_chs is None else list(mid_chs)
        self.num_classes = num_classes
        self.num_anchors = list(num_anchors)
        self.convs = nn.ModuleList(
            ConvBnAct(c, m, 3, act=act) if m else nn.Identity() for c, m in zip(in_chs, mid_chs)
        )
        self.preds = nn.ModuleList(
            nn.Conv2d(m or c, a * (5 + num_classes), 1) for c, m, a in zip(in_chs, mid_chs, num_anchors)
        )
        self._init_bias(prior_prob)

    def _init_bias(self, prior_prob: float) -> None:
        # Start every objectness at prior_prob and every class at 1/C (focal-loss style prior): the
        # first steps then do not drown in the loss of ~all-negative cells.
        obj_bias = -math.log((1 - prior_prob) / prior_prob)
        cls_bias = -math.log(max(self.num_classes - 1, 1))
        for pred, a in zip(self.preds, self.num_anchors):
            nn.init.normal_(pred.weight, 0, 0.01)
            b = pred.bias.detach().view(a, 5 + self.num_classes)
            b.zero_()
            b[:, 4] = obj_bias
            b[:, 5:] = cls_bias

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        return [pred(conv(x)) for x, conv, pred in zip(feats, self.convs, self.preds)]
