"""The benchmark suite: speed and memory of our models, side by side, in one run.

What one run measures (``run_benchmarks``), per *group* = a model and its plain twin
(``get_spec(name).twin``):

- inference at each batch size: our eager model (NCHW and channels-last), `cspnet.deploy`
  (plain, and with Winograd 3x3 convs),
  onnxruntime on the ONNX export, and timm's same model (NCHW and channels-last) where timm
  has one with the same architecture (`TIMM_EQUIVALENTS`);
- a training step (zero_grad, forward, cross-entropy, backward, SGD step) of ours and timm's;
- achieved GFLOP/s (2 x conv/linear MACs from `cspnet.profile` / median time) against the
  machine's measured GEMM and 3x3-conv peak (`measure_peak`);
- memory of a training step in a fresh subprocess per model (`measure_memory`), of ours plain
  and memory-efficient (`cspnet.layers.memory_efficient`) and of timm's: peak RSS, the peak of
  live tensors and the bytes the forward pass holds for backward (both from torch.profiler), and
  on CUDA ``torch.cuda.max_memory_allocated``; CIO (`cspnet.profile`) beside it.

Timing method: every callable of a group is warmed up, then the callables run round-robin
(A B C … A B C …) ``repeats`` times and each reports its median. On a shared, noisy machine
only ratios measured this way, side by side, mean anything: load drifts hit every entry alike.
CPU runs use ``time.perf_counter``; CUDA runs use CUDA events.

Ratios are written "×" with >1 meaning ours is faster (time of the other / time of ours). Ours
against timm's also gets a 95 % interval: each round timed both, so each round gives one ratio,
and `median_interval` bounds the median of those ratios without assuming their distribution.
"""
from __future__ import annotations

import copy
import dataclasses
import datetime as _dt
import gc
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .layers import memory_efficient as set_memory_efficient
from .files import atomic_write_text
from .profile import profile
from .registry import create_model, get_spec, list_models
from .rss import peak_kib, status_kib
from .rss import reset_peak_rss as _reset_peak_rss

# Our model -> (timm model, how the two correspond). Only architectures that correspond layer for
# layer (or nearly, as stated) are mapped; timm's resnet50 / resnext50_32x4d have projection
# shortcuts and a 3x3 max-pool, unlike the Darknet cfgs' resnet50 / resnext50, so those are not.
TIMM_EQUIVALENTS: dict[str, tuple[str, str]] = {
    "cspdarknet53": ("cspdarknet53", "identical layers and parameter count (csdarknet53.cfg)"),
    "darknet53": ("darknet53", "identical layers and parameter count (timm's LeakyReLU slope is 0.01, ours 0.1)"),
    "cspresnet50": ("cspresnet50", "same network from csresnet50.cfg; timm's stage 1 widens its split "
                    "(one 64->256 1x1 instead of 64->128 + 64->64) and uses a 3x3/2 max-pool: +8,320 params"),
    "cspresnext50": ("cspresnext50", "same network from csresnext50.cfg; timm's stage 1 differs as for "
                     "cspresnet50 (+12,416 params) and it uses a 3x3/2 max-pool"),
    "cspdarknet53_timm": ("cspdarknet53", "timm's layout module for module (loads its weights)"),
    "darknet53_timm": ("darknet53", "timm's layout module for module (loads its weights)"),
    "cspresnet50_timm": ("cspresnet50", "timm's layout module for module (loads its weights)"),
    "cspresnext50_timm": ("cspresnext50", "timm's layout module for module (loads its weights)"),
    "resnet50_tv": ("resnet50", "torchvision's resnet50 layout, which timm's resnet50 shares"),
    "resnext50_tv": ("resnext50_32x4d", "torchvision's resnext50_32x4d layout, which timm's shares"),
}

DEFAULT_MODELS = ("cspresnet50", "cspresnext50", "cspdarknet53")
EAGER_VARIANTS = ("eager", "eager_cl")
TRAIN_VARIANTS = ("train", "train_cl")
NO_SLOWDOWN_TARGET = "no significant slowdown vs timm (95% interval of the median ratio ours × timm reaches 1.0)"
INTERVAL_NOTE = ("[a, b] after ours × timm: 95 % interval of the median of per-round ratios (each round timed both; "
                 "`cspnet.bench.median_interval`), given from 6 rounds on.")
MIB = 1024 * 1024
# Our models trained memory-efficiently (`cspnet.layers.memory_efficient`): the ``impl`` of their
# memory rows and the ``variant`` of their (NCHW) training-step timings.
OURS_MEMORY_EFFICIENT = "ours, memory-efficient"
TRAIN_MEMORY_EFFICIENT = "train_memory_efficient"
# glibc's malloc serves a block from its heap once a freed mapped block of that size or larger raised
# its dynamic mmap threshold (up to 32 MiB), and keeps heap blocks after they are freed; so how much
# peak RSS exceeds the live tensors depends on the order of allocations (cspdarknet53: 1551 and 1715
# MiB over two runs, 1216 MiB live). A fixed threshold stops that adapting: every tensor of 128 KiB
# or more is its own mapping, returned to the OS when freed, and peak RSS follows what is live.
MMAP_THRESHOLD_ENV = "MALLOC_MMAP_THRESHOLD_"
FIXED_MMAP_THRESHOLD = 128 * 1024


@dataclass(frozen=True)
class BenchConfig:
    """What to measure. ``quick`` configs (`quick_config`) exist to test the bookkeeping."""

    models: tuple[str, ...] = DEFAULT_MODELS
    twins: bool = True
    input_size: int = 224
    batch_sizes: tuple[int, ...] = (1, 8)
    train_batch: int = 8
    train_formats: tuple[str, ...] = ("contiguous",)
    threads: int = 2
    warmup: int = 2
    repeats: int = 7
    train_warmup: int = 2
    train_repeats: int = 7  # 6+ rounds give ours × timm a 95 % interval (median_interval)
    device: str = "cpu"
    deploy: bool = True
    winograd: bool = True  # also deploy(winograd=True), on the CPU
    onnx: bool = True
    timm: bool = True
    memory: bool = True
    memory_efficient: bool = True  # also measure our models trained with `cspnet.layers.memory_efficient`
    keep_freed_memory: bool = False  # `cspnet.export.keep_freed_memory` for this whole process
    return_freed_memory: bool = True  # memory workers run with FIXED_MMAP_THRESHOLD (see MMAP_THRESHOLD_ENV)
    quick: bool = False
    progress: bool = True


def quick_config(models: tuple[str, ...] = ("cspresnet10",), **overrides: Any) -> BenchConfig:
    """A seconds-long configuration: 64 px, batches 1 and 2, one warm-up and two timed runs.

    One thread: on a loaded 2-core machine a 2-thread run waits at every parallel region for
    a descheduled thread (a 64 px ResNet-50 forward goes from 0.1 s to 4 s), and quick runs
    only check the bookkeeping.
    """
    base = dict(
        models=tuple(models), input_size=64, batch_sizes=(1, 2), train_batch=2, warmup=1, repeats=2,
        train_warmup=1, train_repeats=2, threads=1, quick=True, progress=False,
    )
    base.update(overrides)
    return BenchConfig(**base)


@dataclass
class Timing:
    """The timed samples of one callable: ``impl`` is ``ours`` or ``timm``."""

    model: str
    impl: str
    variant: str
    batch: int
    samples_ms: list[float]

    @property
    def median_ms(self) -> float:
        return statistics.median(self.samples_ms)


@dataclass
class BenchReport:
    config: BenchConfig
    env: dict[str, Any]
    peak: dict[str, Any]
    groups: list[list[str]]
    timm_names: dict[str, str]
    profiles: dict[str, dict[str, Any]]
    timings: list[Timing] = field(default_factory=list)
    memory: dict[str, dict[str, Any]] = field(default_factory=dict)
    # "model, batch N" -> how many layers deploy(winograd=True) computed by Winograd (`winograd_layers_run`)
    winograd_layers: dict[str, int] = field(default_factory=dict)

    # -- look-ups --------------------------------------------------------------------------
    def timing(self, model: str, impl: str, variant: str, batch: int) -> Timing | None:
        for t in self.timings:
            if (t.model, t.impl, t.variant, t.batch) == (model, impl, variant, batch):
                return t
        return None

    def median(self, model: str, impl: str, variant: str, batch: int) -> float | None:
        t = self.timing(model, impl, variant, batch)
        return None if t is None else t.median_ms

    def fastest_timing(self, model: str, impl: str, variants: tuple[str, ...], batch: int) -> Timing | None:
        """The timing with the lowest median among ``variants`` that were measured (None if none was)."""
        timings = [t for t in (self.timing(model, impl, v, batch) for v in variants) if t is not None]
        return min(timings, key=lambda t: t.median_ms, default=None)

    def fastest(self, model: str, impl: str, variants: tuple[str, ...], batch: int) -> float | None:
        """The lowest median among ``variants`` that were measured (None if none was)."""
        t = self.fastest_timing(model, impl, variants, batch)
        return None if t is None else t.median_ms

    def timm_round_ratios(self, model: str, variants: tuple[str, ...], batch: int) -> list[float] | None:
        """ours × timm in each round (each round timed both), each side in its fastest of ``variants``."""
        ours = self.fastest_timing(model, "ours", variants, batch)
        theirs = self.fastest_timing(model, "timm", variants, batch)
        if ours is None or theirs is None:
            return None
        return [t / o for t, o in zip(theirs.samples_ms, ours.samples_ms)]

    def timm_speedup_interval(self, model: str, variants: tuple[str, ...], batch: int) -> tuple[float, float] | None:
        """95 % interval of the median of ours × timm's per-round ratios (`timm_round_ratios`)."""
        ratios = self.timm_round_ratios(model, variants, batch)
        return None if ratios is None else median_interval(ratios)

    def best_eager(self, model: str, impl: str, batch: int) -> float | None:
        return self.fastest(model, impl, EAGER_VARIANTS, batch)

    def winograd_count(self, model: str, batch: int) -> int | None:
        """Layers deploy(winograd=True) computed by Winograd at ``batch`` (None: not deployed so)."""
        return self.winograd_layers.get(_batch_key(model, batch))

    def best_deploy(self, model: str, batch: int) -> float | None:
        """The faster of plain and Winograd deploy; plain alone where Winograd computed no layer, as
        deploy+W then ran the plain network: the faster of two timings of one network is just noise."""
        variants = ("deploy", "deploy_winograd") if self.winograd_count(model, batch) else ("deploy",)
        return self.fastest(model, "ours", variants, batch)

    def conv_peak(self, model: str, batch: int) -> float:
        """Conv-peak GFLOP/s measured inside ``model``'s group at ``batch`` (else the start-of-run probe)."""
        group = next((g for g in self.groups if model in g), [model])
        t = self.median(peak_key(group), "peak", "conv_cl", batch)
        return self.peak["conv_gflops"] if t is None else self.peak["conv_flops"] / (t / 1e3) / 1e9

    def gflops_per_s(self, model: str, impl: str, variant: str, batch: int) -> float | None:
        t = self.median(model, impl, variant, batch)
        prof = self.profiles.get(_key(impl, model))
        if t is None or prof is None:
            return None
        return 2 * prof["macs"] * batch / (t / 1e3) / 1e9

    def as_dict(self) -> dict[str, Any]:
        return {
            "config": dataclasses.asdict(self.config),
            "env": self.env,
            "peak": self.peak,
            "groups": self.groups,
            "timm_names": self.timm_names,
            "profiles": self.profiles,
            "timings": [dataclasses.asdict(t) | {"median_ms": t.median_ms} for t in self.timings],
            "memory": self.memory,
            "winograd_layers": self.winograd_layers,
            "targets": [dataclasses.asdict(c) for c in check_targets(self)],
        }


@dataclass(frozen=True)
class TargetCheck:
    """One target row. Rows judged on per-round ratios also carry the 95 % ``interval`` of their
    median (``value``) and how many ``rounds`` it came from."""

    target: str
    subject: str
    value: float
    threshold: float
    passed: bool
    interval: tuple[float, float] | None = None
    rounds: int | None = None


def median_interval_rank(n: int, confidence: float = 0.95) -> int:
    """The k for which [k-th smallest, k-th largest] of ``n`` values covers their median (0: no k does).

    The median lies below the k-th smallest value with probability P(Binomial(n, 1/2) < k), so
    the interval covers it with at least ``confidence`` for the largest k keeping that within
    the tail. k is 1, the interval [min, max], for 6-8 values at 95 %; 0 for fewer than 6.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    tail = (1 - confidence) / 2
    k, below = 0, 0.0
    while k < n and below + math.comb(n, k) / 2**n <= tail:
        below += math.comb(n, k) / 2**n
        k += 1
    return k


def median_interval(values: list[float], confidence: float = 0.95) -> tuple[float, float] | None:
    """A distribution-free interval for the median of ``values``: two order statistics
    (`median_interval_rank`). None when there are too few values (fewer than 6 at 95 %)."""
    n, k = len(values), median_interval_rank(len(values), confidence)
    if k == 0:
        return None
    ordered = sorted(values)
    return ordered[k - 1], ordered[n - k]


def _key(impl: str, model: str) -> str:
    return f"{impl}:{model}"


def _batch_key(model: str, batch: int) -> str:
    return f"{model}, batch {batch}"


def peak_key(group: list[str]) -> str:
    """The pseudo model name under which a group's conv-peak probe is timed."""
    return f"conv-peak[{group[0]}]"


# --------------------------------------------------------------------------------------------
# Timing


class Clock:
    """Times one call: ``perf_counter`` on CPU, CUDA events (after a synchronize) on CUDA."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn: Callable[[], Any]) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        start_s = time.perf_counter()
        fn()
        return (time.perf_counter() - start_s) * 1e3


def run_interleaved(fns: dict[Any, Callable[[], Any]], warmup: int, repeats: int, clock: Clock) -> dict[Any, list[float]]:
    """Warm every callable up, then time them round-robin ``repeats`` times (ms samples).

    Each round starts one entry later than the last, so no entry always runs first: the first
    call after a round's big frees pays for the memory the C library handed back to the kernel,
    which with a fixed order would always be billed to the same model.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    keys = list(fns)
    samples: dict[Any, list[float]] = {k: [] for k in keys}
    for r in range(repeats):
        start = r % len(keys)
        for k in keys[start:] + keys[:start]:
            samples[k].append(clock(fns[k]))
    return samples


def peak_conv(device: torch.device, quick: bool) -> tuple[Callable[[], Any], Callable[[], Any], tuple[int, ...], int]:
    """The peak-probe convolution: (NCHW call, channels-last call, input shape, FLOPs per call).

    A 3x3, C -> C convolution with C = 256 on 8 x 56 x 56 (quick: 32 on 1 x 16 x 16), the
    shape of a mid-network ResNet layer.
    """
    shape = (1, 32, 16, 16) if quick else (8, 256, 56, 56)
    x = torch.randn(*shape, device=device)
    w = torch.randn(shape[1], shape[1], 3, 3, device=device) * 0.01
    x_cl, w_cl = x.contiguous(memory_format=torch.channels_last), w.contiguous(memory_format=torch.channels_last)
    flops = 2 * shape[0] * shape[1] * shape[2] * shape[3] * shape[1] * 9

    def nchw():
        with torch.inference_mode():
            return F.conv2d(x, w, padding=1)

    def channels_last():
        with torch.inference_mode():
            return F.conv2d(x_cl, w_cl, padding=1)

    return nchw, channels_last, shape, flops


def measure_peak(device: str | torch.device = "cpu", quick: bool = False, repeats: int = 5) -> dict[str, Any]:
    """The machine's fp32 peak as this PyTorch reaches it: a large GEMM and a large 3x3 conv.

    Returns GFLOP/s for the GEMM (``n x n`` by ``n x n``) and for the convolution (`peak_conv`)
    in NCHW and channels-last; ``conv_gflops`` is the better of the two layouts. The suite also
    runs the channels-last probe inside every group, so each "% of conv peak" compares numbers
    taken side by side.
    """
    device = torch.device(device)
    n = 256 if quick else 2048
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    conv, conv_cl, shape, conv_flops = peak_conv(device, quick)
    with torch.inference_mode():
        t = run_interleaved(
            {"gemm": lambda: torch.mm(a, b), "conv": conv, "conv_cl": conv_cl},
            warmup=1 if quick else 2, repeats=2 if quick else repeats, clock=Clock(device),
        )
    result = {
        "gemm_n": n,
        "gemm_gflops": 2 * n**3 / (statistics.median(t["gemm"]) / 1e3) / 1e9,
        "conv_shape": list(shape),
        "conv_flops": conv_flops,
        "conv_gflops_nchw": conv_flops / (statistics.median(t["conv"]) / 1e3) / 1e9,
        "conv_gflops_cl": conv_flops / (statistics.median(t["conv_cl"]) / 1e3) / 1e9,
    }
    result["conv_gflops"] = max(result["conv_gflops_nchw"], result["conv_gflops_cl"])
    return result


# --------------------------------------------------------------------------------------------
# Models


def timm_available() -> bool:
    try:
        import timm  # noqa: F401
    except ImportError:
        return False
    return True


def timm_name(model: str) -> str | None:
    """timm's name for the same architecture as our ``model``, or None (see `TIMM_EQUIVALENTS`)."""
    entry = TIMM_EQUIVALENTS.get(model)
    return entry[0] if entry else None


def build(impl: str, name: str) -> nn.Module:
    """Our model (``impl="ours"``) or timm's (``impl="timm"``, by timm's name), randomly initialised."""
    if impl == "ours":
        return create_model(name)
    if impl == "timm":
        import timm

        return timm.create_model(name, pretrained=False)
    raise ValueError(f"unknown implementation {impl!r}; expected 'ours' or 'timm'")


def make_groups(models: tuple[str, ...], twins: bool) -> list[list[str]]:
    """Each model with its plain twin (when it has one), as [CSP model, twin], every model once.

    A twin listed before its CSP model joins that model's group all the same; groups come in the
    order their first member was listed. A model already paired is not paired again (a CSP
    model that is also an elastic model's twin pairs with whichever was listed first).
    """
    for name in models:
        get_spec(name)  # unknown names fail here, with suggestions
    csp_of: dict[str, str] = {}  # twin -> its CSP model
    paired: set[str] = set()
    for name in models:
        twin = get_spec(name).twin if twins else None
        if twin and twin != name and not {name, twin} & paired:
            csp_of[twin] = name
            paired.update((name, twin))
    twin_of = {csp: twin for twin, csp in csp_of.items()}
    groups, seen = [], set()
    for name in models:
        csp = csp_of.get(name, name)
        if csp in seen:
            continue
        group = [csp] + ([twin_of[csp]] if csp in twin_of else [])
        seen.update(group)
        groups.append(group)
    return groups


# --------------------------------------------------------------------------------------------
# Memory (fresh process per model)


def _status_mib(field_name: str) -> float:
    kib = status_kib(field_name)
    if kib is None:
        raise ValueError(f"/proc/self/status has no {field_name}")
    return kib / 1024


def _profile_memory(device: torch.device, **kwargs: Any):
    from torch.profiler import ProfilerActivity, profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    return torch_profile(activities=activities, profile_memory=True, **kwargs)


def saved_activation_bytes(model: Callable[[torch.Tensor], Any], x: torch.Tensor) -> int:
    """Bytes that ``model(x)`` allocates and still holds when it returns (from torch.profiler).

    That is what autograd keeps for the backward pass, plus the output; tensors made before the
    call (the input, parameters) do not count. Unlike counting through saved-tensor hooks, this
    also sees memory-efficient layers (`cspnet.layers.memory_efficient`), whose own hooks would
    hide their saved tensors from an outer hook.
    """
    with _profile_memory(x.device) as prof:
        out = model(x)
    del out
    field_name = "self_device_memory_usage" if x.device.type == "cuda" else "self_cpu_memory_usage"
    return sum(getattr(e, field_name) for e in prof.key_averages())


def tensor_peak_bytes(step: Callable[[], Any], device: torch.device) -> int:
    """Peak bytes of live tensors on ``device`` during ``step()`` (torch.profiler's memory timeline).

    The counterpart of ``torch.cuda.max_memory_allocated`` for any device: what the tensors
    need, whatever the C library's allocator keeps besides (peak RSS includes that).
    """
    with _profile_memory(device, record_shapes=True, with_stack=True) as prof:
        step()
    with tempfile.TemporaryDirectory(prefix="cspnet-memory-") as tmp:
        path = Path(tmp) / "timeline.json"
        index = device.index if device.index is not None else (torch.cuda.current_device() if device.type == "cuda" else None)
        prof.export_memory_timeline(str(path), device=device.type if index is None else f"{device.type}:{index}")
        _times, sizes = json.loads(path.read_text())
    return max((sum(row) for row in sizes), default=0)


def sgd_train_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    """One training step as the suite times and measures it: zero_grad, forward, cross-entropy,
    backward, SGD step (lr 0.01, momentum 0.9, weight decay 1e-4; an optimizer of its own)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    return step


def warm_up_runtime(device: torch.device) -> None:
    # The first optimizer imports torch's compile machinery (~150 MiB of RSS) and the first conv /
    # BN / backward initialise kernel libraries; do both before the baseline so that neither is
    # charged to the model.
    layer = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.LeakyReLU(0.1)).to(device)
    opt = torch.optim.SGD(layer.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    layer(torch.randn(2, 3, 16, 16, device=device)).sum().backward()
    opt.step()


def measure_memory(impl: str, name: str, batch: int, input_size: int, device: str = "cpu", steps: int = 2,
                   memory_efficient: bool = False) -> dict[str, Any]:
    """Memory of training ``name`` in this process (call it in a fresh one: see `memory_in_subprocess`).

    Returns MiB: ``rss_base`` (after imports), ``rss_model`` (model, batch and optimizer built, before
    the first step: SGD allocates its momentum at its first step), ``rss_peak`` (peak RSS, ``VmHWM``
    reset after the imports, over ``steps`` training steps), ``train`` = peak - base (parameters,
    gradients, optimizer state, activations, workspace), ``step`` = peak - model (all of those but
    the parameters),
    ``tensor_peak`` (live tensors at the peak of one more step, see `tensor_peak_bytes`: the
    same as ``train`` without the allocator's cached free memory) and ``activations`` (held
    for backward, see `saved_activation_bytes`); on CUDA also ``cuda_peak``
    (``max_memory_allocated`` during the steps) and ``cuda_step`` (that minus the memory held
    before them, so it too counts gradients and momentum). ``memory_efficient`` trains our model with `cspnet.layers.memory_efficient`.
    ``malloc_mmap_threshold`` is glibc's fixed mmap threshold this process runs with, if any (see
    ``MMAP_THRESHOLD_ENV``).
    """
    dev = torch.device(device)
    if impl == "timm":
        if memory_efficient:
            raise ValueError("memory_efficient applies to our models only, not timm's")
        import timm  # noqa: F401
    list_models()  # import every model family now: module imports are not the model's memory
    warm_up_runtime(dev)
    gc.collect()
    was_reset = _reset_peak_rss()
    rss_base = _status_mib("VmRSS")
    model = build(impl, name).to(dev).train()
    if memory_efficient:
        set_memory_efficient(model)
    x = torch.randn(batch, 3, input_size, input_size, device=dev)
    num_classes = model.num_classes if getattr(model, "num_classes", 0) else 1000
    y = torch.randint(0, num_classes, (batch,), device=dev)
    train_step = sgd_train_step(model, x, y)
    rss_model = _status_mib("VmRSS")
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(dev)
        held = torch.cuda.memory_allocated(dev)

    for _ in range(steps):
        train_step()
    result: dict[str, Any] = {"impl": impl, "model": name, "batch": batch, "input_size": input_size,
                              "memory_efficient": memory_efficient,
                              "malloc_mmap_threshold": os.environ.get(MMAP_THRESHOLD_ENV)}
    if dev.type == "cuda":
        torch.cuda.synchronize()
        result["cuda_peak"] = torch.cuda.max_memory_allocated(dev) / MIB
        result["cuda_step"] = (torch.cuda.max_memory_allocated(dev) - held) / MIB
    rss_peak = peak_kib(was_reset) / 1024
    tensor_peak = tensor_peak_bytes(train_step, dev) / MIB
    model.zero_grad(set_to_none=True)
    result.update(
        rss_base=rss_base, rss_model=rss_model, rss_peak=rss_peak,
        train=rss_peak - rss_base, step=rss_peak - rss_model, tensor_peak=tensor_peak,
        activations=saved_activation_bytes(model, x) / MIB,
    )
    return result


def worker_env(threads: int, return_freed_memory: bool) -> dict[str, str]:
    """The environment of a memory worker: this one's, with its thread count and malloc policy."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env.pop(MMAP_THRESHOLD_ENV, None)
    if return_freed_memory:
        env[MMAP_THRESHOLD_ENV] = str(FIXED_MMAP_THRESHOLD)
    return env


class MemoryWorkerError(RuntimeError):
    """A memory worker that ran past its timeout, exited with an error or printed no result."""


def run_memory_worker(cmd: list[str], threads: int, return_freed_memory: bool, timeout: float) -> dict[str, Any]:
    """Run the memory worker ``cmd`` in a fresh Python process (so earlier allocations do not count) with
    `worker_env`; return the JSON object its last line of output holds.

    Raises `MemoryWorkerError`: ``timed out after N s``, or ``exit N:`` and its last lines of output.
    """
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              env=worker_env(threads, return_freed_memory))
    except subprocess.TimeoutExpired:
        raise MemoryWorkerError(f"timed out after {timeout:g} s") from None
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise MemoryWorkerError(f"exit {proc.returncode}: {' | '.join(tail)}")
    return json.loads(lines[-1])


def memory_in_subprocess(impl: str, name: str, batch: int, input_size: int, threads: int, device: str = "cpu",
                         timeout: float = 900, memory_efficient: bool = False,
                         return_freed_memory: bool = True) -> dict[str, Any]:
    """Run `measure_memory` in a fresh Python process (`run_memory_worker`); a failure is returned as ``error``.

    ``return_freed_memory`` fixes glibc's mmap threshold in that process (see
    ``MMAP_THRESHOLD_ENV``); without it, peak RSS also counts the freed blocks malloc keeps.
    """
    cmd = [sys.executable, "-m", "cspnet.bench", "--memory-worker", impl, name,
           "--batch", str(batch), "--input-size", str(input_size), "--threads", str(threads), "--device", device]
    if memory_efficient:
        cmd.append("--memory-efficient")
    try:
        return run_memory_worker(cmd, threads, return_freed_memory, timeout)
    except MemoryWorkerError as e:
        return {"impl": impl, "model": name, "error": str(e)}


# --------------------------------------------------------------------------------------------
# The suite


def _environment(config: BenchConfig) -> dict[str, Any]:
    env: dict[str, Any] = {
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "loadavg_start": list(os.getloadavg()),
        "command": " ".join(["cspnet bench", *sys.argv[2:]]) if sys.argv[1:2] == ["bench"] else " ".join(sys.argv),
    }
    if config.device.startswith("cuda") and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(torch.device(config.device))
    for module in ("timm", "onnxruntime"):
        try:
            env[module] = __import__(module).__version__
        except ImportError:
            env[module] = None
    return env


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def winograd_layers_run(deployed: nn.Module, x: torch.Tensor) -> int:
    """How many layers of ``deployed`` compute ``x`` by Winograd, counted over one forward pass.

    A `WinogradConvAct` decides per input whether Winograd gains (`cspnet.winograd.choose_algorithm`:
    not at batch 1, for instance) and otherwise runs the layer it wraps; so the swapped layers
    that ran while the layer they wrap did not are the ones Winograd computed.
    """
    from .winograd import WinogradConvAct

    swapped = [m for m in deployed.modules() if isinstance(m, WinogradConvAct)]
    ran: set[nn.Module] = set()
    fell_back: set[nn.Module] = set()
    hooks = [m.register_forward_hook(lambda module, args, out: ran.add(module)) for m in swapped]
    hooks += [m.layer.register_forward_hook(lambda module, args, out, m=m: fell_back.add(m)) for m in swapped]
    try:
        deployed(x)
    finally:
        for hook in hooks:
            hook.remove()
    return len(ran - fell_back)


def _inference_fns(group: list[str], timm_names: dict[str, str], config: BenchConfig, batch: int, workdir: Path,
                   device: torch.device) -> tuple[dict[tuple[str, str, str], Callable[[], Any]], dict[str, int]]:
    """The callables to time for ``group`` at ``batch``, and per model how many layers deploy+W
    computes by Winograd (`winograd_layers_run`)."""
    from .export import deploy, export_onnx, onednn_available, onnx_session

    x = torch.randn(batch, 3, config.input_size, config.input_size, device=device)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    fns: dict[tuple[str, str, str], Callable[[], Any]] = {}
    winograd_layers: dict[str, int] = {}

    def eager(model: nn.Module, inp: torch.Tensor) -> Callable[[], Any]:
        def run():
            with torch.inference_mode():
                return model(inp)
        return run

    fns[(peak_key(group), "peak", "conv_cl")] = peak_conv(device, config.quick)[1]
    for name in group:
        model = build("ours", name).to(device).eval()
        fns[(name, "ours", "eager")] = eager(model, x)
        fns[(name, "ours", "eager_cl")] = eager(copy.deepcopy(model).to(memory_format=torch.channels_last), x_cl)
        if config.deploy:
            deployed = deploy(model)
            fns[(name, "ours", "deploy")] = lambda d=deployed: d(x)
            if config.winograd and device.type == "cpu" and onednn_available():
                deployed = deploy(model, winograd=True)
                fns[(name, "ours", "deploy_winograd")] = lambda d=deployed: d(x)
                winograd_layers[name] = winograd_layers_run(deployed, x)
        if config.onnx and device.type == "cpu":
            path = export_onnx(model, workdir / f"{name}.onnx", config.input_size)
            session = onnx_session(path, config.threads)
            feed = {session.get_inputs()[0].name: x.numpy()}
            fns[(name, "ours", "onnxruntime")] = lambda s=session, f=feed: s.run(None, f)
        if name in timm_names:
            ref = build("timm", timm_names[name]).to(device).eval()
            fns[(name, "timm", "eager")] = eager(ref, x)
            fns[(name, "timm", "eager_cl")] = eager(copy.deepcopy(ref).to(memory_format=torch.channels_last), x_cl)
    return fns, winograd_layers


def _train_fns(group: list[str], timm_names: dict[str, str], config: BenchConfig,
               device: torch.device) -> dict[tuple[str, str, str], Callable[[], Any]]:
    fns: dict[tuple[str, str, str], Callable[[], Any]] = {}
    size, batch = config.input_size, config.train_batch
    for fmt in config.train_formats:
        memory_format = torch.channels_last if fmt == "channels_last" else torch.contiguous_format
        variant = "train_cl" if fmt == "channels_last" else "train"
        x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=memory_format)
        y = torch.randint(0, 1000, (batch,), device=device)
        for name in group:
            entries = [("ours", name, variant, False)]
            if config.memory_efficient and fmt == "contiguous":
                entries.append(("ours", name, TRAIN_MEMORY_EFFICIENT, True))
            if name in timm_names:
                entries.append(("timm", timm_names[name], variant, False))
            for impl, build_name, entry_variant, lean in entries:
                model = build(impl, build_name).to(device).train().to(memory_format=memory_format)
                if lean:
                    set_memory_efficient(model)
                fns[(name, impl, entry_variant)] = sgd_train_step(model, x, y)
    return fns


def run_benchmarks(config: BenchConfig) -> BenchReport:
    """Run the suite described by ``config`` and return every measurement (see module docstring)."""
    _check_config(config)
    if config.keep_freed_memory:
        from .export import keep_freed_memory

        if not keep_freed_memory():
            raise ValueError("keep_freed_memory needs glibc's mallopt, which this C library does not have")
    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        return _run(config)
    finally:
        torch.set_num_threads(threads)


def _check_config(config: BenchConfig) -> None:
    if config.threads < 1:
        raise ValueError(f"threads must be >= 1, got {config.threads}")
    if not config.batch_sizes or min(config.batch_sizes) < 1 or config.train_batch < 1:
        raise ValueError("batch sizes must be >= 1")
    if min(config.repeats, config.train_repeats) < 1:
        raise ValueError(f"repeats and train_repeats must be >= 1, got {config.repeats} and {config.train_repeats}")
    bad_formats = set(config.train_formats) - {"contiguous", "channels_last"}
    if bad_formats:
        raise ValueError(f"unknown train format(s) {sorted(bad_formats)}; expected contiguous or channels_last")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", config.device):
        raise ValueError(f"device must be cpu, cuda or cuda:N, got {config.device!r}")
    device = torch.device(config.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {config.device!r} requested but CUDA is not available")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device {config.device!r} requested but this machine has {torch.cuda.device_count()} "
                         "CUDA device(s)")
    make_groups(config.models, config.twins)  # unknown model names fail before any work


def _run(config: BenchConfig) -> BenchReport:
    from tqdm import tqdm

    device = torch.device(config.device)
    groups = make_groups(config.models, config.twins)
    use_timm = config.timm and timm_available()
    members = [n for g in groups for n in g]
    timm_names = {n: timm_name(n) for n in members if use_timm and timm_name(n)}

    env = _environment(config)
    peak = measure_peak(device, quick=config.quick)
    profiles: dict[str, dict[str, Any]] = {}
    for name in members:
        impls = [("ours", name)] + ([("timm", timm_names[name])] if name in timm_names else [])
        for impl, build_name in impls:
            model = build(impl, build_name)
            prof = profile(model, config.input_size)
            profiles[_key(impl, name)] = {"params": prof.params, "macs": prof.macs, "cio": prof.cio, "name": build_name}
            del model
    report = BenchReport(config, env, peak, groups, timm_names, profiles)

    clock = Clock(device)
    steps = [(g, b) for g in groups for b in config.batch_sizes] + [(g, "train") for g in groups]
    with tempfile.TemporaryDirectory(prefix="cspnet-bench-") as tmp:
        for group, what in tqdm(steps, desc="bench", disable=not config.progress):
            if what == "train":
                fns = _train_fns(group, timm_names, config, device)
                samples = run_interleaved(fns, config.train_warmup, config.train_repeats, clock)
                batch = config.train_batch
            else:
                fns, winograd_layers = _inference_fns(group, timm_names, config, what, Path(tmp), device)
                samples = run_interleaved(fns, config.warmup, config.repeats, clock)
                batch = what
                report.winograd_layers.update({_batch_key(n, batch): c for n, c in winograd_layers.items()})
            for (name, impl, variant), ms in samples.items():
                report.timings.append(Timing(name, impl, variant, batch, ms))
            del fns
            gc.collect()

    if config.memory:
        jobs = [(impl, name) for name in members for impl in (
            ["ours"] + ([OURS_MEMORY_EFFICIENT] if config.memory_efficient else []) + (["timm"] if name in timm_names else []))]
        for impl, name in tqdm(jobs, desc="memory", disable=not config.progress):
            build_impl, build_name = ("timm", timm_names[name]) if impl == "timm" else ("ours", name)
            mem = memory_in_subprocess(build_impl, build_name, config.train_batch, config.input_size, config.threads,
                                       config.device, memory_efficient=impl == OURS_MEMORY_EFFICIENT,
                                       return_freed_memory=config.return_freed_memory)
            mem["model"] = name
            report.memory[_key(impl, name)] = mem
    report.env["loadavg_end"] = list(os.getloadavg())
    return report


# --------------------------------------------------------------------------------------------
# Targets and the Markdown report


def _ratio(other: float | None, ours: float | None) -> float | None:
    if other is None or ours is None or ours <= 0:
        return None
    return other / ours


def flops_saving(report: BenchReport, csp: str, twin: str) -> float:
    """Fraction of the twin's conv/linear MACs the CSP model does not do."""
    return 1 - report.profiles[_key("ours", csp)]["macs"] / report.profiles[_key("ours", twin)]["macs"]


def check_targets(report: BenchReport, large_gmacs: float = 2.0) -> list[TargetCheck]:
    """The issue's speed and memory targets, evaluated on this run's largest batch.

    - ours eager (best layout) >= 1.0x timm eager (best layout);
    - deploy (the faster of plain and Winograd; plain where Winograd computed no layer) >= 1.3x
      timm eager (best layout);
    - CSP vs twin, eager (best layout): speedup >= 1 + FLOPs saving / 2;
    - CSP peak training memory <= the twin's, as ``train`` (peak RSS - RSS after imports) and as
      ``tensor_peak`` (live tensors), with plain and with memory-efficient training;
    - deploy GFLOP/s >= 60 % of the measured conv peak, for models of >= ``large_gmacs`` GMACs
      per image at 224 px (scaled to the run's input size);
    - no significant slowdown against timm on any row (eager at each batch size, each training
      layout): the 95 % interval (`median_interval`) of the median per-round ratio ours × timm
      reaches 1.0. The row's value is that median. Only a slowdown in (nearly) every round fails
      it (with 6-8 rounds the interval is [min, max]), so passing means no slowdown was shown,
      not that there is none. Rows with too few rounds for an interval are left out.
    """
    checks: list[TargetCheck] = []
    batch = max(report.config.batch_sizes)
    for name in (n for g in report.groups for n in g):
        ours = report.best_eager(name, "ours", batch)
        if name in report.timm_names:
            theirs = report.best_eager(name, "timm", batch)
            r = _ratio(theirs, ours)
            if r is not None:
                checks.append(TargetCheck("eager >= 1.0x timm eager", name, r, 1.0, r >= 1.0))
            r = _ratio(theirs, report.best_deploy(name, batch))
            if r is not None:
                checks.append(TargetCheck("deploy (best of plain, Winograd) >= 1.3x timm eager", name, r, 1.3, r >= 1.3))
        large = report.profiles[_key("ours", name)]["macs"] >= large_gmacs * 1e9 * (report.config.input_size / 224) ** 2
        g = report.gflops_per_s(name, "ours", "deploy", batch)
        if large and g is not None:
            frac = g / report.conv_peak(name, batch)
            checks.append(TargetCheck("deploy GFLOP/s >= 60% of conv peak", name, frac, 0.6, frac >= 0.6))
    for name in (n for g in report.groups for n in g if n in report.timm_names):
        rows = [(f"{name}, forward batch {b}", EAGER_VARIANTS, b) for b in report.config.batch_sizes]
        rows += [(f"{name}, training step {_train_layout(v)}", (v,), report.config.train_batch) for v in TRAIN_VARIANTS]
        for subject, variants, b in rows:
            ratios = report.timm_round_ratios(name, variants, b)
            interval = None if ratios is None else median_interval(ratios)
            if interval is not None:
                checks.append(TargetCheck(NO_SLOWDOWN_TARGET, subject, statistics.median(ratios), 1.0,
                                          interval[1] >= 1.0, interval, len(ratios)))
    for group in report.groups:
        if len(group) < 2:
            continue
        csp, twin = group
        need = 1 + flops_saving(report, csp, twin) / 2
        r = _ratio(report.best_eager(twin, "ours", batch), report.best_eager(csp, "ours", batch))
        if r is not None:
            checks.append(TargetCheck("CSP vs twin eager speedup >= 1 + FLOPs saving/2", f"{csp}/{twin}", r, need, r >= need))
        for impl, how in (("ours", ""), (OURS_MEMORY_EFFICIENT, ", memory-efficient")):
            for measure, what in (("train", "peak RSS"), ("tensor_peak", "live tensors")):
                smaller = _memory_ratio(report, csp, twin, measure, impl)  # twin / CSP
                if smaller is not None:
                    r = 1 / smaller
                    checks.append(TargetCheck(f"CSP peak train memory <= twin's ({what}{how}; ratio)", f"{csp}/{twin}",
                                              r, 1.0, r <= 1.0))
    return checks


def _fmt(v: float | None, spec: str = ".1f", suffix: str = "") -> str:
    return "—" if v is None else f"{v:{spec}}{suffix}"


def _fmt_interval(interval: tuple[float, float] | None) -> str:
    return "" if interval is None else f" [{interval[0]:.2f}, {interval[1]:.2f}]"


def _train_layout(variant: str) -> str:
    return "channels-last" if variant == "train_cl" else "NCHW"


def to_markdown(report: BenchReport) -> str:
    """The report as Markdown tables (what ``cspnet bench`` prints and writes)."""
    c, env, peak = report.config, report.env, report.peak
    lines = [
        "## Environment",
        "",
        f"- command: `{env['command']}`",
        f"- date {env['date']}; {env['cpu']} ({env['cpu_count']} logical CPUs); torch {env['torch']}, "
        f"{env['threads']} threads; timm {env.get('timm')}; onnxruntime {env.get('onnxruntime')}"
        + (f"; GPU {env['gpu']}" if env.get("gpu") else ""),
        f"- load average (1/5/15 min) at start {_loads(env['loadavg_start'])}, at end {_loads(env.get('loadavg_end'))}",
        f"- {c.input_size}x{c.input_size}, fp32, device {c.device}; inference batches {list(c.batch_sizes)}, "
        f"training batch {c.train_batch}; {c.warmup} warm-up + {c.repeats} timed runs (training "
        f"{c.train_warmup} + {c.train_repeats}), interleaved, medians" + (" (quick mode)" if c.quick else "")
        + ("; glibc malloc set to keep freed memory (`keep_freed_memory`) for every entry" if c.keep_freed_memory else ""),
        "",
        "## Measured peak (start of run; each inference table also gives the peak timed beside the models)",
        "",
        f"- GEMM {peak['gemm_n']}x{peak['gemm_n']}: **{peak['gemm_gflops']:.1f} GFLOP/s**",
        f"- 3x3 conv {tuple(peak['conv_shape'])}: {peak['conv_gflops_nchw']:.1f} GFLOP/s NCHW, "
        f"{peak['conv_gflops_cl']:.1f} channels-last → conv peak **{peak['conv_gflops']:.1f} GFLOP/s**",
        "",
    ]
    if report.timm_names:
        lines += ["## Model mapping to timm", "", "| ours | timm | params ours / timm | GMACs ours / timm | correspondence |",
                  "|---|---|---:|---:|---|"]
        for name, tname in report.timm_names.items():
            po, pt = report.profiles[_key("ours", name)], report.profiles[_key("timm", name)]
            lines.append(f"| {name} | {tname} | {po['params']:,} / {pt['params']:,} | "
                         f"{po['macs'] / 1e9:.3f} / {pt['macs'] / 1e9:.3f} | {TIMM_EQUIVALENTS[name][1]} |")
        lines.append("")
    for batch in c.batch_sizes:
        lines += _inference_table(report, batch)
    lines += _train_table(report)
    lines += _twin_table(report)
    lines += _memory_table(report)
    lines += _targets_table(check_targets(report))
    return "\n".join(lines)


def _targets_table(checks: list[TargetCheck]) -> list[str]:
    if not checks:
        return []
    lines = ["## Targets", "", "| target | subject | measured | needed | met |", "|---|---|---:|---:|:---:|"]
    for t in checks:
        # An interval row is judged on the interval's upper end b, not on the median beside it.
        needed = f"b ≥ {t.threshold:.2f}" if t.interval else f"{t.threshold:.2f}"
        rounds = f", {t.rounds} rounds" if t.rounds else ""
        lines.append(f"| {t.target} | {t.subject} | {t.value:.2f}{_fmt_interval(t.interval)}{rounds} | {needed} | "
                     f"{'yes' if t.passed else '**no**'} |")
    rounds = sorted({t.rounds for t in checks if t.rounds})
    if rounds:
        spans = "; ".join(f"{n} rounds: {_interval_span(n)}" for n in rounds)
        lines += ["", "No significant slowdown vs timm: measured is the median of the per-round ratios ours × timm "
                  f"(above 1: ours faster), [a, b] its 95 % interval; met unless b < 1.0. With few rounds the interval "
                  f"is wide ({spans}), so a row fails only when ours was slower in (nearly) every round: met means "
                  "no slowdown was shown, not that there is none. More rounds (`--repeats`, `--train-repeats`) "
                  "narrow it."]
    return lines + [""]


def _interval_span(n: int) -> str:
    """Which per-round ratios bound the 95 % interval of the median of ``n`` of them."""
    k = median_interval_rank(n)
    if k == 1:
        return "[lowest, highest] ratio"
    return f"drops the {k - 1} lowest and {k - 1} highest ratios"


def _loads(loads: list[float] | None) -> str:
    return "—" if not loads else " / ".join(f"{v:.2f}" for v in loads)


def _inference_table(report: BenchReport, batch: int) -> list[str]:
    lines = [
        f"## Inference, batch {batch} (median ms; × = speedup of ours over the column named)",
        "",
        "| model | GMACs/img | eager NCHW | eager CL | deploy | deploy+W | W layers | ORT | timm NCHW | timm CL "
        "| eager × timm | deploy × timm | deploy+W × timm | deploy × eager | ORT × eager | deploy GFLOP/s "
        "| conv peak GFLOP/s | % conv peak |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in (n for g in report.groups for n in g):
        med = lambda impl, v: report.median(name, impl, v, batch)  # noqa: E731
        ours_best, timm_best = report.best_eager(name, "ours", batch), report.best_eager(name, "timm", batch)
        deploy_ms, ort_ms, wino_ms = med("ours", "deploy"), med("ours", "onnxruntime"), med("ours", "deploy_winograd")
        g = report.gflops_per_s(name, "ours", "deploy", batch)
        peak = report.conv_peak(name, batch)
        pct = None if g is None else 100 * g / peak
        lines.append(
            f"| {name} | {report.profiles[_key('ours', name)]['macs'] / 1e9:.2f} | {_fmt(med('ours', 'eager'))} | "
            f"{_fmt(med('ours', 'eager_cl'))} | {_fmt(deploy_ms)} | {_fmt(wino_ms)} | "
            f"{_fmt(report.winograd_count(name, batch), 'd')} | {_fmt(ort_ms)} | "
            f"{_fmt(med('timm', 'eager'))} | {_fmt(med('timm', 'eager_cl'))} | "
            f"{_fmt(_ratio(timm_best, ours_best), '.2f', '×')}"
            f"{_fmt_interval(report.timm_speedup_interval(name, EAGER_VARIANTS, batch))} | "
            f"{_fmt(_ratio(timm_best, deploy_ms), '.2f', '×')} | {_fmt(_ratio(timm_best, wino_ms), '.2f', '×')} | "
            f"{_fmt(_ratio(ours_best, deploy_ms), '.2f', '×')} | "
            f"{_fmt(_ratio(ours_best, ort_ms), '.2f', '×')} | {_fmt(g)} | {peak:.1f} | {_fmt(pct, '.0f', '%')} |"
        )
    lines += ["", "eager × timm and deploy × timm compare with timm's faster layout; deploy × eager with our faster eager "
              f"layout. {INTERVAL_NOTE} deploy+W is `deploy(model, winograd=True)`: wide 3x3 convs by Winograd "
              "(`cspnet.winograd`), "
              "fewer multiplications than the direct kernel, so its GFLOP/s is not counted against the conv peak. "
              "W layers: how many layers it computed by Winograd at this batch; where none, deploy+W ran the plain "
              "network, and the deploy target takes the plain deploy time. "
              "The conv peak is the channels-last 3x3 probe timed in the same round-robin as the models.", ""]
    return lines


def _train_table(report: BenchReport) -> list[str]:
    c = report.config
    lines = [f"## Training step, batch {c.train_batch} (median ms)", "",
             "| model | layout | ours | timm | ours × timm | ours GFLOP/s (3 x forward) | ours, memory-efficient | × ours |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for name in (n for g in report.groups for n in g):
        for variant in TRAIN_VARIANTS:
            ours = report.median(name, "ours", variant, c.train_batch)
            if ours is None:
                continue
            theirs = report.median(name, "timm", variant, c.train_batch)
            lean = report.median(name, "ours", TRAIN_MEMORY_EFFICIENT, c.train_batch) if variant == "train" else None
            # A training step costs ~3 forward passes (forward, input grads, weight grads).
            g = 3 * 2 * report.profiles[_key("ours", name)]["macs"] * c.train_batch / (ours / 1e3) / 1e9
            interval = _fmt_interval(report.timm_speedup_interval(name, (variant,), c.train_batch))
            lines.append(f"| {name} | {_train_layout(variant)} | {ours:.1f} | {_fmt(theirs)} | "
                         f"{_fmt(_ratio(theirs, ours), '.2f', '×')}{interval} | "
                         f"{g:.1f} | {_fmt(lean)} | {_fmt(_ratio(ours, lean), '.2f', '×')} |")
    return lines + ["", f"× ours: the plain step's time / the memory-efficient step's (below 1: memory-efficient is slower). "
                    f"{INTERVAL_NOTE}", ""]


def _memory_ratio(report: BenchReport, csp: str, twin: str, measure: str, impl: str = "ours") -> float | None:
    """Twin / CSP for one memory measure (above 1: the CSP model needs less)."""
    return _ratio(report.memory.get(_key(impl, twin), {}).get(measure), report.memory.get(_key(impl, csp), {}).get(measure))


def _twin_table(report: BenchReport) -> list[str]:
    pairs = [g for g in report.groups if len(g) == 2]
    if not pairs:
        return []
    c = report.config
    lines = ["## CSP model vs its plain twin (ours)", "",
             "| CSP / twin | FLOPs saving | speedup needed | batch | eager (best) × | deploy × | train step × | train memory × "
             "| live tensors × | live tensors, memory-efficient × | held for backward × | CIO × |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for csp, twin in pairs:
        saving = flops_saving(report, csp, twin)
        mem_ratio = partial(_memory_ratio, report, csp, twin)
        cio = _ratio(report.profiles[_key("ours", twin)]["cio"], report.profiles[_key("ours", csp)]["cio"])
        train = _ratio(report.median(twin, "ours", "train", c.train_batch), report.median(csp, "ours", "train", c.train_batch))
        for batch in c.batch_sizes:
            eager = _ratio(report.best_eager(twin, "ours", batch), report.best_eager(csp, "ours", batch))
            deploy_r = _ratio(report.median(twin, "ours", "deploy", batch), report.median(csp, "ours", "deploy", batch))
            lines.append(
                f"| {csp} / {twin} | {100 * saving:.1f}% | {1 + saving / 2:.2f}× | {batch} | {_fmt(eager, '.2f', '×')} | "
                f"{_fmt(deploy_r, '.2f', '×')} | {_fmt(train, '.2f', '×')} | {_fmt(mem_ratio('train'), '.2f', '×')} | "
                f"{_fmt(mem_ratio('tensor_peak'), '.2f', '×')} | {_fmt(mem_ratio('tensor_peak', OURS_MEMORY_EFFICIENT), '.2f', '×')} | "
                f"{_fmt(mem_ratio('activations'), '.2f', '×')} | {_fmt(cio, '.2f', '×')} |"
            )
    lines += ["", "× = twin / CSP (above 1: the CSP model is faster or smaller). Memory columns come from the table below.", ""]
    return lines


def _memory_table(report: BenchReport) -> list[str]:
    if not report.memory:
        return []
    c = report.config
    cuda = any("cuda_peak" in m for m in report.memory.values())
    lines = [f"## Training memory, batch {c.train_batch}, {c.input_size}x{c.input_size} (MiB; fresh process per model)", "",
             "| impl | model | params (M) | peak RSS | after imports | train (peak − imports) | step (peak − model built) "
             "| live tensors at peak | held for backward | CIO (M elements) |" + (" CUDA peak | CUDA step |" if cuda else ""),
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if cuda else "")]
    for key, m in report.memory.items():
        impl, name = key.split(":", 1)
        prof = report.profiles.get(_key("ours", name) if impl == OURS_MEMORY_EFFICIENT else key, {})
        if "error" in m:
            lines.append(f"| {impl} | {name} | failed: {m['error']} |")
            continue
        row = (f"| {impl} | {name} | {prof.get('params', 0) / 1e6:.2f} | {m['rss_peak']:.0f} | {m['rss_base']:.0f} | "
               f"{m['train']:.0f} | {m['step']:.0f} | {m['tensor_peak']:.0f} | {m['activations']:.0f} | "
               f"{prof.get('cio', 0) / 1e6:.2f} |")
        if cuda:
            row += f" {_fmt(m.get('cuda_peak'), '.0f')} | {_fmt(m.get('cuda_step'), '.0f')} |"
        lines.append(row)
    rss_note = (f"Peak RSS: glibc's mmap threshold fixed at {FIXED_MMAP_THRESHOLD // 1024} KiB "
                f"(`{MMAP_THRESHOLD_ENV}`), so freed tensors go back to the OS and RSS follows what is live"
                if c.return_freed_memory else
                "Peak RSS: glibc's default malloc, which keeps freed blocks (how many depends on the order of "
                "allocations)")
    lines += ["", f"{rss_note}. Step: peak RSS less the RSS once the model, its batch and the optimizer were built, "
              "before the first step, so gradients and SGD momentum (allocated at the first step) count in it as "
              "well as activations and workspace" + (" (CUDA step likewise)" if cuda else "") + ". Live tensors: torch.profiler's memory timeline over one more step (parameters, "
              "gradients, optimizer state, activations). Held for backward: bytes the forward pass allocates and "
              "still holds when it returns. "
              f"{OURS_MEMORY_EFFICIENT}: `cspnet.layers.memory_efficient` (activation outputs and concatenations rebuilt in backward). "
              "CIO (the paper's memory-traffic measure): input + output elements of every convolution and linear layer, per image.", ""]
    return lines


def report_json_path(path: str | os.PathLike) -> Path:
    """Where `write_report` puts the raw numbers of the Markdown report ``path``: beside it, as .json.

    A ``.json`` report path is refused: the JSON would be written over the report.
    """
    path = Path(path)
    if path.suffix.lower() == ".json":
        raise ValueError(f"the report path {path} ends in .json, the name of the raw numbers written beside the "
                         f"Markdown report; give the Markdown path (e.g. {path.with_suffix('.md')})")
    return path.with_suffix(".json")


def write_report(report: BenchReport, path: str | os.PathLike, title: str = "Benchmarks", preamble: str = "") -> Path:
    """Write the Markdown report (and the raw numbers as JSON beside it, `report_json_path`), atomically."""
    path, json_path = Path(path), report_json_path(path)
    text = f"# {title}\n\n" + (preamble.strip() + "\n\n" if preamble.strip() else "") + to_markdown(report) + "\n"
    for target, content in ((path, text), (json_path, json.dumps(report.as_dict(), indent=1) + "\n")):
        atomic_write_text(target, content)
    return path


def _worker_main(argv: list[str]) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m cspnet.bench", description="memory worker (one model, fresh process)")
    p.add_argument("--memory-worker", nargs=2, metavar=("IMPL", "MODEL"), required=True)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--input-size", type=int, default=224)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--memory-efficient", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    impl, name = args.memory_worker
    print(json.dumps(measure_memory(impl, name, args.batch, args.input_size, args.device,
                                    memory_efficient=args.memory_efficient)))
    return 0


if __name__ == "__main__":
    raise SystemExit(_worker_main(sys.argv[1:]))
