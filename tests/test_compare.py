"""``cspnet compare`` end to end on a tiny subset: report.md, report.json and the plots."""
from __future__ import annotations

import json

import pytest
from PIL import Image

from cspnet.cli import main
from cspnet.bench import FIXED_MMAP_THRESHOLD, MMAP_THRESHOLD_ENV
from cspnet.compare import DEFAULTS, accuracy_verdict, measure_models, memory_in_fresh_process, throughput
from cspnet.data.classification import FASHION_MNIST_ROOT
from cspnet.engine.models import build_model, model_record
from cspnet.profile import profile

DATA = "fashion-mnist" if FASHION_MNIST_ROOT.is_dir() else "digits"


@pytest.mark.slow
def test_compare_writes_report_and_plots(tmp_path, capsys):
    out = tmp_path / "cmp"
    rc = main(["compare", "--data", DATA, "--train-limit", "320", "--test-limit", "100", "--width", "0.25",
               "--epochs", "1", "--batch-size", "32", "--bench-batch", "16", "--bench-seconds", "0.2",
               "--threads", "1", "--no-progress", "--out", str(out)])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    names = [m["name"] for m in report["models"]]
    assert names == list(DEFAULTS.models)
    for m in report["models"]:
        for key in ("name", "params", "bflops", "top1", "train_img_per_s", "infer_img_per_s", "peak_mem_mib"):
            assert key in m, key
        assert m["train_img_per_s"] > 0 and m["infer_img_per_s"] > m["train_img_per_s"] / 2
        assert 0 < m["peak_mem_mib"] < 4096 and 0.0 <= m["top1"] <= 1.0
        # the figures are the profiler's for the model that was trained
        model = build_model(m["name"], num_classes=10, in_chans=1, width=0.25)
        prof = profile(model, 32)
        assert m["params"] == prof.params == sum(p.numel() for p in model.parameters())
        assert m["bflops"] == pytest.approx(prof.bflops)
        assert (out / m["name"] / "last.safetensors").is_file() and (out / m["name"] / "metrics.csv").is_file()
    assert report["wall_s"] > 0 and report["ratios"]["bflops"] == pytest.approx(report["models"][0]["bflops"] / report["models"][1]["bflops"])
    # at width 0.25 the CSP model is the cheaper one, as at full width (paper Table 3)
    assert report["ratios"]["params"] < 1 and report["ratios"]["bflops"] < 1
    md = (out / "report.md").read_text()
    assert all(n in md for n in names) and "curves.png" in md and "bars.png" in md and "top-1" in md
    assert "| peak train mem (MiB) |" in md  # RSS is read in KiB: the figures are MiB
    # with 5 classes or fewer evaluation gives no top-5 (None): the report says "—" instead of failing
    from cspnet.compare import format_report

    histories = {n: [json.loads(line) for line in (out / n / "metrics.jsonl").read_text().splitlines()] for n in names}
    report["models"][0]["top5"] = None
    assert f"| {100 * report['models'][0]['top1']:.2f}% | — |" in format_report(report, histories)
    for png in ("curves.png", "bars.png"):
        with Image.open(out / png) as im:
            assert im.format == "PNG" and im.size[0] >= 600
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["report"].endswith("report.md")
    # the trained runs are not overwritten by another comparison into the same folder
    before = (out / names[0] / "last.safetensors").read_bytes()
    assert main(["compare", "--data", DATA, "--train-limit", "320", "--epochs", "1", "--out", str(out)]) == 2
    assert f"holds trained runs of {', '.join(names)} from an earlier comparison" in capsys.readouterr().err
    assert (out / names[0] / "last.safetensors").read_bytes() == before


def test_benchmarks_measure_speed_and_memory_growth_with_batch():
    small = model_record("resnet10", num_classes=10, in_chans=1, width=0.25)
    large = model_record("resnet10", num_classes=10, in_chans=1, width=1.0)
    speeds = throughput([small, large], 32, 32, seconds=0.2, rounds=2)
    assert all(s["train_img_per_s"] > 0 and s["infer_img_per_s"] > s["train_img_per_s"] for s in speeds)
    assert speeds[0]["train_img_per_s"] > speeds[1]["train_img_per_s"]  # 14x fewer multiply-adds
    # Memory is measured in a fresh process per model, as the report does: in a process that has run
    # other work, malloc hands back freed memory and the resident set need not grow at all.
    peaks = [measure_models([small], 32, batch, threads=1, seconds=0.1)[0]["peak_mem_mib"] for batch in (8, 256)]
    assert 0 < peaks[0] < peaks[1]  # activations grow with the batch


def test_memory_worker_runs_with_the_fixed_malloc_policy_of_cspnet_bench(monkeypatch):
    # With glibc's adaptive mmap threshold, peak RSS also counts freed blocks malloc keeps, and repeated
    # runs of one pair gave CSP / plain ratios from 1.00x to 1.25x; the worker gets bench's environment.
    monkeypatch.delenv(MMAP_THRESHOLD_ENV, raising=False)  # from the worker's environment, not inherited
    small = model_record("resnet10", num_classes=10, in_chans=1, width=0.25)
    mem = memory_in_fresh_process(small, 32, 8, threads=1)
    assert mem["malloc_mmap_threshold"] == str(FIXED_MMAP_THRESHOLD)
    assert 0 < mem["peak_mem_mib"] < 1024


def test_memory_worker_past_its_timeout_raises_naming_the_model():
    small = model_record("resnet10", num_classes=10, in_chans=1, width=0.25)
    with pytest.raises(RuntimeError, match=r"the memory worker for resnet10 failed: timed out after 0.01 s"):
        memory_in_fresh_process(small, 32, 8, threads=1, timeout=0.01)


def test_accuracy_verdict_weighs_the_difference_against_the_test_sets_sampling_error():
    # 14 % vs 10 % on 100 images is chance, not a finding: 2 SE = 2 sqrt(.14 .86 / 100 + .1 .9 / 100) = 9.17 pp
    assert accuracy_verdict(0.14, 0.10, 100) == (
        "is as accurate within this run's resolution (+4.00 pp top-1; ±9.17 pp is two standard errors on 100 test images)")
    assert accuracy_verdict(0.93, 0.90, 10_000).startswith("is 3.00 pp more accurate on this run (±0.79 pp")
    assert accuracy_verdict(0.88, 0.91, 10_000).startswith("is 3.00 pp less accurate on this run (±0.87 pp")
