"""One training loop for every task (classification here, detection elsewhere).

The loop owns what all tasks share: data order, gradient accumulation, DDP, mixed precision,
the optimizer and schedule, EMA, gradient clipping, NaN checks, checkpoints, progress bar,
metric files and plots. A *task* says what a batch is and how to score it (`Task`).

Determinism, and why ``--resume`` is exact
------------------------------------------
Each epoch's sample order is a pure function of ``(seed, epoch)``. A global batch of
``batch_size`` samples is cut into ``world_size * accum_steps`` equal *chunks*; process ``r``
runs chunks ``r * accum_steps ... (r + 1) * accum_steps - 1``. Every chunk gets its own seed,
``chunk_seed(seed, epoch, step, chunk)``, from which the task draws its augmentation and which
seeds torch's global RNG (dropout) before the chunk's forward pass. A task that augments single
items where they are loaded (``seeded_items``, e.g. detection's mosaic, in the DataLoader workers)
gets each item's seed from the same chunk seed (`item_seeds`), so ``--workers`` changes nothing
either. So nothing depends on what ran before in the process: a resumed run skips the steps
already done and continues with the very same numbers, and one process with ``accum_steps = k``
computes what ``k`` DDP processes do.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..data.classification import with_worker_errors
from ..layers import memory_efficient
from .checkpoint import CheckpointError, load_checkpoint, read_checkpoint_record, save_checkpoint
from .distributed import DistInfo, all_reduce_sum, barrier, broadcast_buffers
from .ema import ModelEMA
from .optim import LrSchedule, build_optimizer, capped_burn_in
from ..files import atomic_savefig, atomic_write_text

AMP_MODES = ("none", "bf16", "fp16")


class Task(Protocol):
    """What the training loop needs from a problem (classification, detection …).

    - ``train_set``: a map-style dataset; ``collate(samples)`` builds a batch from its items.
    - ``seeded_items`` (optional, default False): when True, the loop asks ``train_set`` for
      ``(index, seed)`` pairs (`item_seeds`) instead of indices, and the item draws every random
      number from generators seeded with its ``seed``. Loading and augmenting then run in the
      DataLoader workers (``num_workers``) and still depend on nothing but the chunk seed.
    - ``prepare(batch, device=, seed=)``: move a batch to ``device`` and augment it, drawing every
      random number from generators seeded with ``seed`` (never from global RNGs).
    - ``loss(model, batch) -> (loss, stats)``: the mean loss of the batch and per-batch *sums* to
      log, named as their means (``{"acc": 17.0}`` for 17 correct); the loop divides by the
      number of samples and logs ``train_loss``, ``train_acc`` ….
    - ``evaluate(model, dist) -> dict``: metrics on held-out data (floats, plus anything JSON-able);
      ``dist`` (a `DistInfo`) lets a task split the work between processes.
    - ``metric``: the key of ``evaluate``'s result that picks the best checkpoint (higher is better).
    """

    metric: str
    train_set: Dataset

    def collate(self, samples: list) -> Any: ...

    def prepare(self, batch: Any, *, device: torch.device, seed: int) -> Any: ...

    def loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, float]]: ...

    def evaluate(self, model: nn.Module, dist: DistInfo) -> dict[str, Any]: ...


class TrainingDiverged(ValueError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@dataclass(frozen=True)
class TrainConfig:
    """The recipe. ``batch_size`` is the global batch of one optimizer step (all processes)."""

    epochs: int = 10
    batch_size: int = 128
    accum_steps: int = 1
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    burn_in: int = 0
    burn_in_power: float = 4.0
    poly_power: float = 4.0
    min_lr_ratio: float = 0.0
    step_milestones: tuple[float, ...] = (0.5, 0.75)
    step_gamma: float = 0.1
    amp: str = "none"
    ema_decay: float = 0.0
    grad_clip: float = 0.0
    seed: int = 0
    checkpoint_every: int = 0
    num_workers: int = 0
    deterministic: bool = True
    memory_efficient: bool = False  # `cspnet.layers.memory_efficient`: recompute activations in backward

    def __post_init__(self):
        if self.epochs < 1 or self.batch_size < 1 or self.accum_steps < 1:
            raise ValueError(f"epochs, batch_size and accum_steps must be >= 1, got {self.epochs}, {self.batch_size}, {self.accum_steps}")
        if self.amp not in AMP_MODES:
            raise ValueError(f"amp must be one of {AMP_MODES}, got {self.amp!r}")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["step_milestones"] = list(self.step_milestones)
        return d


# Fields that may change between a run and its --resume without changing the weights it computes
# (memory-efficient layers compute the plain layers' gradients; they only keep less for backward;
# the eval_* and time_limit fields of a task recipe and the data's test_size say when and how a run
# is evaluated or stopped).
RESUMABLE_CHANGES = ("checkpoint_every", "num_workers", "memory_efficient", "eval_every", "eval_conf",
                     "eval_iou", "eval_batch_size", "time_limit", "test_size")


def chunk_seed(seed: int, epoch: int, step: int, chunk: int) -> int:
    """A well-mixed 63-bit seed for one chunk of one step."""
    return int(np.random.SeedSequence([seed, epoch, step, chunk]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def item_seeds(indices: list[int], seed: int) -> list[tuple[int, int]]:
    """The items of a chunk with seed ``seed`` as ``(index, item seed)``: the k-th item's seed is ``seed + k``."""
    return [(i, (seed + k) % 2**63) for k, i in enumerate(indices)]


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The sample order of ``epoch``: a permutation that depends only on ``(seed, epoch)``."""
    return np.random.default_rng([seed, epoch, 0x5A3]).permutation(n)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def amp_context(mode: str, device: torch.device):
    """Autocast for ``bf16`` (CPU or CUDA) and ``fp16`` (CUDA); a null context for ``none``."""
    if mode == "none":
        return contextlib.nullcontext()
    if mode == "fp16" and device.type != "cuda":
        raise ValueError("fp16 mixed precision needs a CUDA device; use --amp bf16 on the CPU")
    return torch.autocast(device.type, dtype=torch.bfloat16 if mode == "bf16" else torch.float16)


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool):
    """Run the block with torch's deterministic algorithms (and cuDNN's autotuner off) when ``enabled``,
    restoring the process's settings after it: a notebook that trains and then predicts should not keep
    paying for them. Uninitialised memory is not NaN-filled (torch's default in this mode): it costs ~4 %
    of a CPU training step, and no kernel here reads memory it did not write."""
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.benchmark, torch.utils.deterministic.fill_uninitialized_memory)
    if enabled:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        torch.utils.deterministic.fill_uninitialized_memory = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.backends.cudnn.benchmark = saved[2]
        torch.utils.deterministic.fill_uninitialized_memory = saved[3]


@dataclass
class FitResult:
    history: list[dict[str, Any]]
    final: dict[str, Any]
    wall_s: float
    train_img_per_s: float
    out_dir: Path


class _MetricFiles:
    """metrics.csv, metrics.jsonl and curves.png, rewritten (atomically) from the history each epoch."""

    def __init__(self, out_dir: Path, tensorboard: bool):
        self.out_dir = out_dir
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(out_dir / "tensorboard"))
            except ImportError:
                print("cspnet train: tensorboard is not installed (pip install tensorboard); --tensorboard ignored", file=sys.stderr)

    def write(self, history: list[dict[str, Any]]) -> None:
        if not history:
            return
        keys = list(dict.fromkeys(k for row in history for k in row))
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=keys)
        w.writeheader()
        w.writerows(history)
        atomic_write_text(self.out_dir / "metrics.csv", buf.getvalue())
        atomic_write_text(self.out_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in history))
        plot_curves({"": history}, self.out_dir / "curves.png")
        if self.writer is not None:
            row = history[-1]
            for k, v in row.items():
                if isinstance(v, (int, float)) and k != "epoch":
                    self.writer.add_scalar(k, v, row["epoch"])
            self.writer.flush()


def plot_curves(runs: dict[str, list[dict[str, Any]]], path: Path, title: str = "") -> Path:
    """Loss and accuracy per epoch (train and val) for one or several runs, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (name, history) in enumerate(runs.items()):
        epochs = [r["epoch"] for r in history]
        color = colors[i % len(colors)]
        label = f"{name} " if name else ""
        # one colour per run; dashed = training, solid = held-out
        for ax, keys, scale in ((ax_loss, ("train_loss", "val_loss"), 1.0), (ax_acc, ("train_acc", "val_top1"), 100.0)):
            for key, style in zip(keys, ("--", "-")):
                if any(key in r for r in history):
                    ax.plot(epochs, [scale * r.get(key, math.nan) for r in history], style, color=color, marker="o",
                            label=f"{label}{key}")
    ax_loss.set_yscale("log")  # early held-out losses of BN nets can be 100x the final ones
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # a run without e.g. accuracies leaves an axis empty
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=100)
    return path


def _check_resume_config(saved: dict[str, Any], cfg: TrainConfig, run_info: dict[str, Any], source: str) -> None:
    """Refuse a resume whose training config, task recipe, model or data differs from the checkpoint's."""
    then_run = dict(saved.get("run") or {})
    then_data, now_data = then_run.get("data"), run_info.get("data")
    if isinstance(then_data, dict) and isinstance(now_data, dict) and then_data.get("name") != now_data.get("name"):
        # runs before image folders were named by their absolute path recorded the path as given
        if Path(str(then_data.get("name"))).resolve() == Path(str(now_data.get("name"))):
            then_run["data"] = {**then_data, "name": now_data["name"]}
    parts = [("", saved.get("train_config", {}), cfg.as_dict())]
    parts += [(f"{key}.", then_run[key], run_info[key]) for key in ("recipe", "model", "data")
              if isinstance(run_info.get(key), dict) and isinstance(then_run.get(key), dict)]
    diffs = [f"{prefix}{k}: checkpoint {then.get(k)!r} vs now {now.get(k)!r}" for prefix, then, now in parts
             for k in {**then, **now} if k not in RESUMABLE_CHANGES and then.get(k) != now.get(k)]
    if diffs:
        raise CheckpointError(f"{source}: --resume with a different recipe or data would not continue the same run ({'; '.join(diffs)})")


def fit(
    task: Task,
    model: nn.Module,
    cfg: TrainConfig,
    out_dir: str | os.PathLike,
    *,
    dist: DistInfo | None = None,
    resume: bool = False,
    progress: bool = True,
    tensorboard: bool = False,
    run_info: dict[str, Any] | None = None,
    desc: str = "",
    bar_position: int = 0,
) -> FitResult:
    """Train ``model`` on ``task`` with recipe ``cfg``, writing checkpoints and metrics to ``out_dir``.

    ``run_info`` (model name and options, data description …) is stored in every checkpoint so
    that ``cspnet eval`` can rebuild the model. With ``resume=True`` the run continues from
    ``out_dir/last.*`` exactly where it stopped (the recipe must be the same).
    """
    dist = dist or DistInfo()
    out_dir = Path(out_dir)
    t_start = time.perf_counter()
    device = dist.device
    n_chunks = dist.world_size * cfg.accum_steps
    if cfg.batch_size % n_chunks:
        raise ValueError(f"batch_size {cfg.batch_size} must be divisible by world_size x accum_steps = {n_chunks}")
    chunk = cfg.batch_size // n_chunks
    n_train = len(task.train_set)
    steps_per_epoch = n_train // cfg.batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"the training set has {n_train} samples, fewer than one batch of {cfg.batch_size}")
    total_steps = cfg.epochs * steps_per_epoch
    burn_in = capped_burn_in(cfg.burn_in, total_steps)
    if burn_in < cfg.burn_in and dist.is_main and not resume:
        print(f"note: the burn-in of {cfg.burn_in} steps is more than half of this run's {total_steps} optimizer steps; "
              f"warming up for {burn_in}", file=sys.stderr)
    with deterministic_algorithms(cfg.deterministic):
        seed_everything(cfg.seed)

        model.to(device)
        optimizer = build_optimizer(model, cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.momentum, cfg.nesterov)
        schedule = LrSchedule(total_steps, cfg.schedule, cfg.burn_in, cfg.burn_in_power, cfg.poly_power, cfg.min_lr_ratio,
                              tuple(cfg.step_milestones), cfg.step_gamma)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        ema = ModelEMA(model, cfg.ema_decay) if cfg.ema_decay > 0 else None
        amp_context(cfg.amp, device)  # refuses fp16 off CUDA here, before GradScaler warns about a missing GPU
        scaler = torch.amp.GradScaler("cuda") if cfg.amp == "fp16" else None
        state: dict[str, Any] = {
            "epoch": 0, "step": 0, "history": [], "partial": {}, "best": None,
            "train_config": cfg.as_dict(), "run": run_info or {}, "steps_per_epoch": steps_per_epoch,
        }
        if resume:
            if not (out_dir / "last.json").is_file():
                raise CheckpointError(f"{out_dir / 'last.json'}: nothing to resume")
            record = read_checkpoint_record(out_dir)
            _check_resume_config(record["state"], cfg, run_info or {}, str(out_dir / "last.json"))
            saved_scaler = scaler
            if scaler is not None and "scaler" not in record:
                saved_scaler = None  # an fp16 checkpoint of a version that kept no scaler state
                print(f"{out_dir / 'last.json'}: saved without the fp16 gradient scaler's state (an older cspnet); the "
                      "resumed run starts a fresh scaler, so its steps are not exactly those of an uninterrupted run",
                      file=sys.stderr)
            state = load_checkpoint(out_dir, model=model, optimizer=optimizer, scheduler=scheduler, ema=ema, scaler=saved_scaler)
            if state.get("steps_per_epoch") != steps_per_epoch:
                raise CheckpointError(f"{out_dir / 'last.json'}: the training set changed ({state.get('steps_per_epoch')} steps per epoch then, {steps_per_epoch} now)")
            if not dist.is_main:  # the saved partial-epoch sums are global; count them once
                state["partial"] = {}
        out_dir.mkdir(parents=True, exist_ok=True)
        memory_efficient(model, cfg.memory_efficient)
        train_model = model
        if dist.enabled:
            train_model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        files = _MetricFiles(out_dir, tensorboard and dist.is_main) if dist.is_main else None
        if files is not None and state["history"]:
            files.write(state["history"])

        def save(name: str = "last", weights_only: bool = False) -> None:
            if dist.is_main:
                save_checkpoint(out_dir, model=model, optimizer=None if weights_only else optimizer,
                                scheduler=None if weights_only else scheduler, ema=ema,
                                scaler=None if weights_only else scaler, state=state, name=name)

        imgs_timed, time_timed = 0, 0.0
        while state["step"] < total_steps:
            epoch = state["step"] // steps_per_epoch
            first = state["step"] - epoch * steps_per_epoch
            order = epoch_order(n_train, cfg.seed, epoch)
            chunk_ids = [(s, c) for s in range(first, steps_per_epoch)
                         for c in range(dist.rank * cfg.accum_steps, (dist.rank + 1) * cfg.accum_steps)]
            my_chunks = [order[s * cfg.batch_size + c * chunk: s * cfg.batch_size + (c + 1) * chunk].tolist() for s, c in chunk_ids]
            if getattr(task, "seeded_items", False):
                my_chunks = [item_seeds(ids, chunk_seed(cfg.seed, epoch, s, c)) for ids, (s, c) in zip(my_chunks, chunk_ids)]
            loader = DataLoader(task.train_set, batch_sampler=my_chunks, num_workers=cfg.num_workers,
                                collate_fn=task.collate, persistent_workers=False, pin_memory=device.type == "cuda")
            train_model.train()
            sums = dict(state["partial"]) or {}
            bar = _progress(progress and dist.is_main, steps_per_epoch, first, f"{desc}epoch {epoch + 1}/{cfg.epochs}", bar_position)
            t_epoch, imgs_epoch = time.perf_counter(), 0
            batches = iter(with_worker_errors(loader))
            for step_in_epoch in range(first, steps_per_epoch):
                t_step = time.perf_counter()
                step_sums: dict[str, float] = {}
                for a in range(cfg.accum_steps):
                    c = dist.rank * cfg.accum_steps + a
                    seed = chunk_seed(cfg.seed, epoch, step_in_epoch, c)
                    batch = task.prepare(next(batches), device=device, seed=seed)
                    torch.manual_seed(seed)  # dropout and any other global-RNG use: a function of the chunk
                    sync = contextlib.nullcontext() if (a == cfg.accum_steps - 1 or not dist.enabled) else train_model.no_sync()
                    with sync:
                        with amp_context(cfg.amp, device):
                            loss, stats = task.loss(train_model, batch)
                        scaled = loss / cfg.accum_steps
                        (scaler.scale(scaled) if scaler else scaled).backward()
                    step_sums["loss"] = step_sums.get("loss", 0.0) + float(loss.detach()) * chunk
                    for k, v in stats.items():
                        step_sums[k] = step_sums.get(k, 0.0) + float(v)
                    step_sums["samples"] = step_sums.get("samples", 0.0) + chunk
                finite = torch.tensor([float(math.isfinite(step_sums["loss"]))])
                if all_reduce_sum(finite, dist).item() < dist.world_size:
                    last = out_dir / "last.json"
                    kept = f"the last good checkpoint {last} (step {read_checkpoint_record(out_dir)['state']['step']}) is kept" if last.is_file() else "no checkpoint had been written yet"
                    raise TrainingDiverged(f"the loss became {step_sums['loss'] / chunk} at epoch {epoch + 1}, step {state['step'] + 1}; "
                                           f"lower the learning rate or add --burn-in; {kept}")
                if scaler:
                    scaler.unscale_(optimizer)
                if cfg.grad_clip > 0:
                    nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                if scaler:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                if ema is not None:
                    ema.update(model)
                state["step"] += 1
                for k, v in step_sums.items():
                    sums[k] = sums.get(k, 0.0) + v
                dt = time.perf_counter() - t_step
                imgs_epoch += chunk * cfg.accum_steps * dist.world_size
                imgs_timed += chunk * cfg.accum_steps * dist.world_size
                time_timed += dt
                if bar is not None:
                    rate = imgs_epoch / max(1e-9, time.perf_counter() - t_epoch)
                    eta_run = (total_steps - state["step"]) * cfg.batch_size / max(rate, 1e-9)
                    shown = {k: f"{v / sums['samples']:.3f}" for k, v in sums.items() if k != "samples"}
                    bar.set_postfix(**shown, img_s=f"{rate:.0f}", run_eta=f"{eta_run / 60:.1f}min", refresh=False)
                    bar.update(1)
                if cfg.checkpoint_every and state["step"] % cfg.checkpoint_every == 0 and step_in_epoch + 1 < steps_per_epoch:
                    state["partial"] = _global_sums(sums, dist)
                    save()
            if bar is not None:
                bar.refresh()  # the epoch's final figures, however fast its steps went by
                bar.close()
            totals = _global_sums(sums, dist)
            scored = ema.module if ema is not None else model
            broadcast_buffers(scored, dist)  # every process scores the model rank 0 saves
            metrics = task.evaluate(scored, dist)
            # the rate the epoch's last step used (the optimizer already holds the next step's)
            row = {"epoch": epoch + 1, "step": state["step"], "lr": cfg.lr * schedule(state["step"] - 1)}
            row.update({f"train_{k}": v / totals["samples"] for k, v in totals.items() if k != "samples"})
            row.update({f"val_{k}": v for k, v in metrics.items() if isinstance(v, (int, float))})
            row["img_per_s"] = imgs_epoch / max(1e-9, time.perf_counter() - t_epoch)
            row["epoch_s"] = time.perf_counter() - t_epoch
            state["history"].append(row)
            state["partial"] = {}
            state["epoch"] = epoch + 1
            state["last_eval"] = {k: v for k, v in metrics.items()}
            score = metrics.get(task.metric)
            is_best = score is not None and (state["best"] is None or score > state["best"])
            if is_best:
                state["best"] = score
                # best first: a crash before `last` commits leaves the previous `last`, from which
                # --resume scores the epoch again and writes `best`; the other order could lose it
                save("best", weights_only=True)
            save()
            if files is not None:
                files.write(state["history"])
                if progress:
                    shown = ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())
                    print(f"{desc}{shown}", flush=True)
        barrier(dist)
        return FitResult(state["history"], state.get("last_eval", {}), time.perf_counter() - t_start,
                         imgs_timed / max(time_timed, 1e-9), out_dir)


def _global_sums(sums: dict[str, float], dist: DistInfo) -> dict[str, float]:
    if not dist.enabled:
        return dict(sums)
    keys = list(sums)  # every process adds them in the same order; the metrics keep it (loss, then acc …)
    t = all_reduce_sum(torch.tensor([sums[k] for k in keys], dtype=torch.float64), dist)
    return dict(zip(keys, t.tolist()))


def _progress(enabled: bool, total: int, initial: int, desc: str, position: int):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True, leave=False, position=position)
