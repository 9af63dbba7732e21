"""Darknet ``.cfg`` + ``.weights`` -> cspnet safetensors, as the native model or as the cfg-built network."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..weights import model_metadata, save_weights
from .build import DarknetNet, build_model
from .mapping import check_records, copy_records, native_records
from .weights import DarknetWeightsError, WeightsHeader, default_cutoff, read_weights

CHECK_SIZE = 64  # input side of the equivalence check after a native conversion
UNREAD_FILL_SEED = 0  # torch seed of the initial values that the layers a partial file lacks are written with


@dataclass(frozen=True)
class DarknetConversion:
    path: Path
    header: WeightsHeader
    records: int  # the weighted layers read from the file
    records_total: int  # the network's weighted layers; more than ``records`` for a partial file
    model: str | None  # the registered model written, or None for the cfg-built layout
    model_kwargs: dict[str, int] = dataclasses.field(default_factory=dict)  # create_model's, for the cfg's head and input


def model_for_cfg(cfg_path: str | os.PathLike) -> str | None:
    """The registered model whose official cfg has this file name (``csresnext50.cfg`` -> cspresnext50)."""
    from ..registry import get_spec, list_models

    name = os.path.basename(cfg_path)
    matches = [m for m in list_models() if get_spec(m).darknet_cfg == name]
    return matches[0] if len(matches) == 1 else None


def _check_same_function(darknet: DarknetNet, native: torch.nn.Module, model: str) -> None:
    # Equal shapes do not make equal networks (an activation or a pooling may differ, as between
    # csdarknet53.cfg and csdarknet53-omega.cfg): compare outputs on a random image.
    darknet.eval()
    native.eval()
    x = torch.randn(1, darknet.in_chans, CHECK_SIZE, CHECK_SIZE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = darknet(x), native(x)
    if a.shape != b.shape or (a - b).abs().max() > 1e-3 * max(1.0, a.abs().max().item()):
        raise DarknetWeightsError(
            f"{os.path.basename(darknet.cfg_path)} and model {model!r} have the same weight shapes but compute "
            "different outputs (another activation or layer order?); convert with --raw")


def convert_weights(
    cfg_path: str | os.PathLike,
    weights_path: str | os.PathLike,
    out_path: str | os.PathLike,
    *,
    model: str | None = None,
    raw: bool = False,
    cutoff: int | None = None,
) -> DarknetConversion:
    """Read ``weights_path`` for ``cfg_path`` and write ``out_path`` (safetensors, atomically).

    Unless ``raw``, the weights go into the registered ``model`` (default: the one whose
    ``darknet_cfg`` is this cfg's file name), built with the cfg's class count and input channels
    (a fine-tuned cfg's), after checking that the cfg-built network and the native model compute
    the same function; otherwise the cfg-built network's state is written.
    With ``cutoff`` (or a ``.conv.N`` file) the layers after it keep their initial values, drawn with torch seed
    `UNREAD_FILL_SEED` (the caller's random stream is left as it was), so that converting the same file twice
    writes the same file; the metadata's ``darknet_records_read`` / ``darknet_records_total`` say how many
    weighted layers hold the file's weights.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(UNREAD_FILL_SEED)
        return _convert(cfg_path, weights_path, out_path, model, raw, cutoff)


def _convert(cfg_path: str | os.PathLike, weights_path: str | os.PathLike, out_path: str | os.PathLike,
             model: str | None, raw: bool, cutoff: int | None) -> DarknetConversion:
    from ..registry import create_model

    darknet = build_model(cfg_path)
    if cutoff is None:
        cutoff = default_cutoff(weights_path)
    header = read_weights(darknet, weights_path, cutoff=cutoff)
    records, records_total = len(darknet.weight_records(cutoff)), len(darknet.weight_records())
    source = {
        "source": "darknet",
        "darknet_cfg": os.path.basename(cfg_path),
        "darknet_weights": os.path.basename(weights_path),
        "darknet_header": dataclasses.asdict(header),
        "darknet_layers_read": cutoff if cutoff is not None else len(darknet.layers),
        "darknet_records_read": records,
        "darknet_records_total": records_total,
        "input_size": list(darknet.net_size),
        # Darknet feeds its networks RGB scaled to [0, 1], nothing subtracted or divided
        "mean": [0.0] * darknet.in_chans,
        "std": [1.0] * darknet.in_chans,
    }
    name = None if raw else (model or model_for_cfg(cfg_path))
    if name is None:
        # Shared convs appear under several names; safetensors stores each tensor once per name.
        state = {k: v.clone() for k, v in darknet.state_dict().items()}
        path = save_weights(out_path, state, {**source, "layout": "darknet"})
        return DarknetConversion(path, header, records, records_total, None)
    # a fine-tuned cfg has its own class count (the last conv's filters) and maybe another input depth
    kwargs = {"num_classes": darknet.layers[-1].out_shape[0], "in_chans": darknet.in_chans}
    native = create_model(name, **kwargs)
    try:
        check_records(darknet.weight_records(), native_records(native))
    except DarknetWeightsError as e:
        raise DarknetWeightsError(f"{os.path.basename(cfg_path)} does not map onto model {name!r} ({e}); convert "
                                  "with --raw to keep the cfg-built network's layout") from None
    copy_records(darknet.weight_records(), native_records(native))
    _check_same_function(darknet, native, name)
    path = save_weights(out_path, native, {**model_metadata(native), **source, "layout": "native"})
    return DarknetConversion(path, header, records, records_total, name, kwargs)
