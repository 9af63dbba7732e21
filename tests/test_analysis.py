"""The analysis tools: gradient duplication, per-layer bottleneck profile, γ / fusion ablation runner."""
import fcntl
import json
import math
import re
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from cspnet import create_model, list_models, profile
from cspnet.analysis.ablation import (
    PAPER_TABLE1, TABLE1_FAMILY, AblationRun, _measure, ablation_runs, format_ablation_table, run_ablation,
)
from cspnet.analysis.common import find_twin
from cspnet.analysis.gradients import analyze_gradients, cosine, cosine_matrix, stage_gradients
from cspnet.analysis.layers import layer_costs
from cspnet.blocks import DarkBlock, repeat_blocks
from cspnet.cli import main
from cspnet.data import load_classification
from cspnet.engine.classify import ClassifyRecipe
from cspnet.engine.models import build_model
from cspnet.engine.train import TrainConfig
from cspnet.layers import ConvBnAct
from cspnet.net import StagedNet
from cspnet.registry import get_spec
from cspnet.stage import CrossStage

TINY_DENSE = {"depths": (2, 3), "growth_rate": 8, "stem_chs": 16}


# -- the measure ------------------------------------------------------------------------------------
def test_cosine_is_one_for_identical_minus_one_for_opposite_and_near_zero_for_independent():
    gen = torch.Generator().manual_seed(1)
    for _ in range(5):
        a = torch.randn(4, 8, 5, 5, generator=gen)
        assert cosine(a, a.clone()) == 1.0  # exactly, not approximately
        assert cosine(a, -a) == -1.0
    a, b = torch.randn(2, 100_000, generator=gen)
    assert abs(cosine(a, b)) < 0.02  # 1/sqrt(n) ~ 0.003
    assert math.isnan(cosine(a, torch.zeros_like(a)))
    with pytest.raises(ValueError, match="different shapes"):
        cosine(a, b[:10])
    m = cosine_matrix([a, a * 3, b])
    assert m[0, 1] == pytest.approx(1.0, abs=1e-12) and np.allclose(np.diag(m), 1) and abs(m[0, 2]) < 0.02 and np.array_equal(m, m.T)


class TwoPaths(nn.Module):
    """Two 3x3 convs reading the same map: summed (``concat=False``) or side by side."""

    def __init__(self, chs: int, concat: bool):
        super().__init__()
        self.concat = concat
        self.a = nn.Conv2d(chs, chs, 3, padding=1, bias=False)
        self.b = nn.Conv2d(chs, chs, 3, padding=1, bias=False)

    def forward(self, x):
        return torch.cat([self.a(x), self.b(x)], 1) if self.concat else self.a(x) + self.b(x)


def _two_path_net(concat: bool, chs: int = 32, classes: int = 100) -> StagedNet:
    stage = CrossStage(chs, lambda w: (TwoPaths(w, concat), 2 * w if concat else w), fusion="none")
    return StagedNet(ConvBnAct(1, chs, 3), chs, 1, [stage], [stage.out_chs], [1], num_classes=classes, in_chans=1)


def test_two_identical_paths_measure_exactly_one():
    net = _two_path_net(concat=False)
    blocks = net.stages[0].blocks
    blocks.b.weight.data.copy_(blocks.a.weight.data)  # same weights, same output gradient: the same path twice
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 100, (8,))
    s = stage_gradients(net, x, y).stages[0]
    assert s.paths == ["blocks.a", "blocks.b"]
    assert s.path_cos[0, 1] == 1.0
    assert s.residual < 1e-6  # the two paths are all of dL/dX


def test_independent_random_paths_measure_near_zero():
    for seed in range(3):
        torch.manual_seed(seed)
        net = _two_path_net(concat=True)  # independent random weights, independent readouts
        x, y = torch.randn(32, 1, 8, 8), torch.randint(0, 100, (32,))
        s = stage_gradients(net, x, y).stages[0]
        # noise floor ~ 1/sqrt(batch x classes) ~ 0.02 here
        assert abs(s.path_cos[0, 1]) < 0.1, s.path_cos
        assert s.residual < 1e-6


def _dense_maps_gradients(model, x, y, stage_index):
    """The total gradient of every map of a dense block (x0, x1, ...), computed independently of the tool."""
    block = model.stages[stage_index].blocks
    maps = []
    handles = [block.register_forward_pre_hook(lambda m, a: maps.append(a[0]))]
    handles += [layer.register_forward_hook(lambda m, a, o: maps.append(o)) for layer in block.layers]
    model.train()
    loss = nn.functional.cross_entropy(model(x), y)
    for h in handles:
        h.remove()
    return [g.double() for g in torch.autograd.grad(loss, maps)]


@pytest.mark.parametrize("name", ["densenet121", "cspdensenet121"])
def test_dense_block_paths_add_up_and_update_overlap_follows_the_paper_equation(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, in_chans=1, **TINY_DENSE)
    x, y = torch.randn(6, 1, 32, 32), torch.randint(0, 10, (6,))
    report = stage_gradients(model, x, y)
    last = "partial_transition" if name.startswith("csp") else "transition"
    for i, s in enumerate(report.stages):
        depth = TINY_DENSE["depths"][i]
        assert s.paths == [f"blocks.layers.{k}" for k in range(depth)] + [last]
        assert s.residual < 1e-5  # every reader of X found: sum of the paths = dL/dX
        assert s.overlap is not None and np.allclose(s.overlap, s.overlap.T) and np.allclose(np.diag(s.overlap), 1)
        # O[layer 0, layer k] = ||(g0)|| / ||(g0, ..., g_{k-1})||, from the maps' own gradients
        g = [t.pow(2).sum().item() for t in _dense_maps_gradients(model, x, y, i)]
        for k in range(1, depth):
            assert s.overlap[0, k] == pytest.approx(math.sqrt(g[0] / sum(g[:k + 1])), rel=1e-5)
        if name.startswith("csp"):
            assert s.split == "slice" and s.split_cos == 0.0  # x0' and x0'' are disjoint channels
    stage0 = model.stages[0]  # X is x0'' (the part-2 slice) for CSP, the whole 16-channel base map otherwise
    assert report.stages[0].shared_chs == (stage0.main_chs if name.startswith("csp") else 16)
    assert stage0.main_chs < 16 if name.startswith("csp") else True


def test_conv_split_and_residual_blocks_are_complete():
    # A Darknet-style CSP stage: two 1x1 convs read the base map; the residual add reads X as its second input.
    stage = CrossStage(16, lambda w: repeat_blocks(lambda c, i: DarkBlock(c, w // 2, w), w, w, 2), fusion="csp",
                       split="conv", transition_chs=16)
    net = StagedNet(ConvBnAct(1, 16, 3), 16, 1, [stage], [16], [1], num_classes=10, in_chans=1)
    s = stage_gradients(net, torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,))).stages[0]
    assert s.split == "conv" and -1 <= s.split_cos <= 1 and s.split_cos != 0.0
    assert s.paths == ["blocks.0"] and s.residual < 1e-5
    assert s.overlap is None  # residual blocks do not read prefixes of one concat


def test_stage_gradients_leaves_the_model_unchanged_and_rejects_models_without_stages():
    torch.manual_seed(0)
    model = create_model("cspdensenet121", num_classes=10, in_chans=1, **TINY_DENSE).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 1, 32, 32)
    out_before = model(x)
    stage_gradients(model, torch.randn(4, 1, 32, 32), torch.randint(0, 10, (4,)))
    assert not model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(model(x), out_before)  # no hook left behind
    with pytest.raises(ValueError, match="no CrossStage"):
        stage_gradients(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)), torch.randn(2, 4), torch.tensor([0, 1]))


def test_analyze_gradients_writes_heatmaps_and_tables(tmp_path):
    torch.manual_seed(0)
    models = {n: create_model(n, num_classes=10, in_chans=1, **TINY_DENSE) for n in ("cspdensenet121", "densenet121")}
    reports = analyze_gradients(models, torch.randn(4, 1, 32, 32), torch.randint(0, 10, (4,)), tmp_path)
    assert [r.model for r in reports] == list(models)
    for i in range(2):
        assert (tmp_path / f"gradients_stage{i}.png").stat().st_size > 10_000
    rows = json.loads((tmp_path / "gradients.json").read_text())
    assert rows[0]["stages"][0]["paths"][-1] == "partial_transition" and rows[1]["stages"][0]["split"] is None
    table = (tmp_path / "gradients.md").read_text()
    assert table.count("| cspdensenet121 | stages.") == 2 and table.count("| densenet121 | stages.") == 2


# -- the per-layer bottleneck profile ---------------------------------------------------------------
@pytest.mark.parametrize("name", ["cspresnet50", "cspdarknet53"])
def test_per_layer_flops_and_cio_sum_to_the_profiler_totals(name):
    model = create_model(name)
    summary = layer_costs(model, 32)
    prof = profile(model, 32)
    assert sum(layer.macs for layer in summary.layers) == prof.macs
    assert sum(layer.bflops for layer in summary.layers) == pytest.approx(prof.bflops, rel=1e-12)
    assert sum(layer.cio for layer in summary.layers) == prof.cio
    assert summary.peak_bflops.bflops == max(layer.bflops for layer in summary.layers)
    assert [layer.index for layer in summary.layers] == list(range(len(summary.layers)))


def test_analyze_layers_cli_names_the_peaks_of_model_and_twin(tmp_path, capsys):
    assert main(["analyze", "layers", "csppeleenet", "--out", str(tmp_path), "--input-size", "32"]) == 0
    data = json.loads((tmp_path / "layers.json").read_text())
    assert [d["model"] for d in data] == ["csppeleenet", "peleenet"]
    for d in data:
        assert d["bflops"] == pytest.approx(profile(create_model(d["model"]), 32).bflops, rel=1e-12)
        assert f"`{d['peak_bflops']['name']}`" in (tmp_path / "layers.md").read_text()
    assert (tmp_path / "layers.png").stat().st_size > 10_000
    assert main(["analyze", "layers", "peleenet", "--out", str(tmp_path / "x"), "--twin", "nosuchmodel"]) == 2
    assert "unknown model 'nosuchmodel'" in capsys.readouterr().err


# -- the ablation runner ----------------------------------------------------------------------------
def test_ablation_runs_cover_the_grid_and_reject_bad_requests():
    runs = ablation_runs("csppeleenet")
    assert [r.key for r in runs][:2] == ["plain", "fusion_first-g0.25"] and len(runs) == 10
    assert runs[0].model == "peleenet" and runs[0].options == {}
    assert {(r.fusion, r.part_ratio) for r in runs} == set(PAPER_TABLE1)
    assert ablation_runs("peleenet")[1].model == "csppeleenet"  # a plain name finds its CSP twin
    with pytest.raises(ValueError, match="unknown fusion"):
        ablation_runs("csppeleenet", fusions=("fusion_middle",))
    with pytest.raises(ValueError, match=r"must lie in \(0, 1\)"):
        ablation_runs("csppeleenet", gammas=(1.0,))
    lonely = next(n for n in list_models() if find_twin(n) is None)
    with pytest.raises(ValueError, match="no CSP twin"):
        ablation_runs(lonely)


def _shapes(name: str, options: dict) -> dict[str, tuple[int, ...]]:
    model = build_model(name, num_classes=10, in_chans=3, width=0.25, options=options)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_the_plain_row_is_the_family_without_csp():
    # where the family's config with fusion "none" is its registered twin, the row is that twin
    for family in ("csppeleenet", "cspdensenet121"):
        plain = ablation_runs(family, gammas=(0.5,), fusions=("csp",))[0]
        assert (plain.key, plain.model, plain.options) == ("plain", get_spec(family).twin, {})
        assert _shapes(family, {"fusion": "none"}) == _shapes(plain.model, plain.options)
    # the cfgs' own pair: csdarknet53.cfg also drops Darknet-53's bottleneck, so fusion "none" alone is not Darknet-53
    assert ablation_runs("cspdarknet53", gammas=(0.5,), fusions=("csp",))[0].model == "darknet53"
    # a CSP twin (CSPDarknet-53) or another network (Darknet Reference) is no plain row: the family without CSP is
    for family in ("cspdarknet53_elastic", "cspdensenet_ref", "csppeleenet_ref"):
        plain = ablation_runs(family, gammas=(0.5,), fusions=("csp",))[0]
        assert (plain.model, plain.options) == (family, {"fusion": "none"})
        model = build_model(plain.model, num_classes=10, in_chans=3, width=0.25, options=plain.options)
        stages = [m for m in model.modules() if isinstance(m, CrossStage)]
        assert stages and {m.fusion for m in stages} == {"none"}


@pytest.fixture(scope="module")
def tiny_ablation(tmp_path_factory):
    """A 5-run ablation of a tiny CSPDenseNet: 32 digits at 16x16, one epoch of two steps."""
    out = tmp_path_factory.mktemp("ablation")
    data = load_classification("digits", 16, train_limit=32, test_limit=10)
    cfg = TrainConfig(epochs=1, batch_size=16, lr=0.05, seed=0)
    kwargs = dict(options=TINY_DENSE, gammas=(0.25, 0.75), fusions=("fusion_last", "csp"), paper_size=16, progress=False)
    rows = run_ablation("cspdensenet121", data, cfg, ClassifyRecipe(), out, **kwargs)
    return out, data, cfg, kwargs, rows


def test_ablation_completes_on_a_tiny_subset_with_profiler_bflops(tiny_ablation):
    out, data, _, _, rows = tiny_ablation
    assert [r["status"] for r in rows] == ["trained"] * 5
    assert [r["key"] for r in rows] == ["plain", "fusion_last-g0.25", "fusion_last-g0.75", "csp-g0.25", "csp-g0.75"]
    table = (out / "ablation.md").read_text()
    lines = [line for line in table.splitlines() if re.match(r"\| (csp)?densenet121 ", line)]
    assert len(lines) == 5
    saved = json.loads((out / "ablation.json").read_text())
    for line, row in zip(lines, saved):
        cells = [c.strip() for c in line.strip("|").split("|")]
        ablated = {} if row["fusion"] == "none" else {"fusion": row["fusion"], "part_ratio": row["part_ratio"]}
        model = build_model(row["model"], num_classes=10, in_chans=1, options={**TINY_DENSE, **ablated})
        prof = profile(model, 16)
        assert row["bflops"] == prof.bflops and row["params"] == prof.params
        assert float(cells[4]) == round(prof.bflops, 4)  # the BFLOPs column of the Markdown table
        assert float(cells[3]) == round(prof.params / 1e6, 3)
        assert 0.0 <= row["top1"] <= 1.0 and float(cells[5]) == round(100 * row["top1"], 2)
        imagenet = build_model(row["model"], num_classes=1000, in_chans=3, options={**TINY_DENSE, **ablated})
        assert row["bflops_paper_size"] == profile(imagenet, 16).bflops
    assert len({r["bflops"] for r in rows}) == 5  # γ and fusion really change the models
    assert (out / "ablation.png").stat().st_size > 10_000
    assert (out / "runs" / "plain" / "metrics.csv").is_file()


def test_ablation_runs_are_a_function_of_the_seed(tiny_ablation, tmp_path):
    out, data, cfg, kwargs, _ = tiny_ablation
    torch.manual_seed(12345)  # whatever ran before in this process must not reach the initial weights
    run_ablation("cspdensenet121", data, cfg, ClassifyRecipe(), tmp_path, **{**kwargs, "gammas": (0.75,), "fusions": ("csp",)})
    for key in ("plain", "csp-g0.75"):
        first, again = (load_file(d / "runs" / key / "last.safetensors") for d in (out, tmp_path))
        assert first.keys() == again.keys()
        assert all(torch.equal(first[k], again[k]) for k in first), key


def test_ablation_builds_every_cell_before_training_any(tmp_path):
    data = load_classification("digits", 16, train_limit=32, test_limit=10)
    cfg = TrainConfig(epochs=1, batch_size=16, lr=0.05, seed=0)
    with pytest.raises(ValueError, match="cspdarknet53 csp-g0.25: part_ratio=0.25 with split='conv'"):
        run_ablation("cspdarknet53", data, cfg, ClassifyRecipe(), tmp_path, gammas=(0.5, 0.25), fusions=("csp",),
                     width=0.25, progress=False)
    assert not (tmp_path / "runs").exists()


def test_ablation_leaves_runs_another_process_holds_to_it(tmp_path, capsys):
    data = load_classification("digits", 16, train_limit=32, test_limit=10)
    cfg = TrainConfig(epochs=1, batch_size=16, lr=0.05, seed=0)
    kwargs = dict(options=TINY_DENSE, gammas=(0.5,), fusions=("csp",), paper_size=16, progress=False)
    (tmp_path / "runs").mkdir()
    with open(tmp_path / "runs" / "plain.lock", "a") as held:  # what a second `cspnet ablation` would hold
        fcntl.flock(held, fcntl.LOCK_EX)
        rows = run_ablation("cspdensenet121", data, cfg, ClassifyRecipe(), tmp_path, **kwargs)
        assert [(r["key"], r["status"]) for r in rows] == [("csp-g0.5", "trained")]
        assert not (tmp_path / "runs" / "plain").exists()
        assert "plain: another process is training it" in capsys.readouterr().err
        assert "| densenet121 |" not in (tmp_path / "ablation.md").read_text()
    rows = run_ablation("cspdensenet121", data, cfg, ClassifyRecipe(), tmp_path, **kwargs)
    assert [(r["key"], r["status"]) for r in rows] == [("plain", "trained"), ("csp-g0.5", "skipped")]
    assert "| densenet121 |" in (tmp_path / "ablation.md").read_text()


def test_ablation_table_puts_the_papers_figures_beside_the_papers_network_only(tiny_ablation):
    data, rows = tiny_ablation[1], [dict(r) for r in tiny_ablation[4]]
    assert "| 70.7 |" not in format_ablation_table(rows)  # no paper figures for DenseNet
    csp = AblationRun(TABLE1_FAMILY, "csp", 0.5)
    assert _measure(csp, data, 1.0, csp.options, 224)["paper_arch"]
    headline = AblationRun("csppeleenet", "csp", 0.5)  # its other stage set misses Table 1's fusion-first rows
    assert not _measure(headline, data, 1.0, headline.options, 224)["paper_arch"]
    # swish, another width or another size is not the network Table 1 measured
    assert not _measure(csp, data, 1.0, {**csp.options, "act": "swish"}, 224)["paper_arch"]
    assert not _measure(csp, data, 0.5, csp.options, 224)["paper_arch"]
    assert not _measure(csp, data, 1.0, csp.options, 64)["paper_arch"]
    for r in rows:
        r["model"] = "peleenet" if r["fusion"] == "none" else TABLE1_FAMILY
    assert "| 70.7 |" not in format_ablation_table(rows)
    for r in rows:
        r["paper_arch"] = True
    table = format_ablation_table(rows)
    for r in rows:
        top1, bflops = PAPER_TABLE1[(r["fusion"], r["part_ratio"])]
        assert re.search(rf"\| {100 * r['top1']:.2f} \|.*\| {bflops:.3f} \| {top1:.1f} \|$", table, re.M)


def test_ablation_resumes_skipping_finished_runs(tiny_ablation):
    out, data, cfg, kwargs, rows = tiny_ablation
    table = (out / "ablation.md").read_text()
    (out / "runs" / "csp-g0.25" / "result.json").unlink()  # as if killed after training, before the result
    old = out / "runs" / "plain" / "result.json"  # a result finished before rows recorded paper_arch
    saved = json.loads(old.read_text())
    del saved["row"]["paper_arch"]
    old.write_text(json.dumps(saved))
    again = run_ablation("cspdensenet121", data, cfg, ClassifyRecipe(), out, **kwargs)
    assert [r["status"] for r in again] == ["skipped"] * 3 + ["resumed", "skipped"]
    assert [r["top1"] for r in again] == [r["top1"] for r in rows]
    assert [r["paper_arch"] for r in again] == [False] * 5  # DenseNet: not paper Table 1's network
    assert (out / "ablation.md").read_text() == table
    with pytest.raises(ValueError, match="finished with a different train"):
        run_ablation("cspdensenet121", data, TrainConfig(epochs=2, batch_size=16, lr=0.05), ClassifyRecipe(), out, **kwargs)
    with pytest.raises(ValueError, match="what the ablation varies"):
        run_ablation("cspdensenet121", data, cfg, ClassifyRecipe(), out, **{**kwargs, "options": {"part_ratio": 0.5}})


def test_a_reused_run_is_measured_at_the_current_paper_size(tiny_ablation, tmp_path):
    out, data, cfg, kwargs, rows = tiny_ablation
    shutil.copytree(out, tmp_path, dirs_exist_ok=True)  # the fixture's runs, finished at paper size 16
    again = run_ablation("cspdensenet121", data, cfg, ClassifyRecipe(), tmp_path, **{**kwargs, "paper_size": 24})
    assert [r["status"] for r in again] == ["skipped"] * 5 and [r["top1"] for r in again] == [r["top1"] for r in rows]
    for row in again:
        ablated = {} if row["fusion"] == "none" else {"fusion": row["fusion"], "part_ratio": row["part_ratio"]}
        imagenet = build_model(row["model"], num_classes=1000, in_chans=3, options={**TINY_DENSE, **ablated})
        assert row["paper_size"] == 24 and row["bflops_paper_size"] == profile(imagenet, 24).bflops
    table = (tmp_path / "ablation.md").read_text()
    assert "BFLOPs @ 24 (ImageNet arch)" in table
    assert [r["bflops_paper_size"] for r in json.loads((tmp_path / "ablation.json").read_text())] == \
        [r["bflops_paper_size"] for r in again]


def test_ablation_cli_trains_the_requested_cells_only(tmp_path, capsys):
    # The runner itself is tested above through the Python API; this is the command's wiring, kept to two runs.
    opts = [a for k, v in TINY_DENSE.items() for a in ("--model-opt", f"{k}={json.dumps(list(v) if isinstance(v, tuple) else v)}")]
    out = tmp_path / "abl"
    assert main(["ablation", "--family", "cspdensenet121", "--gammas", "0.25,0.75", "--fusions", "fusion_last", "--no-plain",
                 "--width", "0.5", *opts, "--paper-size", "16", "--data", "digits", "--img-size", "16", "--train-limit", "32",
                 "--test-limit", "10", "--epochs", "1", "--batch-size", "16", "--threads", "1", "--no-progress",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.endswith("0 run(s) reused, 2 trained\n")
    rows = json.loads((out / "ablation.json").read_text())
    assert [(r["key"], r["model"], r["fusion"], r["part_ratio"], r["epochs"]) for r in rows] == [
        ("fusion_last-g0.25", "cspdensenet121", "fusion_last", 0.25, 1), ("fusion_last-g0.75", "cspdensenet121", "fusion_last", 0.75, 1)]
    table = (out / "ablation.md").read_text()
    assert table in printed
    lines = [line for line in table.splitlines() if re.match(r"\| (csp)?densenet121 ", line)]
    assert len(lines) == 2  # --no-plain: no densenet121 row
    for line, row in zip(lines, rows):
        model = build_model("cspdensenet121", num_classes=10, in_chans=1, width=0.5,
                            options={**TINY_DENSE, "fusion": "fusion_last", "part_ratio": row["part_ratio"]})
        prof = profile(model, 16)
        assert (row["params"], row["bflops"]) == (prof.params, prof.bflops)  # --width and --model-opt reached the model
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[:3] == ["cspdensenet121", f"{row['part_ratio']:g}", "fusion last"]
        assert float(cells[3]) == round(prof.params / 1e6, 3) and float(cells[4]) == round(prof.bflops, 4)
        assert 0.0 <= row["top1"] <= 1.0 and float(cells[5]) == round(100 * row["top1"], 2)
        assert cells[6] == cells[7] == "—"  # no plain row to compare with
    assert rows[0]["bflops"] != rows[1]["bflops"]
    assert sorted(p.name for p in (out / "runs").iterdir() if p.is_dir()) == ["fusion_last-g0.25", "fusion_last-g0.75"]
    assert all((out / "runs" / r["key"] / "last.safetensors").is_file() for r in rows)
    assert (out / "ablation.png").stat().st_size > 10_000


def test_gradients_model_opt_fusion_changes_the_model_not_its_plain_twin(tmp_path):
    args = ["analyze", "gradients", "csppeleenet", "--model-opt", "fusion=fusion_last", "--width", "0.25",
            "--data", "digits", "--img-size", "32", "--batch", "8"]
    assert main([*args, "--out", str(tmp_path)]) == 0
    model, twin = json.loads((tmp_path / "gradients.json").read_text())
    assert (model["model"], twin["model"]) == ("csppeleenet", "peleenet")
    assert [s["split"] for s in model["stages"]] == ["slice"] * 3 + [None]  # CSPPeleeNet's stages 1-3
    assert [s["split"] for s in twin["stages"]] == [None] * 4  # the twin has no CSP stage
    assert [s["shared_chs"] for s in twin["stages"]] != [s["shared_chs"] for s in model["stages"]]
    assert twin["loss"] != model["loss"]


def test_gradients_cli_on_trained_runs_and_registered_models(tiny_ablation, tmp_path, capsys):
    out = tiny_ablation[0]
    assert main(["analyze", "gradients", str(out / "runs" / "plain"), "--twin", str(out / "runs" / "csp-g0.75"),
                 "--out", str(tmp_path / "trained"), "--batch", "10"]) == 0
    reports = json.loads((tmp_path / "trained" / "gradients.json").read_text())
    assert [r["model"].split(" ")[0] for r in reports] == ["plain", "csp-g0.75"]
    assert all(s["residual"] < 1e-5 for r in reports for s in r["stages"])
    assert [s["shared_chs"] for s in reports[1]["stages"]] == [4, 4]  # γ = 0.75 of the 16 base channels bypass
    assert len(list((tmp_path / "trained").glob("gradients_stage*.png"))) == 2
    # a folder without a run is named as such, not taken for an unknown model name
    (tmp_path / "empty").mkdir()
    assert main(["analyze", "gradients", str(tmp_path / "empty"), "--out", str(tmp_path / "e"), "--batch", "10"]) == 2
    assert "a folder without a training run in it" in capsys.readouterr().err
    # a checkpoint name that the run does not have is an error, not a quiet fall-back to last
    assert main(["analyze", "gradients", str(out / "runs" / "plain"), "--checkpoint", "bset",
                 "--out", str(tmp_path / "typo"), "--batch", "10"]) == 2
    opts = [a for k, v in TINY_DENSE.items() for a in ("--model-opt", f"{k}={json.dumps(list(v) if isinstance(v, tuple) else v)}")]
    assert main(["analyze", "gradients", "densenet121", "--out", str(tmp_path / "fresh"), "--data", "digits",
                 "--img-size", "32", "--batch", "8", *opts]) == 0
    assert [r["model"] for r in json.loads((tmp_path / "fresh" / "gradients.json").read_text())] == ["densenet121", "cspdensenet121"]
