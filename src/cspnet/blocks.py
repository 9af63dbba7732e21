"""Blocks that go inside a stage. Each is a small module; stages receive them through a factory."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .layers import ConvBnAct, Shortcut, make_act


class ResidualBlock(nn.Module):
    """ResNet bottleneck / ResNeXt block: 1x1 -> 3x3 (grouped, strided) -> 1x1 linear, add, act.

    With ``mid_chs == out_chs`` and ``groups=32`` it is the CSPResNeXt block "w/o bottleneck"
    (paper Fig. 5). The shortcut is Darknet's: when the input has fewer channels or a larger map
    than the output it is added partially (see ``darknet_add``). With ``projection=True`` such a
    block instead projects its input with a strided 1x1 conv + BN, as torchvision's ResNets do.
    ``dilation`` is the 3x3's (see `cspnet.net.dilate_stages`).
    """

    def __init__(
        self,
        in_chs: int,
        mid_chs: int,
        out_chs: int,
        stride: int = 1,
        groups: int = 1,
        act: str = "leaky",
        projection: bool = False,
        dilation: int = 1,
    ):
        super().__init__()
        self.conv1 = ConvBnAct(in_chs, mid_chs, 1, act=act)
        self.conv2 = ConvBnAct(mid_chs, mid_chs, 3, stride, groups=groups, act=act, dilation=dilation)
        self.conv3 = ConvBnAct(mid_chs, out_chs, 1, act="linear")
        needs_projection = projection and (in_chs != out_chs or stride != 1)
        self.shortcut = ConvBnAct(in_chs, out_chs, 1, stride, act="linear") if needs_projection else None
        self.add = Shortcut(inplace=True)  # conv's BN output: a temporary
        self.act = make_act(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.shortcut is None else self.shortcut(x)
        return self.act(self.add(self.conv3(self.conv2(self.conv1(x))), shortcut))


class BasicBlock(nn.Module):
    """ResNet-10/18 block: 3x3 (strided) -> 3x3 linear, add, act (resnet10.cfg).

    ``first_dilation`` is the first 3x3's (default: ``dilation``), ``dilation`` the second's: in a stage's
    first block the first 3x3 is the stage's downsampling conv (see `cspnet.net.dilate_stages`).
    """

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1, act: str = "leaky", dilation: int = 1,
                 first_dilation: int | None = None):
        super().__init__()
        self.conv1 = ConvBnAct(in_chs, out_chs, 3, stride, act=act, dilation=first_dilation or dilation)
        self.conv2 = ConvBnAct(out_chs, out_chs, 3, act="linear", dilation=dilation)
        self.add = Shortcut(inplace=True)  # conv's BN output: a temporary
        self.act = make_act(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.add(self.conv2(self.conv1(x)), x))


class DarkBlock(nn.Module):
    """Darknet-53 block: 1x1 -> 3x3, add; no activation after the add (``[shortcut] activation=linear``)."""

    def __init__(self, in_chs: int, mid_chs: int, out_chs: int, act: str = "leaky", dilation: int = 1):
        super().__init__()
        self.conv1 = ConvBnAct(in_chs, mid_chs, 1, act=act)
        self.conv2 = ConvBnAct(mid_chs, out_chs, 3, act=act, dilation=dilation)
        self.add = Shortcut(inplace=True, x_saved_for_backward=True)  # conv2's activation output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.add(self.conv2(self.conv1(x)), x)


def repeat_blocks(make_block: Callable[[int, int], nn.Module], in_chs: int, out_chs: int, depth: int) -> tuple[nn.Sequential, int]:
    """``depth`` blocks in sequence; ``make_block(in_chs, index)`` builds block ``index``."""
    blocks = []
    for i in range(depth):
        blocks.append(make_block(in_chs if i == 0 else out_chs, i))
    return nn.Sequential(*blocks), out_chs
