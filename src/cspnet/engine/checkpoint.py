"""Training checkpoints that lose nothing and never unpickle.

A checkpoint called ``name`` (``"last"``, ``"best"`` …) in ``out_dir`` is three files:

- ``{name}.safetensors``: the model weights, written by `cspnet.weights.save_weights`, with the
  model name, its config and the training position in the header metadata. This is the file a
  user loads for inference (``cspnet.weights.load_state``).
- ``{name}.state.safetensors``: every other tensor: optimizer and scheduler state, the EMA
  weights, the torch RNG state.
- ``{name}.json``: the commit record: epoch, step, metrics, config, Python / NumPy RNG states,
  the fp16 gradient scaler's state, and the non-tensor parts of the optimizer / scheduler state (tensors are replaced by
  ``{"__tensor__": key}`` references into the state file).

Why a crash never costs the last good checkpoint: the two tensor files are first written under
names carrying a fresh token (``{name}-{token}.safetensors``), each atomically (temp file + fsync
+ ``os.replace``). Only then is ``{name}.json`` replaced (atomically, last) -- that is the commit.
After the commit the token files are renamed to their plain names. A loader follows the JSON: it
takes the token files if they still exist, else the plain files, and checks that every file
carries the JSON's token. A process killed at any instant therefore leaves either the previous
checkpoint or the new one, complete, and never a mixture.
"""
from __future__ import annotations

import json
import os
import random
import re
import secrets
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..files import atomic_path
from ..net import StagedNet, deleted_stage_prefixes
from ..weights import WeightsError, load_into, model_metadata, read_metadata, save_weights

FORMAT = "cspnet-checkpoint/1"


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete, corrupt, or made for another model."""


# -- nested Python state <-> JSON + tensors -----------------------------------------------------
def flatten_state(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Turn nested state (dicts, lists, tuples, numbers, tensors) into JSON-able data.

    Tensors go into ``tensors`` under a key derived from ``prefix`` and are replaced by
    ``{"__tensor__": key}``; dicts with non-string keys (optimizer state is keyed by int) become
    ``{"__items__": [[key, value], ...]}`` and tuples ``{"__tuple__": [...]}``, so that
    `unflatten_state` gives back exactly the same structure.
    """
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj.detach().to("cpu").clone().contiguous()
        return {"__tensor__": prefix}
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: flatten_state(v, f"{prefix}.{k}", tensors) for k, v in obj.items()}
        items = []
        for i, (k, v) in enumerate(obj.items()):
            if not isinstance(k, (str, int, float, bool)) and k is not None:
                raise CheckpointError(f"cannot store a dict key of type {type(k).__name__} at {prefix}")
            items.append([k, flatten_state(v, f"{prefix}.{i}", tensors)])
        return {"__items__": items}
    if isinstance(obj, tuple):
        return {"__tuple__": [flatten_state(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [flatten_state(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise CheckpointError(f"cannot store a value of type {type(obj).__name__} at {prefix} (only tensors, numbers, strings, lists and dicts)")


def unflatten_state(obj: Any, tensors: dict[str, torch.Tensor], source: str = "checkpoint") -> Any:
    """Inverse of `flatten_state`."""
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"}:
            key = obj["__tensor__"]
            if key not in tensors:
                raise CheckpointError(f"{source}: tensor {key!r} is missing")
            return tensors[key]
        if set(obj) == {"__items__"}:
            return {k: unflatten_state(v, tensors, source) for k, v in obj["__items__"]}
        if set(obj) == {"__tuple__"}:
            return tuple(unflatten_state(v, tensors, source) for v in obj["__tuple__"])
        return {k: unflatten_state(v, tensors, source) for k, v in obj.items()}
    if isinstance(obj, list):
        return [unflatten_state(v, tensors, source) for v in obj]
    return obj


# -- RNG ------------------------------------------------------------------------------------------
def rng_state(tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Python, NumPy and torch (CPU, and CUDA if used) RNG states; torch's go into ``tensors``."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["rng.torch"] = torch.get_rng_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": {"__tensor__": "rng.torch"},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
        state["cuda"] = [{"__tensor__": f"rng.cuda.{i}"} for i in range(torch.cuda.device_count())]
    return state


def set_rng_state(state: dict[str, Any], tensors: dict[str, torch.Tensor], source: str) -> None:
    """Restore what `rng_state` saved."""
    try:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
        torch.set_rng_state(unflatten_state(state["torch"], tensors, source))
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([unflatten_state(s, tensors, source) for s in state["cuda"]])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{source}: corrupt RNG state ({e})") from None


# -- files ---------------------------------------------------------------------------------------
def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_json_atomic(path: Path, obj: Any) -> None:
    with atomic_path(path, durable=True) as tmp, open(tmp, "w") as f:
        json.dump(obj, f)
    _fsync_dir(path.parent)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The bare model inside a DistributedDataParallel (or similar ``.module``) wrapper."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def _files(out_dir: Path, name: str, token: str | None = None) -> tuple[Path, Path]:
    stem = f"{name}-{token}" if token else name
    return out_dir / f"{stem}.safetensors", out_dir / f"{stem}.state.safetensors"


def save_checkpoint(
    out_dir: str | os.PathLike,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    ema: Any = None,
    scaler: Any = None,
    state: dict[str, Any],
    name: str = "last",
) -> Path:
    """Write checkpoint ``name`` in ``out_dir`` (see the module docstring for the files).

    ``state`` is JSON-able training state (epoch, step, config, metrics …); it is returned by
    `load_checkpoint`. ``scheduler``, ``ema`` and ``scaler`` (fp16's ``torch.amp.GradScaler``) are
    anything with ``state_dict()`` / ``load_state_dict()`` (an EMA's state dict holds tensors, a
    scheduler's and a scaler's numbers).
    The RNG states of Python, NumPy and torch are saved too. Returns the JSON path.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = unwrap_model(model)
    token = secrets.token_hex(6)
    model_tmp, state_tmp = _files(out_dir, name, token)
    model_final, state_final = _files(out_dir, name)

    meta = {**model_metadata(model), "token": token, "epoch": state.get("epoch"), "step": state.get("step")}
    state_tensors: dict[str, torch.Tensor] = {}
    flat_state = flatten_state(state, "state", state_tensors)
    if state_tensors:
        raise CheckpointError(f"state must be JSON-able (numbers, strings, lists, dicts), found tensors at {sorted(state_tensors)[:3]}; "
                              "put tensors in the model, optimizer, scheduler or EMA")
    tensors: dict[str, torch.Tensor] = {}
    record = {
        "format": FORMAT,
        "token": token,
        "model": meta["model"],
        "num_classes": meta["num_classes"],
        "in_chans": meta["in_chans"],
        "state": flat_state,
        "rng": rng_state(tensors),
    }
    if optimizer is not None:
        record["optimizer"] = flatten_state(optimizer.state_dict(), "optimizer", tensors)
    if scheduler is not None:
        record["scheduler"] = flatten_state(scheduler.state_dict(), "scheduler", tensors)
    if ema is not None:
        record["ema"] = flatten_state(ema.state_dict(), "ema", tensors)
    if scaler is not None:
        record["scaler"] = flatten_state(scaler.state_dict(), "scaler", tensors)

    # 1. payloads under token names; 2. the JSON commit; 3. plain names.
    save_weights(model_tmp, model, meta)
    with atomic_path(state_tmp, durable=True) as tmp:
        save_file(tensors, str(tmp), metadata={"cspnet_token": token, "format": FORMAT})
    _fsync_dir(out_dir)
    json_path = out_dir / f"{name}.json"
    _write_json_atomic(json_path, record)
    os.replace(model_tmp, model_final)
    os.replace(state_tmp, state_final)
    _fsync_dir(out_dir)
    stale = re.compile(rf"{re.escape(name)}-[0-9a-f]{{12}}(\.state)?\.safetensors(\.tmp)?")
    for path in out_dir.iterdir():  # payloads of earlier writes killed before their commit
        if stale.fullmatch(path.name):
            path.unlink(missing_ok=True)
    return json_path


def run_beside_weights(path: str | os.PathLike, metadata: dict[str, Any]) -> dict[str, Any] | None:
    """The run record (``state.run``: model, data, statistics …) of a training run's checkpoint weights
    file (``RUN/last.safetensors`` beside ``RUN/last.json``), when the record's token is the file's
    (``metadata["token"]``); None for any other file."""
    path = Path(path)
    if "token" not in metadata or not path.with_suffix(".json").is_file():
        return None
    record = read_checkpoint_record(path.parent, path.stem)
    run = record["state"].get("run") if isinstance(record["state"], dict) else None
    return run if record["token"] == metadata["token"] and isinstance(run, dict) else None


def read_checkpoint_record(out_dir: str | os.PathLike, name: str = "last") -> dict[str, Any]:
    """The JSON commit record of a checkpoint, validated (no tensors loaded).

    Its ``state`` (the training state `save_checkpoint` was given, e.g. ``state.run.model``) is
    decoded as `load_checkpoint` returns it: tuples come back as tuples, not ``{"__tuple__": …}``.
    The other keys (optimizer, scheduler, EMA, RNG) stay in stored form: they refer to tensors of
    the state file.
    """
    path = Path(out_dir) / f"{name}.json"
    if Path(out_dir).is_file():
        raise CheckpointError(f"{out_dir}: a file, not a run directory (expected the folder holding {name}.json)")
    if not path.is_file():
        raise CheckpointError(f"{path}: no checkpoint here (expected {name}.json written by cspnet train)")
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt checkpoint record ({e})") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a {FORMAT} record (key 'format' is {record.get('format') if isinstance(record, dict) else None!r})")
    for key in ("token", "model", "state", "rng"):
        if key not in record:
            raise CheckpointError(f"{path}: key {key!r} is missing")
    record["state"] = unflatten_state(record["state"], {}, str(path))  # holds no tensors (save_checkpoint refuses them)
    return record


def read_run_record(out_dir: str | os.PathLike, name: str | None = None,
                    require: tuple[str, ...] = ()) -> tuple[str, dict[str, Any]]:
    """``(name, record)`` of a training run's checkpoint whose ``state.run`` (what the run was: model,
    data, recipe …) holds the keys ``require``. ``name=None`` takes ``best`` when the run has one, else
    ``last``; a name given is read as is (a missing one is an error, not a fallback)."""
    out_dir = Path(out_dir)
    if name is None:
        name = "best" if (out_dir / "best.json").is_file() else "last"
    record = read_checkpoint_record(out_dir, name)
    run = record["state"].get("run") if isinstance(record["state"], dict) else None
    missing = [k for k in require if not isinstance(run, dict) or k not in run]
    if missing:
        raise CheckpointError(f"{out_dir / (name + '.json')}: key 'state.run' lacks {', '.join(missing)}; "
                              "not a run of the kind asked for")
    return name, record


def check_run_dir(out_dir: str | os.PathLike, resume: bool) -> None:
    """Refuse to start a new run in a folder holding a run's checkpoints (its work would be overwritten),
    and a resume that has no ``last`` to continue from.

    The loop writes ``best`` before ``last``: a run cut in between in its first epoch leaves ``best``
    alone, of an epoch that never finished. Such a folder may be trained into again (the epoch is
    repeated); a ``best`` of a later epoch without ``last`` is another run's result and is kept.
    """
    out_dir = Path(out_dir)
    if (out_dir / "last.json").is_file():
        if not resume:
            raise CheckpointError(f"{out_dir}: holds the checkpoints of a training run; continue it with --resume "
                                  "or train into another --out")
        return
    if not (out_dir / "best.json").is_file():
        return  # a new run; a --resume finds nothing to resume and says so
    if read_checkpoint_record(out_dir, "best")["state"].get("epoch", 0) > 1:
        raise CheckpointError(f"{out_dir}: holds the best checkpoint of a training run but no last one to continue from; "
                              "train into another --out")
    if resume:
        raise CheckpointError(f"{out_dir}: holds only the best checkpoint of a first epoch cut before last was written: "
                              "nothing to resume; train again without --resume (the first epoch is repeated)")


def _committed_file(out_dir: Path, name: str, token: str, which: int) -> Path:
    """The committed tensor file ``which`` (0: model, 1: state): token name first, then plain name."""
    for path in (_files(out_dir, name, token)[which], _files(out_dir, name)[which]):
        if path.is_file():
            return path
    return _files(out_dir, name)[which]


def _check_token(path: Path, token: str, found: str | None) -> None:
    if found != token:
        raise CheckpointError(
            f"{path}: belongs to another write of this checkpoint (token {found!r}, the JSON record says {token!r}); "
            "were files copied in by hand?"
        )


def _without_deleted_stages(saved: dict[str, Any], optimizer: torch.optim.Optimizer, model: nn.Module) -> dict[str, Any]:
    """The optimizer state ``saved`` while ``model`` held the stages it has since deleted
    (`cspnet.net.StagedNet.keep_levels`; a detector run trained before detectors kept only the levels
    they tap), without those parameters' entries.

    Optimizers are built over ``named_parameters()`` in order, so in each group the deleted stages'
    parameters came right after their network's other parameters, and a group held as many more
    entries as it now lacks. Anything else that does not fit is left to ``load_state_dict`` to name.
    """
    nets = [name for name, m in model.named_modules() if isinstance(m, StagedNet) and m.deleted_stages]
    if len(nets) != 1 or len(saved["param_groups"]) != len(optimizer.param_groups):
        return saved
    prefix = f"{nets[0]}." if nets[0] else ""
    named = list(model.named_parameters())
    order = {id(p): i for i, (_, p) in enumerate(named)}
    end = max(i for i, (name, _) in enumerate(named) if name.startswith(prefix)) + 1  # after the network's parameters
    dropped, groups = set(), []
    for old, new in zip(saved["param_groups"], optimizer.param_groups):
        ids, surplus = list(old["params"]), len(old["params"]) - len(new["params"])
        if surplus > 0:
            at = sum(order[id(p)] < end for p in new["params"])
            dropped.update(ids[at:at + surplus])
            ids = ids[:at] + ids[at + surplus:]
        groups.append({**old, "params": ids})
    return {**saved, "state": {k: v for k, v in saved["state"].items() if k not in dropped}, "param_groups": groups}


def load_checkpoint(
    out_dir: str | os.PathLike,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    ema: Any = None,
    scaler: Any = None,
    name: str = "last",
    restore_rng: bool = True,
) -> dict[str, Any]:
    """Load checkpoint ``name`` from ``out_dir`` into the given objects; return its ``state``.

    Raises `CheckpointError` naming the file and key at fault: a checkpoint of another model,
    a head with another number of classes, missing / mis-shaped tensors, an optimizer with other
    parameter groups, a file from another write. Nothing is unpickled. ``restore_rng`` restores
    the Python, NumPy and torch RNG states as they were when the checkpoint was written.
    """
    out_dir = Path(out_dir)
    model = unwrap_model(model)
    record = read_checkpoint_record(out_dir, name)
    token = record["token"]
    json_path = out_dir / f"{name}.json"

    weights_path = _committed_file(out_dir, name, token, 0)
    try:
        meta = read_metadata(weights_path)
    except WeightsError as e:
        raise CheckpointError(str(e)) from None
    _check_token(weights_path, token, meta.get("token"))
    want = getattr(model, "model_name", None)
    if want is not None and meta.get("model") != want:
        raise CheckpointError(f"{weights_path}: checkpoint of model {meta.get('model')!r} (key 'model'), cannot load into {want!r}")
    own_classes = getattr(model, "num_classes", None)
    classes_differ = own_classes is not None and meta.get("num_classes") not in (None, own_classes)
    try:
        weights = load_file(str(weights_path))
        deleted = deleted_stage_prefixes(model)
        # written while the model held stages it has since deleted (load_into skips their weights)
        held_deleted_stages = any(k.startswith(deleted) for k in weights)
        load_into(model, weights, source=str(weights_path))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{weights_path}: not a readable safetensors file ({e})") from None
    except WeightsError as e:
        if classes_differ:
            raise CheckpointError(f"{weights_path}: checkpoint has num_classes={meta['num_classes']} (key 'num_classes'), "
                                  f"the model was built with num_classes={own_classes}: {e}") from None
        raise CheckpointError(str(e)) from None

    need_state = restore_rng or any(x is not None for x in (optimizer, scheduler, ema, scaler))
    if need_state:
        state_path = _committed_file(out_dir, name, token, 1)
        try:
            from safetensors import safe_open

            with safe_open(str(state_path), framework="pt") as f:
                found = (f.metadata() or {}).get("cspnet_token")
            tensors = load_file(str(state_path))
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{state_path}: not a readable safetensors file ({e})") from None
        _check_token(state_path, token, found)
        for key, obj in (("optimizer", optimizer), ("scheduler", scheduler), ("ema", ema), ("scaler", scaler)):
            if obj is None:
                continue
            if key not in record:
                raise CheckpointError(f"{json_path}: key {key!r} is missing (the run was saved without one)")
            try:
                saved = unflatten_state(record[key], tensors, str(state_path))
                if key == "optimizer" and held_deleted_stages:
                    saved = _without_deleted_stages(saved, optimizer, model)
                obj.load_state_dict(saved)
            except CheckpointError:
                raise
            except (ValueError, KeyError, RuntimeError, TypeError) as e:
                raise CheckpointError(f"{json_path}: key {key!r} does not fit ({e})") from None
        if restore_rng:
            set_rng_state(record["rng"], tensors, str(json_path))
    return record["state"]
