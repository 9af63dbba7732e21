"""The γ / fusion ablation of paper Table 1, re-run on your data.

One family (a CSP model whose config has ``part_ratio`` and ``fusion``) is trained with one recipe and
one seed for every γ in ``gammas`` and every fusion in ``fusions`` (paper Fig. 3: ``fusion_first``,
``fusion_last``, ``csp``), plus the plain model (`plain_run`). Each run lives in ``OUT/runs/<key>/`` (the trainer's
checkpoints and metrics) and is finished when ``OUT/runs/<key>/result.json`` exists: a re-run skips
finished runs and resumes an interrupted one from its last checkpoint. After every run the table
(``ablation.md``, ``ablation.json``) and the accuracy-vs-BFLOPs scatter (``ablation.png``) are rewritten.

Several processes may share one ``OUT`` (one thread each is the fastest use of a small CPU): each run is
claimed with an exclusive lock (``OUT/runs/<key>.lock``), a process leaves runs another one holds to it,
and its table lists the runs finished so far; run once more when all are done for the whole table.

Params and BFLOPs are measured by `cspnet.profile` on the model as trained (classes and channels of
the data, at the training size); the "BFLOPs @ paper size" column profiles the same architecture as
an ImageNet model (3 channels, 1000 classes) at ``paper_size`` (224x224, which is what Table 1's BFLOPs
column is, unless asked otherwise), for reused runs too.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..data import ClassificationData
from ..engine.classify import ClassificationTask, ClassifyRecipe
from ..engine.models import build_model, model_record, rebuild_model
from ..engine.train import RESUMABLE_CHANGES, TrainConfig, fit
from ..profile import profile
from ..registry import get_spec
from ..files import atomic_savefig, atomic_write_text
from ..models.peleenet import PAPER_TABLE1, TABLE1_FAMILY
from .common import find_twin

ABLATION_FUSIONS = ("fusion_first", "fusion_last", "csp")
ABLATION_GAMMAS = (0.25, 0.5, 0.75)

PAPER_MODELS = ("peleenet", TABLE1_FAMILY)  # the networks of paper Table 1


@dataclass(frozen=True)
class AblationRun:
    """One cell of the ablation: a model name and the γ / fusion it is built with (plain: ``fusion="none"``)."""

    model: str
    fusion: str
    part_ratio: float | None

    @property
    def key(self) -> str:
        return "plain" if self.fusion == "none" else f"{self.fusion}-g{self.part_ratio:g}"

    @property
    def options(self) -> dict[str, Any]:
        """The config overrides that make the registered model this cell (none for a registered plain model)."""
        if self.fusion != "none":
            return {"fusion": self.fusion, "part_ratio": self.part_ratio}
        return {} if getattr(get_spec(self.model).cfg, "fusion", "none") == "none" else {"fusion": "none"}


def plain_run(csp: str) -> AblationRun:
    """The plain row of an ablation of the CSP model ``csp``: what its CSP stages are measured against.

    That is the registered twin when it is a plain model of the same builder (PeleeNet for CSPPeleeNet,
    Darknet-53 for CSPDarknet-53, whose cfg also drops the blocks' bottleneck), else ``csp`` itself built
    with ``fusion="none"``: the same network without CSP. A twin of another builder is another network
    (the *_ref models' twin is the Darknet Reference model) and a CSP twin is no plain model
    (CSPDarknet-53-Elastic's is CSPDarknet-53); neither would make "vs plain" mean "vs no CSP".
    """
    spec = get_spec(csp)
    twin = get_spec(spec.twin) if spec.twin else None
    if twin is not None and twin.build is spec.build and twin.cfg.fusion == "none":
        return AblationRun(twin.name, "none", None)
    return AblationRun(csp, "none", None)


def ablation_runs(family: str, gammas=ABLATION_GAMMAS, fusions=ABLATION_FUSIONS, include_plain: bool = True) -> list[AblationRun]:
    """The runs of an ablation of ``family`` (a CSP model, or a plain model that has a CSP twin)."""
    spec = get_spec(family)
    csp = family if spec.twin else find_twin(family)
    if csp is None:
        raise ValueError(f"model {family!r} has no CSP twin to ablate; pick a CSP model (e.g. csppeleenet_table1)")
    csp_spec = get_spec(csp)
    fields = {f.name for f in dataclasses.fields(csp_spec.cfg)}
    if not {"fusion", "part_ratio"} <= fields:
        raise ValueError(f"model {csp!r} has no 'fusion' / 'part_ratio' config fields (has {sorted(fields)})")
    bad = [f for f in fusions if f not in ABLATION_FUSIONS]
    if bad:
        raise ValueError(f"unknown fusion(s) {bad}; expected some of {', '.join(ABLATION_FUSIONS)}")
    for g in gammas:
        if not 0.0 < float(g) < 1.0:
            raise ValueError(f"γ (part ratio) must lie in (0, 1), got {g}")
    runs = [plain_run(csp)] if include_plain else []
    runs += [AblationRun(csp, f, float(g)) for f in fusions for g in gammas]
    if not runs:
        raise ValueError("nothing to run: give at least one γ and one fusion, or keep the plain model")
    return runs


def _signature(record: dict, cfg: TrainConfig, recipe: ClassifyRecipe, data: ClassificationData) -> dict[str, Any]:
    """What a finished run must share with the current request to be reused."""
    d = data.describe()
    train = {k: v for k, v in cfg.as_dict().items() if k not in RESUMABLE_CHANGES}
    signature = {"model": record, "train": train, "recipe": dataclasses.asdict(recipe) | {"num_workers": None},
                 "data": {k: d[k] for k in ("name", "img_size", "in_chans", "train_size", "test_size", "classes")}}
    return json.loads(json.dumps(signature))  # as it reads back from result.json (tuples become lists)


def _measure(run: AblationRun, data: ClassificationData, width: float, options: dict, paper_size: int) -> dict[str, Any]:
    model = build_model(run.model, num_classes=data.num_classes, in_chans=data.in_chans, width=width, options=options)
    prof = profile(model, data.img_size, data.in_chans)
    return {"params": prof.params, "conv_params": prof.conv_params, "bflops": prof.bflops, "macs": prof.macs,
            **_paper_size_figures(run, width, options, paper_size)}


def _paper_size_figures(run: AblationRun, width: float, options: dict, paper_size: int) -> dict[str, Any]:
    """The row's ImageNet-architecture figures at ``paper_size``. They depend on --paper-size, which a
    finished run does not record, so a reused row gets them anew for the current request."""
    imagenet = build_model(run.model, num_classes=1000, in_chans=3, width=width, options=options)
    return {"paper_size": paper_size, "bflops_paper_size": profile(imagenet, paper_size, 3).bflops,
            "paper_arch": _is_paper_arch(run, width, options, paper_size)}


def _is_paper_arch(run: AblationRun, width: float, options: dict, paper_size: int) -> bool:
    """Whether the run measures the network of paper Table 1, so that its figures belong beside the row:
    PeleeNet or CSPPeleeNet at full width, 224 x 224, nothing but fusion and γ changed (not swish, SE …)."""
    overrides = set(options) - {"fusion", "part_ratio"}
    return run.model in PAPER_MODELS and width == 1.0 and not overrides and paper_size == 224


def run_ablation(
    family: str,
    data: ClassificationData,
    train_cfg: TrainConfig,
    recipe: ClassifyRecipe,
    out_dir: str | Path,
    *,
    width: float = 1.0,
    options: dict[str, Any] | None = None,
    gammas=ABLATION_GAMMAS,
    fusions=ABLATION_FUSIONS,
    include_plain: bool = True,
    paper_size: int = 224,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Train every run of the ablation (skipping finished ones) and write the table and plot.

    ``width`` and ``options`` (config overrides such as ``act``) apply to every run, the plain one too.

    Returns one row per run this process finished or found finished: ``key, model, fusion, part_ratio,
    params, bflops, bflops_paper_size, top1, top5`` (test accuracy after the last epoch), ``wall_s`` and
    ``status`` (``trained``, ``resumed`` or ``skipped``). Runs that another process is training are left
    out (and named on stderr).
    """
    runs = ablation_runs(family, gammas, fusions, include_plain)
    options = dict(options or {})
    if {"fusion", "part_ratio"} & set(options):
        raise ValueError("fusion and part_ratio are what the ablation varies; give them as fusions / gammas, not options")
    for run in runs:  # every cell is built before any is trained: one the family cannot build fails now, not runs later
        try:
            build_model(run.model, num_classes=data.num_classes, in_chans=data.in_chans, width=width,
                        options={**options, **run.options})
        except ValueError as e:
            raise ValueError(f"{run.model} {run.key}: {e}") from None
    out = Path(out_dir)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(runs), desc="ablation", unit="run", position=0, dynamic_ncols=True)
    try:
        for i, run in enumerate(runs):
            row = _one_run(run, i, len(runs), data, train_cfg, recipe, out, width, {**options, **run.options},
                           paper_size, progress)
            if row is None:
                print(f"{run.key}: another process is training it ({out / 'runs' / run.key}); left to it",
                      file=sys.stderr)
            else:
                rows.append(row)
                write_ablation_report(rows, out, family, data)
            if bar is not None:
                if row is not None:
                    bar.set_postfix(last=f"{run.key} top1={100 * row['top1']:.2f}%", refresh=False)
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return rows


@contextlib.contextmanager
def _claim(lock_path: Path):
    """Yield True while this process holds the exclusive lock on ``lock_path``, False if another one does."""
    with open(lock_path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _one_run(run: AblationRun, i: int, n: int, data, train_cfg, recipe, out: Path, width: float, options: dict,
             paper_size: int, progress: bool) -> dict[str, Any] | None:
    """The run's row (trained, resumed or found finished), or None while another process holds the run."""
    with _claim(out / "runs" / f"{run.key}.lock") as mine:
        if not mine:
            return None
        return _train_or_reuse(run, i, n, data, train_cfg, recipe, out, width, options, paper_size, progress)


def _train_or_reuse(run: AblationRun, i: int, n: int, data, train_cfg, recipe, out: Path, width: float, options: dict,
                    paper_size: int, progress: bool) -> dict[str, Any]:
    run_dir = out / "runs" / run.key
    result_path = run_dir / "result.json"
    record = model_record(run.model, num_classes=data.num_classes, in_chans=data.in_chans, width=width, options=options)
    signature = _signature(record, train_cfg, recipe, data)
    if result_path.is_file():
        try:
            saved = json.loads(result_path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{result_path}: not valid JSON ({e}); delete it to re-run {run.key}") from None
        if saved.get("signature") != signature:
            diff = sorted(k for k in signature if saved.get("signature", {}).get(k) != signature[k])
            raise ValueError(f"{result_path}: finished with a different {', '.join(diff)}; use another --out "
                             "or delete the run directory to retrain it")
        return {**saved["row"], **_paper_size_figures(run, width, options, paper_size), "status": "skipped"}
    resume = (run_dir / "last.json").is_file()
    measured = _measure(run, data, width, options, paper_size)
    model = rebuild_model(record, seed=train_cfg.seed)
    run_info = {"model": record, "data": data.describe(), "recipe": dataclasses.asdict(recipe), "ablation": run.key}
    result = fit(ClassificationTask(data, recipe), model, train_cfg, run_dir, resume=resume, progress=progress,
                 run_info=run_info, desc=f"[{i + 1}/{n}] {run.key} ")
    row = {"key": run.key, "model": run.model, "fusion": run.fusion, "part_ratio": run.part_ratio, **measured,
           "top1": result.final.get("top1", math.nan), "top5": result.final.get("top5", math.nan),
           "epochs": train_cfg.epochs, "wall_s": result.wall_s}
    atomic_write_text(result_path, json.dumps({"signature": signature, "row": row}, indent=1) + "\n")
    return {**row, "status": "resumed" if resume else "trained"}


# -- the table and the plot ---------------------------------------------------------------------------
def _paper(row: dict) -> tuple[float, float] | None:
    """Paper Table 1's (top-1, BFLOPs) for a row measuring the paper's own network, else None."""
    if not row.get("paper_arch"):
        return None
    return PAPER_TABLE1.get((row["fusion"], row["part_ratio"]))


_FUSION_LABEL = {"none": "— (plain)", "fusion_first": "fusion first", "fusion_last": "fusion last", "csp": "CSP (both)"}


def format_ablation_table(rows: list[dict], data: ClassificationData | None = None) -> str:
    """Paper Table 1's layout (γ, fusion, params, BFLOPs, top-1) with ratios to the plain model and,
    beside rows that measure the paper's own network (`_is_paper_arch`), the paper's ImageNet figures."""
    plain = next((r for r in rows if r["fusion"] == "none"), None)
    size = f"{data.img_size}x{data.img_size}" if data else "train size"
    paper_size = rows[0]["paper_size"] if rows else 224
    lines = [f"| Model | γ | Fusion | Params (M) | BFLOPs @ {size} | Top-1 (%) | Δ top-1 vs plain | BFLOPs / plain | "
             f"BFLOPs @ {paper_size} (ImageNet arch) | Paper BFLOPs | Paper top-1 |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        paper = _paper(r)
        gamma = "—" if r["part_ratio"] is None else f"{r['part_ratio']:g}"
        delta = f"{100 * (r['top1'] - plain['top1']):+.2f}" if plain and r is not plain else "—"
        ratio = f"{r['bflops'] / plain['bflops']:.3f}" if plain else "—"
        lines.append(
            f"| {r['model']} | {gamma} | {_FUSION_LABEL[r['fusion']]} | {r['params'] / 1e6:.3f} | {r['bflops']:.4f} | "
            f"{100 * r['top1']:.2f} | {delta} | {ratio} | {r['bflops_paper_size']:.3f} | "
            f"{'—' if paper is None else f'{paper[1]:.3f}'} | {'—' if paper is None else f'{paper[0]:.1f}'} |")
    return "\n".join(lines) + "\n"


def plot_ablation(rows: list[dict], path: Path, title: str = "") -> Path:
    """Top-1 vs BFLOPs: this ablation (left) and, for the PeleeNet family, the paper's Table 1 (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with_paper = any(_paper(r) for r in rows)
    fig, axes = plt.subplots(1, 2 if with_paper else 1, figsize=(12 if with_paper else 6.5, 4.8), squeeze=False)
    styles = {"none": ("k", "*"), "fusion_first": ("tab:red", "v"), "fusion_last": ("tab:blue", "o"), "csp": ("tab:green", "s")}
    panels = [(axes[0][0], lambda r: (r["bflops"], 100 * r["top1"]), "this run", "BFLOPs at the training size")]
    if with_paper:
        panels.append((axes[0][1], lambda r: tuple(reversed(_paper(r))) if _paper(r) else None,
                       "paper Table 1 (ImageNet, 224x224)", "BFLOPs (paper)"))
    for ax, point, name, xlabel in panels:
        for fusion, (color, marker) in styles.items():
            pts = [(point(r), r) for r in rows if r["fusion"] == fusion and point(r) is not None]
            if not pts:
                continue
            ax.scatter([p[0] for p, _ in pts], [p[1] for p, _ in pts], c=color, marker=marker, s=90 if marker == "*" else 45,
                       label=_FUSION_LABEL[fusion])
            for (x, y), r in pts:
                if r["part_ratio"] is not None:
                    ax.annotate(f"γ={r['part_ratio']:g}", (x, y), xytext=(4, 4), textcoords="offset points", fontsize=7)
        ax.set(xlabel=xlabel, ylabel="top-1 (%)", title=name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return atomic_savefig(fig, path)


def write_ablation_report(rows: list[dict], out_dir: Path, family: str, data: ClassificationData | None = None) -> None:
    """``ablation.md`` (the table), ``ablation.json`` (the rows) and ``ablation.png`` (the scatter) in ``out_dir``."""
    out_dir = Path(out_dir)
    what = f" on {data.name} ({len(data.train)} train / {len(data.test)} test images, {data.img_size}x{data.img_size})" if data else ""
    epochs = rows[0].get("epochs") if rows else None
    head = f"# γ / fusion ablation of {family}{what}\n\n" + (f"{epochs} epoch(s), one recipe and seed for every run.\n\n" if epochs else "")
    atomic_write_text(out_dir / "ablation.md", head + format_ablation_table(rows, data))
    clean = [{k: v for k, v in r.items() if k != "status"} for r in rows]
    atomic_write_text(out_dir / "ablation.json", json.dumps(clean, indent=1) + "\n")
    plot_ablation(rows, out_dir / "ablation.png", f"γ / fusion ablation of {family}{what}")
