"""Darknet's start-up table for a cfg: one row per layer with output shapes, plus params and BFLOPs.

Shapes come from the builder's shape inference; params and BFLOPs from `cspnet.profile` on the
built network (conv and connected weights, 2 x multiply-adds), attributed to the layer that
ran each module, so a weight-sharing conv counts its own work. As in Darknet's table, a row's
BFLOPs also count a ``[maxpool]``'s comparisons and a ``[shortcut]``'s adds, and the rows sum to
Darknet's "Total BFLOPS"; `Profile.bflops` (conv and connected layers only) is printed beside it.
"""
from __future__ import annotations

import math
import os
from collections import defaultdict
from dataclasses import dataclass

import torch

from ..profile import Profile, profile
from .build import (
    ConnectedLayer, ConvLayer, DarknetLayer, DarknetNet, MaxPoolLayer, RouteLayer, ShortcutLayer, UpsampleLayer,
    build_model,
)

_SHORT = {"convolutional": "conv", "maxpool": "max", "avgpool": "avg", "scale_channels": "scale"}


@dataclass(frozen=True)
class LayerRow:
    index: int
    kind: str
    detail: str
    in_shape: tuple[int, int, int]
    out_shape: tuple[int, int, int]
    bflops: float
    line: int


def _detail(layer: DarknetLayer) -> str:
    if isinstance(layer, ConvLayer):
        k, s = layer.conv.kernel_size, layer.conv.stride
        groups = f" g{layer.conv.groups}" if layer.conv.groups > 1 else ""
        groups += f" d{layer.conv.dilation[0]}" if layer.conv.dilation[0] > 1 else ""
        shared = f" (shares {layer.shared_from})" if layer.shared_from is not None else ""
        stride = f"{s[0]}" if s[0] == s[1] else f"{s[1]}x{s[0]}"
        return f"{layer.conv.out_channels:5d} {k[0]} x {k[1]}/{stride:>2}{groups}{shared}"
    if isinstance(layer, MaxPoolLayer):
        if layer.depth:
            return f"{layer.out_shape[0]:5d} depth"
        sy, sx = layer.stride_yx
        return f"      {layer.size} x {layer.size}/{sy if sy == sx else f'{sx}x{sy}':>2}"
    if isinstance(layer, RouteLayer):
        groups = f" (group {layer.group_id}/{layer.groups})" if layer.groups > 1 else ""
        return " " + ",".join(str(j) for j in layer.sources) + groups
    if isinstance(layer, UpsampleLayer):
        return f"      {layer.stride}x"
    if isinstance(layer, ConnectedLayer):
        return f"{layer.fc.out_features:5d}"
    if layer.sources:
        return f" from {layer.sources[0]}"
    return ""


def _per_layer_bflops(model: DarknetNet, prof: Profile) -> dict[int, float]:
    # The profiler names a module once (a shared conv under its first owner); the k-th call of a
    # module belongs to the k-th layer that holds it, in forward order.
    users: dict[int, list[int]] = defaultdict(list)
    for layer in model.layers:
        for m in layer.modules():
            users[id(m)].append(layer.index)
    modules = dict(model.named_modules())
    calls: dict[str, int] = defaultdict(int)
    flops: dict[int, float] = defaultdict(float)
    for entry in prof.layers:
        owners = users[id(modules[entry.name])]
        flops[owners[min(calls[entry.name], len(owners) - 1)]] += 2 * entry.macs / 1e9
        calls[entry.name] += 1
    return flops


def _unweighted_bflops(layer: DarknetLayer) -> float:
    """Darknet's BFLOPs of a layer without weights: ``size^2 x C_in`` per output position of a ``[maxpool]``
    (``maxpool_layer.c``, also with ``maxpool_depth``), one per output element of a ``[shortcut]``
    (``shortcut_layer.c``, one ``from`` layer); Darknet counts nothing for the other kinds."""
    if isinstance(layer, MaxPoolLayer):
        _, out_h, out_w = layer.out_shape
        return layer.size ** 2 * layer.in_shape[0] * out_h * out_w / 1e9
    if isinstance(layer, ShortcutLayer):
        return math.prod(layer.out_shape) / 1e9
    return 0.0


def summarize(cfg_path: str | os.PathLike, input_size: int | tuple[int, int] | None = None) -> tuple[list[LayerRow], Profile, DarknetNet]:
    """Build ``cfg_path`` (on the meta device: no weights are allocated) and profile it.

    Returns the per-layer rows (their BFLOPs sum to Darknet's total), the `Profile` (``conv_params``,
    ``bflops`` of the conv and connected layers …) and the model.
    """
    with torch.device("meta"):
        model = build_model(cfg_path, input_size)
    prof = profile(model, model.input_size, model.in_chans)
    flops = _per_layer_bflops(model, prof)
    rows = [
        LayerRow(layer.index, _SHORT.get(layer.kind, layer.kind), _detail(layer), layer.in_shape, layer.out_shape,
                 flops.get(layer.index, 0.0) + _unweighted_bflops(layer), layer.line)
        for layer in model.layers
    ]
    return rows, prof, model


def _whc(shape: tuple[int, int, int]) -> str:
    c, h, w = shape
    return f"{w:4d} x{h:4d} x{c:5d}"


def format_table(rows: list[LayerRow], prof: Profile, model: DarknetNet) -> str:
    """Darknet-style text: ``layer  type  filters size/strd  input -> output  BFLOPs  line``."""
    h, w = model.input_size
    lines = [f"{os.path.basename(model.cfg_path)}: input {w} x {h} x {model.in_chans}",
             f"{'layer':>5}  {'type':<8}{'filters  size/strd':<26}{'input':>18}    {'output':<18}{'BFLOPs':>8}  line"]
    for r in rows:
        bf = f"{r.bflops:8.3f}" if r.bflops else " " * 8
        source = "" if r.kind == "route" else _whc(r.in_shape)  # a route reads the layers it lists
        lines.append(f"{r.index:5d}  {r.kind:<8}{r.detail:<26}{source:>18} -> {_whc(r.out_shape):<18}{bf}  {r.line}")
    lines.append(f"conv weights: {prof.conv_params / 1e6:.3f} M   params: {prof.params / 1e6:.3f} M   "
                 f"BFLOPs: {prof.bflops:.3f} (conv and connected layers)")
    lines.append(f"Total BFLOPS {sum(r.bflops for r in rows):.3f} (Darknet's: with maxpool and shortcut layers)")
    return "\n".join(lines)
