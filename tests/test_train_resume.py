"""Runs in real processes: SIGKILL mid-epoch then --resume, and DDP over 2 CPU processes (gloo)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cspnet.data import load_classification
from cspnet.engine.classify import evaluate_classifier, load_classifier
from cspnet.weights import load_state

# 20 steps per epoch (640 images / 32); small enough to be quick, slow enough to be caught mid-epoch
RUN = ["-m", "cspnet", "train", "--model", "resnet10", "--width", "0.5", "--data", "digits", "--img-size", "32",
       "--train-limit", "640", "--test-limit", "100", "--epochs", "2", "--batch-size", "32", "--seed", "3",
       "--threads", "1", "--no-progress"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _run(args, timeout=600):
    proc = subprocess.run([sys.executable, *args], env=ENV, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_state(run_dir / "last.safetensors")


def _checkpoint_step(run_dir: Path) -> int:
    try:
        return json.loads((run_dir / "last.json").read_text())["state"]["step"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return -1


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_is_bit_identical(tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    _run([*RUN, "--out", str(whole), "--checkpoint-every", "3"])

    proc = subprocess.Popen([sys.executable, *RUN, "--out", str(killed), "--checkpoint-every", "3"], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while _checkpoint_step(killed) < 6 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    step_at_kill = _checkpoint_step(killed)
    assert 6 <= step_at_kill < 40 and step_at_kill % 20 != 0, f"killed at step {step_at_kill}: not mid-epoch"

    _run([*RUN, "--out", str(killed), "--checkpoint-every", "3", "--resume"])
    a, b = _weights(whole), _weights(killed)
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"resumed run differs in {different[:5]}"
    # the epoch metrics agree too (train loss sums were carried over the kill)
    ha = [json.loads(line) for line in (whole / "metrics.jsonl").read_text().splitlines()]
    hb = [json.loads(line) for line in (killed / "metrics.jsonl").read_text().splitlines()]
    for ra, rb in zip(ha, hb, strict=True):
        for key in ("train_loss", "train_acc", "val_top1", "val_loss", "lr"):
            assert ra[key] == rb[key], key


@pytest.mark.slow
def test_ddp_two_cpu_processes_match_one_process(tmp_path):
    """2 gloo processes x 16 images == 1 process x 2 accumulated chunks of 16 (global batch 32).

    Without SyncBatchNorm (CUDA-only), each DDP process normalises with the statistics of its own
    16 images. The one-process reference therefore accumulates gradients over the same two chunks
    of 16 (``--accum-steps 2``): identical BN batch statistics, identical augmentation (seeded per
    chunk), and DDP's averaged gradient (g0 + g1) / 2 equals the accumulated g0 / 2 + g1 / 2 up to
    float rounding (both scale by a power of two, so in practice exactly). Parameters must agree
    to 1e-6; BN *running* statistics are not compared: DDP keeps rank 0's (it broadcasts buffers
    from rank 0), the reference has seen both chunks.
    """
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    # RUN starts with "-m cspnet", which is also how torchrun is told to run a module
    _run(["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *RUN, "--epochs", "1", "--out", str(ddp)])
    _run([*RUN, "--epochs", "1", "--accum-steps", "2", "--out", str(single)])
    a, b = _weights(ddp), _weights(single)
    params = [k for k in a if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    worst = max((a[k] - b[k]).abs().max().item() for k in params)
    assert worst <= 1e-6, f"parameters differ by up to {worst}"
    # the run really trained (not a trivially equal copy of the initial weights)
    row = json.loads((ddp / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["train_acc"] > 0.3
    header = lambda run: (run / "metrics.csv").read_text().splitlines()[0]  # noqa: E731
    assert header(ddp) == header(single)  # the same columns in the same order
    # both processes scored rank 0's model, the one saved: its BN running statistics, not each
    # process's own (DDP leaves every process with those of its own last chunk)
    model, _ = load_classifier(ddp)
    data = load_classification("digits", 32, train_limit=640, test_limit=100)
    again = evaluate_classifier(model, data)
    assert again["loss"] == pytest.approx(row["val_loss"], rel=1e-5) and again["top1"] == row["val_top1"]
