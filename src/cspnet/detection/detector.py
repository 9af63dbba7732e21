"""`Detector` = backbone taps -> neck -> YOLO head, and `create_detector`.

In training mode ``forward`` returns the raw per-level head maps (what `YoloLoss` reads); in eval
mode it returns the decoded boxes of every anchor and cell before NMS, ``(N, R, 5 + C)`` rows
``[x1, y1, x2, y2, objectness, class probabilities…]`` in input pixels. `Detector.postprocess`
applies the confidence threshold and class-wise NMS (``torchvision.ops.batched_nms``).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torchvision.ops import batched_nms

from ..engine.models import build_model
from .head import AnchorLayout, YoloHead, anchor_pairs, decode_level, level_scale_x_y, make_anchor_layout
from .necks import NECKS, build_neck, neck_inputs

# torch.fx records decoding as one node per level: it reads the grid size from the raw map when the
# graph runs. A traced detector computes what it computed in the mode it was traced in (training:
# the raw maps; eval: the decoded rows).
torch.fx.wrap("decode_level")

# Feature taps the official detector cfgs read where they differ from our stage outputs:
# csresnet50-panet-spp.cfg routes layers 38 and 65, the 1x1 convs that open the next stage's
# downsampling (256 ch at stride 8, 512 at 16), not the 512 / 1024-ch concats before them.
# csresnext50 (layers 38, 65) and csdarknet53 (54, 85) tap the stage outputs themselves. The
# stride-4 tap, which only EFM reads, follows the same rule for cspresnet50. Each entry names the
# stage whose first downsampling conv is tapped; that conv reads the previous stage's maps, at their stride.
_CSPRESNET50_TAPS = {4: 1, 8: 2, 16: 3}
CFG_TAPS: dict[str, dict[int, int]] = {
    "cspresnet50": _CSPRESNET50_TAPS, "cspresnet50_omega": _CSPRESNET50_TAPS,
    "cspresnet50_elastic": _CSPRESNET50_TAPS,  # in-progress/csresnet50-elastic-panet-spp.cfg: layers 86 and 153
}
# Neck width at the coarsest level: 512 in the official cfgs (128 / 256 / 512); EFM and GFM were
# designed for small backbones (paper Table 2: CSPPeleeNet), so they default to half of it.
DEFAULT_WIDTH = {"fpn": 512, "yolov3": 512, "panet": 512, "efm": 256, "efm-sam": 256, "efm-spp": 256, "gfm": 256}


@dataclass(frozen=True)
class DetectorCfg:
    """Everything needed to rebuild a detector (stored in checkpoints)."""

    backbone: str
    neck: str = "panet"
    num_classes: int = 80
    anchors: tuple[tuple[float, float], ...] | None = None
    strides: tuple[int, ...] = (8, 16, 32)
    neck_width: int | None = None
    spp: bool | None = None
    act: str = "leaky"
    scale_x_y: float | tuple[float, ...] = 1.0  # one for every level, or one per level (finest first)
    in_chans: int = 3
    backbone_width: float = 1.0
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["anchors"] = [list(a) for a in self.anchors] if self.anchors is not None else None
        d["strides"] = list(self.strides)
        if isinstance(self.scale_x_y, tuple):
            d["scale_x_y"] = list(self.scale_x_y)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DetectorCfg:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown detector config key(s) {unknown}; known: {sorted(names)}")
        d = dict(d)
        if d.get("anchors") is not None:
            d["anchors"] = tuple(tuple(float(v) for v in a) for a in d["anchors"])
        if "strides" in d:
            d["strides"] = tuple(int(s) for s in d["strides"])
        if isinstance(d.get("scale_x_y"), list):
            d["scale_x_y"] = tuple(d["scale_x_y"])
        return cls(**d)


def _keep_output(module: nn.Module, inputs, output) -> None:
    # A plain function (no closure over the detector), so deep copies (EMA) keep working. Only while
    # `BackboneTaps.forward` runs: gradient checkpointing reruns the module in the backward pass, and a
    # map kept then would stay on the module (alive, and refusing deepcopy).
    if getattr(module, "tap_armed", False):
        module.tap_output = output


class BackboneTaps(nn.Module):
    """Runs a backbone once and returns the maps the neck reads, finest first.

    A tap is a feature level (an int, see ``feature_info``) or the dotted name of a module inside
    the backbone whose output is kept by a forward hook (`CFG_TAPS`). The backbone (``features_only``)
    returns the levels tapped and holds no stage after the deepest (`StagedNet.keep_levels`): a stage
    whose output no tap reads would take no part in the loss (and DistributedDataParallel refuses
    parameters without a gradient).
    """

    def __init__(self, backbone: nn.Module, taps: list[int | str], chs: list[int], strides: list[int]):
        super().__init__()
        backbone.keep_levels([t for t in taps if isinstance(t, int)])
        self.body = backbone
        self.taps = list(taps)
        self.out_chs = list(chs)
        self.strides = list(strides)
        modules = dict(backbone.named_modules())
        for tap in self.taps:
            if isinstance(tap, str):
                if tap not in modules:
                    raise ValueError(f"backbone has no module {tap!r} to tap")
                modules[tap].register_forward_hook(_keep_output)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        tapped = [self.body.get_submodule(t) for t in self.taps if isinstance(t, str)]
        for module in tapped:
            module.tap_armed = True
        try:
            levels = iter(self.body(x))  # the levels tapped, in the taps' order
        finally:
            for module in tapped:
                module.tap_armed = False
        maps = []
        for t in self.taps:
            if isinstance(t, str):
                module = self.body.get_submodule(t)
                maps.append(module.tap_output)
                del module.tap_output  # do not keep activations alive between calls
            else:
                maps.append(next(levels))
        return maps


def select_taps(backbone: nn.Module, name: str, strides: tuple[int, ...]) -> tuple[list[int | str], list[int]]:
    """The tap and its channel count for each stride (finest first): the cfg's tap if `CFG_TAPS` names
    one at that stride, else the deepest feature level at that stride. The coarsest tap is always a
    level: a cfg tap opens the next stage, which then runs for a deeper level, never for one conv."""
    infos = backbone.feature_info
    modules = dict(backbone.named_modules())
    taps, chs = [], []
    for s in strides:
        levels = [i for i, f in enumerate(infos) if f.reduction == s]
        if not levels:
            have = sorted({f.reduction for f in infos})
            raise ValueError(f"backbone {name!r} has no feature map at stride {s} (strides: {have})")
        stage = CFG_TAPS.get(name, {}).get(s) if s != strides[-1] else None
        # the cfg's tap reads the deepest map at its stride; in a dilated backbone (output_stride) that map
        # belongs to a later stage, and a tap there would leave the deeper stages unread
        if stage is not None and infos[levels[-1]]["module"] == f"stages.{stage - 1}":
            taps.append(f"stages.{stage}.down.0")
            chs.append(modules[taps[-1]].out_chs)
            continue
        taps.append(levels[-1])
        chs.append(infos[levels[-1]].num_chs)
    return taps, chs


class Detector(nn.Module):
    """A one-stage YOLO-style detector (see the module docstring for the outputs)."""

    def __init__(self, cfg: DetectorCfg):
        super().__init__()
        if cfg.neck not in NECKS:
            raise ValueError(f"unknown neck {cfg.neck!r}; expected one of {', '.join(NECKS)}")
        self.cfg = cfg
        self.model_cfg = cfg  # for checkpoint metadata
        self.model_name = f"{cfg.backbone}-{cfg.neck}"
        self.num_classes = cfg.num_classes
        self.in_chans = cfg.in_chans
        self.layout: AnchorLayout = make_anchor_layout(cfg.anchors, cfg.strides)
        if any(b != 2 * a for a, b in zip(cfg.strides, cfg.strides[1:])):
            raise ValueError(f"strides {cfg.strides}: each level must have twice the stride of the one before "
                             "(the necks resample by 2 between levels)")
        self.scale_x_y = level_scale_x_y(cfg.scale_x_y, len(cfg.strides))
        n_in = neck_inputs(cfg.neck, len(cfg.strides))
        tap_strides = tuple(cfg.strides[0] // 2 ** k for k in range(n_in - len(cfg.strides), 0, -1)) + cfg.strides
        picked = sorted({"features_only", "out_indices"} & set(cfg.backbone_kwargs))
        if picked:
            raise ValueError(f"backbone_kwargs {picked}: the detector takes the backbone's feature levels its strides "
                             f"{cfg.strides} need; leave these out")
        body = build_model(cfg.backbone, num_classes=0, in_chans=cfg.in_chans, width=cfg.backbone_width,
                           options={**cfg.backbone_kwargs, "features_only": True})
        have = sorted({f.reduction for f in body.feature_info})
        if tap_strides[0] < cfg.strides[0] and tap_strides[0] not in have:  # EFM also reads scale s-1
            raise ValueError(f"neck {cfg.neck!r} also reads the backbone map one scale finer than its finest output "
                             f"(stride {tap_strides[0]} for strides {cfg.strides}); backbone {cfg.backbone!r} has maps "
                             f"at strides {have}: start the strides at {2 * have[0]} or more")
        taps, chs = select_taps(body, cfg.backbone, tap_strides)
        self.backbone = BackboneTaps(body, taps, chs, list(tap_strides))
        top = DEFAULT_WIDTH[cfg.neck] if cfg.neck_width is None else cfg.neck_width
        n = len(cfg.strides)
        if top < 8 * 2 ** (n - 1):  # each finer level gets half the width of the next coarser one
            raise ValueError(f"neck_width {top} leaves the finest of {n} levels fewer than 8 channels; give at least {8 * 2 ** (n - 1)}")
        widths = [top // 2 ** (n - 1 - i) for i in range(n)]
        self.neck = build_neck(cfg.neck, chs, widths, cfg.act, cfg.spp)
        self.head = YoloHead(self.neck.out_chs, [self.layout.num_anchors(i) for i in range(n)], cfg.num_classes, act=cfg.act)

    @property
    def strides(self) -> tuple[int, ...]:
        return self.layout.strides

    def forward_raw(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.head(self.neck(self.backbone(x)))

    def decode(self, raw: list[torch.Tensor]) -> torch.Tensor:
        """Decoded rows of every level, concatenated: ``(N, R, 5 + C)``."""
        return torch.cat(
            [
                decode_level(r, self.layout.level_anchors(i), s, k)
                for i, (r, s, k) in enumerate(zip(raw, self.layout.strides, self.scale_x_y))
            ],
            dim=1,
        )

    def forward(self, x: torch.Tensor):
        raw = self.forward_raw(x)
        return raw if self.training else self.decode(raw)

    @staticmethod
    def postprocess(
        outputs: torch.Tensor,
        conf_thresh: float = 0.25,
        iou_thresh: float = 0.45,
        max_det: int = 300,
        multi_label: bool = True,
        max_candidates: int = 30000,
    ) -> list[dict[str, torch.Tensor]]:
        """Threshold and NMS the decoded rows of each image.

        Score = objectness x class probability. With ``multi_label`` every class above
        ``conf_thresh`` is a candidate (Darknet's per-class thresholding), else only the best class.
        Only the ``max_candidates`` best-scoring candidates of an image go to NMS (as YOLOv5's
        ``max_nms``): at an evaluation threshold of 0.001 an untrained 80-class detector at 416 px has
        ~700,000, and NMS over them took 40 s per image. NMS is class-wise
        (`torchvision.ops.batched_nms`). Returns per image a dict with ``boxes`` (K, 4) xyxy,
        ``scores`` (K,) and ``labels`` (K,), best first.
        """
        if not isinstance(outputs, torch.Tensor):
            raise ValueError("postprocess takes the decoded rows a detector returns in eval mode; in training mode it "
                             "returns one raw map per level (call model.eval() first)")
        if outputs.ndim != 3 or outputs.shape[-1] < 6:
            raise ValueError(f"postprocess expects decoded outputs (N, R, 5 + C), got shape {tuple(outputs.shape)}")
        results = []
        for rows in outputs:
            scores = rows[:, 4:5] * rows[:, 5:]
            if multi_label:
                idx, labels = (scores > conf_thresh).nonzero(as_tuple=True)
                conf = scores[idx, labels]
            else:
                conf, labels = scores.max(1)
                idx = (conf > conf_thresh).nonzero().flatten()
                conf, labels = conf[idx], labels[idx]
            if len(conf) > max_candidates:
                best = conf.topk(max_candidates).indices
                idx, labels, conf = idx[best], labels[best], conf[best]
            boxes = rows[idx, :4]
            keep = batched_nms(boxes, conf, labels, iou_thresh)[:max_det]
            results.append({"boxes": boxes[keep], "scores": conf[keep], "labels": labels[keep]})
        return results

    def cfg_layer_order(self) -> list[str]:
        """Names of the neck and head convolutions in the order of the official Darknet cfg.

        The cfgs interleave the heads with the neck (PANet: top-down path, stride-8 head,
        bottom-up step, stride-16 head, …); a Darknet ``.weights`` file stores conv weights in
        this order after the backbone's.
        """
        def convs(prefix: str, mod: nn.Module) -> list[str]:
            return [f"{prefix}.{n}" if n else prefix for n, m in mod.named_modules() if isinstance(m, nn.Conv2d)]

        def head(i: int) -> list[str]:
            return convs(f"head.convs.{i}", self.head.convs[i]) + convs(f"head.preds.{i}", self.head.preds[i])

        n = len(self.strides)
        if self.cfg.neck == "panet":
            order = convs("neck.topdown", self.neck.topdown) + head(0)
            for i, step in enumerate(self.neck.bottomup):
                order += convs(f"neck.bottomup.{i}", step) + head(i + 1)
            return order
        if self.cfg.neck in ("fpn", "yolov3"):  # the same modules; yolov3's steps have no lateral conv
            order = convs("neck.top", self.neck.top) + head(n - 1)
            for i, step in enumerate(self.neck.steps):
                order += convs(f"neck.steps.{i}", step) + head(n - 2 - i)
            return order
        raise ValueError(f"neck {self.cfg.neck!r} has no official Darknet cfg")

    def darknet_records(self) -> list:
        """The weighted layers in the order of the official cfg's ``.weights`` file: the backbone's
        (module order, see `cspnet.darknet.mapping`), then neck and head in `cfg_layer_order`."""
        from ..darknet.mapping import native_records

        records = native_records(self)
        by_name = {r.name: r for r in records}
        backbone = [r for r in records if r.name.startswith("backbone.")]
        return backbone + [by_name[n] for n in self.cfg_layer_order()]

    def load_backbone_weights(self, path) -> list[str]:
        """Start the backbone from weights trained without this detector (e.g. on ImageNet); the neck
        and head keep their initialisation. ``path``: a ``.safetensors`` / ``.pth`` of the backbone model
        (`cspnet.weights.load_pretrained`; its classifier is ignored), or an official Darknet file for the
        backbone's cfg, whole or cut after the backbone (``.conv.N``; `load_darknet_weights`).

        Returns notes for the user, one line each: a Darknet file holding fewer layers than the
        backbone says how many of its convolutions were read."""
        from ..darknet.mapping import layers_read, load_darknet_weights
        from ..darknet.weights import is_darknet_weights
        from ..weights import load_pretrained

        if not is_darknet_weights(path):
            load_pretrained(self.backbone.body, path)
            return []
        header = load_darknet_weights(self.backbone.body, path, partial=True)
        read, total = layers_read(self.backbone.body, path, header)
        if read == total:
            return []
        return [f"read {read} of {total} backbone convolutions from {path}; the rest keep their initialisation"]

    def load_darknet_weights(self, path, partial: bool = False):
        """Load an official ``*-panet-spp`` / ``-fpn-spp`` / ``-yolo-spp`` ``.weights`` file (``partial``:
        only the first layers, e.g. a backbone's ``.conv.N`` file). Returns the file header."""
        from ..darknet.mapping import check_weights_name
        from ..darknet.weights import read_weights

        check_weights_name(self.backbone.body, path)  # csdarknet53-panet-spp.weights is leaky: not for the Mish model
        return read_weights(self.darknet_records(), path, partial=partial)


def create_detector(
    backbone: str, neck: str = "panet", num_classes: int = 80, anchors=None, **kwargs: Any
) -> Detector:
    """Build a detector on a registered backbone (``cspnet.list_models()``).

    Args:
        backbone: model name, e.g. ``"cspresnext50"``.
        neck: ``fpn`` | ``yolov3`` | ``panet`` (with SPP, as the official cfgs) | ``efm`` | ``efm-sam`` | ``efm-spp`` | ``gfm``.
        num_classes: number of object classes.
        anchors: ``(w, h)`` pixel sizes, a multiple of the number of levels (default: the cfgs' nine
            COCO anchors); spread over the levels smallest first.
        **kwargs: ``strides`` (default (8, 16, 32)), ``neck_width`` (channels at the coarsest level),
            ``spp`` (force SPP on/off), ``act``, ``scale_x_y`` (one, or one per level), ``in_chans``, ``backbone_width`` (channel
            multiplier of the backbone, see `cspnet.engine.models.scale_widths`), ``backbone_kwargs``
            (config overrides for `cspnet.create_model`).
    """
    names = {f.name for f in dataclasses.fields(DetectorCfg)} - {"backbone", "neck", "num_classes", "anchors"}
    unknown = sorted(set(kwargs) - names)
    if unknown:
        raise ValueError(f"unknown detector option(s) {unknown}; known: {sorted(names)}")
    for key in ("strides", "scale_x_y"):
        if isinstance(kwargs.get(key), list):
            kwargs[key] = tuple(kwargs[key])
    if anchors is not None:
        anchors = anchor_pairs(anchors)
    return Detector(DetectorCfg(backbone, neck, num_classes, anchors, **kwargs))
