"""Small pieces the analyses share: finding a model's twin and loading training runs."""
from __future__ import annotations

from pathlib import Path

from ..registry import get_spec, list_models, specs


def find_twin(name: str) -> str | None:
    """The plain model of a CSP model (its spec's ``twin``), or the CSP model whose twin ``name`` is.

    When several CSP models share a plain twin, ``csp<name>`` is preferred, then the first by name.
    """
    spec = get_spec(name)
    if spec.twin:
        return spec.twin
    csp = sorted(n for n, s in specs().items() if s.twin == name)
    if not csp:
        return None
    return f"csp{name}" if f"csp{name}" in csp else csp[0]


def twin_pair(name: str, twin: str | None, input_size: int | None) -> tuple[list[str], int]:
    """``[name]`` or ``[name, twin]`` (``twin="auto"``: `find_twin`) and the input size to use."""
    spec = get_spec(name)
    if twin == "auto":
        twin = find_twin(name)
    elif twin is not None:
        get_spec(twin)
    names = [name] if twin is None else [name, twin]
    return names, input_size or spec.default_input


def is_run_dir(path: str) -> bool:
    """A directory written by ``cspnet train`` / ``cspnet ablation`` (it holds ``last.json``).

    A directory without a run is an error, unless its name is also a registered model's (then the model
    is meant): "unknown model" would name the wrong problem.
    """
    if (Path(path) / "last.json").is_file():
        return True
    if Path(path).is_dir() and path not in list_models():
        raise ValueError(f"{path}: a folder without a training run in it (no last.json)")
    return False


def read_run(path: str, checkpoint: str | None = None) -> tuple[str, dict]:
    """``(checkpoint name, run record)`` of a classification run directory: the model, data and recipe
    it was trained with. ``checkpoint=None``: ``best`` if the run has one, else ``last``."""
    from ..engine.checkpoint import read_run_record

    name, record = read_run_record(path, checkpoint, require=("model", "data"))
    return name, record["state"]["run"]


def load_subject(model: str, *, num_classes: int, in_chans: int, width: float = 1.0, options: dict | None = None,
                 checkpoint: str | None = None):
    """A model to analyse: a registered name (fresh weights, seeded) or a training run directory.

    Returns ``(label, model, run)`` where ``run`` is the run's record (model, data and recipe
    description) for a run directory and ``None`` for a registered name.
    """
    import torch

    from ..engine.classify import load_classifier
    from ..engine.models import build_model

    if is_run_dir(model):
        name, _ = read_run(model, checkpoint)
        net, run = load_classifier(model, name)
        return f"{Path(model).name} ({run['model']['name']}, {name})", net, run
    get_spec(model)
    torch.manual_seed(0)
    return model, build_model(model, num_classes=num_classes, in_chans=in_chans, width=width, options=options), None
