"""Weights from the libraries users already have them for: timm and torchvision.

A `Conversion` maps one source model's state dict onto the cspnet model that computes the same
function (``cspresnext50`` in timm -> ``cspresnext50_timm`` here; docs/interop.md lists the
models and how they differ from the official cfgs). Conversion only renames keys and, where
the layouts differ in form, reorders channels; it never needs the source library installed.
`convert_file` also fits the first convolution to grey or RGB input when asked (``in_chans``).
"""
from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..data.classification import IMAGENET_MEAN, IMAGENET_STD
from ..weights import (
    WeightsError, input_conv_adaptation, load_into, load_state, model_metadata, save_weights, strip_wrapper_prefix,
)


StateDict = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Preprocess:
    """How the source library's ImageNet weights expect images (their eval transform)."""

    input_size: int
    crop_pct: float
    interpolation: str
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


@dataclass(frozen=True)
class Conversion:
    """``library``'s model ``source`` -> cspnet model ``model``, via ``convert`` (state dict in, out)."""

    library: str
    source: str
    model: str
    convert: Callable[[StateDict], StateDict]
    preprocess: Preprocess


Rule = tuple[str, "str | Callable[[re.Match[str]], str]"]


def rename_keys(state: StateDict, rules: Sequence[Rule], source: str) -> StateDict:
    """Rename every key by the first matching ``(regex, replacement)`` rule (as `re.sub` takes).

    A key that no rule matches means the state dict is not of the model it claims to be; it is
    reported by name rather than silently dropped.
    """
    out: StateDict = {}
    unknown = []
    for key, value in state.items():
        for pattern, repl in rules:
            new, n = re.subn(pattern, repl, key, count=1)
            if n:
                out[new] = value
                break
        else:
            unknown.append(key)
    if unknown:
        more = f" … ({len(unknown)} in all)" if len(unknown) > 10 else ""
        raise WeightsError(f"{source}: keys with no counterpart in cspnet: {', '.join(unknown[:10])}{more}")
    return out


def conversions() -> dict[tuple[str, str], Conversion]:
    """Every known conversion, keyed by ``(library, source model name)``."""
    from . import timm, torchvision

    return {(c.library, c.source): c for c in (*timm.CONVERSIONS, *torchvision.CONVERSIONS)}


def get_conversion(library: str, source: str) -> Conversion:
    known = conversions()
    try:
        return known[(library, source)]
    except KeyError:
        names = sorted(s for lib, s in known if lib == library)
        if not names:
            libs = sorted({lib for lib, _ in known})
            raise ValueError(f"unknown source library {library!r}; expected one of {', '.join(libs)}") from None
        raise ValueError(f"no converter for {library} model {source!r}; known: {', '.join(names)}") from None


def convert_state(library: str, source: str, state: StateDict) -> StateDict:
    """Map ``library``'s ``source`` state dict onto its cspnet model's keys and layouts (the ``module.`` /
    ``_orig_mod.`` prefixes of DataParallel / DDP and ``torch.compile`` are dropped)."""
    state = strip_wrapper_prefix(state)
    return get_conversion(library, source).convert(state)


def convert_file(library: str, source: str, src: str | os.PathLike, out: str | os.PathLike, *,
                 in_chans: int | None = None) -> Path:
    """Convert the weights file ``src`` (.safetensors, or .pth read with weights_only=True) to ``out``.

    The result is loaded strictly into the cspnet model before it is written, so a file that is
    not ``source``'s weights fails here with the keys and shapes at fault. ``out`` carries the
    model name, config, class count, input channels and the source's preprocessing as metadata.

    The model takes the source's input channels unless ``in_chans`` asks for others: an RGB first
    convolution is then summed over its colour channels for ``in_chans=1`` (a grey one spread over
    three for ``in_chans=3``), as `cspnet.weights.load_pretrained` does with ``finetune=True``.
    A source without a classifier (timm's ``features_only`` or ``num_classes=0`` models) gives a
    backbone file (0 classes); one that stops before the last stage (``features_only`` with
    ``out_indices`` short of the last level) holds those stages only, for a ``features_only``
    model whose levels stop there too.
    """
    from ..registry import create_model

    conv = get_conversion(library, source)
    state = convert_state(library, source, load_state(src))
    fc = state.get("head.fc.weight")
    num_classes = fc.shape[0] if fc is not None else 0
    model = create_model(conv.model, num_classes=num_classes, in_chans=in_chans or 3)
    adapted = []
    change = input_conv_adaptation(model, state)
    if change is not None and in_chans is None:  # a grey source (timm's in_chans=1): a grey model, as it is
        model = create_model(conv.model, num_classes=num_classes, in_chans=state[change[0]].shape[1])
    elif change is not None:
        key, weight, how = change
        state[key] = weight
        adapted.append(f"{key}: {how}")
    levels = [f"{info.module}." for info in model.feature_info]
    last = max((i for i, level in enumerate(levels) if any(k.startswith(level) for k in state)), default=len(levels) - 1)
    absent = tuple(levels[last + 1:]) if fc is None else ()
    load_into(model, state, source=f"{src} (as {library} {source})", keep=absent)
    p = conv.preprocess
    # a one-channel model takes one mean and std: the colour channels' average (its first conv sums them)
    mean, std = ([sum(p.mean) / 3], [sum(p.std) / 3]) if model.in_chans == 1 else (list(p.mean), list(p.std))
    metadata = {
        **model_metadata(model),
        "source": f"{library}:{source}",
        "adapted": adapted,
        "last_level": last if absent else None,  # a file cut short loads into features_only up to this level
        "input_size": p.input_size,
        "crop_pct": p.crop_pct,
        "interpolation": p.interpolation,
        "mean": mean,
        "std": std,
    }
    return save_weights(out, {k: v for k, v in model.state_dict().items() if not k.startswith(absent)}, metadata)
