"""Gradient duplication inside a stage (paper §3.1 / reference §4.1), measured on a batch of real images.

The paper's argument, in its notation: a dense layer computes ``x_k = w_k * [x0, x1, ..., x_{k-1}]``, so its
update ``w'_k = f(w_k, g0, g1, ..., g_{k-1})`` is driven by the gradients of every map it reads, and the
same ``g0`` (the gradient of the block input) is reused by the update of every layer. CSPNet reads only
``x0''`` in the dense block and lets ``x0'`` bypass it, so that "neither side contains duplicated gradient
information of the other". Two measures make that checkable; both are cosines, so they are 1 for two
identical gradient signals and near 0 for unrelated ones (docs/analysis.md states them in full):

**Path duplication** ``D``. Let ``X`` be the input of a stage's block (``x0`` for a plain stage, ``x0''``
for a CSP stage). Every *path* ``p`` that reads ``X`` -- each dense layer, and the (partial) transition
that reads the block's concatenated output -- sends back its own share of the gradient ``g_p``, and
``∂L/∂X = Σ_p g_p``. ``D[p, q] = cos(g_p, g_q)`` over the whole batch. The *split* cosine of a CSP stage
is the same quantity for its two paths out of the base map, part 1 (cross) and part 2 (main).

**Update overlap** ``O``. With ``G`` the total gradient of the block's concatenated maps ``[x0, x1, ..., xk]``
and ``u_p`` = ``G`` restricted to the channels path ``p`` reads (zero elsewhere) -- the arguments of ``f``
in the paper's update equation -- ``O[p, q] = cos(u_p, u_q)``: the share of gradient information the two
updates have in common.

How ``g_p`` is measured: one training-mode forward pass with hooks. Every module of the stage's blocks
or transitions whose input begins (channel-wise) with ``X`` reads ``X``; in front of each such read by a
leaf module the hook inserts an identity node (a *tap*), so ``∂L/∂tap`` is the gradient sent back through
that read alone. A path is the outermost reading module (a dense layer, the transition) and ``g_p`` sums
its leaves' taps. Modules that hand their input on unchanged (identity, dropout, in-place activations)
are not tapped, so nothing is counted twice; that the taps add up to ``∂L/∂X`` is checked on every stage.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..layers import Shortcut
from ..stage import CrossStage
from ..files import atomic_savefig, atomic_write_text


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine similarity of two tensors of the same shape, flattened, in float64.

    Exactly 1.0 for two identical non-zero tensors (``sqrt(x * x) == x`` in IEEE arithmetic);
    NaN when either is all zeros (a path that received no gradient has no direction).
    """
    if a.shape != b.shape:
        raise ValueError(f"cosine of tensors of different shapes {tuple(a.shape)} and {tuple(b.shape)}")
    a, b = a.detach().double().flatten(), b.detach().double().flatten()
    na, nb = float(a @ a), float(b @ b)
    if na == 0.0 or nb == 0.0:
        return math.nan
    return max(-1.0, min(1.0, float(a @ b) / math.sqrt(na * nb)))


def cosine_matrix(vectors: list[torch.Tensor]) -> np.ndarray:
    """Pairwise `cosine` of a list of same-shaped tensors."""
    n = len(vectors)
    out = np.eye(n)
    for i in range(n):
        for j in range(i + 1, n):
            out[i, j] = out[j, i] = cosine(vectors[i], vectors[j])
    for i in range(n):
        if not vectors[i].detach().abs().sum():
            out[i, :] = out[:, i] = math.nan
    return out


def mean_off_diagonal(m: np.ndarray | None) -> float:
    """Mean of the off-diagonal entries (NaN entries ignored); NaN for fewer than two paths."""
    if m is None or len(m) < 2:
        return math.nan
    vals = m[~np.eye(len(m), dtype=bool)]
    vals = vals[~np.isnan(vals)]
    return float(vals.mean()) if len(vals) else math.nan


@dataclass
class StageGradients:
    """The two measures for one stage (see the module docstring)."""

    stage: str
    shared_chs: int  # channels of X, the block input every path reads
    paths: list[str]  # path names relative to the stage, in execution order
    path_norms: list[float]  # ||g_p||
    path_cos: np.ndarray  # D
    read_chs: list[int]  # channels of [x0, x1, ...] each path reads
    overlap: np.ndarray | None  # O; None when the paths do not read prefixes of one concat (not a dense block)
    split: str | None = None  # "conv" | "slice" for a CSP stage, None for a plain one
    split_cos: float | None = None  # cos(g_cross, g_main) on the base map
    split_norms: tuple[float, float] | None = None
    residual: float = math.nan  # ||Σ_p g_p - ∂L/∂X|| / ||∂L/∂X||: float32 rounding (~1e-7) when every reader of X was found

    @property
    def mean_path_cos(self) -> float:
        return mean_off_diagonal(self.path_cos)

    @property
    def max_path_cos(self) -> float:
        if len(self.paths) < 2:
            return math.nan
        vals = self.path_cos[~np.eye(len(self.paths), dtype=bool)]
        return float(np.nanmax(vals)) if not np.isnan(vals).all() else math.nan

    @property
    def mean_overlap(self) -> float:
        return mean_off_diagonal(self.overlap)

    def as_dict(self) -> dict:
        def arr(m):
            return None if m is None else [[None if math.isnan(v) else float(v) for v in row] for row in m]

        def num(v):
            return None if v is None or (isinstance(v, float) and math.isnan(v)) else v

        return {
            "stage": self.stage, "shared_chs": self.shared_chs, "paths": self.paths, "path_norms": self.path_norms,
            "read_chs": self.read_chs, "mean_path_cos": num(self.mean_path_cos), "max_path_cos": num(self.max_path_cos),
            "mean_overlap": num(self.mean_overlap), "split": self.split, "split_cos": num(self.split_cos),
            "split_norms": list(self.split_norms) if self.split_norms else None, "residual": num(self.residual),
            "path_cos": arr(self.path_cos), "overlap": arr(self.overlap),
        }


@dataclass
class GradientReport:
    model: str
    loss: float
    batch: int
    stages: list[StageGradients] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"model": self.model, "loss": self.loss, "batch": self.batch, "stages": [s.as_dict() for s in self.stages]}


# -- recording the paths ----------------------------------------------------------------------------
_PASS_THROUGH = (nn.Identity, nn.Dropout, nn.Dropout2d)


@dataclass
class _Read:
    """One input of one module call that carries the shared map: ``tap`` is an identity node inserted in
    front of that input, so ``∂L/∂tap`` is the gradient sent back through this read alone."""

    name: str
    tap: torch.Tensor | None  # None for a container: only used to group its leaves
    leaf: bool


def _begins_with(x, shared: torch.Tensor | None) -> bool:
    return (
        shared is not None and isinstance(x, torch.Tensor) and x.dim() == 4 and x.shape[0] == shared.shape[0]
        and x.shape[-2:] == shared.shape[-2:] and x.shape[1] >= shared.shape[1]
        and torch.equal(x[:, : shared.shape[1]], shared)
    )


def _passes_through(m: nn.Module) -> bool:
    # Identity, dropout and in-place activations hand their input on; their readers are tapped instead.
    # A `Shortcut` is a reader: its add is in place only without autograd, never while this records.
    return isinstance(m, _PASS_THROUGH) or (bool(getattr(m, "inplace", False)) and not isinstance(m, Shortcut))


class _StageRecorder:
    """Hooks on one `CrossStage`: its base map, its block input / output, and a tap on every read of them."""

    def __init__(self, name: str, stage: CrossStage):
        self.name, self.stage = name, stage
        self.base: torch.Tensor | None = None
        self.block_in: torch.Tensor | None = None
        self.block_out: torch.Tensor | None = None
        self.block_reads: list[_Read] = []
        self.split_reads: list[_Read] = []
        self.handles = []
        s = stage
        self._capture_input(s.blocks, "block_in")
        self.handles.append(s.blocks.register_forward_hook(lambda m, i, o: setattr(self, "block_out", o)))
        for root in ("blocks", "partial_transition", "transition"):
            if getattr(s, root) is not None:
                self._tap_readers(getattr(s, root), root, lambda: self.block_in, self.block_reads, skip_root=root == "blocks")
        if s.fusion == "none":
            return
        if s.split == "conv":
            self._capture_input(s.cross, "base")  # cross runs first; main reads the same map
            for root in ("cross", "main"):
                self._tap_readers(getattr(s, root), root, lambda: self.base, self.split_reads, skip_root=False)
        else:
            producer = s.base if s.base is not None else s.down
            if producer is not None:
                self.handles.append(producer.register_forward_hook(lambda m, i, o: setattr(self, "base", o)))
            else:
                self._capture_input(s, "base")

    def _capture_input(self, module: nn.Module, attr: str) -> None:
        self.handles.append(module.register_forward_pre_hook(lambda m, args: setattr(self, attr, args[0])))

    def _tap_readers(self, root: nn.Module, prefix: str, shared, sink: list[_Read], skip_root: bool) -> None:
        for sub, module in root.named_modules():
            if (skip_root and not sub) or _passes_through(module):
                continue
            name = f"{prefix}.{sub}" if sub else prefix
            leaf = not any(True for _ in module.children())

            def pre_hook(m, args, name=name, leaf=leaf):
                if not any(_begins_with(a, shared()) for a in args):
                    return None
                if not leaf:
                    sink.append(_Read(name, None, False))
                    return None
                # Every argument that carries X is a read: a residual add (`Shortcut`) reads it second.
                new_args = []
                for a in args:
                    if _begins_with(a, shared()):
                        a = a.view_as(a)
                        sink.append(_Read(name, a, True))
                    new_args.append(a)
                return tuple(new_args)

            self.handles.append(module.register_forward_pre_hook(pre_hook))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _contributions(loss: torch.Tensor, reads: list[_Read]) -> dict[str, torch.Tensor]:
    """The gradient each path sends back through its reads, at full read width, in float64.

    A path is the outermost module that reads the shared map (a dense layer, the transition …);
    its gradient is the sum over the taps of its leaves.
    """
    readers = {r.name for r in reads}
    taps = [r for r in reads if r.leaf]
    if not taps:
        return {}
    grads = torch.autograd.grad(loss, [r.tap for r in taps], retain_graph=True, allow_unused=True)
    width = max(r.tap.shape[1] for r in taps)
    out: dict[str, torch.Tensor] = {}
    for r, g in zip(taps, grads):
        parts = r.name.split(".")
        path = next(".".join(parts[:i]) for i in range(1, len(parts) + 1) if ".".join(parts[:i]) in readers)
        g = torch.zeros_like(r.tap) if g is None else g
        g = F.pad(g.detach().double(), (0, 0, 0, 0, 0, width - g.shape[1]))
        out[path] = out[path] + g if path in out else g
    return out


def _read_width(reads: list[_Read]) -> dict[str, int]:
    readers = {r.name for r in reads}
    width: dict[str, int] = {}
    for r in reads:
        if r.leaf:
            parts = r.name.split(".")
            path = next(".".join(parts[:i]) for i in range(1, len(parts) + 1) if ".".join(parts[:i]) in readers)
            width[path] = max(width.get(path, 0), r.tap.shape[1])
    return width


def _overlap(contrib: dict[str, torch.Tensor], read: list[int], reads: list[_Read], block_out) -> np.ndarray | None:
    """O[p, q] from the per-channel energy of the total gradient of the block's concat (see module doc)."""
    if not isinstance(block_out, torch.Tensor):
        return None
    width = block_out.shape[1]
    for r in reads:
        if r.leaf:
            n = min(r.tap.shape[1], width)
            if r.tap.shape[-2:] != block_out.shape[-2:] or not torch.equal(r.tap[:, :n], block_out[:, :n]):
                return None  # the paths do not read prefixes of one concatenation: not a dense block
    total = sum(c[:, :width] if c.shape[1] >= width else F.pad(c, (0, 0, 0, 0, 0, width - c.shape[1])) for c in contrib.values())
    energy = total.pow(2).sum((0, 2, 3)).cumsum(0).cpu().numpy()  # energy[c] = sum over channels 0..c
    n = len(read)
    o = np.eye(n)
    for i in range(n):
        for j in range(i + 1, n):
            lo, hi = sorted((min(read[i], width), min(read[j], width)))
            e_lo, e_hi = energy[lo - 1], energy[hi - 1]
            o[i, j] = o[j, i] = math.sqrt(e_lo / e_hi) if e_hi > 0 else math.nan
    return o


def _split_cos(rec: _StageRecorder, loss: torch.Tensor) -> tuple[float | None, tuple[float, float] | None]:
    s = rec.stage
    if s.fusion == "none" or rec.base is None:
        return None, None
    if s.split == "conv":
        contrib = _contributions(loss, rec.split_reads)
        if set(contrib) != {"cross", "main"}:
            return None, None
        c = rec.base.shape[1]
        g_cross, g_main = contrib["cross"][:, :c], contrib["main"][:, :c]
    else:
        # Slice split: the two parts are disjoint channel ranges of the base map, so their gradients are
        # supported on disjoint channels -- computed rather than assumed, as a check of the stage.
        (g,) = torch.autograd.grad(loss, rec.base, retain_graph=True)
        g = g.detach().double()
        mask = torch.zeros(g.shape[1], dtype=torch.bool, device=g.device)
        mask[: s.cross_chs] = True
        g_cross, g_main = g * mask.view(1, -1, 1, 1), g * (~mask).view(1, -1, 1, 1)
    return cosine(g_cross, g_main), (float(g_cross.norm()), float(g_main.norm()))


def stage_gradients(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, name: str = "") -> GradientReport:
    """Both measures for every `CrossStage` of ``model``, from one training-mode forward/backward.

    The loss is the cross-entropy of ``model(images)`` with ``labels``; BatchNorm uses batch statistics
    as in training (its running statistics are restored afterwards), and no weight changes.
    """
    stages = [(n, m) for n, m in model.named_modules() if isinstance(m, CrossStage)]
    if not stages:
        raise ValueError(f"model {name or type(model).__name__} has no CrossStage to analyse")
    recorders = [_StageRecorder(n, m) for n, m in stages]
    bn_state = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
    was_training = model.training
    model.train()
    try:
        with torch.enable_grad():
            logits = model(images)
            if logits.dim() != 2 or logits.shape[0] != len(labels):
                raise ValueError(f"expected class logits of shape ({len(labels)}, classes), got {tuple(logits.shape)}")
            loss = F.cross_entropy(logits, labels)
            report = GradientReport(name or getattr(model, "model_name", type(model).__name__), loss.item(), len(labels))
            for rec in recorders:
                report.stages.append(_analyse_stage(rec, loss))
    finally:
        for rec in recorders:
            rec.remove()
        model.load_state_dict(bn_state, strict=False)
        model.train(was_training)
    return report


def _analyse_stage(rec: _StageRecorder, loss: torch.Tensor) -> StageGradients:
    split_cos, split_norms = _split_cos(rec, loss)
    s = rec.stage
    split = None if s.fusion == "none" else s.split
    contrib = _contributions(loss, rec.block_reads)
    if rec.block_in is None or not contrib:
        return StageGradients(rec.name, 0, [], [], np.zeros((0, 0)), [], None, split, split_cos, split_norms)
    c0 = rec.block_in.shape[1]
    paths = list(contrib)
    shared = [contrib[p][:, :c0] for p in paths]
    widths = _read_width(rec.block_reads)
    read = [widths[p] for p in paths]
    overlap = _overlap(contrib, read, rec.block_reads, rec.block_out)
    # The paths must add up to the whole gradient of X; a reader the hooks cannot see (a tensor op
    # outside any module) shows up here as a large residual.
    (total,) = torch.autograd.grad(loss, rec.block_in, retain_graph=True)
    total = total.detach().double()
    residual = float((sum(shared) - total).norm() / total.norm()) if total.norm() > 0 else math.nan
    return StageGradients(rec.name, c0, paths, [float(g.norm()) for g in shared], cosine_matrix(shared), read,
                          overlap, split, split_cos, split_norms, residual)


# -- reports ----------------------------------------------------------------------------------------
def _short(path: str) -> str:
    """``blocks.layers.3`` -> ``L3``, ``partial_transition`` -> ``PT``, ``transition`` -> ``T``."""
    if path == "partial_transition":
        return "PT"
    if path == "transition":
        return "T"
    last = path.split(".")[-1]
    return f"L{last}" if last.isdigit() else path


def _fmt(v: float | None, digits: int = 3) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def format_gradient_table(reports: list[GradientReport]) -> str:
    """Markdown summary: one row per model and stage."""
    lines = ["| Model | Stage | X chs | Paths | mean D (path cos) | max D | mean O (update overlap) | split | "
             "cos(cross, main) | Σg_p vs ∂L/∂X (rel. err) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in reports:
        for s in r.stages:
            lines.append(f"| {r.model} | {s.stage} | {s.shared_chs} | {len(s.paths)} | {_fmt(s.mean_path_cos)} | "
                         f"{_fmt(s.max_path_cos)} | {_fmt(s.mean_overlap)} | {s.split or '—'} | {_fmt(s.split_cos)} | "
                         f"{'—' if math.isnan(s.residual) else f'{s.residual:.1e}'} |")
    return "\n".join(lines) + "\n"


def plot_stage_heatmaps(reports: list[GradientReport], index: int, path: Path) -> Path:
    """One PNG for stage ``index``: a row per model, path cosines D (left) and update overlap O (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(r, r.stages[index]) for r in reports if index < len(r.stages)]
    fig, axes = plt.subplots(len(rows), 2, figsize=(11, 4.8 * len(rows)), squeeze=False)
    for (report, s), (ax_d, ax_o) in zip(rows, axes):
        labels = [_short(p) for p in s.paths]
        for ax, m, title, cmap, vmin in ((ax_d, s.path_cos, "path duplication D = cos(g_p, g_q)", "RdBu_r", -1),
                                         (ax_o, s.overlap, "update overlap O = cos(u_p, u_q)", "viridis", 0)):
            if m is None or not len(m):
                ax.text(0.5, 0.5, "not a dense block\n(no shared-prefix paths)", ha="center", va="center")
                ax.set_axis_off()
                continue
            im = ax.imshow(m, cmap=cmap, vmin=vmin, vmax=1)
            step = max(1, len(labels) // 16)
            ax.set_xticks(range(0, len(labels), step), labels[::step], rotation=90, fontsize=7)
            ax.set_yticks(range(0, len(labels), step), labels[::step], fontsize=7)
            if len(labels) <= 8:
                for i in range(len(m)):
                    for j in range(len(m)):
                        ax.text(j, i, _fmt(m[i, j], 2), ha="center", va="center", fontsize=7)
            fig.colorbar(im, ax=ax, fraction=0.046)
            mean = mean_off_diagonal(m)
            ax.set_title(f"{report.model} {s.stage}: {title}\nmean off-diagonal {_fmt(mean)}", fontsize=9)
        if s.split_cos is not None:
            ax_d.set_xlabel(f"base-map split ({s.split}): cos(g_cross, g_main) = {_fmt(s.split_cos)}", fontsize=8)
    fig.tight_layout()
    return atomic_savefig(fig, path)


def analyze_gradients(models: dict[str, nn.Module], images: torch.Tensor | dict[str, torch.Tensor], labels: torch.Tensor,
                      out_dir: str | Path) -> list[GradientReport]:
    """Run `stage_gradients` for each model on the same batch; write ``gradients.md``, ``gradients.json``
    and ``gradients_stage<i>.png`` (one heat-map figure per stage, models side by side).

    ``images`` is one normalised batch, or one per model (models trained with different normalisations).
    """
    reports = []
    for name, model in models.items():
        batch = images[name] if isinstance(images, dict) else images
        reports.append(stage_gradients(model, batch, labels, name))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n_stages = max(len(r.stages) for r in reports)
    for i in range(n_stages):
        plot_stage_heatmaps(reports, i, out / f"gradients_stage{i}.png")
    head = (f"# Gradient duplication: {' vs '.join(models)}\n\nOne batch of {len(labels)} images, cross-entropy loss, "
            "training-mode BatchNorm. D: cosine between the gradients the paths of a stage send back into the "
            "shared block input X; O: overlap of the gradient information in the paths' weight updates "
            "(docs/analysis.md). Paths: L<i> = dense layer / block i, PT = partial transition, T = transition.\n\n")
    atomic_write_text(out / "gradients.md", head + format_gradient_table(reports))
    atomic_write_text(out / "gradients.json", json.dumps([r.as_dict() for r in reports], indent=1) + "\n")
    return reports


def gradient_subjects(model: str, twin: str | None = "auto", *, data: str | None = None, img_size: int | None = None,
                      in_chans: int | None = None, batch: int = 32, width: float = 1.0, options: dict | None = None,
                      checkpoint: str | None = None, seed: int = 0):
    """The models and the batch for `analyze_gradients`: ``(models, images per model, labels)``.

    ``model`` / ``twin`` are registered names (fresh weights, seeded) or run directories (trained
    weights, the run's data, size and normalisation). ``twin="auto"`` is the registered twin of a
    name and nothing for a run directory; ``None`` or ``"none"`` analyses ``model`` alone. ``width`` and
    ``options`` apply to both registered models, except ``fusion``: it applies to ``model`` only, the twin
    keeps its own (so a plain twin stays plain).
    """
    from ..data import load_classification
    from ..engine.classify import normalize
    from .common import find_twin, is_run_dir, load_subject, read_run

    if twin == "auto":
        twin = None if is_run_dir(model) else find_twin(model)
    twin = None if twin == "none" else twin
    first_run = next((read_run(m, checkpoint)[1] for m in (model, twin) if m and is_run_dir(m)), None)
    trained = (first_run or {}).get("data", {})
    data_name = data or trained.get("name") or "digits"
    size = img_size or trained.get("img_size") or 64
    ds = load_classification(data_name, size, in_chans=in_chans, train_limit=batch, seed=seed)
    if len(ds.train) < batch:
        raise ValueError(f"{data_name}: only {len(ds.train)} training images, fewer than --batch {batch}")
    images = torch.stack([ds.train[i][0] for i in range(batch)])
    labels = torch.tensor([int(ds.train[i][1]) for i in range(batch)])
    # fusion=... makes `model` a CSP variant to hold against its twin, so the twin keeps its own fusion: a
    # plain twin stays plain (the other CSP options, part_ratio and the like, do nothing to a plain config).
    twin_options = {k: v for k, v in (options or {}).items() if k != "fusion"}
    models, batches = {}, {}
    for m, opts in ((model, options), (twin, twin_options)):
        if not m:
            continue
        label, net, run = load_subject(m, num_classes=ds.num_classes, in_chans=ds.in_chans, width=width,
                                       options=opts, checkpoint=checkpoint)
        if run is not None:
            if run["model"]["num_classes"] != ds.num_classes or run["model"]["in_chans"] != ds.in_chans:
                raise ValueError(f"{m}: the run's model has {run['model']['num_classes']} classes / {run['model']['in_chans']} "
                                 f"channels, {data_name} has {ds.num_classes} / {ds.in_chans}")
            mean, std = tuple(run["data"]["mean"]), tuple(run["data"]["std"])
        else:
            mean, std = ds.mean, ds.std
        models[label] = net
        batches[label] = normalize(images.clone(), mean, std)
    return models, batches, labels

