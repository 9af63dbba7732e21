"""Deploy mode and export: BatchNorm folding, fused CPU kernels, ONNX, TorchScript, safetensors.

``fuse(model)`` folds every BatchNorm that directly follows a convolution into that
convolution's weights and bias (``torch.nn.utils.fuse_conv_bn_eval``); a `ConvBnAct` becomes a
`ConvAct`. The result is plain PyTorch and exports anywhere.

``deploy(model)`` builds the fastest eager inference form: ``eval()``, ``fuse``, channels-last
memory format, and on CPU each conv+activation runs as one oneDNN kernel with the activation
applied in the kernel's epilogue and the weights reordered once into oneDNN's layout
(`OneDnnConvAct`); a ResNet block's last conv also absorbs its residual add. The kernel is
``torch.ops.mkldnn._convolution_pointwise``, the one ``torch.compile``'s CPU backend emits
for the same pattern. It is a private op of the pinned torch, so deploy checks it exists
(`onednn_available`) and every model's deployed output is tested against eager. The result
runs under ``torch.inference_mode``. ``compile=True`` adds ``torch.compile`` on top;
``winograd=True`` computes the wide 3×3 convs by Winograd (`cspnet.winograd`).

Why channels-last by default: oneDNN convolutions work on NHWC/blocked layouts, so an NCHW
model pays a layout reorder around every convolution. On the project's CPU this makes every
model 13-30 % faster at batch 8 (docs/benchmarks.md; timm's models gain as much here); on CUDA it
is what tensor cores want. ``channels_last=None`` follows this rule, or, given
``example_input``, times both layouts on it and keeps the faster.

Exports (all written atomically: temp file, then ``os.replace``):

- ONNX with a dynamic batch axis through the TorchScript-based exporter (``dynamo=False``,
  opset 17). It exports cspdarknet53 in ~2 s where the dynamo exporter takes ~25 s, with the
  same outputs (within 1.2e-5 of eager on this machine). Graphs the legacy tracer rejects, and
  opsets above 20 (the legacy exporter's newest), go through the dynamo exporter (opset >= 18).
  The model is BN-folded first, so the graph is conv + activation only.
- TorchScript by tracing the fused model (``torch.jit.trace``; the models' shape-dependent
  branches depend on channel counts and strides only, never on the batch size).
- safetensors of the (unfused) state dict with the model name and config as metadata, so
  ``cspnet.weights.load_model(path)`` rebuilds the model from the file alone (any width or options, or a
  detector), and ``cspnet.create_model(name, pretrained=path)`` reads a registered config's back.

Every export carries one metadata record (`export_record`), JSON under the key ``cspnet``: the model's
name, config, class count and input channels, a detector's anchors and strides, the input size,
and what the caller knows of its inputs and outputs: class names, COCO category ids, mean / std, width …
(``cspnet export`` takes them from the training run or the weights file exported). ONNX keeps it in the
model's ``metadata_props``, TorchScript as the extra file ``cspnet.json`` (``torch.jit.load(path,
_extra_files={"cspnet.json": ""})``), safetensors in its header (`cspnet.weights.read_metadata`).
"""
from __future__ import annotations

import copy
import os
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.utils import fuse_conv_bn_eval

from .blocks import ResidualBlock
from .darknet.build import ConvLayer
from .data.detection import PAD_VALUE
from .detection.head import AnchorLayout
from .files import atomic_path
from .layers import ConvBnAct, hooked
from .weights import METADATA_KEY, encode_metadata, model_metadata, save_weights
from .winograd import PackedFrom, WinogradConvAct, eligible, wide_enough

EXPORT_FORMATS = ("onnx", "torchscript", "safetensors")
ONNX_OPSET = 17  # the oldest opset exports are made and tested at
LEGACY_EXPORTER_MAX_OPSET = 20  # the newest opset torch.onnx's TorchScript-based exporter writes
DYNAMO_EXPORTER_MIN_OPSET = 18  # the oldest opset torch.onnx's dynamo exporter writes
BFLOAT16_OPSET = 22  # the first opset whose Conv takes bfloat16
TORCHSCRIPT_METADATA_FILE = f"{METADATA_KEY}.json"  # the extra file of a TorchScript export holding its record
# What a weights file's metadata says of the model's inputs and outputs (a training run's classes, input size
# and normalisation; the preprocessing cspnet convert records): carried into exports made from the file.
DESCRIPTIVE_KEYS = ("class_names", "category_ids", "input_size", "mean", "std", "crop_pct", "interpolation", "resize",
                    "letterbox", "width", "options", "source")
# How a detector's input is made (`cspnet.data.detection.letterbox`, which training, predict and eval use) and what
# its eval output holds (`Detector.decode`): recorded in every detector export, so that another runtime can feed
# it and read it without this code.
LETTERBOX_RECORD = {
    "letterbox": True,
    "letterbox_resize": "ratio = input_size / max(height, width); the image resized to round(width * ratio) x "
                        "round(height * ratio), bilinear (PIL), longer side = input_size",
    "letterbox_pad_value": PAD_VALUE,
    "letterbox_position": "top-left: the image at (0, 0), the padding on the right and bottom (not centred)",
}
DETECTOR_OUTPUT_LAYOUT = {
    "shape": "(batch, rows, 5 + num_classes)",
    "columns": ["x1", "y1", "x2", "y2", "objectness", "class probabilities (num_classes columns)"],
    "boxes": "corners in pixels of the letterboxed input (divide by the letterbox ratio for the image's pixels)",
    "scores": "sigmoid probabilities; a class's score is objectness x its class probability",
    "rows": "every anchor at every cell, level by level in 'strides' order (in a level: anchor, then row, then "
            "column), before any threshold or NMS",
}
# What cspnet train / predict feed a classifier trained on image files or IDX sets
# (`cspnet.data.classification.decode_image`): recorded in the exports of a classification run.
CLASSIFIER_RESIZE_RECORD = {
    "resize": "shorter side to input_size, longer side floor(longer * input_size / shorter) (torchvision Resize), "
              "bilinear with antialiasing, then a centre crop of input_size x input_size",
    "crop_pct": 1.0,
    "interpolation": "bilinear",
}


# --------------------------------------------------------------------------------------------
# BatchNorm folding


class ConvAct(nn.Module):
    """A `ConvBnAct` whose BatchNorm has been folded into the convolution (which now has a bias)."""

    def __init__(self, conv: nn.Conv2d, act: nn.Module):
        super().__init__()
        self.conv = conv
        self.act = act
        self.in_chs, self.out_chs = conv.in_channels, conv.out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(x))


class FoldedBatchNorm(nn.Identity):
    """What `fuse` leaves where it folded a BatchNorm into the conv before it: passes its input on, and
    marks the model as fused (`export_safetensors` refuses it)."""


def _foldable(conv: nn.Module, bn: nn.Module) -> bool:
    return (
        isinstance(conv, nn.Conv2d)
        and isinstance(bn, nn.BatchNorm2d)
        and bn.track_running_stats
        and bn.running_mean is not None
        and conv.out_channels == bn.num_features
    )


def _fold(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    # fuse_conv_bn_eval refuses modules in training mode; folding uses the running statistics.
    return fuse_conv_bn_eval(conv.eval(), bn.eval())


# Where nn.Module keeps its forward hooks: the hooks, and the ids of those taking kwargs / always called.
_HOOK_DICTS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks",
               "_forward_hooks_with_kwargs", "_forward_hooks_always_called")


def _own_hooks(*modules: nn.Module) -> bool:
    return hooked(*modules, include_global=False)


def _replace(parent: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` in place of ``parent.name``, moving the old module's forward hooks onto it.

    Hooks carry meaning: a detector taps backbone layers through forward hooks (`BackboneTaps`),
    and the replacement computes the same output, so the hooks stay valid.
    """
    old = parent._modules[name]
    for hooks in _HOOK_DICTS:  # the dicts themselves, so that the hooks' handles still remove them
        setattr(new, hooks, getattr(old, hooks))
        setattr(old, hooks, type(getattr(old, hooks))())
    parent._modules[name] = new


@torch.no_grad()
def fuse(model: nn.Module) -> nn.Module:
    """Fold every BatchNorm2d that directly follows a Conv2d into it, in place; return ``model``.

    Each `ConvBnAct` becomes a `ConvAct` (conv with bias, then the activation); inside any
    other ``nn.Sequential`` a (Conv2d, BatchNorm2d) pair becomes (fused Conv2d, `FoldedBatchNorm`). A Darknet-cfg
    ``[convolutional]`` layer with ``batch_normalize`` (`cspnet.darknet.build.ConvLayer`) keeps its place and
    runs a `ConvAct` as its ``conv`` (its ``bn`` None, its ``act`` the identity); layers that share one conv
    (``share_index``) share its folded conv, each keeping its own activation.
    A BatchNorm that follows something else (a DenseNet pre-activation BN, say) stays, and so does a
    pair whose conv or BN has a forward hook of its own (folded, the hook would see another map or none).
    The model is switched to eval mode: folding freezes the running statistics, so a fused
    model is for inference only.
    """
    model.eval()
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            # a hooked conv or BN inside would see another map, or none, once folded: kept. (Global hooks
            # do not stop folding: tools such as torch's ModuleTracker hold them while a model is deployed.)
            if isinstance(child, ConvBnAct) and _foldable(child.conv, child.bn) and not _own_hooks(child.conv, child.bn):
                _replace(parent, name, ConvAct(_fold(child.conv, child.bn), child.act))
        if isinstance(parent, nn.Sequential) and not isinstance(parent, ConvBnAct):
            names = [n for n, _ in parent.named_children()]
            for first, second in zip(names, names[1:]):
                conv, bn = parent._modules[first], parent._modules[second]
                if _foldable(conv, bn) and not _own_hooks(conv, bn):
                    _replace(parent, first, _fold(conv, bn))
                    _replace(parent, second, FoldedBatchNorm())
    _fuse_darknet_convs(model)
    return model


def _fuse_darknet_convs(model: nn.Module) -> None:
    folded: dict[int, nn.Conv2d] = {}  # id of a conv that share_index layers share (with its BN) -> its folded conv
    for layer in list(model.modules()):
        if (isinstance(layer, ConvLayer) and layer.bn is not None and _foldable(layer.conv, layer.bn)
                and not _own_hooks(layer.conv, layer.bn)):
            if id(layer.conv) not in folded:
                folded[id(layer.conv)] = _fold(layer.conv, layer.bn)
            # the activation moves into the ConvAct, so that deploy runs conv + activation as one oneDNN kernel
            layer.conv, layer.bn, layer.act = ConvAct(folded[id(layer.conv)], layer.act), None, nn.Identity()


def unfolded_batchnorms(model: nn.Module) -> list[str]:
    """Names of the BatchNorm layers left in ``model`` (after `fuse`: those no conv precedes)."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


# --------------------------------------------------------------------------------------------
# Fused oneDNN kernels for CPU inference

# Activation module -> (oneDNN post-op name, its scalars). The op names are those the CPU
# inductor backend passes to the same kernel (torch/_inductor/fx_passes/mkldnn_fusion.py).
def _onednn_post_op(act: nn.Module) -> tuple[str, list[float]] | None:
    if type(act) is nn.Identity:
        return "none", []
    if type(act) is nn.ReLU:
        return "relu", []
    if type(act) is nn.LeakyReLU:
        return "leaky_relu", [float(act.negative_slope)]
    if type(act) is nn.SiLU:
        return "swish", []
    if type(act) is nn.ReLU6:
        return "hardtanh", [0.0, 6.0]
    if type(act) is nn.Sigmoid:
        return "sigmoid", []
    return None  # e.g. Mish: oneDNN has no such post-op here; the layer keeps conv + act


def onednn_available() -> bool:
    """Whether this PyTorch build has the fused oneDNN conv+pointwise kernel."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")


class OneDnnConvAct(nn.Module):
    """A `ConvAct` run as one oneDNN kernel with the activation in its epilogue (float32 CPU).

    The weights are reordered once into oneDNN's blocked layout, on the first call (for that
    input's shape; other shapes stay correct); without this every call pays a weight reorder,
    which costs 30-50 % of a batch-1 convolution here. Keeps the `ConvAct` it replaces and
    falls back to it outside inference (the fused kernel has no backward) and for other
    devices or dtypes, so a deployed model still runs anywhere.
    """

    def __init__(self, layer: ConvAct, post_op: tuple[str, list[float]]):
        super().__init__()
        conv = layer.conv
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError(f"OneDnnConvAct needs numeric zero padding, got {conv.padding!r}/{conv.padding_mode}")
        self.layer = layer
        self.attr, self.scalars = post_op
        self.padding, self.stride = list(conv.padding), list(conv.stride)
        self.dilation, self.groups = list(conv.dilation), conv.groups
        self._packed: torch.Tensor | None = None
        self._packed_from: PackedFrom | None = None

    def drop_packed(self) -> None:
        """Forget the packed weights: the next call packs the current ones again."""
        self._packed = self._packed_from = None

    def _apply(self, fn, recurse=True):
        self.drop_packed()  # moved or cast: pack again from the new weights
        return super()._apply(fn, recurse)

    def fast_path(self, x: torch.Tensor) -> bool:
        return (
            x.device.type == "cpu" and x.dtype == torch.float32 and not torch.is_grad_enabled()
            and self.layer.conv.weight.device.type == "cpu" and self.layer.conv.weight.dtype == torch.float32
        )

    def packed_weight(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.layer.conv.weight
        if self._packed_from is None or not self._packed_from.matches(weight):  # first call, or new / changed weights
            self._packed_from = PackedFrom(weight)
            self._packed = torch.ops.mkldnn._reorder_convolution_weight(
                weight.detach(), self.padding, self.stride, self.dilation, self.groups, list(x.shape),
            )
        return self._packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fast_path(x):
            return self.layer(x)
        return torch.ops.mkldnn._convolution_pointwise(
            x, self.packed_weight(x), self.layer.conv.bias, self.padding, self.stride, self.dilation, self.groups,
            self.attr, self.scalars, "",
        )


class OneDnnResidualBlock(nn.Module):
    """A fused `ResidualBlock` whose last conv absorbs the residual add (oneDNN binary post-op).

    ``act(conv3(y) + shortcut)``: the kernel computes ``conv3(y) + shortcut`` (and a ReLU if
    that is the block's activation) in one pass; a LeakyReLU is then applied in place. Partial
    or subsampled shortcuts (`darknet_add`) take the unfused path.
    """

    CHILDREN = {"conv1", "conv2", "conv3", "shortcut", "add", "act"}  # ResidualBlock's, as fused here

    def __init__(self, block: ResidualBlock):
        super().__init__()
        if not isinstance(block.conv3, OneDnnConvAct) or block.conv3.attr != "none":
            raise ValueError("OneDnnResidualBlock needs a block whose linear conv3 runs on oneDNN")
        self.conv1, self.conv2, self.conv3 = block.conv1, block.conv2, block.conv3
        self.shortcut, self.add, self.act = getattr(block, "shortcut", None), block.add, block.act
        self.relu_in_kernel = type(self.act) is nn.ReLU

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv2(self.conv1(x))
        shortcut = x if self.shortcut is None else self.shortcut(x)
        conv3 = self.conv3
        out_shape = (y.shape[0], conv3.layer.conv.out_channels, *y.shape[2:])
        if conv3.fast_path(y) and conv3.stride == [1, 1] and shortcut.shape == out_shape:
            out = torch.ops.mkldnn._convolution_pointwise.binary(
                y, shortcut, conv3.packed_weight(y), conv3.layer.conv.bias, conv3.padding, conv3.stride,
                conv3.dilation, conv3.groups, "add", None, "relu" if self.relu_in_kernel else None, [], "",
            )
            return out if self.relu_in_kernel else self.act(out)
        return self.act(self.add(self.conv3(y), shortcut))


def _known_layout(block: nn.Module, children: set[str]) -> bool:
    # Fuse a block only while its children are the ones the fused forward reproduces; a block
    # that gains a submodule keeps its own forward (and stays correct) until this file learns it.
    return set(block._modules) <= children


def use_onednn(model: nn.Module) -> nn.Module:
    """Swap a fused model's `ConvAct` layers and residual blocks for oneDNN-fused versions, in place."""
    if not onednn_available():
        raise ValueError("this PyTorch build has no oneDNN fused convolution kernel (torch.ops.mkldnn)")
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, ConvAct) and not _own_hooks(*child.children()):  # the kernel runs neither as a module
                post_op = _onednn_post_op(child.act)
                if post_op is not None and child.conv.padding_mode == "zeros" and not isinstance(child.conv.padding, str):
                    _replace(parent, name, OneDnnConvAct(child, post_op))
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if (
                isinstance(child, ResidualBlock) and _known_layout(child, OneDnnResidualBlock.CHILDREN)
                and isinstance(child.conv3, OneDnnConvAct) and child.conv3.attr == "none"
                and not _own_hooks(child.conv3, child.add)  # the fused kernel runs neither as a module
            ):
                _replace(parent, name, OneDnnResidualBlock(child))
    return model


def use_winograd(model: nn.Module) -> int:
    """Swap each oneDNN 3×3 stride-1 conv wide enough to gain for a Winograd one, in place.

    Returns how many layers were swapped. See `cspnet.winograd` for the rule and the numbers.
    """
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            conv = child.layer.conv if isinstance(child, OneDnnConvAct) else None
            if conv is not None and eligible(conv) and wide_enough(conv.in_channels, conv.out_channels):
                _replace(parent, name, WinogradConvAct(child))
                swapped += 1
    return swapped


# --------------------------------------------------------------------------------------------
# Deploy


class DeployedModel(nn.Module):
    """An inference-only model: runs the wrapped (fused) network under ``torch.inference_mode``.

    Inputs are converted to channels-last when the network is. Outputs are inference tensors:
    read them, or ``.clone()`` them before using them in autograd.

    The oneDNN and Winograd layers keep packed copies of their weights, made again when the weights
    change by ``load_state_dict``, in-place edits under ``torch.no_grad()`` or new memory (``p.data = …``).
    An in-place edit through ``p.data`` (``p.data.copy_(q)``, ``p.data.mul_(2)``) leaves no trace on the
    weights: call `repack` after it, or the model keeps computing with the old weights.
    """

    def __init__(self, model: nn.Module, channels_last: bool, compiled: nn.Module | None = None):
        super().__init__()
        self.model = model
        self.channels_last = channels_last
        # torch.compile's wrapper around ``model``: it holds the same weights, so it is kept out of the
        # submodules, or the state dict would hold every tensor twice (and safetensors refuse to write it)
        self.__dict__["compiled"] = compiled

    def forward(self, x: torch.Tensor):
        with torch.inference_mode():
            if self.channels_last and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            return (self.model if self.compiled is None else self.compiled)(x)

    def repack(self) -> None:
        """Drop every packed copy of the weights: the next call packs the current weights again."""
        for module in self.model.modules():
            if isinstance(module, (OneDnnConvAct, WinogradConvAct)):
                module.drop_packed()

    def train(self, mode: bool = True):
        if mode:
            raise ValueError("a deployed model is inference-only (BatchNorm is folded); train the original model")
        return super().train(False)


def _median_time(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def faster_memory_format(model: nn.Module, example_input: torch.Tensor, repeats: int = 3) -> bool:
    """Time ``model`` on ``example_input`` in NCHW and channels-last; True if channels-last wins.

    ``model`` is left in channels-last; the caller converts it back if NCHW won.
    """
    def timed(channels_last: bool) -> float:
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        model.to(memory_format=fmt)
        x = example_input.contiguous(memory_format=fmt)
        with torch.inference_mode():
            return _median_time(lambda: model(x), repeats)

    t_nchw = timed(False)
    t_nhwc = timed(True)
    return t_nhwc <= t_nchw


def deploy(
    model: nn.Module,
    channels_last: bool | None = None,
    compile: bool | str | dict = False,
    *,
    onednn: bool | None = None,
    winograd: bool = False,
    example_input: torch.Tensor | None = None,
    copy_model: bool = True,
) -> DeployedModel:
    """The fastest inference form of ``model``: eval + BN folding + channels-last (+ fused kernels).

    Args:
        channels_last: memory format. ``None``: time both on ``example_input`` if given,
            else channels-last (the documented rule, see the module docstring).
        compile: ``True`` (or a backend name, or a dict of ``torch.compile`` kwargs) to run the
            deployed network through ``torch.compile``. ``True`` on the CPU compiles with
            inductor's ``freezing``, which pre-packs the folded weights into the same fused
            oneDNN kernels itself.
        onednn: run conv+activation as fused oneDNN kernels (CPU float32). ``None``: when
            available, the model is on the CPU and ``compile`` is off (the oneDNN modules'
            shape checks would make ``torch.compile`` recompile per layer).
        winograd: compute the wide 3×3 stride-1 convs by Winograd, F(4×4, 3×3) or F(2×2, 3×3)
            by map size (`cspnet.winograd`): fewer multiplications, faster on the CPU from
            batch ~8, but each layer shape is compiled by inductor on its first call. Inputs
            where it measured slower (batch 1, 7×7 maps) keep the direct kernel. Needs ``onednn``.
        example_input: an input batch to choose the memory format on.
        copy_model: deploy a deep copy, leaving ``model`` untouched (default).
    Outputs equal ``model.eval()(x)`` up to float rounding (tests/test_export.py).
    """
    net = copy.deepcopy(model) if copy_model else model
    fuse(net)
    for p in net.parameters():
        p.requires_grad_(False)
    param = next(net.parameters(), None)
    on_cpu = param is None or param.device.type == "cpu"
    if onednn is None:
        onednn = on_cpu and onednn_available() and not compile
    if onednn:
        use_onednn(net)
    if winograd:
        if not onednn:
            raise ValueError("winograd=True needs the oneDNN deploy path (onednn=True, CPU, no compile)")
        use_winograd(net)
    if channels_last is None:
        channels_last = faster_memory_format(net, example_input) if example_input is not None else True
    net.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    compiled = None
    if compile:
        if isinstance(compile, dict):
            compiled = torch.compile(net, **compile)
        elif isinstance(compile, str):
            compiled = torch.compile(net, backend=compile)
        else:
            compiled = torch.compile(net, options={"freezing": True} if on_cpu else None)
    return DeployedModel(net, channels_last, compiled).eval()


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse instead of handing it back (process-wide).

    PyTorch allocates CPU tensors with malloc, and glibc serves blocks above 32 MiB (and, until
    its threshold adapts, above 128 KiB) with ``mmap``. Every activation map of a batch-8
    224-px forward is then mapped, page-faulted in and zeroed by the kernel, and unmapped again
    on every call: ~54,000 page faults per cspdarknet53 forward. With mmap off and trimming off,
    freed blocks are reused: on this CPU deploy at batch 8 went from 464 to 402 ms
    (cspdarknet53) and from 281 to 266 ms (cspresnet50). The cost: the process keeps its peak
    RSS. It is the same as starting Python with ``MALLOC_MMAP_MAX_=0
    MALLOC_TRIM_THRESHOLD_=2147483647``. Returns False where the C library is not glibc.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # <malloc.h>
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 2**31 - 1))


# --------------------------------------------------------------------------------------------
# Export


def _example_input(model: nn.Module, input_size: int | tuple[int, int], batch_size: int) -> torch.Tensor:
    if isinstance(input_size, int):
        input_size = (input_size, input_size)
    in_chans = getattr(model, "in_chans", 3)
    # The model's device and dtype: an fp16 / bf16 / fp64 model is exported taking that dtype.
    like = next(model.parameters(), torch.empty(0))
    return torch.randn(batch_size, in_chans, *input_size, device=like.device, dtype=like.dtype)


def _output_names(outputs: Any) -> list[str]:
    if isinstance(outputs, torch.Tensor):
        return ["output"]
    if isinstance(outputs, (list, tuple)) and all(isinstance(o, torch.Tensor) for o in outputs):
        return [f"output{i}" for i in range(len(outputs))]
    raise ValueError(f"can only export models returning a tensor or a list of tensors, got {type(outputs).__name__}")


def _refuse_deployed(model: nn.Module) -> None:
    deployed = (DeployedModel, OneDnnConvAct, OneDnnResidualBlock, WinogradConvAct)
    if any(isinstance(m, deployed) for m in model.modules()):
        raise ValueError("a deployed model (cspnet.deploy) runs fused oneDNN kernels under inference_mode, which "
                         "no exporter traces, and holds folded weights only; export the model before deploying it "
                         "(ONNX and TorchScript exports fold BatchNorm themselves)")


def _refuse_fused(model: nn.Module) -> None:
    if any(isinstance(m, (ConvAct, FoldedBatchNorm)) for m in model.modules()):
        raise ValueError("a fused model (cspnet.fuse) holds convs with the BatchNorms folded in: its state dict has "
                         "conv biases and no BatchNorm tensors, which no model built by create_model (or Detector) "
                         "loads; save the model before fusing it")


def export_record(model: nn.Module, metadata: dict[str, Any] | None = None,
                  input_size: int | tuple[int, int] | None = None) -> dict[str, Any]:
    """The metadata an export of ``model`` carries: ``metadata`` (what is known of the model's inputs and
    outputs: class names, category ids, mean / std, width …), the model's own name, config, class count and
    channels (`model_metadata`, over any in ``metadata``), a detector's anchors (pixels), each level's anchor
    indices and strides, its input rule (`LETTERBOX_RECORD`; RGB in [0, 1]: mean 0, std 1 unless ``metadata``
    says otherwise) and output layout (`DETECTOR_OUTPUT_LAYOUT`), and ``input_size``, the size a graph was
    traced at."""
    record = {**(metadata or {}), **model_metadata(model)}
    layout = getattr(model, "layout", None)
    if isinstance(layout, AnchorLayout):  # resolved: the config says None for the default anchors
        record.update(anchors=layout.anchors, anchor_masks=layout.masks, strides=layout.strides,
                      output_layout=DETECTOR_OUTPUT_LAYOUT, **LETTERBOX_RECORD)
        channels = record.get("in_chans") or 3
        record.setdefault("mean", [0.0] * channels)
        record.setdefault("std", [1.0] * channels)
    if input_size is not None:
        record["input_size"] = input_size
    return record


def descriptive_metadata(metadata: dict[str, Any]) -> dict[str, Any]:
    """The `DESCRIPTIVE_KEYS` of a weights file's metadata: what its exports carry of it."""
    return {k: metadata[k] for k in DESCRIPTIVE_KEYS if k in metadata}


def export_model(model: nn.Module, fused: bool = True) -> nn.Module:
    """The module exports are made from: an eval-mode copy of ``model``, BN-folded if ``fused``."""
    _refuse_deployed(model)
    net = copy.deepcopy(model).eval()
    return fuse(net) if fused else net


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    input_size: int | tuple[int, int] = 224,
    *,
    opset: int = ONNX_OPSET,
    dynamic_batch: bool = True,
    fused: bool = True,
    exporter: str = "auto",
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` as ONNX with input ``input`` (N, C, H, W) and a dynamic batch axis.

    Outputs are named ``output`` (one tensor) or ``output0``, ``output1`` … (a list, e.g.
    ``features_only`` models). ``exporter``: ``legacy`` (TorchScript-based, fast, opset <= 20),
    ``dynamo`` (``torch.export``-based, opset >= 18), or ``auto``: legacy, and dynamo for the
    graphs the legacy tracer rejects (it needs sizes it can treat as constants) and for opsets
    above 20. ``opset`` runs from 17 to the newest the installed onnx defines; the file is checked
    to hold it, and a warning says so when the dynamo exporter wrote 18 for 17.
    The graph keeps the model's dtype: a float16 model takes float16 input. bfloat16 needs opset
    22 or newer, and onnxruntime's CPU provider has no bfloat16 or float64 convolution.
    ``metadata``: what to record beside the model's identity and the input size (`export_record`), kept
    in the file's ``metadata_props`` under ``cspnet``.
    ``model`` is not modified.
    """
    import onnx

    newest = onnx.defs.onnx_opset_version()
    if not ONNX_OPSET <= opset <= newest:
        raise ValueError(f"opset {opset} is out of range: use {ONNX_OPSET} to {newest} "
                         f"(the newest the installed onnx {onnx.__version__} defines)")
    if exporter not in ("auto", "legacy", "dynamo"):
        raise ValueError(f"unknown exporter {exporter!r}; expected auto, legacy or dynamo")
    if exporter == "legacy" and opset > LEGACY_EXPORTER_MAX_OPSET:
        raise ValueError(f"the legacy exporter writes opsets up to {LEGACY_EXPORTER_MAX_OPSET}, not {opset}; "
                         "use exporter='dynamo' or 'auto'")
    net = export_model(model, fused)
    # torch.export treats a dimension of size 1 as the constant 1, so a graph traced at batch 1
    # takes batch 1 only: a dynamic batch is traced at batch 2.
    x = _example_input(net, input_size, 2 if dynamic_batch else 1)
    if x.dtype == torch.bfloat16 and opset < BFLOAT16_OPSET:
        raise ValueError(f"a bfloat16 model needs opset {BFLOAT16_OPSET} or newer (ONNX's Conv takes bfloat16 from there), "
                         f"got {opset}; onnxruntime's CPU provider runs float16 and float32 models: export model.half() "
                         "or model.float()")
    with torch.no_grad():
        names = _output_names(net(x))
    with atomic_path(path) as tmp:
        if exporter == "legacy" or (exporter == "auto" and opset <= LEGACY_EXPORTER_MAX_OPSET):
            try:
                asked = _export_onnx_legacy(net, x, tmp, opset, names, dynamic_batch)
            except OSError:  # the file cannot be written: the dynamo exporter would fail the same way, slowly
                raise
            except Exception as legacy_error:  # the legacy tracer's failures have no common base class
                if exporter == "legacy":
                    raise
                try:
                    asked = _export_onnx_dynamo(net, x, tmp, opset, names, dynamic_batch)
                except Exception as dynamo_error:
                    raise ValueError(
                        f"ONNX export failed with both exporters: legacy: {legacy_error}; dynamo: {dynamo_error}"
                    ) from dynamo_error
        else:
            asked = _export_onnx_dynamo(net, x, tmp, opset, names, dynamic_batch)
        _add_onnx_metadata(tmp, export_record(model, metadata, input_size))
        written = onnx_opset(tmp)
        if written != asked:
            raise ValueError(f"{path}: the exporter wrote opset {written}, not the {asked} asked for; nothing written")
    if written != opset:
        warnings.warn(f"{path}: written at opset {written}, not {opset}: the dynamo exporter (exporter={exporter!r}) "
                      f"writes opset {DYNAMO_EXPORTER_MIN_OPSET} or newer", stacklevel=2)
    return Path(path)


def _add_onnx_metadata(path: Path, record: dict[str, Any]) -> None:
    # torch.onnx.export takes no metadata: it is added to the written file
    import onnx

    model = onnx.load(str(path))
    entry = model.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, encode_metadata(record)
    onnx.save(model, str(path))


def onnx_opset(path: str | os.PathLike) -> int:
    """The opset of an ONNX file's standard operators."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def _export_onnx_legacy(net: nn.Module, x: torch.Tensor, path: Path, opset: int, names: list[str], dynamic_batch: bool) -> int:
    """Write ``path`` with the TorchScript-based exporter; return the opset asked of it."""
    axes = {n: {0: "batch"} for n in ["input", *names]} if dynamic_batch else None
    with warnings.catch_warnings():
        # The TorchScript-based exporter is deprecated in favour of dynamo=True, which is ~15x
        # slower to export these models and gives the same graph (module docstring). Tracer
        # warnings flag shape-dependent Python branches; ours depend on channels and strides,
        # which the export fixes anyway, never on the batch size.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(
            net, (x,), str(path), dynamo=False, opset_version=opset,
            input_names=["input"], output_names=names, dynamic_axes=axes,
        )
    return opset


def _export_onnx_dynamo(net: nn.Module, x: torch.Tensor, path: Path, opset: int, names: list[str], dynamic_batch: bool) -> int:
    """Write ``path`` with the ``torch.export``-based exporter; return the opset asked of it.

    It builds an opset-18 graph and converts it to a newer opset asked for (keeping 18 when the
    conversion fails, which `export_onnx` then catches); an older one is written as 18.
    """
    opset = max(opset, DYNAMO_EXPORTER_MIN_OPSET)
    shapes = ({0: torch.export.Dim("batch")},) if dynamic_batch else None
    torch.onnx.export(
        net, (x,), str(path), dynamo=True, opset_version=opset, input_names=["input"], output_names=names,
        dynamic_shapes=shapes, external_data=False, verbose=False,
    )
    return opset


def onnx_session(path: str | os.PathLike, threads: int | None = None):
    """An onnxruntime CPU session for ``path`` with ``threads`` intra-op threads (default: torch's)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or torch.get_num_threads()
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def run_onnx(session, x: torch.Tensor) -> list[torch.Tensor]:
    """Run an onnxruntime session on ``x``; every output as a tensor."""
    outputs = session.run(None, {session.get_inputs()[0].name: x.detach().cpu().numpy()})
    return [torch.from_numpy(o) for o in outputs]


def export_torchscript(model: nn.Module, path: str | os.PathLike, input_size: int | tuple[int, int] = 224, *,
                       fused: bool = True, metadata: dict[str, Any] | None = None) -> Path:
    """Write the traced (BN-folded) model as TorchScript; load it with ``torch.jit.load``.

    The file's extra file ``cspnet.json`` holds `export_record` (``metadata`` beside the model's identity
    and the input size traced at).
    """
    net = export_model(model, fused)
    x = _example_input(net, input_size, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated but still supported
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # see _export_onnx_legacy
        with torch.no_grad():
            traced = torch.jit.trace(net, x, check_trace=False)
        with atomic_path(path) as tmp:
            record = encode_metadata(export_record(model, metadata, input_size))
            torch.jit.save(traced, str(tmp), _extra_files={TORCHSCRIPT_METADATA_FILE: record})
    return Path(path)


def load_torchscript(path: str | os.PathLike) -> torch.jit.ScriptModule:
    """Load a TorchScript export (CPU); ``torch.jit`` is deprecated in torch 2.14 but still works."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.load(str(path), map_location="cpu")


def export_safetensors(model: nn.Module, path: str | os.PathLike, metadata: dict[str, Any] | None = None) -> Path:
    """Write the model's (unfused) state dict as safetensors, with `export_record` as metadata (``metadata``
    beside the model's name, config, class count and channels). A fused or deployed model is refused: its
    folded weights fit no model a loader builds.

    ``cspnet.weights.load_model(path)`` rebuilds the model from the file and loads it (a width-scaled or
    otherwise reconfigured model, a detector); ``cspnet.create_model(name, pretrained=path)`` reads a model of
    the registered config back (checking the name and config); ``cspnet.weights.load_into`` any model built
    to match.
    """
    _refuse_deployed(model)
    _refuse_fused(model)
    return save_weights(path, model, export_record(model, metadata))


def export(model: nn.Module, path: str | os.PathLike, fmt: str, input_size: int | tuple[int, int] = 224, **kwargs: Any) -> Path:
    """Export ``model`` to ``path`` in ``fmt`` (``onnx`` | ``torchscript`` | ``safetensors``)."""
    if fmt == "onnx":
        return export_onnx(model, path, input_size, **kwargs)
    if fmt == "torchscript":
        return export_torchscript(model, path, input_size, **kwargs)
    if fmt == "safetensors":
        return export_safetensors(model, path, **kwargs)
    raise ValueError(f"unknown export format {fmt!r}; expected one of {', '.join(EXPORT_FORMATS)}")
