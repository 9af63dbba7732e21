"""Small building blocks shared by every model family.

`ConvBnAct` is the Darknet ``[convolutional]`` section with ``batch_normalize=1``: a bias-free
convolution, BatchNorm and an activation. Activations are named as in the Darknet cfgs
(``leaky`` is LeakyReLU with slope 0.1, as darknet's ``leaky_activate``; ``leaky_0.01`` is
PyTorch's default slope, which timm's ``leaky_relu`` models were trained with).
"""
from __future__ import annotations

import difflib

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = ("leaky", "leaky_0.01", "mish", "swish", "relu", "relu6", "logistic", "linear")
# Aliases users reach for; each maps onto one of ACTIVATIONS.
_ALIASES = {"silu": "swish", "leaky_relu": "leaky", "identity": "linear", "sigmoid": "logistic", "none": "linear"}


def canonical_act(name: str) -> str:
    """Return the canonical activation name, or raise ValueError with close matches."""
    if not isinstance(name, str):
        raise ValueError(f"activation must be a name, got {type(name).__name__}")
    key = name.lower()
    key = _ALIASES.get(key, key)
    if key not in ACTIVATIONS:
        close = difflib.get_close_matches(key, ACTIVATIONS + tuple(_ALIASES), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown activation {name!r}{hint} (known: {', '.join(ACTIVATIONS)})")
    return key


def make_act(name: str) -> nn.Module:
    """Build the activation module for a Darknet activation name."""
    key = canonical_act(name)
    if key == "leaky":
        return nn.LeakyReLU(0.1, inplace=True)
    if key == "leaky_0.01":
        return nn.LeakyReLU(0.01, inplace=True)
    if key == "mish":
        return nn.Mish(inplace=True)
    if key == "swish":
        return nn.SiLU(inplace=True)
    if key == "relu":
        return nn.ReLU(inplace=True)
    if key == "relu6":
        return nn.ReLU6(inplace=True)
    if key == "logistic":
        return nn.Sigmoid()
    return nn.Identity()


class ConvOutputBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` for the output of the convolution just before it (`ConvBnAct`).

    In eval mode with no autograd graph recorded it normalizes a large map in place, as
    ``x * scale + shift`` with per-channel factors (equal to ``nn.BatchNorm2d`` up to float
    rounding, ~3e-7 relative), so the conv+BN pair allocates one such map, not two. The conv
    output is fresh and nothing else reads it, so overwriting it is safe. Otherwise (training,
    autograd recording, or a map below ``IN_PLACE_MIN_NUMEL``) it is exactly ``nn.BatchNorm2d``;
    its parameters and buffers are the same, so state dicts, converters and BN folding see a
    plain BatchNorm2d.
    """

    # Why only large maps: glibc serves allocations below its mmap threshold (adaptive, up to
    # 32 MiB) from reused heap memory, where a new output costs nothing and the native kernel's
    # one pass beats the two in-place passes; larger ones are fresh pages, faulted in on every
    # call. Measured interleaved with timm (2 threads, 224 px): in place everywhere was ~4 %
    # faster at batch 8 but 3-10 % slower at batch 1; with this threshold (16 MiB of float32)
    # both batch sizes get the faster form.
    IN_PLACE_MIN_NUMEL = 1 << 22

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            self.training or torch.is_grad_enabled() or self.running_mean is None or not self.affine
            or x.numel() < self.IN_PLACE_MIN_NUMEL
        ):
            return super().forward(x)
        scale = self.weight * torch.rsqrt(self.running_var + self.eps)
        shift = self.bias - self.running_mean * scale
        return x.mul_(scale.view(1, -1, 1, 1)).add_(shift.view(1, -1, 1, 1))


class ConvBnAct(nn.Sequential):
    """Conv2d (no bias) -> BatchNorm2d -> activation, with Darknet's 'same' padding (k // 2)."""

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        kernel_size: int = 1,
        stride: int = 1,
        groups: int = 1,
        act: str = "leaky",
        dilation: int = 1,
    ):
        padding = dilation * (kernel_size // 2)
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size, stride, padding, dilation=dilation, groups=groups, bias=False)
        self.bn = ConvOutputBatchNorm2d(out_chs)
        self.act = make_act(act)
        self.in_chs, self.out_chs = in_chs, out_chs


def darknet_add(x: torch.Tensor, shortcut: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """Darknet's ``[shortcut]``: add ``shortcut`` into ``x`` over min(C_x, C_s) channels.

    The result keeps ``x``'s shape; with ``inplace`` it is ``x`` itself whenever the add covers
    all of ``x``'s channels. A larger shortcut map is subsampled with stride
    ``H_s / H_x`` (darknet ``shortcut_cpu``), which is how the plain ResNet cfgs make the
    first block of a stride-2 stage residual without a projection conv; a shortcut with fewer
    channels is a *partial residual* (csresnet50 stage 1, paper §4.2, CSPNet issue #13).
    """
    if x.shape == shortcut.shape:
        return x.add_(shortcut) if inplace else x + shortcut
    if shortcut.shape[2] != x.shape[2] or shortcut.shape[3] != x.shape[3]:
        step_h, step_w = shortcut.shape[2] // x.shape[2], shortcut.shape[3] // x.shape[3]
        if step_h < 1 or step_w < 1 or step_h != step_w:
            raise ValueError(f"shortcut of shape {tuple(shortcut.shape)} cannot be added to {tuple(x.shape)}")
        shortcut = shortcut[:, :, ::step_h, ::step_w][:, :, : x.shape[2], : x.shape[3]]
    c_x, c_s = x.shape[1], shortcut.shape[1]
    if c_s >= c_x:
        shortcut = shortcut[:, :c_x]
        return x.add_(shortcut) if inplace else x + shortcut
    return torch.cat([x[:, :c_s] + shortcut, x[:, c_s:]], dim=1)


class Shortcut(nn.Module):
    """A residual add as a module (Darknet ``[shortcut]``), so that profilers can see it.

    With ``inplace=True`` (as ``nn.ReLU``) the sum is written into ``x``: the block passes a fresh
    conv output that nothing else reads. Skipping one block-sized allocation per block is
    measurably faster on CPU, where each large allocation is freshly ``mmap``-ed, zeroed memory.
    ``x_saved_for_backward=True`` says that the layer which made ``x`` keeps it for its backward
    pass (a leaky ReLU keeps its output), so the add is in place only while no autograd graph is
    being recorded (``torch.no_grad``, ``inference_mode``).
    """

    def __init__(self, inplace: bool = False, x_saved_for_backward: bool = False):
        super().__init__()
        self.inplace = inplace
        self.x_saved_for_backward = x_saved_for_backward

    def forward(self, x: torch.Tensor, shortcut: torch.Tensor) -> torch.Tensor:
        inplace = self.inplace and not (self.x_saved_for_backward and torch.is_grad_enabled())
        return darknet_add(x, shortcut, inplace=inplace)


class Maxout(nn.Module):
    """Maxout over channels (Darknet ``[maxpool] maxpool_depth=1 out_channels=N``).

    Output channel g is the max over input channels g, g+N, g+2N, ... (darknet
    ``forward_maxpool_layer``); EFM uses it to compress pyramid maps before concatenation.
    """

    def __init__(self, out_chs: int):
        super().__init__()
        self.out_chs = out_chs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        if c % self.out_chs:
            # Channels past the last full group take part only in their own group's max: pad with -inf.
            pad = self.out_chs - c % self.out_chs
            x = torch.cat([x, x.new_full((n, pad, h, w), float("-inf"))], dim=1)
            c = x.shape[1]
        return x.view(n, c // self.out_chs, self.out_chs, h, w).amax(dim=1)


class SPP(nn.Module):
    """Spatial pyramid pooling as in YOLOv3-SPP: concat [max13, max9, max5, identity] (stride 1)."""

    def __init__(self, kernel_sizes: tuple[int, ...] = (5, 9, 13)):
        super().__init__()
        self.kernel_sizes = kernel_sizes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pools = [F.max_pool2d(x, k, 1, k // 2) for k in reversed(self.kernel_sizes)]
        return torch.cat(pools + [x], dim=1)


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation channel attention (used by the SE PeleeNet variants)."""

    def __init__(self, chs: int, reduction: int = 4, act: str = "relu"):
        super().__init__()
        hidden = max(8, chs // reduction)
        self.fc1 = nn.Conv2d(chs, hidden, 1)
        self.act = make_act(act)
        self.fc2 = nn.Conv2d(hidden, chs, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean((2, 3), keepdim=True)
        return x * torch.sigmoid(self.fc2(self.act(self.fc1(s))))


class ClassifierHead(nn.Module):
    """Global average pool -> dropout -> linear (the cfgs' ``[avgpool]`` + 1x1 ``[convolutional]``).

    A 1x1 convolution on a pooled 1x1 map is a linear layer; ``nn.Linear`` holds the same
    ``C_out x C_in`` weights and bias, so Darknet weights map onto it by a reshape.
    """

    def __init__(self, in_chs: int, num_classes: int, drop_rate: float = 0.0):
        super().__init__()
        self.in_chs = in_chs
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(in_chs, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        if pre_logits:
            return x
        return self.fc(self.drop(x))
