"""Turn a parsed Darknet cfg into a PyTorch module that computes what Darknet computes.

One module per cfg section, in file order, so ``model.layers[i]`` is Darknet layer ``i``.
Shapes are inferred while building (at the ``[net]`` size, or ``input_size``), so a cfg that
Darknet could not run fails here with `DarknetCfgError` at the line at fault, not deep inside
a forward pass; run at another input size, a layer that cannot take its inputs raises a
RuntimeError naming its line. Semantics follow darknet's layer code (AlexeyAB fork, which trained CSPNet):

- ``[convolutional]``: ``pad=1`` means padding ``size // 2``, else ``padding`` (default 0);
  ``dilation=d`` (kernels above 1x1) convolves with padding ``padding * d`` (``im2col_cpu_ext``) and
  needs ``2 * padding = size - 1``, the only padding where Darknet's undilated output size is right;
  without ``batch_normalize`` the conv has a bias; BN eps is darknet's 1e-5; the default
  activation is ``logistic`` (``parse_convolutional``).
- ``[route] layers=a,b groups=G group_id=i``: channel group ``i`` of G of *each* listed layer,
  concatenated (``forward_route_layer`` copies ``input_size / groups`` values per layer).
- ``[shortcut]``: `cspnet.layers.darknet_add` (min channels, larger ``from`` map subsampled),
  then the activation (default ``linear``).
- ``[maxpool]``: ``padding`` defaults to ``size - 1``; out = (w + padding - size) // stride + 1,
  and the window starts at ``-padding // 2`` (the extra padding is on the right/bottom).
  ``maxpool_depth=1 out_channels=N`` is a max over channels (`cspnet.layers.Maxout`).
- ``[avgpool]`` is global; ``[upsample]`` is nearest-neighbour (times ``scale``).
- ``[softmax]``, ``[cost]`` pass logits through (the softmax belongs to the loss in PyTorch);
  ``[dropout]`` is `nn.Dropout`, the identity in eval mode.
- ``[yolo]`` passes its raw map through and exposes anchors, mask, classes and loss settings;
  decoding is the detection code's job.
"""
from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import Maxout, Shortcut, make_act
from .cfg import DarknetCfg, Section, parse_cfg

Shape = tuple[int, int, int]  # (C, H, W) of one image

# Activations Darknet names in cfgs that this package implements (darknet's ``get_activation``).
DARKNET_ACTIVATIONS = ("leaky", "mish", "swish", "relu", "relu6", "logistic", "linear")
BN_EPS = 1e-5  # darknet normalize_cpu: (x - mean) / sqrt(var + .00001f)
BN_MOMENTUM = 0.01  # darknet keeps rolling stats as .99 * old + .01 * batch


def _activation(section: Section, default: str) -> nn.Module:
    name = section.get_str("activation", default)
    if name not in DARKNET_ACTIVATIONS:
        raise section.error(f"unsupported activation {name!r} (supported: {', '.join(DARKNET_ACTIVATIONS)})", "activation")
    return make_act(name)


def _fmt(shape: Shape) -> str:
    return "x".join(str(v) for v in shape)


class DarknetLayer(nn.Module):
    """Base of every layer: its cfg position and the layers it reads besides its input.

    ``sources`` are absolute layer indices whose outputs are passed after the input
    (``takes_input``) or instead of it (``[route]``).
    """

    takes_input = True

    def __init__(self, section: Section, in_shape: Shape):
        super().__init__()
        self.index, self.kind, self.line = section.index, section.kind, section.line
        self.in_shape: Shape = in_shape
        self.out_shape: Shape = in_shape
        self.sources: tuple[int, ...] = ()

    def extra_repr(self) -> str:
        return f"index={self.index}, line={self.line}, out={_fmt(self.out_shape)}"


class ConvLayer(DarknetLayer):
    """``[convolutional]``: Conv2d (bias only without BN) -> BatchNorm2d -> activation.

    With ``share_index`` the conv and BN modules are those of another layer (shared weights,
    and no entry in the ``.weights`` file, as in darknet's ``load_weights_upto``).
    `cspnet.export.fuse` folds the BN into the conv: ``conv`` becomes a `cspnet.export.ConvAct` (the
    folded conv, shared as the conv was, and this layer's activation), ``bn`` None and ``act`` the
    identity. A fused network is for inference: its weights no longer have the ``.weights`` layout.
    """

    def __init__(self, section: Section, in_shape: Shape, shared: ConvLayer | None = None):
        super().__init__(section, in_shape)
        c, h, w = in_shape
        filters = section.get_int("filters", min_value=1)
        size = section.get_int("size", 1, min_value=1)
        stride = section.get_int("stride", 1, min_value=1)
        stride_x = section.get_int("stride_x", stride, min_value=1)
        stride_y = section.get_int("stride_y", stride, min_value=1)
        # parse_convolutional ignores dilation for 1x1 kernels
        dilation = section.get_int("dilation", 1, min_value=1) if size > 1 else 1
        padding = section.get_int("padding", 0, min_value=0)
        if section.get_int("pad", 0):
            padding = size // 2
        groups = section.get_int("groups", 1, min_value=1)
        batch_normalize = bool(section.get_int("batch_normalize", 0))
        if c % groups or filters % groups:
            raise section.error(f"groups={groups} must divide the input channels ({c}) and filters ({filters})", "groups")
        # Darknet sizes the output as if undilated and convolves with padding * dilation (im2col_cpu_ext); the two
        # agree only where the padding keeps the size (2 * padding = size - 1), elsewhere its buffers disagree
        if dilation > 1 and 2 * padding != size - 1:
            raise section.error(f"dilation={dilation} needs padding (size - 1) / 2 (pad=1 with an odd size): Darknet "
                                f"sizes a dilated conv's output as if it were undilated", "dilation")
        out_h = (h + 2 * padding - size) // stride_y + 1
        out_w = (w + 2 * padding - size) // stride_x + 1
        self.out_shape = (filters, out_h, out_w)
        self.shared_from = shared.index if shared is not None else None
        if shared is None:
            self.conv = nn.Conv2d(c, filters, size, (stride_y, stride_x), padding * dilation, dilation, groups,
                                  bias=not batch_normalize)
            self.bn = nn.BatchNorm2d(filters, eps=BN_EPS, momentum=BN_MOMENTUM) if batch_normalize else None
        else:
            mine = (c, filters, (size, size), (stride_y, stride_x), (padding * dilation,) * 2, (dilation,) * 2, groups,
                    batch_normalize)
            theirs = (shared.conv.in_channels, shared.conv.out_channels, shared.conv.kernel_size, shared.conv.stride,
                      shared.conv.padding, shared.conv.dilation, shared.conv.groups, shared.bn is not None)
            if mine != theirs:
                raise section.error(
                    f"share_index: layer {shared.index} has a different convolution "
                    f"(in, filters, size, stride, padding, dilation, groups, batch_normalize) = {theirs}, here {mine}",
                    "share_index",
                )
            self.conv, self.bn = shared.conv, shared.bn
        self.act = _activation(section, "logistic")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.bn is not None:
            x = self.bn(x)
        return self.act(x)


class ConnectedLayer(DarknetLayer):
    """``[connected]``: flatten C*H*W -> Linear (bias only without BN) -> BatchNorm1d -> act, as a 1x1 map."""

    def __init__(self, section: Section, in_shape: Shape):
        super().__init__(section, in_shape)
        outputs = section.get_int("output", 1, min_value=1)
        batch_normalize = bool(section.get_int("batch_normalize", 0))
        self.fc = nn.Linear(math.prod(in_shape), outputs, bias=not batch_normalize)
        self.bn = nn.BatchNorm1d(outputs, eps=BN_EPS, momentum=BN_MOMENTUM) if batch_normalize else None
        self.act = _activation(section, "logistic")
        self.out_shape = (outputs, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc(torch.flatten(x, 1))
        if self.bn is not None:
            x = self.bn(x)
        return self.act(x)[:, :, None, None]


class RouteLayer(DarknetLayer):
    """``[route]``: concatenate the listed layers' outputs, or channel group ``group_id`` of each."""

    takes_input = False

    def __init__(self, section: Section, in_shape: Shape, sources: list[int], shapes: Sequence[Shape]):
        super().__init__(section, in_shape)
        self.sources = tuple(sources)
        self.groups = section.get_int("groups", 1, min_value=1)
        self.group_id = section.get_int("group_id", 0, min_value=0)
        if self.group_id >= self.groups:
            raise section.error(f"group_id={self.group_id} must be < groups={self.groups}", "group_id")
        first = shapes[sources[0]]
        channels = 0
        for j in sources:
            c, h, w = shapes[j]
            if (h, w) != first[1:]:
                raise section.error(
                    f"layers: layer {j} is {_fmt(shapes[j])} but layer {sources[0]} is {_fmt(first)}; "
                    "routed maps must have the same height and width", "layers")
            if c % self.groups:
                raise section.error(f"groups={self.groups} does not divide the {c} channels of layer {j}", "groups")
            channels += c // self.groups
        self.out_shape = (channels, first[1], first[2])

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        if self.groups > 1:
            parts = []
            for t in inputs:
                step = t.shape[1] // self.groups
                parts.append(t[:, self.group_id * step : (self.group_id + 1) * step])
            inputs = tuple(parts)
        return inputs[0] if len(inputs) == 1 else torch.cat(inputs, dim=1)


class ShortcutLayer(DarknetLayer):
    """``[shortcut] from=j``: Darknet's residual add (`cspnet.layers.darknet_add`), then the activation."""

    def __init__(self, section: Section, in_shape: Shape, source: int, source_shape: Shape):
        super().__init__(section, in_shape)
        if section.get_str("weights_type", "none") != "none" or section.get_str("weights_normalization", "none") != "none":
            raise section.error("weighted shortcuts (weights_type/weights_normalization) are not supported")
        _, h, w = in_shape
        _, hs, ws = source_shape
        step_h, step_w = hs // h, ws // w
        if step_h < 1 or step_w < 1 or step_h != step_w:
            raise section.error(
                f"from: layer {source} ({_fmt(source_shape)}) cannot be added to the input ({_fmt(in_shape)}); "
                "the from map must be as large or an integer multiple larger in both directions", "from")
        self.sources = (source,)
        self.add = Shortcut()
        self.act = _activation(section, "linear")

    def forward(self, x: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        return self.act(self.add(x, source))


class MaxPoolLayer(DarknetLayer):
    """``[maxpool]`` with Darknet's padding (see module docstring), or a max over channels."""

    def __init__(self, section: Section, in_shape: Shape):
        super().__init__(section, in_shape)
        c, h, w = in_shape
        if section.get_int("antialiasing", 0):
            raise section.error("antialiasing is not supported", "antialiasing")
        stride = section.get_int("stride", 1, min_value=1)
        stride_x = section.get_int("stride_x", stride, min_value=1)
        stride_y = section.get_int("stride_y", stride, min_value=1)
        size = section.get_int("size", stride, min_value=1)
        padding = section.get_int("padding", size - 1, min_value=0)
        self.size, self.stride_yx = size, (stride_y, stride_x)
        self.pad: tuple[int, int, int, int] | None = None
        self.depth = bool(section.get_int("maxpool_depth", 0))
        if self.depth:
            out_channels = section.get_int("out_channels", 1, min_value=1)
            if out_channels > c:
                # output channel g is the max over input channels g, g+N, ... < C: none for g >= C
                raise section.error(f"out_channels={out_channels} exceeds the {c} input channels; channels {c} and "
                                    "above would take the max over no input channel", "out_channels")
            self.pool = Maxout(out_channels)
            self.out_shape = (out_channels, h, w)
            return
        before, after = padding // 2, padding - padding // 2
        if before == after and before <= size // 2:
            self.pool = nn.MaxPool2d(size, (stride_y, stride_x), padding=before)
        else:  # asymmetric: pad explicitly with -inf so padded cells never win
            self.pool = nn.MaxPool2d(size, (stride_y, stride_x))
            self.pad = (before, after, before, after)
        self.out_shape = (c, (h + padding - size) // stride_y + 1, (w + padding - size) // stride_x + 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pad is not None:
            x = F.pad(x, self.pad, value=float("-inf"))
        return self.pool(x)


class AvgPoolLayer(DarknetLayer):
    """``[avgpool]``: global average pooling to a 1x1 map."""

    def __init__(self, section: Section, in_shape: Shape):
        super().__init__(section, in_shape)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.out_shape = (in_shape[0], 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(x)


class UpsampleLayer(DarknetLayer):
    """``[upsample] stride=s scale=k``: nearest-neighbour upsampling by ``s``, times ``k``."""

    def __init__(self, section: Section, in_shape: Shape):
        super().__init__(section, in_shape)
        self.stride = section.get_int("stride", 2)
        if self.stride < 1:
            raise section.error("downsampling [upsample] (stride < 1) is not supported", "stride")
        self.scale = section.get_float("scale", 1.0)
        self.up = nn.Upsample(scale_factor=self.stride, mode="nearest")
        c, h, w = in_shape
        self.out_shape = (c, h * self.stride, w * self.stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.up(x)
        return x * self.scale if self.scale != 1.0 else x


class ScaleChannelsLayer(DarknetLayer):
    """``[scale_channels] from=j``: layer j's map times the input (C x 1 x 1, or 1 x H x W with ``scale_wh``)."""

    def __init__(self, section: Section, in_shape: Shape, source: int, source_shape: Shape):
        super().__init__(section, in_shape)
        c, h, w = source_shape
        scale_wh = bool(section.get_int("scale_wh", 0))
        want = (1, h, w) if scale_wh else (c, 1, 1)
        if in_shape != want:
            raise section.error(f"the input is {_fmt(in_shape)} but scaling layer {source} ({_fmt(source_shape)}) needs {_fmt(want)}", "from")
        self.sources = (source,)
        self.act = _activation(section, "linear")
        self.out_shape = source_shape

    def forward(self, x: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        return self.act(source * x)


class SamLayer(DarknetLayer):
    """``[sam] from=j``: spatial attention, layer j's map times the input element-wise."""

    def __init__(self, section: Section, in_shape: Shape, source: int, source_shape: Shape):
        super().__init__(section, in_shape)
        if in_shape != source_shape:
            raise section.error(f"the input ({_fmt(in_shape)}) and layer {source} ({_fmt(source_shape)}) differ in shape", "from")
        self.sources = (source,)
        self.act = _activation(section, "linear")

    def forward(self, x: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        return self.act(source * x)


class PassLayer(DarknetLayer):
    """``[softmax]`` and ``[cost]``: the logits pass through (softmax and loss live in the training code)."""

    def __init__(self, section: Section, in_shape: Shape):
        super().__init__(section, in_shape)
        self.groups = section.get_int("groups", 1, min_value=1) if section.kind == "softmax" else 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class DropoutLayer(DarknetLayer):
    """``[dropout] probability=p``: inverted dropout in training (as darknet), identity in eval."""

    def __init__(self, section: Section, in_shape: Shape):
        super().__init__(section, in_shape)
        p = section.get_float("probability", 0.5)
        if not 0.0 <= p < 1.0:
            raise section.error(f"probability={p} must lie in [0, 1)", "probability")
        self.drop = nn.Dropout(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(x)


class YoloLayer(DarknetLayer):
    """``[yolo]``: returns its raw input map (``len(mask) * (classes + 5)`` channels).

    Exposes what a decoder and a loss need: ``anchors`` (the masked (w, h) pairs, in pixels of
    the ``[net]`` input), ``all_anchors``, ``mask``, ``num_classes``, ``stride`` (input pixels per
    cell along x; ``stride_hw`` gives both directions), ``scale_x_y``, the thresholds and loss
    weights, and every option as written in ``options``.
    """

    def __init__(self, section: Section, in_shape: Shape, net_hw: tuple[int, int]):
        super().__init__(section, in_shape)
        self.num_classes = section.get_int("classes", 20, min_value=1)
        num = section.get_int("num", 1, min_value=1)
        self.mask = tuple(section.get_ints("mask", range(num)))
        if any(not 0 <= m < num for m in self.mask):
            raise section.error(f"mask {list(self.mask)} indexes anchors outside 0..{num - 1} (num={num})", "mask")
        values = section.get_floats("anchors", [])
        if len(values) != 2 * num:
            raise section.error(f"anchors holds {len(values)} numbers, num={num} needs {2 * num}", "anchors")
        self.all_anchors = tuple(zip(values[0::2], values[1::2]))
        self.anchors = tuple(self.all_anchors[m] for m in self.mask)
        c, h, w = in_shape
        want = len(self.mask) * (self.num_classes + 5)
        if c != want:
            raise section.error(
                f"the input has {c} channels but {len(self.mask)} anchors x ({self.num_classes} classes + 5) = {want}; "
                "fix filters= of the conv before it, or classes=/mask=", "classes")
        self.stride_hw = tuple(int(v) if v == int(v) else v for v in (net_hw[0] / h, net_hw[1] / w))
        self.stride = self.stride_hw[1]
        self.scale_x_y = section.get_float("scale_x_y", 1.0)
        self.ignore_thresh = section.get_float("ignore_thresh", 0.5)
        self.truth_thresh = section.get_float("truth_thresh", 1.0)
        self.iou_thresh = section.get_float("iou_thresh", 1.0)
        self.iou_loss = section.get_str("iou_loss", "mse")
        self.iou_normalizer = section.get_float("iou_normalizer", 0.75)
        self.cls_normalizer = section.get_float("cls_normalizer", 1.0)
        self.obj_normalizer = section.get_float("obj_normalizer", 1.0)
        self.nms_kind = section.get_str("nms_kind", "default")
        self.beta_nms = section.get_float("beta_nms", 0.6)
        self.jitter = section.get_float("jitter", 0.2)
        self.random = section.get_float("random", 0.0)
        self.label_smooth_eps = section.get_float("label_smooth_eps", 0.0)
        self.options = {k: o.value for k, o in section.options.items()}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, classes={self.num_classes}, mask={list(self.mask)}, stride={self.stride:g}"


@dataclass(frozen=True)
class WeightRecord:
    """One entry of a ``.weights`` file: a conv (or connected) layer's weights, bias and BN.

    ``layout`` is the order Darknet writes them in: ``conv`` = bias, [scale, mean, var], weights;
    ``connected`` = bias, weights, [scale, mean, var]. ``weight`` may be a Linear's weight for a
    1x1 conv record (a classifier head); it is copied by reshape.
    """

    name: str
    layout: str
    weight: torch.Tensor
    bias: torch.Tensor
    bn: nn.Module | None
    layer: int | None = None

    @property
    def tensors(self) -> list[torch.Tensor]:
        bn = [self.bn.weight, self.bn.running_mean, self.bn.running_var] if self.bn is not None else []
        if self.layout == "connected":
            return [self.bias, self.weight, *bn]
        return [self.bias, *bn, self.weight]

    @property
    def num_floats(self) -> int:
        return sum(t.numel() for t in self.tensors)


def flatten_logits(out: torch.Tensor) -> torch.Tensor:
    """A classifier's 1x1 output map as ``(N, C)`` logits; any other map as it is."""
    return torch.flatten(out, 1) if out.shape[2:] == (1, 1) else out


# torch.fx records this call as one node: it decides by the map's size when the graph runs.
torch.fx.wrap("flatten_logits")


class DarknetNet(nn.Module):
    """A network built from a Darknet cfg; ``layers[i]`` is Darknet layer ``i``.

    ``forward(x)`` returns the list of ``[yolo]`` inputs for a detector, else the last layer's
    output (flattened to ``(N, C)`` when it is a 1x1 map, as a classifier's logits).
    """

    def __init__(self, cfg: DarknetCfg, input_size: int | tuple[int, int] | None = None):
        super().__init__()
        net = cfg.net
        self.cfg_path = cfg.path
        self.in_chans = net.get_int("channels", 0)
        height, width = net.get_int("height", 0), net.get_int("width", 0)
        if self.in_chans < 1 or height < 1 or width < 1:
            raise net.error(f"width={width}, height={height} and channels={self.in_chans} must all be given and positive")
        self.net_size = (height, width)
        if input_size is not None:
            height, width = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
            if min(height, width) < 1:
                raise ValueError(f"input_size must be positive, got {input_size!r}")
        self.input_size = (height, width)
        self.layers = nn.ModuleList()
        shapes: list[Shape] = []
        for section in cfg.layers:
            in_shape = shapes[-1] if shapes else (self.in_chans, height, width)
            layer = self._build(section, in_shape, shapes)
            if min(layer.out_shape) < 1:
                raise section.error(
                    f"the output would be empty ({_fmt(layer.out_shape)}) for input {_fmt(in_shape)}; "
                    f"is the input size {height}x{width} too small?")
            self.layers.append(layer)
            shapes.append(layer.out_shape)
        self.yolo_indices = tuple(i for i, layer in enumerate(self.layers) if isinstance(layer, YoloLayer))
        self._keep = frozenset(j for layer in self.layers for j in layer.sources) | frozenset(self.yolo_indices)

    def _source(self, section: Section, key: str, value: int) -> int:
        index = value if value >= 0 else section.index + value
        if not 0 <= index < section.index:
            raise section.error(f"{key}={value} refers to layer {index}, which does not exist before layer {section.index}", key)
        return index

    def _build(self, section: Section, in_shape: Shape, shapes: list[Shape]) -> DarknetLayer:
        kind = section.kind
        if kind == "convolutional":
            shared = None
            if section.has("share_index"):
                j = self._source(section, "share_index", section.get_int("share_index"))
                shared = self.layers[j]
                if not isinstance(shared, ConvLayer):
                    raise section.error(f"share_index={j} is not a [convolutional] layer", "share_index")
            return ConvLayer(section, in_shape, shared)
        if kind == "connected":
            return ConnectedLayer(section, in_shape)
        if kind == "route":
            sources = [self._source(section, "layers", v) for v in section.get_ints("layers")]
            return RouteLayer(section, in_shape, sources, shapes)
        if kind in ("shortcut", "scale_channels", "sam"):
            froms = section.get_ints("from")
            if len(froms) != 1:
                raise section.error(f"from= lists {len(froms)} layers; only one is supported", "from")
            j = self._source(section, "from", froms[0])
            cls = {"shortcut": ShortcutLayer, "scale_channels": ScaleChannelsLayer, "sam": SamLayer}[kind]
            return cls(section, in_shape, j, shapes[j])
        if kind == "maxpool":
            return MaxPoolLayer(section, in_shape)
        if kind == "avgpool":
            return AvgPoolLayer(section, in_shape)
        if kind == "upsample":
            return UpsampleLayer(section, in_shape)
        if kind == "yolo":
            return YoloLayer(section, in_shape, self.input_size)
        if kind == "dropout":
            return DropoutLayer(section, in_shape)
        return PassLayer(section, in_shape)  # softmax, cost

    # -- running -----------------------------------------------------------------------------
    def forward_layers(self, x: torch.Tensor, keep: Sequence[int] = ()) -> dict[int, torch.Tensor]:
        """Run the network and return ``{i: output of layer i}`` for ``keep``, the [yolo] layers and the last layer.

        Shapes were checked at the build size; a layer that cannot run at another input size (a route
        joining maps rounded differently) raises RuntimeError naming its cfg line, kind and input shapes.
        """
        # while torch.fx traces, x is a Proxy: its shape is known only when the graph runs
        if not isinstance(x, torch.fx.Proxy) and (x.dim() != 4 or x.shape[1] != self.in_chans):
            raise ValueError(f"expected an image batch (N, {self.in_chans}, H, W), got shape {tuple(x.shape)}")
        image = x
        last = len(self.layers) - 1
        bad = [i for i in keep if not -len(self.layers) <= i <= last]
        if bad:
            raise ValueError(f"layer indices {bad} out of range for {len(self.layers)} layers")
        wanted = {i % len(self.layers) for i in keep} | set(self.yolo_indices) | {last}
        store = self._keep | wanted
        outputs: dict[int, torch.Tensor] = {}
        for i, layer in enumerate(self.layers):
            extra = [outputs[j] for j in layer.sources]
            try:
                x = layer(x, *extra) if layer.takes_input else layer(*extra)
            except RuntimeError as e:  # never while tracing: a traced graph raises torch's own error
                image_hw = tuple(image.shape[2:])
                out_of_memory = isinstance(e, torch.OutOfMemoryError) or "allocate" in str(e)  # CUDA's, or the CPU's
                if out_of_memory or image_hw == tuple(self.input_size):
                    raise  # not a shape the build did not check: torch's own error says what happened
                previous = [f"{f'layer {i - 1}' if i else 'the image'} {_fmt(x.shape[1:])}"] if layer.takes_input else []
                inputs = previous + [f"layer {j} {_fmt(outputs[j].shape[1:])}" for j in layer.sources]
                raise RuntimeError(
                    f"{os.path.basename(self.cfg_path)}:{layer.line}: layer {i} [{layer.kind}] cannot run on "
                    f"{', '.join(inputs)} at input {image_hw[0]}x{image_hw[1]} (shapes were checked at "
                    f"{self.input_size[0]}x{self.input_size[1]}; build_model(cfg, input_size) checks another size): {e}"
                ) from e
            if i in store:
                outputs[i] = x
        return {i: outputs[i] for i in sorted(wanted)}

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        outputs = self.forward_layers(x)
        if self.yolo_indices:
            return [outputs[i] for i in self.yolo_indices]
        return flatten_logits(outputs[len(self.layers) - 1])

    # -- weights -----------------------------------------------------------------------------
    def weight_records(self, cutoff: int | None = None) -> list[WeightRecord]:
        """The ``.weights`` entries of layers ``0 .. cutoff-1``, in file order (shared convs have none)."""
        n = len(self.layers)
        if cutoff is not None and not 0 <= cutoff <= n:
            raise ValueError(f"cutoff={cutoff} out of range for a cfg of {n} layers")
        records = []
        for layer in self.layers[: n if cutoff is None else cutoff]:
            where = f"layer {layer.index} [{layer.kind}] ({os.path.basename(self.cfg_path)}:{layer.line})"
            if isinstance(layer, ConvLayer) and layer.shared_from is None:
                if not isinstance(layer.conv, nn.Conv2d):  # `cspnet.fuse` made it a ConvAct
                    raise ValueError(f"{where}: its BatchNorm is folded into the convolution (cspnet.fuse), and a "
                                     ".weights file holds unfolded layers: write it from the network before fusing")
                bias = layer.bn.bias if layer.bn is not None else layer.conv.bias
                records.append(WeightRecord(where, "conv", layer.conv.weight, bias, layer.bn, layer.index))
            elif isinstance(layer, ConnectedLayer):
                bias = layer.bn.bias if layer.bn is not None else layer.fc.bias
                records.append(WeightRecord(where, "connected", layer.fc.weight, bias, layer.bn, layer.index))
        return records


def build_model(cfg: DarknetCfg | str | os.PathLike, input_size: int | tuple[int, int] | None = None) -> DarknetNet:
    """Build the network of ``cfg`` (a parsed cfg or a path); shapes are checked at ``input_size`` or the [net] size."""
    if not isinstance(cfg, DarknetCfg):
        cfg = parse_cfg(cfg)
    return DarknetNet(cfg, input_size)


__all__ = ["DARKNET_ACTIVATIONS", "DarknetNet", "WeightRecord", "YoloLayer", "build_model"]
