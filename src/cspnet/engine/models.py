"""Building the model of a run, and rebuilding it from a checkpoint record.

A run's model is described by JSON-able options: ``{"name", "width", "options", "num_classes",
"in_chans"}``. ``width`` scales every channel count of the registered config (`scale_widths`,
rounded to a multiple of 8): how the compare job makes small twins for 32x32 images.
``options`` are other config-field overrides (``act``, ``fusion``, ``part_ratio`` …).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

from torch import nn

from ..registry import create_model, get_spec
from .train import seed_everything


# Channel counts not named ``*_chs``: DenseNet's / PeleeNet's growth rate, and MobileNet's and the
# Darknet Reference model's per-layer widths.
_CHANNEL_FIELDS = ("growth_rate", "widths")


def _max_groups(cfg: Any) -> int:
    """The largest ``groups`` field of a (possibly nested) config: 1 without grouped convs."""
    found = [1]
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if f.name == "groups" and isinstance(v, int):
            found.append(v)
        elif isinstance(v, tuple):
            found += [_max_groups(x) for x in v if dataclasses.is_dataclass(x)]
    return max(found)


def scale_widths(cfg: Any, width: float, divisor: int = 8) -> Any:
    """A copy of a (frozen, possibly nested) config with every channel count times ``width``.

    Channel counts are the ``*_chs`` fields and ``_CHANNEL_FIELDS``, single or per stage (tuples),
    rounded to a multiple of ``divisor`` (at least ``divisor``).
    """
    if width <= 0:
        raise ValueError(f"width must be positive, got {width}")

    def scale_count(v: int) -> int:
        return max(divisor, int(round(v * width / divisor)) * divisor)

    def is_count(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v > 0

    def scale(obj: Any) -> Any:
        if dataclasses.is_dataclass(obj):
            changes = {}
            for f in dataclasses.fields(obj):
                v = getattr(obj, f.name)
                if f.name.endswith("_chs") or f.name in _CHANNEL_FIELDS:
                    if is_count(v):
                        changes[f.name] = scale_count(v)
                    elif isinstance(v, tuple) and v and all(is_count(x) for x in v):
                        changes[f.name] = tuple(scale_count(x) for x in v)
                elif isinstance(v, tuple) and any(dataclasses.is_dataclass(x) for x in v):
                    changes[f.name] = tuple(scale(x) for x in v)
            return dataclasses.replace(obj, **changes)
        return obj

    return cfg if width == 1.0 else scale(cfg)


def build_model(name: str, *, num_classes: int, in_chans: int, width: float = 1.0,
                options: dict[str, Any] | None = None) -> nn.Module:
    """``create_model`` with a width multiplier and config overrides (see the module docstring)."""
    options = dict(options or {})
    spec = get_spec(name)
    reserved = sorted(set(options) & {"num_classes", "in_chans", "pretrained", "darknet_weights"})
    if reserved:
        raise ValueError(f"{reserved} cannot be model options: they are set on their own (num_classes and in_chans "
                         "from the data of a run, weights with pretrained= / --pretrained)")
    if width != 1.0:
        fields = {f.name for f in dataclasses.fields(spec.cfg)}
        cfg = dataclasses.replace(spec.cfg, **{k: v for k, v in options.items() if k in fields})
        # grouped convs (ResNeXt) need widths the group count divides
        cfg = scale_widths(cfg, width, divisor=math.lcm(8, _max_groups(cfg)))
        options.update({f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
                        if getattr(cfg, f.name) != getattr(spec.cfg, f.name)})
    try:
        return create_model(name, num_classes=num_classes, in_chans=in_chans, **options)
    except ValueError as e:
        if width == 1.0 or "divisible by groups" not in str(e):
            raise
        raise ValueError(f"width {width} leaves a grouped conv of model {name!r} with channels its groups do not "
                         f"divide (widths derived by ratios); use a larger width") from None


def model_record(name: str, *, num_classes: int, in_chans: int, width: float = 1.0,
                 options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The JSON-able description that `rebuild_model` turns back into the same model."""
    return {"name": name, "width": width, "options": dict(options or {}), "num_classes": num_classes, "in_chans": in_chans}


def rebuild_model(record: dict[str, Any], *, seed: int | None = None) -> nn.Module:
    """The model a `model_record` describes (weights not loaded).

    With ``seed``, the global RNGs are seeded (`seed_everything`) right before the model is built, so its
    initial weights are a function of the seed alone, not of whatever ran before in the process.
    """
    if seed is not None:
        seed_everything(seed)
    try:
        return build_model(record["name"], num_classes=record["num_classes"], in_chans=record["in_chans"],
                           width=record.get("width", 1.0), options=record.get("options"))
    except KeyError as e:
        raise ValueError(f"model record lacks key {e}") from None
