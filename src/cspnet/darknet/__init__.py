"""Darknet interoperability: build official ``.cfg`` files, read and write ``.weights``, map them onto native models.

>>> from cspnet.darknet import load_model
>>> model = load_model("csresnext50.cfg", "csresnext50.weights")  # doctest: +SKIP
"""
from __future__ import annotations

import os

from ..weights import load_into, load_state
from .build import DarknetNet, WeightRecord, YoloLayer, build_model
from .cfg import DarknetCfg, DarknetCfgError, parse_cfg, parse_cfg_text
from .convert import DarknetConversion, convert_weights, model_for_cfg
from .mapping import (
    check_records, copy_records, darknet_to_native, load_darknet_weights, native_records, native_to_darknet,
    save_darknet_weights,
)
from .weights import DarknetWeightsError, WeightsHeader, read_header, read_weights, write_weights


def load_model(
    cfg_path: str | os.PathLike,
    weights_path: str | os.PathLike | None = None,
    *,
    input_size: int | tuple[int, int] | None = None,
    cutoff: int | None = None,
) -> DarknetNet:
    """Build the network of a Darknet cfg and, if given, load a ``.weights`` file into it (eval mode).

    The forward pass takes an image batch and returns a classifier's logits, or the list of the
    ``[yolo]`` layers' raw maps for a detector. ``input_size`` (default: the cfg's ``[net]``
    size) is where shapes are checked and ``[yolo]`` strides are measured; ``cutoff`` reads only
    the first layers' weights (see `read_weights`). ``weights_path`` may also be a safetensors
    file of this network's state (``cspnet darknet convert --raw``).
    """
    model = build_model(cfg_path, input_size)
    if weights_path is not None and str(weights_path).endswith(".safetensors"):
        # written by `convert_weights` in the cfg-built layout (cspnet darknet convert --raw)
        load_into(model, load_state(weights_path), source=str(weights_path))
    elif weights_path is not None:
        model.weights_header = read_weights(model, weights_path, cutoff=cutoff)
    return model.eval()


__all__ = [
    "DarknetConversion", "check_records", "convert_weights", "copy_records", "model_for_cfg",
    "DarknetCfg", "DarknetCfgError", "DarknetNet", "DarknetWeightsError", "WeightRecord", "WeightsHeader",
    "YoloLayer", "build_model", "darknet_to_native", "load_darknet_weights", "load_model", "native_records",
    "native_to_darknet", "parse_cfg", "parse_cfg_text", "read_header", "read_weights", "save_darknet_weights",
    "write_weights",
]
