"""The main job (``cspnet compare``, ``make demo``): a CSP model against its plain twin on real data.

Both models are trained with the same recipe and seed on Fashion-MNIST at 32x32, then measured
side by side: parameters, multiply-adds / BFLOPs (`cspnet.profile`), training and inference
throughput and peak memory (each in a fresh process, so one model's memory cannot hide in the
other's; memory with `cspnet.bench`'s fixed malloc policy), and test top-1 / top-5. The report is
``report.md`` with PNG plots and ``report.json``.

The paper's claim (§1, Table 3) is *less computation at equal or better accuracy*; the report
prints the ratios CSP / plain so that a reader can check it on this run.
"""
from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch

from .bench import (
    FIXED_MMAP_THRESHOLD, MMAP_THRESHOLD_ENV, MemoryWorkerError, run_memory_worker, sgd_train_step, warm_up_runtime,
)
from .data import ClassificationData
from .engine.checkpoint import CheckpointError, check_run_dir
from .engine.classify import ClassificationTask, ClassifyRecipe
from .engine.distributed import DistInfo, resolve_device
from .engine.models import model_record, rebuild_model
from .engine.train import TrainConfig, fit, plot_curves
from .profile import profile
from .registry import get_spec
from .files import atomic_savefig, atomic_write_text
from .rss import peak_kib, reset_peak_rss, status_kib


@dataclass(frozen=True)
class CompareDefaults:
    """The default pair and recipe: chosen so that ``make demo`` fits in 15 minutes on 2 CPU cores
    and both models pass 88% test top-1 (measured figures in docs/training.md)."""

    models: tuple[str, str] = ("cspresnet10", "resnet10")
    width: float = 0.5
    epochs: int = 6
    batch_size: int = 128
    lr: float = 0.2
    bench_batch: int = 128
    jobs: int = max(1, min(2, os.cpu_count() or 1))


DEFAULTS = CompareDefaults()


# -- measurements in a fresh process ------------------------------------------------------------
def _batch(record: dict[str, Any], img_size: int, batch: int, dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, record["in_chans"], img_size, img_size, generator=g).to(dev)
    return x, torch.randint(0, record["num_classes"], (batch,), generator=g).to(dev)


def peak_train_memory(record: dict[str, Any], img_size: int, batch: int, device: str = "cpu", steps: int = 3) -> float:
    """MiB a process needs to train the model ``record`` describes with ``batch``-image SGD steps.

    Meant for a fresh process (`memory_in_fresh_process`): the growth of the resident set (CPU; on CUDA the
    allocator's peak) from just before the model is built to the peak of the steps, i.e. weights,
    gradients, optimizer state and activations. The steps are `cspnet.bench`'s training step.
    """
    dev = torch.device(device)
    x, y = _batch(record, img_size, batch, dev)
    warm_up_runtime(dev)  # one-off costs of the first optimizer and convolution are not the model's
    base_kb = status_kib("VmRSS")
    exact_peak = reset_peak_rss()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        base_cuda = torch.cuda.memory_allocated(dev)
    step = sgd_train_step(rebuild_model(record).to(dev).train(), x, y)
    for _ in range(steps):
        step()
    if dev.type == "cuda":
        return (torch.cuda.max_memory_allocated(dev) - base_cuda) / 2**20
    # without /proc (no base either): the process's lifetime peak, an upper bound
    return (peak_kib(exact_peak) - (base_kb or 0)) / 1024


def throughput(records: list[dict[str, Any]], img_size: int, batch: int, device: str = "cpu", seconds: float = 2.0,
               rounds: int = 5) -> list[dict[str, float]]:
    """Training (SGD step) and inference images/s of each model, measured in interleaved rounds.

    The models take turns, ``rounds`` times, each turn timing about ``seconds / rounds``; the best
    turn of each model counts. On a machine shared with other work, turns of the same model vary
    by a factor of two or more, and turns taken in the same time window treat the models alike.
    """
    dev = torch.device(device)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def rate(fn, turn_time: float) -> float:
        sync()
        n, t0 = 0, time.perf_counter()
        while n < 2 or time.perf_counter() - t0 < turn_time:
            fn()
            n += 1
        sync()
        return n * batch / (time.perf_counter() - t0)

    jobs = []
    for record in records:
        model = rebuild_model(record).to(dev)
        x, y = _batch(record, img_size, batch, dev)

        def train(model=model, step=sgd_train_step(model, x, y)):
            model.train()
            step()

        def infer(model=model, x=x):
            model.eval()
            with torch.inference_mode():
                model(x)

        train(), train(), infer()  # warm-up
        jobs.append((train, infer))
    best = [{"train_img_per_s": 0.0, "infer_img_per_s": 0.0} for _ in records]
    for _ in range(rounds):
        for b, (train, infer) in zip(best, jobs):
            b["train_img_per_s"] = max(b["train_img_per_s"], rate(train, seconds / rounds))
            b["infer_img_per_s"] = max(b["infer_img_per_s"], rate(infer, seconds / rounds))
    return best


def _in_fresh_process(fn, *args):
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def _with_threads(threads: int | None, fn, *args):
    if threads:
        torch.set_num_threads(threads)
    return fn(*args)


def memory_in_fresh_process(record: dict[str, Any], img_size: int, batch: int, device: str = "cpu",
                            threads: int | None = None, timeout: float = 900) -> dict[str, Any]:
    """`peak_train_memory` in a fresh Python process with the environment of `cspnet.bench`'s memory
    workers (`cspnet.bench.worker_env`): glibc's mmap threshold fixed, so that the resident set follows
    the live tensors. With glibc's adaptive default, how many freed blocks malloc keeps depends on the
    order of allocations, and repeated runs of one pair gave CSP / plain ratios from 1.00x to 1.25x.

    Returns ``peak_mem_mib`` and the ``malloc_mmap_threshold`` the worker ran with; raises `RuntimeError`
    when the worker fails or runs past ``timeout`` seconds (`cspnet.bench.run_memory_worker`).
    """
    threads = threads or torch.get_num_threads()
    cmd = [sys.executable, "-m", "cspnet.compare", "--memory-worker", json.dumps(record), str(img_size), str(batch),
           device, str(threads)]
    try:
        return run_memory_worker(cmd, threads, return_freed_memory=True, timeout=timeout)
    except MemoryWorkerError as e:
        raise RuntimeError(f"the memory worker for {record['name']} failed: {e}") from None


def _memory_worker(argv: list[str]) -> None:
    record, img_size, batch, device, threads = json.loads(argv[0]), int(argv[1]), int(argv[2]), argv[3], int(argv[4])
    torch.set_num_threads(threads)
    peak = peak_train_memory(record, img_size, batch, device)
    print(json.dumps({"peak_mem_mib": peak, "malloc_mmap_threshold": os.environ.get(MMAP_THRESHOLD_ENV)}))


def measure_models(records: list[dict[str, Any]], img_size: int, batch: int, device: str = "cpu",
                   threads: int | None = None, seconds: float = 2.0) -> list[dict[str, float]]:
    """Peak training memory (one fresh process per model, `memory_in_fresh_process`) and throughput
    (one process, interleaved)."""
    speeds = _in_fresh_process(_with_threads, threads, throughput, records, img_size, batch, device, seconds)
    for record, speed in zip(records, speeds):
        speed["peak_mem_mib"] = memory_in_fresh_process(record, img_size, batch, device, threads)["peak_mem_mib"]
    return speeds


# -- the job --------------------------------------------------------------------------------------
def train_one(name: str, width: float, data: ClassificationData, cfg: TrainConfig, recipe: ClassifyRecipe, out: Path,
              device: str, progress: bool, position: int = 0, threads: int | None = None) -> dict[str, Any]:
    """Train one model of the comparison (in this process or a worker); its history and test metrics."""
    if threads:
        torch.set_num_threads(threads)
    record = model_record(name, num_classes=data.num_classes, in_chans=data.in_chans, width=width)
    model = rebuild_model(record, seed=cfg.seed)  # same seed, same recipe for every model
    run_info = {"model": record, "data": data.describe(), "recipe": asdict(recipe)}
    t0 = time.perf_counter()
    result = fit(ClassificationTask(data, recipe), model, cfg, out / name, dist=DistInfo(device=resolve_device(device)),
                 progress=progress, run_info=run_info, desc=f"{name}: ", bar_position=position)
    return {"record": record, "history": result.history, "final": result.final, "threads": torch.get_num_threads(),
            "train_img_per_s": result.train_img_per_s, "train_wall_s": time.perf_counter() - t0}


def run_compare_models(
    models: tuple[str, ...] | list[str],
    data: ClassificationData,
    cfg: TrainConfig,
    recipe: ClassifyRecipe,
    out: str | os.PathLike,
    *,
    width: float = DEFAULTS.width,
    jobs: int = 1,
    bench_batch: int = DEFAULTS.bench_batch,
    bench_seconds: float = 2.0,
    device: str = "cpu",
    progress: bool = True,
    command: str = "",
) -> dict[str, Any]:
    """Train every model in ``models`` with ``cfg`` / ``recipe`` on ``data``; write the report to ``out``.

    ``jobs > 1`` trains that many models at once, each in its own process with an equal share of
    the CPU threads: on a small CPU two single-threaded runs side by side finish sooner than two
    two-threaded runs one after the other (small convolutions scale poorly over threads).
    Throughput (interleaved rounds, see `throughput`) and memory are measured afterwards, with all threads.
    """
    t0 = time.perf_counter()
    out = Path(out)
    if len(models) < 2:
        raise ValueError(f"compare needs at least two models, got {list(models)}")
    if len(set(models)) < len(models):  # each model trains into OUT/<name>
        raise ValueError(f"compare needs different models, got {list(models)}")
    for name in models:
        get_spec(name)  # unknown names fail before any training
    trained = []
    for name in models:  # a comparison's models are work too: never overwritten (the rule of `cspnet train`)
        try:
            check_run_dir(out / name, resume=False)
        except CheckpointError:
            trained.append(name)
    if trained:
        raise ValueError(f"{out}: holds trained runs of {', '.join(trained)} from an earlier comparison; "
                         "give another --out, or delete the folder to run it again")
    out.mkdir(parents=True, exist_ok=True)
    jobs = max(1, min(jobs, len(models)))
    threads = torch.get_num_threads()
    bench_device = resolve_device(device).type
    if jobs == 1:
        runs = [train_one(name, width, data, cfg, recipe, out, device, progress) for name in models]
    else:
        per_job = max(1, threads // jobs)
        with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn")) as pool:
            futures = [pool.submit(train_one, name, width, data, cfg, recipe, out, device, progress, i, per_job)
                       for i, name in enumerate(models)]
            runs = [f.result() for f in futures]
    benches = measure_models([run["record"] for run in runs], data.img_size, bench_batch, bench_device, threads, bench_seconds)
    rows, histories = [], {}
    for name, run, bench in zip(models, runs, benches):
        prof = profile(rebuild_model(run["record"]), data.img_size)
        histories[name] = run["history"]
        final = run["final"]
        rows.append({
            "name": name, "width": width, "params": prof.params, "conv_params": prof.conv_params, "macs": prof.macs,
            "bflops": prof.bflops, "top1": final["top1"], "top5": final["top5"],
            "test_loss": final["loss"], "per_class": final["per_class"],
            "train_img_per_s": bench["train_img_per_s"], "infer_img_per_s": bench["infer_img_per_s"],
            "peak_mem_mib": bench["peak_mem_mib"], "train_img_per_s_during_run": run["train_img_per_s"],
            "train_threads": run["threads"], "train_wall_s": run["train_wall_s"], "run_dir": str(out / name),
        })
    report = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "data": data.describe(),
        "recipe": {**cfg.as_dict(), **asdict(recipe)},
        "bench": {"batch": bench_batch, "threads": threads, "device": bench_device},
        "jobs": jobs,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": sys.version.split()[0],
                    "torch": torch.__version__},
        "models": rows,
        "ratios": _ratios(rows[0], rows[1]),
        "wall_s": None,
    }
    plot_curves(histories, out / "curves.png", title=f"{' vs '.join(models)} on {data.name} ({data.img_size}x{data.img_size})")
    plot_bars(rows, out / "bars.png")
    report["wall_s"] = time.perf_counter() - t0
    atomic_write_text(out / "report.json", json.dumps(report, indent=1) + "\n")
    atomic_write_text(out / "report.md", format_report(report, histories))
    return report


def _ratios(csp: dict[str, Any], plain: dict[str, Any]) -> dict[str, float]:
    keys = ("params", "bflops", "train_img_per_s", "infer_img_per_s", "peak_mem_mib")
    out = {k: csp[k] / plain[k] for k in keys if plain[k]}
    out["top1_diff_pp"] = 100 * (csp["top1"] - plain["top1"])
    return out


def plot_bars(rows: list[dict[str, Any]], path: Path) -> Path:
    """Side-by-side bars: parameters, BFLOPs, throughput, peak memory and top-1 per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("params", "parameters (M)", 1e-6), ("bflops", "BFLOPs / image", 1.0),
              ("train_img_per_s", "train images/s", 1.0), ("infer_img_per_s", "inference images/s", 1.0),
              ("peak_mem_mib", "peak train memory (MiB)", 1.0), ("top1", "test top-1 (%)", 100.0)]
    fig, axes = plt.subplots(1, len(panels), figsize=(3 * len(panels), 3.2))
    names = [r["name"] for r in rows]
    colors = ["tab:green", "tab:gray", "tab:blue", "tab:orange"][: len(rows)]
    for ax, (key, title, scale) in zip(axes, panels):
        values = [r[key] * scale for r in rows]
        ax.bar(names, values, color=colors)
        for i, v in enumerate(values):
            ax.text(i, v, f"{v:.4g}", ha="center", va="bottom", fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.tick_params(axis="x", labelsize=8)
        if key == "top1":
            ax.set_ylim(max(0.0, min(values) - 10), 100)
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=100)
    return path


def accuracy_verdict(top1: float, other_top1: float, test_size: int) -> str:
    """Whether a top-1 difference on ``test_size`` images stands out of the test set's sampling error:
    beyond two standard errors of the difference, sqrt(p1 (1 - p1) / n + p2 (1 - p2) / n). (Another
    seed moves accuracy more than that; this only says what one run can tell.)"""
    diff = 100 * (top1 - other_top1)
    two_se = 200 * math.sqrt((top1 * (1 - top1) + other_top1 * (1 - other_top1)) / test_size)
    resolution = f"±{two_se:.2f} pp is two standard errors on {test_size:,} test images"
    if abs(diff) <= two_se:
        return f"is as accurate within this run's resolution ({diff:+.2f} pp top-1; {resolution})"
    return f"is {abs(diff):.2f} pp {'more' if diff > 0 else 'less'} accurate on this run ({resolution})"


def _percent(fraction: float | None) -> str:
    return "—" if fraction is None else f"{100 * fraction:.2f}%"  # None: top-5 of 5 classes or fewer says nothing


def format_report(report: dict[str, Any], histories: dict[str, list[dict[str, Any]]]) -> str:
    """The Markdown report."""
    rows, ratios, data = report["models"], report["ratios"], report["data"]
    csp, plain = rows[0]["name"], rows[1]["name"]
    lines = [
        f"# {csp} vs {plain} on {data['name']} ({data['img_size']}x{data['img_size']})",
        "",
        f"Run {report['created']}, {report['machine']['cpus']} CPU(s), torch {report['machine']['torch']}; "
        f"wall time {report['wall_s'] / 60:.1f} min. Command: `{report['command']}`.",
        f"Both models: width x{rows[0]['width']}, {report['recipe']['epochs']} epochs, batch {report['recipe']['batch_size']}, "
        f"{report['recipe']['optimizer']} lr {report['recipe']['lr']}, {report['recipe']['schedule']} schedule, "
        f"seed {report['recipe']['seed']}; {data['train_size']} training / {data['test_size']} test images.",
        "",
        "| model | params | BFLOPs | MMACs | train img/s | infer img/s | peak train mem (MiB) | top-1 | top-5 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['name']} | {r['params']:,} | {r['bflops']:.4f} | {r['macs'] / 1e6:.2f} | {r['train_img_per_s']:.0f} | "
                     f"{r['infer_img_per_s']:.0f} | {r['peak_mem_mib']:.0f} | {100 * r['top1']:.2f}% | {_percent(r['top5'])} |")
    lines.append(f"| **{csp} / {plain}** | {ratios.get('params', 0):.2f}x | {ratios.get('bflops', 0):.2f}x | | "
                 f"{ratios.get('train_img_per_s', 0):.2f}x | {ratios.get('infer_img_per_s', 0):.2f}x | "
                 f"{ratios.get('peak_mem_mib', 0):.2f}x | {ratios['top1_diff_pp']:+.2f} pp | |")
    saved = 100 * (1 - ratios.get("bflops", 1))
    during = ", ".join(f"{r['name']} {r['train_img_per_s_during_run']:.0f}" for r in rows)
    verdict = accuracy_verdict(rows[0]["top1"], rows[1]["top1"], data["test_size"])
    lines += [
        "",
        f"{csp} needs {saved:.0f}% {'fewer' if saved >= 0 else 'more'} multiply-adds than {plain} and {verdict}.",
        f"Throughput is the best of 5 turns the models took alternately in one fresh process, peak memory the growth "
        f"of a fresh process per model, glibc's mmap threshold fixed at {FIXED_MMAP_THRESHOLD // 1024} KiB as in `cspnet bench` "
        f"(batch {report['bench']['batch']}, {report['bench']['threads']} thread(s), "
        f"{report['bench']['device']}); the images/s seen during training "
        f"were {during} ({report['jobs']} model(s) trained at a time, {rows[0]['train_threads']} thread(s) each).",
        "",
        "![loss and accuracy per epoch](curves.png)",
        "",
        "![side by side](bars.png)",
        "",
        "## Per epoch",
        "",
        "| model | epoch | lr | train loss | train acc | test loss | test top-1 | img/s | epoch s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, hist in histories.items():
        for h in hist:
            lines.append(f"| {name} | {h['epoch']} | {h['lr']:.4f} | {h['train_loss']:.4f} | {100 * h.get('train_acc', 0):.2f}% | "
                         f"{h.get('val_loss', float('nan')):.4f} | {100 * h.get('val_top1', 0):.2f}% | {h['img_per_s']:.0f} | {h['epoch_s']:.0f} |")
    lines += ["", "## Per-class test accuracy", "", "| class | " + " | ".join(r["name"] for r in rows) + " |",
              "|---|" + "---:|" * len(rows)]
    for cls in rows[0]["per_class"]:
        lines.append(f"| {cls} | " + " | ".join("-" if r["per_class"][cls] is None else f"{100 * r['per_class'][cls]:.1f}%"
                                                  for r in rows) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # the memory worker of `memory_in_fresh_process`
    if sys.argv[1:2] != ["--memory-worker"]:
        raise SystemExit("usage: python -m cspnet.compare --memory-worker RECORD_JSON IMG_SIZE BATCH DEVICE THREADS")
    _memory_worker(sys.argv[2:])
