"""Weights on disk: safetensors with a small JSON metadata block, and strict loading with clear errors.

Nothing here unpickles: safetensors files hold only tensors and string metadata, and ``.pth``
files are read with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError as SafetensorsError  # the class is SafetensorError in safetensors 0.8
from safetensors.torch import load_file, save_file
from torch import nn

from .files import atomic_path
from .net import deleted_stage_prefixes

METADATA_KEY = "cspnet"
_PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".tar")  # torch.save files, read with weights_only=True
# torch.save writes a zip archive, or in its legacy format a pickle of its magic number first (torch/
# serialization.py's MAGIC_NUMBER, a 10-byte LONG1) after the pickle's PROTO opcode and, from protocol 4,
# a FRAME opcode with its 8-byte length. A safetensors file opens with its header's length, which never
# looks like either.
_ZIP_MAGIC = b"PK\x03\x04"
_PROTO, _FRAME = b"\x80", b"\x95"  # pickle opcodes: PROTO takes 1 byte, FRAME 8
_LEGACY_MAGIC = b"\x8a\x0a" + 0x1950A86A20F9469CFC6C.to_bytes(10, "little")


class WeightsError(ValueError):
    """A weights file that cannot be loaded into the model it was meant for."""


def model_metadata(model: nn.Module) -> dict[str, Any]:
    """Name, config and head size of a registered model, for file headers."""
    cfg = getattr(model, "model_cfg", None)
    return {
        "model": getattr(model, "model_name", type(model).__name__),
        "config": dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else None,
        "num_classes": getattr(model, "num_classes", None),
        "in_chans": getattr(model, "in_chans", None),
    }


def encode_metadata(metadata: dict[str, Any]) -> str:
    """``metadata`` as the JSON text every cspnet file keeps it in (safetensors, ONNX and TorchScript exports)."""
    return json.dumps(metadata, sort_keys=True, default=str)


def save_weights(path: str | os.PathLike, model_or_state: nn.Module | dict[str, torch.Tensor], metadata: dict[str, Any] | None = None) -> Path:
    """Write tensors to ``path`` as safetensors, atomically (temp file + rename).

    ``metadata`` (model name, config, input size, normalisation …) is stored as JSON under
    the ``cspnet`` key of the safetensors header.
    """
    path = Path(path)
    if path.suffix in _PICKLE_SUFFIXES:  # a torch.save name on a safetensors file: no reader would take it
        raise WeightsError(f"{path}: save_weights writes safetensors; name the file .safetensors")
    state = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    meta = {METADATA_KEY: encode_metadata(metadata or {})}
    with atomic_path(path, durable=True) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return path


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON metadata block of a cspnet safetensors file (empty for foreign files)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorsError, OSError) as e:
        raise WeightsError(f"{path}: not a readable safetensors file ({e})") from None
    raw = meta.get(METADATA_KEY)
    if raw is None:
        return {}
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:
        raise WeightsError(f"{path}: corrupt cspnet metadata ({e})") from None


def _first_bytes(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(2 + 9 + len(_LEGACY_MAGIC))  # PROTO n, FRAME length, the legacy magic number


def _written_by_torch_save(head: bytes) -> bool:
    if head.startswith(_ZIP_MAGIC):
        return True
    if not head.startswith(_PROTO) or head[1:2] not in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return False
    body = head[2 + 9:] if head[2:3] == _FRAME else head[2:]
    return body.startswith(_LEGACY_MAGIC)


def is_torch_save_file(path: Path) -> bool:
    """Whether ``path`` was written by ``torch.save`` (by its first bytes, whatever its name)."""
    return _written_by_torch_save(_first_bytes(path))


_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DataParallel / DDP, torch.compile


def strip_wrapper_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The keys without the prefixes of a model saved inside wrappers: ``module.`` (DataParallel / DDP) and
    ``_orig_mod.`` (``torch.compile``), however nested."""
    def bare(key: str) -> str:
        while key.startswith(_WRAPPER_PREFIXES):
            key = key.split(".", 1)[1]
        return key

    return {bare(k): v for k, v in state.items()}


def check_weights_file(path: Path, folder_hint: str, darknet_hint: str) -> None:
    """Refuse, naming ``path``, what is not a file of weights cspnet reads: a folder, a missing file, a Darknet
    ``.weights`` file (which needs its cfg); the hints say what to do instead."""
    if path.is_dir():
        raise WeightsError(f"{path}: a folder, not a weights file ({folder_hint})")
    if not path.is_file():
        raise WeightsError(f"{path}: no such weights file")
    from .darknet.weights import is_darknet_weights  # here: cspnet.darknet imports this module

    if is_darknet_weights(path):
        raise WeightsError(f"{path}: a Darknet weights file; {darknet_hint}")


def load_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state dict from a safetensors file or (never unpickling) from a ``torch.save`` file
    (``.pth``, ``.pt``, ``.bin``, ``.ckpt``, ``.pth.tar``; a ``state_dict`` / ``model`` entry is taken);
    the prefixes of DataParallel / DDP (``module.``) and ``torch.compile`` (``_orig_mod.``) are dropped."""
    path = Path(path)
    check_weights_file(path, f"a training run's weights are {path / 'last.safetensors'}",
                       "read it with create_model(name, darknet_weights=...) or convert it first: cspnet darknet "
                       "convert CFG WEIGHTS OUT.safetensors")
    head = _first_bytes(path)
    torch_save = _written_by_torch_save(head)
    if path.suffix in _PICKLE_SUFFIXES and not torch_save:
        raise WeightsError(f"{path}: not a file written by torch.save (it begins with {head[:4]!r})")
    if torch_save:
        resave = "where the file is trusted, save it again: torch.save(torch.load(path, weights_only=False), new_path)"
        if head.startswith(_PROTO) and head[1] > 3:  # the legacy format's pickle protocol, in its 2nd byte
            raise WeightsError(f"{path}: written by torch.save with pickle protocol {head[1]}, which torch.load("
                               f"weights_only=True) cannot read (it takes protocols 2 and 3); {resave}")
        try:
            # timm's training checkpoints (CheckpointSaver) keep the run's options as an argparse.Namespace,
            # a bag of attributes rebuilt without running code: allowed beside tensors and plain containers.
            with torch.serialization.safe_globals([argparse.Namespace]), warnings.catch_warnings():
                # torch warns about a protocol its reader may not know; the error below says it plainly
                warnings.filterwarnings("ignore", message="Detected pickle protocol")
                obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # weights_only refuses anything but tensors and plain containers
            if "Unsupported operand" in str(e):  # a pickle opcode of protocol 4 / 5 (FRAME …) in a zip file
                raise WeightsError(f"{path}: written by torch.save with pickle protocol 4 or 5, which torch.load("
                                   f"weights_only=True) cannot read (it takes protocols 2 and 3); {resave}") from None
            raise WeightsError(f"{path}: cannot be read safely with weights_only=True ({e})") from None
        for key in ("state_dict", "model", "model_state"):
            if isinstance(obj, dict) and isinstance(obj.get(key), dict):
                obj = obj[key]
        if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise WeightsError(f"{path}: does not hold a flat state dict of tensors")
        return strip_wrapper_prefix(obj)
    try:
        return strip_wrapper_prefix(load_file(str(path)))
    except (SafetensorsError, OSError) as e:
        raise WeightsError(f"{path}: not a readable safetensors file ({e})") from None


def load_into(model: nn.Module, state: dict[str, torch.Tensor], *, strict: bool = True, source: str = "weights",
              keep: tuple[str, ...] = ()) -> None:
    """Copy ``state`` into ``model``, naming every missing, unexpected and mis-shaped key.

    The model's tensors whose names start with a prefix in ``keep`` need not be in ``state``: they
    keep their values. The tensors of stages the model deleted (a ``features_only`` model's stages
    after its last level, `cspnet.net.StagedNet.keep_levels`) are skipped: nothing runs them.
    """
    deleted = deleted_stage_prefixes(model)
    state = {k: v for k, v in state.items() if not k.startswith(deleted)}
    own = model.state_dict()
    # Files saved before BatchNorm counted its batches (torchvision's published DenseNet and ResNet
    # weights) lack `num_batches_tracked`; torch's BatchNorm loads them keeping its own count, as here.
    uncounted = {k: own[k] for k in set(own) - set(state) if k.rsplit(".", 1)[-1] == "num_batches_tracked"}
    state = {**state, **uncounted}
    missing = sorted(k for k in set(own) - set(state) if not (keep and k.startswith(keep)))
    unexpected = sorted(set(state) - set(own))
    mis_shaped = sorted(
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in set(own) & set(state)
        if own[k].shape != state[k].shape
    )
    problems = []
    if mis_shaped:
        problems.append("mis-shaped: " + "; ".join(mis_shaped[:10]) + (" …" if len(mis_shaped) > 10 else ""))
    if strict and missing:
        problems.append("missing: " + ", ".join(missing[:10]) + (f" … ({len(missing)} in all)" if len(missing) > 10 else ""))
    if strict and unexpected:
        problems.append("unexpected: " + ", ".join(unexpected[:10]) + (f" … ({len(unexpected)} in all)" if len(unexpected) > 10 else ""))
    if problems:
        name = getattr(model, "model_name", type(model).__name__)
        raise WeightsError(f"{source} do not fit model {name!r}: " + " | ".join(problems))
    model.load_state_dict(state, strict=strict and not keep)


def _config_differences(saved: dict[str, Any], cfg: Any) -> list[str]:
    import dataclasses

    # Compare as JSON, the form the metadata was written in (tuples become lists).
    built = json.loads(json.dumps(dataclasses.asdict(cfg), default=str))
    return [
        f"{k}: file {saved.get(k)!r} vs model {built.get(k)!r}"
        for k in sorted(set(saved) | set(built))
        if saved.get(k) != built.get(k)
    ]


def load_pretrained(model: nn.Module, path: str | os.PathLike, *, finetune: bool = False) -> list[str]:
    """Load a weights file into a registered model, checking that it was made for it.

    The file's metadata (when it has any) must name this model and, if it records a config,
    the same config; then every tensor must fit (`load_into`, strict). A model without a classifier
    (``features_only``, or ``num_classes=0`` for pooled features) ignores the file's (``head.*``), as
    detection frameworks and timm expect; a ``features_only`` backbone holds no stages after the last
    level it returns, and skips the file's (`load_into`).

    ``finetune=True`` starts a model for other data from the file: a classifier made for another
    number of classes (or a file without one) leaves the model's own, freshly initialised
    classifier, and a first convolution made for RGB is summed over its colour channels for a
    one-channel model (or spread over three channels, divided by 3, for an RGB model from a grey
    file): a grey image then gives what the file's model gave for it as three equal channels.
    Everything else must fit; without ``finetune`` such a first convolution is refused, the error
    saying how to ask for it.
    Returns what was adapted, one line each (empty when the file was loaded as it is).
    """
    if not isinstance(path, (str, os.PathLike)):
        raise WeightsError(f"pretrained must be the path of a weights file (nothing is downloaded), got {path!r}")
    path = Path(path)
    state = load_state(path)
    meta = {} if is_torch_save_file(path) else read_metadata(path)
    name = getattr(model, "model_name", None)
    if name is not None and meta.get("model") not in (None, name):
        raise WeightsError(f"{path}: holds weights of model {meta['model']!r} (metadata 'model'), not {name!r}")
    cfg = getattr(model, "model_cfg", None)
    if isinstance(meta.get("config"), dict) and cfg is not None:
        diffs = _config_differences(meta["config"], cfg)
        if diffs:
            raise WeightsError(f"{path}: made for another configuration of {name!r}: " + "; ".join(diffs)
                               + "; cspnet.weights.load_model(path) rebuilds the model the file records")
    if getattr(model, "num_classes", None) == 0:  # no classifier (features_only, or pooled features)
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
    adapted, keep = _adapt_for_finetuning(model, state) if finetune else ([], ())
    try:
        load_into(model, state, strict=True, source=str(path), keep=keep)
    except WeightsError as e:
        change = None if finetune else input_conv_adaptation(model, state)
        if change is None:
            raise
        key, weight, how = change
        raise WeightsError(f"{e}; to load {key} {how}, ask for it: load_pretrained(model, path, finetune=True) "
                           f"(what cspnet train --pretrained does), or convert timm / torchvision weights with "
                           f"cspnet convert --in-chans {weight.shape[1]}") from None
    return adapted


def _config_from_json(template: Any, saved: Any) -> Any:
    """``saved``, a config as its metadata holds it (JSON), rebuilt in the types of ``template``, the registered
    config: nested configs as their dataclasses, lists as tuples. A key the template lacks raises KeyError."""
    if dataclasses.is_dataclass(template) and isinstance(saved, dict):
        names = {f.name for f in dataclasses.fields(template)}
        unknown = sorted(set(saved) - names)
        if unknown:
            raise KeyError(", ".join(unknown))
        return dataclasses.replace(template, **{k: _config_from_json(getattr(template, k), v) for k, v in saved.items()})
    if isinstance(saved, list):  # a tuple of configs (stages) or of values: each like the template's first
        like = template[0] if isinstance(template, tuple) and template else None
        return tuple(_config_from_json(like, v) for v in saved)
    return saved


def load_model(path: str | os.PathLike) -> nn.Module:
    """The model a cspnet safetensors file was saved from, rebuilt from its metadata, with its weights (eval mode).

    The file records the model's name, full config, class count and input channels (`model_metadata`), so this
    rebuilds what ``create_model(name, pretrained=path)`` cannot, as that builds the registered config: a model
    whose config was changed (a ``cspnet train --width`` run's scaled channels, options such as ``act``), and a
    detector (its anchors, strides and widths). A file without that record (a torch.save file, timm's) is
    refused: build its model and use ``create_model(name, pretrained=path)``.
    """
    from .registry import create_model, get_spec

    path = Path(path)
    meta = read_metadata(path) if path.is_file() and not is_torch_save_file(path) else {}
    config = meta.get("config")
    if not isinstance(config, dict) or not isinstance(meta.get("model"), str):
        load_state(path)  # a missing or unreadable file is named as such
        raise WeightsError(f"{path}: records no cspnet model and config (metadata 'model', 'config'); build the "
                           "model it was made for and load it with create_model(name, pretrained=path)")
    if "neck" in config:  # a detector's DetectorCfg
        from .detection.detector import Detector, DetectorCfg

        model = Detector(DetectorCfg.from_dict(config))
        load_into(model, load_state(path), source=str(path))
        return model.eval()
    spec = get_spec(meta["model"])
    try:
        cfg = _config_from_json(spec.cfg, config)
    except KeyError as e:
        raise WeightsError(f"{path}: its config has key(s) {e} that model {meta['model']!r} does not know") from None
    changed = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if getattr(cfg, f.name) != getattr(spec.cfg, f.name)}
    model = create_model(meta["model"], num_classes=meta["num_classes"], in_chans=meta["in_chans"], **changed)
    load_pretrained(model, path)
    return model.eval()


def _adapt_for_finetuning(model: nn.Module, state: dict[str, torch.Tensor]) -> tuple[list[str], tuple[str, ...]]:
    """Drop a classifier of another class count from ``state`` and fit the first convolution's input
    channels (RGB <-> grey), in place; return one line per change and the prefixes left unloaded."""
    own = model.state_dict()
    adapted, keep = [], ()
    head = [k for k in own if k.startswith("head.")]
    if any(k not in state or state[k].shape != own[k].shape for k in head):
        why = (f"the file's classifier has {state[head[0]].shape[0]} classes, the model's {own[head[0]].shape[0]}"
               if head[0] in state else "the file has no classifier")
        for k in [k for k in state if k.startswith("head.")]:
            del state[k]
        adapted.append(f"head: not loaded ({why}); it starts from its initialisation")
        keep = ("head.",)
    change = input_conv_adaptation(model, state)
    if change is not None:
        key, weight, how = change
        adapted.append(f"{key}: {state[key].shape[1]} input channel(s) in the file, {weight.shape[1]} in the model; {how}")
        state[key] = weight
    return adapted, keep


def input_conv_adaptation(model: nn.Module, state: dict[str, torch.Tensor]) -> tuple[str, torch.Tensor, str] | None:
    """The model's first convolution weight in ``state`` fitted to the model's input channels, when it
    was made for RGB and the model takes one channel or the other way round: ``(key, weight, how)``.

    An RGB weight is summed over its colour channels; a one-channel weight is spread over three
    channels, divided by 3. Either way a grey image gives what the file's model gave for it as three
    equal channels (timm's ``adapt_input_conv`` does the same). None when the weight fits as it is,
    or differs in another way.
    """
    first = next((n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)), None)
    key = f"{first}.weight"
    if first is None or key not in state:
        return None
    w, want = state[key], model.state_dict()[key].shape
    if w.shape[0] != want[0] or w.shape[2:] != want[2:] or (w.shape[1], want[1]) not in ((3, 1), (1, 3)):
        return None
    if want[1] == 1:
        return key, w.sum(1, keepdim=True), "summed over the colour channels"
    return key, w.expand(-1, 3, -1, -1) / 3, "spread over three channels (divided by 3)"
