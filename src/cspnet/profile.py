"""Measure a model from its real module graph: parameters, MACs, Darknet BFLOPs and CIO.

Conventions (stated once, used everywhere):

- ``params``: every parameter (what ``sum(p.numel())`` gives).
- ``conv_params``: weights of convolution (any ``nn.Conv*d``, transposed too) and linear layers only, no BN and no biases. This is
  how the official CSPNet README counts "#Param" (a Darknet classifier is a 1x1 conv).
- ``macs``: multiply-accumulates of convolution and linear layers, for one image. A transposed
  convolution spreads each input element over ``k`` x ``C_out / groups`` outputs.
- ``bflops``: Darknet's BFLOPs = 2 * ``macs`` / 1e9.
- ``flops_all``: FLOPs of every layer that runs as a module: 2 per MAC for conv/linear,
  2 per element for BatchNorm (scale and shift), 1 per element for activations and residual
  adds (`cspnet.layers.Shortcut`), one per window element for pooling: pooling modules, and
  the pools cspnet's layers write as tensor ops (`SPP`'s max pools, `Maxout`'s max over
  channels, `SqueezeExcite`'s mean, `ClassifierHead`'s global average). `SqueezeExcite`'s
  sigmoid and channel scaling count one per element. Other tensor ops (adds, concatenations,
  the detection necks' pools) are not counted.
- ``shortcut_adds``: elements written by residual adds (`cspnet.layers.Shortcut`). Some Darknet
  builds add these to their BFLOPs total (one per output element of a ``[shortcut]``); the
  README's resnet10 figure (2.273) includes them, its darknet53 figure (18.57) does not.
- ``cio``: the paper's memory-traffic measure (CIO of HarDNet): for every convolution and linear
  layer, the number of elements of its input plus its output, summed, for one image. A linear
  layer counts as the 1x1 convolution on a 1x1 map that a Darknet cfg writes for a classifier,
  so a native model and the network built from its cfg have the same CIO.

Shapes come from forward hooks during one batch-1 forward pass in eval mode. Every convolution
and linear layer is hooked, also one holding modules of its own (a quantization-aware conv's fake
quantizers, a parametrized weight), so that none goes uncounted.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

import torch
from torch import nn

from .export import OneDnnConvAct
from .layers import SPP, ClassifierHead, Maxout, Shortcut, SqueezeExcite

_ACTS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.Mish, nn.SiLU, nn.Sigmoid, nn.Hardswish, nn.Tanh)
_POOLS = (nn.MaxPool2d, nn.AvgPool2d)
_WEIGHTED = (nn.modules.conv._ConvNd, nn.Linear)  # the layers whose weights and MACs are counted
# Modules with children whose forward also computes with tensor ops of its own (counted in flops_all)
_OWN_OPS = (SqueezeExcite, ClassifierHead)


@dataclass(frozen=True)
class LayerProfile:
    name: str
    kind: str
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    params: int
    macs: int
    flops: int
    cio: int


@dataclass(frozen=True)
class Profile:
    input_size: tuple[int, int]
    params: int
    conv_params: int
    macs: int
    flops_all: int
    shortcut_adds: int
    cio: int
    layers: list[LayerProfile] = field(repr=False)

    @property
    def bflops(self) -> float:
        """Darknet BFLOPs: 2 x conv/linear multiply-adds, in billions."""
        return 2 * self.macs / 1e9

    def as_dict(self) -> dict:
        return {
            "input_size": list(self.input_size),
            "params": self.params,
            "conv_params": self.conv_params,
            "macs": self.macs,
            "bflops": self.bflops,
            "flops_all": self.flops_all,
            "shortcut_adds": self.shortcut_adds,
            "cio": self.cio,
        }


def _conv_macs(m: nn.modules.conv._ConvNd, x: torch.Tensor, out: torch.Tensor) -> int:
    k = math.prod(m.kernel_size)
    if m.transposed:  # each input element is spread over k * C_out / groups outputs
        return x.numel() * (m.out_channels // m.groups) * k
    return out.numel() * (m.in_channels // m.groups) * k


def _window(m: nn.Module) -> int:
    k = m.kernel_size
    return k * k if isinstance(k, int) else k[0] * k[1]


def _is_positive_int(value) -> bool:
    # any integer type (numpy's too), but not a bool: True is no size
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 1


def profile(model: nn.Module, input_size: int | tuple[int, int] = 224, in_chans: int | None = None) -> Profile:
    """Profile ``model`` on one ``in_chans x H x W`` image (``input_size`` is H = W or (H, W)).

    ``in_chans`` defaults to the model's ``in_chans`` attribute, else 3.
    """
    size = (input_size, input_size) if isinstance(input_size, numbers.Integral) else input_size
    if not isinstance(size, (tuple, list)) or len(size) != 2 or not all(_is_positive_int(v) for v in size):
        raise ValueError(f"input size must be one or two positive integers (H, W), got {input_size!r}")
    input_size = (int(size[0]), int(size[1]))
    if in_chans is None:
        in_chans = getattr(model, "in_chans", 3)
    if not _is_positive_int(in_chans):
        raise ValueError(f"in_chans must be a positive integer, got {in_chans!r}")
    in_chans = int(in_chans)
    if any(isinstance(m, OneDnnConvAct) for m in model.modules()):
        raise ValueError("profile counts the calls of nn.Conv2d layers, which a deployed model (cspnet.deploy) replaces "
                         "with fused oneDNN kernels; profile the model before deploying it (the arithmetic is the same)")
    layers: list[LayerProfile] = []

    def hook(name: str):
        def fn(m: nn.Module, inputs, output):
            x = inputs[0] if inputs else None
            if not isinstance(x, torch.Tensor) or not isinstance(output, torch.Tensor):
                return
            own = sum(p.numel() for p in m.parameters(recurse=False))
            macs = flops = cio = 0
            if isinstance(m, nn.modules.conv._ConvNd):
                macs = _conv_macs(m, x, output)
                flops, cio = 2 * macs, x.numel() + output.numel()
                kind = "conv"
            elif isinstance(m, nn.Linear):
                macs = output.numel() * m.in_features
                flops, cio = 2 * macs, x.numel() + output.numel()
                kind = "linear"
            elif isinstance(m, nn.modules.batchnorm._BatchNorm):
                flops, kind = 2 * output.numel(), "bn"
            elif isinstance(m, _ACTS):
                flops, kind = output.numel(), "act"
            elif isinstance(m, Shortcut):
                flops, kind = output.numel(), "shortcut"
            elif isinstance(m, _POOLS):
                flops, kind = output.numel() * _window(m), "pool"
            elif isinstance(m, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)):
                flops, kind = x.numel(), "pool"
            elif isinstance(m, SPP):  # stride-1 max pools, one per kernel size, each as large as x
                flops, kind = x.numel() * sum(k * k for k in m.kernel_sizes), "pool"
            elif isinstance(m, Maxout):  # each output element is the max of ceil(C / out_chs) channels
                flops, kind = output.numel() * -(-x.shape[1] // m.out_chs), "pool"
            elif isinstance(m, SqueezeExcite):  # its convs count on their own: here the mean, sigmoid and scaling
                flops, kind = x.numel() + x.shape[0] * x.shape[1] + output.numel(), "se"
            elif isinstance(m, ClassifierHead):  # its linear layer counts on its own: here the global pool
                flops, kind = x.numel(), "pool"
            else:
                kind = type(m).__name__
            layers.append(LayerProfile(name, kind, tuple(x.shape), tuple(output.shape), own, macs, flops, cio))

        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules()
               if isinstance(m, (*_WEIGHTED, *_OWN_OPS)) or not list(m.children())]
    modes = {m: m.training for m in model.modules()}  # restored one by one: a user may have frozen some
    model.eval()
    try:
        param = next(model.parameters(), None)
        probe = {"device": param.device, "dtype": param.dtype} if param is not None else {}
        with torch.no_grad():
            try:
                model(torch.zeros(1, in_chans, *input_size, **probe))
            except (RuntimeError, ValueError) as e:  # torch's errors, and a model's own input checks
                name = getattr(model, "model_name", type(model).__name__)
                h, w = input_size
                raise ValueError(f"{name} cannot run on a {h}x{w} input with {in_chans} channel(s): {e}") from e
    finally:
        for h in handles:
            h.remove()
        for m, training in modes.items():
            m.training = training
    conv_params = sum(m.weight.numel() for m in model.modules() if isinstance(m, _WEIGHTED))
    return Profile(
        input_size=tuple(input_size),
        params=sum(p.numel() for p in model.parameters()),
        conv_params=conv_params,
        macs=sum(layer.macs for layer in layers),
        flops_all=sum(layer.flops for layer in layers),
        shortcut_adds=sum(layer.flops for layer in layers if layer.kind == "shortcut"),
        cio=sum(layer.cio for layer in layers),
        layers=layers,
    )
