"""Model registry: name -> (typed config, builder, the paper's figures).

Each family file declares its variants in a ``MODELS`` tuple of `ModelSpec`; this module only
collects those tuples, so "go to definition" on a config leads straight to the family file.
"""
from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from torch import nn

from .net import OutputStrideError


@dataclass(frozen=True)
class PaperFigures:
    """Figures published for a model, with the precision they were printed at.

    ``params_m`` counts convolution weights only (no BN, no bias), as the official README does,
    unless ``params_kind == "all"`` (every parameter, as the ELASTIC paper counts);
    ``bflops`` is Darknet's BFLOPs, 2 x multiply-adds of the conv layers, at ``input_size``.
    """

    params_m: float | None
    bflops: float | None
    input_size: int
    source: str
    top1: float | None = None
    params_decimals: int = 2
    bflops_decimals: int = 2
    params_kind: Literal["conv", "all"] = "conv"


@dataclass(frozen=True)
class ModelSpec:
    name: str
    family: str
    cfg: Any
    build: Callable[..., nn.Module]
    paper: PaperFigures | None = None
    twin: str | None = None
    darknet_cfg: str | None = None
    default_input: int = 256
    description: str = ""


MODEL_KWARGS = ("num_classes", "in_chans", "drop_rate", "features_only", "out_indices", "output_stride", "frozen_stages",
                "norm_eval")


def _all_specs() -> dict[str, ModelSpec]:
    from .models import (
        darknet, densenet, elastic, mobilenet, peleenet, reference, resnet, timm_variants, torchvision_variants,
    )

    specs: dict[str, ModelSpec] = {}
    for family in (darknet.MODELS, resnet.MODELS, timm_variants.MODELS, torchvision_variants.MODELS,
                   densenet.MODELS, elastic.MODELS, mobilenet.MODELS,
                   peleenet.MODELS, reference.MODELS):
        for spec in family:
            if spec.name in specs:
                raise RuntimeError(f"model {spec.name!r} registered twice")
            specs[spec.name] = spec
    return specs


_SPECS: dict[str, ModelSpec] | None = None


def specs() -> dict[str, ModelSpec]:
    global _SPECS
    if _SPECS is None:
        _SPECS = _all_specs()
    return _SPECS


def list_models(pattern: str | list[str] | tuple[str, ...] = "*") -> list[str]:
    """Names of registered models matching a shell-style ``pattern`` (or any of several, as timm takes)."""
    patterns = [pattern] if isinstance(pattern, str) else pattern
    if not isinstance(patterns, (list, tuple)) or not all(isinstance(p, str) for p in patterns):
        raise ValueError(f"pattern must be a shell-style string or a list of them, got {pattern!r}")
    return sorted(n for n in specs() if any(fnmatch.fnmatch(n, p) for p in patterns))


def get_spec(name: str) -> ModelSpec:
    try:
        return specs()[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(specs()), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown model {name!r}{hint} (see cspnet.list_models())") from None


def _checked_override(model: str, field: str, default: Any, value: Any) -> Any:
    """``value`` for config field ``field``, of the default's type (a list becomes a tuple, an int a float).

    A value of the wrong type would otherwise fail deep inside a builder with a message naming neither.
    """
    if isinstance(default, tuple) and isinstance(value, list):
        value = tuple(value)
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    ok = isinstance(value, type(default)) and isinstance(value, bool) == isinstance(default, bool)
    if ok and isinstance(default, tuple) and default:
        item_type = type(default[0])
        ok = all(isinstance(v, item_type) and isinstance(v, bool) == isinstance(default[0], bool) for v in value)
    if not ok:
        raise ValueError(f"model {model!r}: option {field}={value!r} has the wrong type; "
                         f"expected a value like the default {default!r}")
    return value


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered model.

    Keyword arguments that name a field of the model's config (``act``, ``fusion``,
    ``part_ratio`` …) override it; ``num_classes``, ``in_chans``, ``drop_rate``,
    ``features_only``, ``out_indices``, ``output_stride``, ``frozen_stages`` and ``norm_eval`` go to the
    network. ``output_stride`` (8 or 16; 32 is the network as designed) dilates the last stages instead of
    downsampling (`cspnet.net.dilate_stages`); models whose stages downsample by pooling refuse it.
    ``pretrained`` is the path of a weights file (`cspnet.weights.load_pretrained`);
    ``darknet_weights`` the path of an official Darknet ``.weights`` file for the model's cfg, or of a
    ``darknet partial`` cut of one (``csdarknet53.conv.104``: the first layers, the rest keep their random
    initialisation, and a warning says how many of the model's convolutions were read).
    """
    pretrained = kwargs.pop("pretrained", None)
    darknet_weights = kwargs.pop("darknet_weights", None)
    spec = get_spec(name)
    if darknet_weights and not spec.darknet_cfg:
        raise ValueError(f"model {name!r} has no official Darknet cfg, so no .weights layout to read")
    fields = {f.name for f in dataclasses.fields(spec.cfg)}
    cfg_over = {k: _checked_override(name, k, getattr(spec.cfg, k), v) for k, v in kwargs.items() if k in fields}
    net_kwargs = {k: v for k, v in kwargs.items() if k in MODEL_KWARGS}
    unknown = sorted(set(kwargs) - set(cfg_over) - set(net_kwargs))
    if unknown:
        raise ValueError(
            f"unknown option(s) {unknown} for model {name!r}; config fields: {sorted(fields)}, "
            f"network options: {list(MODEL_KWARGS)}"
        )
    cfg = dataclasses.replace(spec.cfg, **cfg_over) if cfg_over else spec.cfg
    try:
        model = spec.build(cfg, **net_kwargs)
    except OutputStrideError as err:  # raised deep in a builder, which does not know the model's name
        raise OutputStrideError(f"model {name!r}: {err}") from None
    model.model_name = name
    model.model_cfg = cfg
    if pretrained:
        from .weights import load_pretrained

        load_pretrained(model, pretrained)
    if darknet_weights:
        from .darknet.mapping import load_darknet_weights
        from .darknet.weights import default_cutoff

        # a darknet partial cut (x.conv.N) holds the first layers only; the rest keep their initialisation
        partial = default_cutoff(darknet_weights) is not None
        header = load_darknet_weights(model, darknet_weights, partial=partial)
        if partial:
            _warn_unread_layers(model, darknet_weights, header)
    return model


def _warn_unread_layers(model: nn.Module, path: str | os.PathLike, header) -> None:
    """Warn when a partial Darknet file left some of the model's convolutions unread: the model would
    otherwise look loaded while those layers (often the classifier) hold random initial values."""
    from .darknet.mapping import layers_read

    read, total = layers_read(model, path, header)
    if read < total:
        warnings.warn(f"{path}: read {read} of the {total} convolutions of model {model.model_name!r} (a partial "
                      f"Darknet file); the other {total - read} keep their random initialisation", stacklevel=3)
