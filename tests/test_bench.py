"""The benchmark suite's bookkeeping (quick mode): what it measures, pairs and reports. No timing asserts."""
import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import cspnet
from cspnet.bench import (
    FIXED_MMAP_THRESHOLD, NO_SLOWDOWN_TARGET, OURS_MEMORY_EFFICIENT, TIMM_EQUIVALENTS, BenchConfig, Clock,
    MemoryWorkerError, Timing, build, check_targets, flops_saving, make_groups, measure_peak, memory_in_subprocess,
    quick_config, run_benchmarks, run_interleaved, run_memory_worker, saved_activation_bytes, to_markdown,
    winograd_layers_run, worker_env, write_report,
)
from cspnet.export import ConvAct, OneDnnConvAct, deploy, onednn_available
from cspnet.winograd import WinogradConvAct
from cspnet.cli import main as cli_main


def test_quick_suite_via_cli_records_every_measurement(tmp_path, capsys):
    out = tmp_path / "bench.md"
    assert cli_main(["bench", "--quick", "cspresnet10", "--no-timm", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    data = json.loads(out.with_suffix(".json").read_text())
    text = out.read_text()
    assert "## Inference, batch 2" in printed and "## Targets" in text

    assert data["groups"] == [["cspresnet10", "resnet10"]]  # the plain twin joins its CSP model
    cfg = data["config"]
    timings = {(t["model"], t["impl"], t["variant"], t["batch"]): t for t in data["timings"]}
    for name in ("cspresnet10", "resnet10"):
        for batch in cfg["batch_sizes"]:
            for variant in ("eager", "eager_cl", "deploy", "deploy_winograd", "onnxruntime"):
                t = timings[(name, "ours", variant, batch)]
                assert len(t["samples_ms"]) == cfg["repeats"]
                assert t["median_ms"] == statistics.median(t["samples_ms"]) > 0
        for variant in ("train", "train_memory_efficient"):
            assert len(timings[(name, "ours", variant, cfg["train_batch"])]["samples_ms"]) == cfg["train_repeats"]
    assert not any(impl == "timm" for _, impl, _, _ in timings)
    # the conv-peak probe ran inside the group, and "% conv peak" divides by it
    for batch in cfg["batch_sizes"]:
        probe = timings[("conv-peak[cspresnet10]", "peak", "conv_cl", batch)]
        assert len(probe["samples_ms"]) == cfg["repeats"]
        peak = data["peak"]["conv_flops"] / (probe["median_ms"] / 1e3) / 1e9
        assert f"| {peak:.1f} |" in text

    # FLOPs and CIO come from cspnet.profile at the run's input size.
    for name in ("cspresnet10", "resnet10"):
        prof = cspnet.profile(cspnet.create_model(name), cfg["input_size"])
        assert data["profiles"][f"ours:{name}"]["macs"] == prof.macs
        assert data["profiles"][f"ours:{name}"]["cio"] == prof.cio

    # Memory was measured in fresh processes; the saved-activation count is a pure function of the
    # model and input shape, so this process must count the same bytes.
    for name in ("cspresnet10", "resnet10"):
        mem, lean = data["memory"][f"ours:{name}"], data["memory"][f"{OURS_MEMORY_EFFICIENT}:{name}"]
        for m in (mem, lean):
            assert "error" not in m, m
            assert m["rss_peak"] >= m["rss_model"] > 0
            assert m["train"] == pytest.approx(m["rss_peak"] - m["rss_base"])
            assert m["malloc_mmap_threshold"] == str(FIXED_MMAP_THRESHOLD)  # the workers' default malloc policy
            # live tensors at the peak: at least parameters, gradients and momentum, plus what backward keeps
            params_mib = data["profiles"][f"ours:{name}"]["params"] * 4 / 2**20
            assert m["tensor_peak"] > 3 * params_mib + m["activations"] * 0.5
        assert (mem["memory_efficient"], lean["memory_efficient"]) == (False, True)
        assert lean["activations"] < mem["activations"]
        torch.manual_seed(0)
        model = cspnet.create_model(name).train()
        x = torch.randn(cfg["train_batch"], 3, cfg["input_size"], cfg["input_size"])
        assert mem["activations"] == pytest.approx(saved_activation_bytes(model, x) / 2**20, abs=1e-3)
        cspnet.memory_efficient(model)
        assert lean["activations"] == pytest.approx(saved_activation_bytes(model, x) / 2**20, abs=1e-3)

    targets = {(t["target"], t["subject"]): t for t in data["targets"]}
    twin = targets[("CSP vs twin eager speedup >= 1 + FLOPs saving/2", "cspresnet10/resnet10")]
    saving = 1 - data["profiles"]["ours:cspresnet10"]["macs"] / data["profiles"]["ours:resnet10"]["macs"]
    assert twin["threshold"] == pytest.approx(1 + saving / 2)
    best = lambda n: min(timings[(n, "ours", v, 2)]["median_ms"] for v in ("eager", "eager_cl"))  # noqa: E731
    assert twin["value"] == pytest.approx(best("resnet10") / best("cspresnet10"))
    for what in ("peak RSS", "live tensors", "peak RSS, memory-efficient", "live tensors, memory-efficient"):
        assert (f"CSP peak train memory <= twin's ({what}; ratio)", "cspresnet10/resnet10") in targets
    rss = targets[("CSP peak train memory <= twin's (live tensors, memory-efficient; ratio)", "cspresnet10/resnet10")]
    lean = lambda n: data["memory"][f"{OURS_MEMORY_EFFICIENT}:{n}"]["tensor_peak"]  # noqa: E731
    assert rss["value"] == pytest.approx(lean("cspresnet10") / lean("resnet10"))
    assert f"{100 * saving:.1f}%" in text
    assert "mmap threshold fixed at 128 KiB" in text


def test_a_json_report_path_is_refused_before_the_run(tmp_path, capsys, benchmark_script):
    # The raw numbers go beside the report as .json: a .json report path would be both files.
    out = tmp_path / "bench.json"
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["bench", "--quick", "cspresnet10", "--out", str(out)])
    assert exit_info.value.code == 2
    assert "ends in .json" in capsys.readouterr().err and not out.exists()
    with pytest.raises(SystemExit):
        benchmark_script("run_all").main(["--out", str(out)])
    assert "ends in .json" in capsys.readouterr().err
    report = _report_with_timings([100.0] * 7, [100.0] * 7)
    with pytest.raises(ValueError, match="ends in .json"):
        write_report(report, out)
    assert not out.exists()
    assert write_report(report, tmp_path / "bench") == tmp_path / "bench"  # no suffix: the JSON is bench.json
    assert (tmp_path / "bench").read_text().startswith("# Benchmarks")
    assert json.loads((tmp_path / "bench.json").read_text())["groups"] == [["darknet53"]]


def test_memory_step_column_says_it_counts_gradients_and_momentum():
    # rss_model is read before the first step, and SGD allocates its momentum buffers at that step: the
    # step column is peak minus the built model, not minus "model & optimizer".
    report = _report_with_timings([100.0] * 7, [100.0] * 7)
    report.memory["ours:darknet53"] = {"rss_peak": 900.0, "rss_base": 500.0, "rss_model": 600.0, "train": 400.0,
                                       "step": 300.0, "tensor_peak": 380.0, "activations": 200.0}
    text = to_markdown(report)
    assert "| step (peak − model built) |" in text and "model & optimizer" not in text
    assert "| 900 | 500 | 400 | 300 | 380 | 200 |" in text
    assert "gradients and SGD momentum (allocated at the first step) count in it" in text


# A 30 MiB block is mapped; freeing it raises glibc's adaptive mmap threshold, so the next 20 MiB
# block comes from the heap and stays resident after it is freed.
_FREED_BLOCK_RSS = """
import torch
def rss():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS:")) / 1024
a = torch.ones(30 * 2**18); del a
base = rss()
b = torch.ones(20 * 2**18); del b
print(rss() - base)
"""


@pytest.mark.parametrize("return_freed_memory", [True, False])
def test_memory_worker_malloc_policy_decides_whether_freed_blocks_stay_in_rss(return_freed_memory):
    proc = subprocess.run([sys.executable, "-c", _FREED_BLOCK_RSS], capture_output=True, text=True, timeout=120,
                          env=worker_env(1, return_freed_memory))
    assert proc.returncode == 0, proc.stderr
    kept_mib = float(proc.stdout)
    if return_freed_memory:
        assert kept_mib < 5
    else:
        assert kept_mib > 15


def test_memory_worker_past_its_timeout_is_an_error_not_a_hang():
    result = memory_in_subprocess("ours", "resnet10", batch=1, input_size=32, threads=1, timeout=0.01)
    assert result == {"impl": "ours", "model": "resnet10", "error": "timed out after 0.01 s"}


def test_a_failed_memory_worker_is_named_with_its_exit_status_and_last_lines():
    cmd = [sys.executable, "-c", "import sys; print('a'); print('b', file=sys.stderr); sys.exit(3)"]
    with pytest.raises(MemoryWorkerError, match=r"^exit 3: b$"):
        run_memory_worker(cmd, threads=1, return_freed_memory=True, timeout=120)
    printed = [sys.executable, "-c", "import json; print('warming up'); print(json.dumps({'peak': 1.5}))"]
    assert run_memory_worker(printed, threads=1, return_freed_memory=True, timeout=120) == {"peak": 1.5}


def test_timm_models_run_side_by_side():
    config = quick_config(("darknet53",), onnx=False, memory=False, batch_sizes=(1,), train_batch=1)
    report = run_benchmarks(config)
    assert report.timm_names == {"darknet53": "darknet53"}
    for variant in ("eager", "eager_cl"):
        assert report.median("darknet53", "timm", variant, 1) > 0
    assert report.median("darknet53", "timm", "train", 1) > 0
    # timm's model was profiled on its own, and it is the same network as ours
    assert report.profiles["timm:darknet53"]["macs"] == report.profiles["ours:darknet53"]["macs"]
    checks = {c.target: c for c in check_targets(report)}
    eager = checks["eager >= 1.0x timm eager"]
    assert eager.value == pytest.approx(report.best_eager("darknet53", "timm", 1) / report.best_eager("darknet53", "ours", 1))
    deploy = checks["deploy (best of plain, Winograd) >= 1.3x timm eager"]
    # At batch 1 (64 px) Winograd gains on no layer, so deploy+W ran the plain network: the target takes plain deploy.
    assert report.winograd_count("darknet53", 1) == 0
    assert deploy.value == pytest.approx(report.best_eager("darknet53", "timm", 1) / report.median("darknet53", "ours", "deploy", 1))
    assert deploy.passed == (deploy.value >= 1.3)
    g = report.gflops_per_s("darknet53", "ours", "deploy", 1)
    assert g == pytest.approx(2 * report.profiles["ours:darknet53"]["macs"] / (report.median("darknet53", "ours", "deploy", 1) / 1e3) / 1e9)
    md = to_markdown(report)
    assert "| darknet53 | darknet53 |" in md  # the mapping table


def test_deploy_target_takes_winograd_only_where_it_computed_a_layer():
    report = _report_with_timings([500.0] * 7, [650.0] * 7)
    report.timings += [Timing("darknet53", "ours", "deploy", 8, [500.0] * 7),
                       Timing("darknet53", "ours", "deploy_winograd", 8, [480.0] * 7)]
    deploy = lambda: next(c for c in check_targets(report) if c.target.startswith("deploy (best"))  # noqa: E731
    # No layer computed by Winograd: deploy+W timed the plain network again, and its lower time is noise.
    report.winograd_layers["darknet53, batch 8"] = 0
    assert deploy().value == pytest.approx(650 / 500)
    assert "| 500.0 | 480.0 | 0 |" in to_markdown(report)  # deploy, deploy+W, W layers
    report.winograd_layers["darknet53, batch 8"] = 12
    assert deploy().value == pytest.approx(650 / 480)
    assert "| 500.0 | 480.0 | 12 |" in to_markdown(report)


@pytest.mark.skipif(not onednn_available(), reason="Winograd runs on the oneDNN deploy path")
def test_winograd_layers_run_counts_the_layers_winograd_computed(monkeypatch):
    # Two layers are swapped; each decides per input. Its Winograd kernels are replaced by zeros so that
    # nothing compiles: what is counted is which path each layer took.
    layers = [WinogradConvAct(OneDnnConvAct(ConvAct(nn.Conv2d(c, 128, 3, padding=1), nn.ReLU()), ("relu", [])))
              for c in (64, 128)]
    net = deploy(nn.Sequential(*layers), onednn=False)
    monkeypatch.setattr(WinogradConvAct, "run", lambda self, x, algorithm: torch.zeros(x.shape[0], 128, *x.shape[2:]))
    assert winograd_layers_run(net, torch.randn(1, 64, 28, 28)) == 0  # batch 1: too few tiles, both run direct
    assert winograd_layers_run(net, torch.randn(8, 64, 28, 28)) == 2


# The correspondence claims of TIMM_EQUIVALENTS, checked against timm's own parameter counts.
PARAM_DIFFERENCE = {"cspresnet50": 8_320, "cspresnext50": 12_416}


@pytest.mark.parametrize("ours", sorted(n for n in TIMM_EQUIVALENTS if n in cspnet.list_models()))
def test_timm_mapping_matches_parameter_counts(ours):
    pytest.importorskip("timm")
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    theirs = TIMM_EQUIVALENTS[ours][0]
    assert count(build("timm", theirs)) - count(build("ours", ours)) == PARAM_DIFFERENCE.get(ours, 0)


def test_saved_activation_bytes_counts_what_the_forward_pass_holds():
    # The conv output (8x8x8 floats) is the in-place ReLU's output; the out-of-place ReLU frees it
    # and keeps its own output. The input and the weights were allocated before: they do not count.
    for inplace in (False, True):
        model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace=inplace))
        assert saved_activation_bytes(model, torch.randn(1, 3, 8, 8)) == 4 * 8 * 64
    # A second conv keeps its input (the first ReLU's output) and returns its own output.
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1))
    assert saved_activation_bytes(model, torch.randn(1, 3, 8, 8)) == 4 * (8 * 64 + 4 * 64)


def test_interleaving_runs_round_robin_with_a_rotating_start():
    calls = []
    fns = {k: (lambda k=k: calls.append(k)) for k in "abc"}
    samples = run_interleaved(fns, warmup=1, repeats=4, clock=Clock(torch.device("cpu")))
    assert calls == list("abc") + list("abc" "bca" "cab" "abc")
    assert {k: len(v) for k, v in samples.items()} == {"a": 4, "b": 4, "c": 4}


def test_measure_peak_reports_gemm_and_conv():
    peak = measure_peak("cpu", quick=True)
    assert peak["gemm_gflops"] > 0 and peak["conv_gflops"] == max(peak["conv_gflops_nchw"], peak["conv_gflops_cl"])


def test_groups_pair_each_model_with_its_twin_once():
    assert make_groups(("cspresnet50", "resnet50", "cspdarknet53"), twins=True) == [
        ["cspresnet50", "resnet50"], ["cspdarknet53", "darknet53"]]
    assert make_groups(("cspresnet50",), twins=False) == [["cspresnet50"]]
    # The twin listed first still pairs with its CSP model, CSP model first (check_targets reads them so).
    assert make_groups(("resnet10", "cspresnet10"), twins=True) == [["cspresnet10", "resnet10"]]
    assert make_groups(("darknet53", "cspresnet50", "cspdarknet53", "resnet50"), twins=True) == [
        ["cspdarknet53", "darknet53"], ["cspresnet50", "resnet50"]]
    # A CSP model that is also an elastic model's twin pairs once, with whichever was listed first.
    assert make_groups(("cspdarknet53", "cspdarknet53_elastic"), twins=True) == [
        ["cspdarknet53", "darknet53"], ["cspdarknet53_elastic"]]
    assert make_groups(("cspdarknet53_elastic", "cspdarknet53"), twins=True) == [["cspdarknet53_elastic", "cspdarknet53"]]
    assert make_groups(("resnet10", "cspresnet10"), twins=False) == [["resnet10"], ["cspresnet10"]]
    with pytest.raises(ValueError, match="did you mean"):
        make_groups(("cspresnet5O",), twins=True)


def test_bad_configs_are_refused():
    with pytest.raises(ValueError, match="threads"):
        run_benchmarks(BenchConfig(models=("resnet10",), threads=0))
    with pytest.raises(ValueError, match="train format"):
        run_benchmarks(quick_config(("resnet10",), train_formats=("nhwc",)))
    with pytest.raises(ValueError, match="train_repeats must be >= 1"):
        run_benchmarks(quick_config(("resnet10",), train_repeats=0))
    for device in ("tpu", "cuda:x", "CPU", "cpu:0"):
        with pytest.raises(ValueError, match=f"device must be cpu, cuda or cuda:N, got '{device}'"):
            run_benchmarks(quick_config(("resnet10",), device=device))


def test_bench_cli_refuses_an_unknown_device_without_a_traceback(capsys):
    assert cli_main(["bench", "--quick", "resnet10", "--device", "tpu"]) == 2
    err = capsys.readouterr().err
    assert "device must be cpu, cuda or cuda:N, got 'tpu'" in err and "Traceback" not in err


def test_flops_saving_uses_conv_macs():
    report = type("R", (), {"profiles": {"ours:a": {"macs": 78}, "ours:b": {"macs": 100}}})()
    assert flops_saving(report, "a", "b") == pytest.approx(0.22)


def test_keep_freed_memory_flag_is_applied_and_reported():
    # It changes malloc for the whole process, so run the suite in a fresh one.
    cmd = [sys.executable, "-m", "cspnet", "bench", "resnet10", "--quick", "--no-twins", "--no-timm", "--no-onnx",
           "--no-memory", "--no-deploy", "--keep-freed-memory", "--no-memory-efficient"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "keep freed memory" in proc.stdout and "| resnet10 |" in proc.stdout
    # without memory-efficient entries the training table has no time in that column
    assert any(line.startswith("| resnet10 | NCHW |") and line.endswith("| — | — |") for line in proc.stdout.splitlines())


def test_bench_cli_memory_options_reach_the_config():
    from cspnet.cli import build_parser
    from cspnet.cli.bench import config_from_args

    default = config_from_args(build_parser().parse_args(["bench", "resnet10"]))
    assert default.return_freed_memory and default.memory_efficient and default.train_repeats == 7
    assert config_from_args(build_parser().parse_args(["bench", "resnet10", "--train-repeats", "11"])).train_repeats == 11
    chosen = config_from_args(build_parser().parse_args(
        ["bench", "resnet10", "--glibc-default-malloc", "--no-memory-efficient", "--keep-freed-memory"]))
    assert not chosen.return_freed_memory and not chosen.memory_efficient and chosen.keep_freed_memory


def test_op_profile_finds_darknet53_doing_timms_work_op_for_op(tmp_path, benchmark_script):
    # benchmarks/op_profile.py: our darknet53 and timm's are the same network, so a training step
    # must run the same ATen ops the same number of times; cspdarknet53 runs the cfg's two split
    # convs where timm runs one and splits its output, so there the counts must differ.
    script = benchmark_script("op_profile")
    out = tmp_path / "ops.md"
    argv = ["darknet53", "cspdarknet53", "--rounds", "1", "--batch", "2", "--input-size", "32", "--threads", "1",
            "--out", str(out)]
    assert script.main(argv) == 0
    text = out.read_text()
    dark, csp = text.split("## cspdarknet53")
    assert "## darknet53" in dark and "Ops whose counts differ: none" in dark
    assert "| `aten::convolution_backward` | 52 | 52 |" in dark
    differ = next(line for line in csp.splitlines() if line.startswith("Ops whose counts differ: "))
    assert "`aten::conv2d` 72 vs 67" in differ  # 5 stages: two split convs vs one


def test_median_interval_is_two_order_statistics_with_the_stated_coverage():
    from cspnet.bench import median_interval

    assert median_interval([3.0, 1.0, 2.0, 5.0, 4.0]) is None  # 5 values: even [min, max] covers only 94 %
    assert median_interval([6.0, 1.0, 2.0, 5.0, 4.0, 3.0]) == (1.0, 6.0)
    assert median_interval([float(v) for v in range(11, 0, -1)]) == (2.0, 10.0)
    with pytest.raises(ValueError):
        median_interval([1.0] * 8, confidence=1.0)
    # Coverage, by simulation from a skewed distribution whose median is known (ln 2 for Exp(1)).
    gen = torch.Generator().manual_seed(0)
    for n in (6, 11, 15):
        draws = torch.empty(4000, n).exponential_(1.0, generator=gen)
        hits = 0
        for row in draws.tolist():
            low, high = median_interval(row)
            hits += low <= 0.6931 <= high
        assert 0.95 <= hits / 4000 <= 0.995, (n, hits)


def _report_with_timings(ours_ms: list[float], timm_ms: list[float]):
    from cspnet.bench import BenchReport, Timing, _environment

    config = quick_config(("darknet53",), twins=False, batch_sizes=(8,), train_batch=8)
    profiles = {f"{impl}:darknet53": {"params": 1, "macs": 10**9, "cio": 1} for impl in ("ours", "timm")}
    peak = {"gemm_n": 2048, "gemm_gflops": 1.0, "conv_shape": [8, 256, 56, 56], "conv_gflops_nchw": 1.0, "conv_gflops_cl": 1.0,
            "conv_gflops": 1.0, "conv_flops": 1e9}
    report = BenchReport(config, _environment(config), peak, [["darknet53"]], {"darknet53": "darknet53"}, profiles)
    for impl, ms in (("ours", ours_ms), ("timm", timm_ms)):
        report.timings.append(Timing("darknet53", impl, "eager", 8, list(ms)))
        report.timings.append(Timing("darknet53", impl, "train", 8, list(ms)))
    return report


def test_no_slowdown_vs_timm_is_judged_on_paired_rounds():
    # Per round, ours is 3 % slower: a slowdown, although the medians alone would not show a pattern.
    rounds = [100.0, 140.0, 90.0, 120.0, 110.0, 95.0, 130.0]
    slower = _report_with_timings([1.03 * t for t in rounds], rounds)
    checks = [c for c in check_targets(slower) if c.target == NO_SLOWDOWN_TARGET]
    assert {c.subject for c in checks} == {"darknet53, forward batch 8", "darknet53, training step NCHW"}
    assert all(not c.passed and c.value == pytest.approx(1 / 1.03) for c in checks)
    # Rounds that go either way: no slowdown was measured.
    mixed = _report_with_timings([t * f for t, f in zip(rounds, (1.02, 0.99, 1.01, 0.98, 1.0, 1.03, 0.99))], rounds)
    assert all(c.passed for c in check_targets(mixed) if c.target == NO_SLOWDOWN_TARGET)
    text = to_markdown(mixed)
    assert "| darknet53 | NCHW |" in text and "× [0.97, 1.02] |" in text
    # Five rounds are too few for a 95 % interval: no verdict rather than a made-up one.
    few = _report_with_timings(rounds[:5], rounds[:5])
    assert not [c for c in check_targets(few) if c.target == NO_SLOWDOWN_TARGET]


def test_no_slowdown_row_shows_the_median_ratio_beside_its_interval():
    # Ours is 25 % slower in 6 of 7 rounds; in one round timm was descheduled. With 7 rounds the 95 %
    # interval is [lowest, highest] ratio, which reaches 1.0: the rule passes the row, but the row must
    # show the median (0.80), not the interval's upper end, and say how wide 7 rounds leave the interval.
    report = _report_with_timings([125.0] * 7, [100.0] * 6 + [140.0])
    check = next(c for c in check_targets(report) if c.target == NO_SLOWDOWN_TARGET)
    assert check.value == pytest.approx(0.8) and check.interval == pytest.approx((0.8, 1.12))
    assert check.passed and check.rounds == 7
    text = to_markdown(report)
    assert "| darknet53, forward batch 8 | 0.80 [0.80, 1.12], 7 rounds | b ≥ 1.00 | yes |" in text
    assert "7 rounds: [lowest, highest] ratio" in text and "no slowdown was shown, not that there is none" in text
    eleven = _report_with_timings([125.0] * 11, [100.0] * 11)
    assert "11 rounds: drops the 1 lowest and 1 highest ratios" in to_markdown(eleven)


def test_benchmarks_doc_preamble_is_notes_md():
    # run_all.py writes NOTES.md before the tables: a fix made in the doc alone is lost at the next run.
    root = Path(__file__).resolve().parents[1]
    notes = (root / "benchmarks" / "NOTES.md").read_text().strip()
    doc = (root / "docs" / "benchmarks.md").read_text()
    assert doc.startswith(f"# Benchmarks: speed and memory\n\n{notes}\n\n## Environment\n")
