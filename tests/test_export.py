"""Deploy mode and exports give the eager model's outputs: every model, every detector neck.

Tolerance: max |out - eager| <= 1e-4 x max |eager| (TOL), on BN-calibrated models (random-init
BatchNorm statistics make logits huge and the comparison meaningless). For scale: fp32 eager
itself differs from a float64 run of the same model by up to ~4e-5 of the output scale, and
the fused model is as close to float64 as eager is.
"""
import copy
import subprocess
import sys
from functools import partial

import pytest
import torch
from torch import nn

import cspnet
from cspnet.cli import main as cli_main
from cspnet.detection import NECKS, create_detector
from cspnet.export import (
    ConvAct, DeployedModel, OneDnnConvAct, OneDnnResidualBlock, deploy, export_onnx, export_safetensors,
    export_torchscript, fuse, load_torchscript, onednn_available, onnx_opset, onnx_session, run_onnx,
    unfolded_batchnorms, use_onednn,
)
from cspnet.layers import ConvBnAct
from cspnet.weights import load_into, load_state, read_metadata

TOL = 1e-4
SIZE = 64
TINY_DET = {"backbone_width": 0.25, "neck_width": 64}


def calibrate(model: nn.Module, batches: int = 3) -> nn.Module:
    """Give every BatchNorm realistic statistics: the average over a few train-mode batches."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # cumulative average
    model.train()
    with torch.no_grad():
        for _ in range(batches):
            model(torch.randn(4, 3, SIZE, SIZE))
    return model.eval()


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out - ref).abs().max() / ref.abs().max())


def det_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    # Boxes are pixels and scores probabilities: compare each against its own scale.
    return max(rel_err(out[..., :4], ref[..., :4]), rel_err(out[..., 4:], ref[..., 4:]))


_CACHE: dict[str, tuple[nn.Module, torch.Tensor, torch.Tensor]] = {}


def exact_output(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``model(x)`` computed in float64, as float32. Every path (fused, deployed, ONNX, TorchScript) is held
    against it rather than against float32 eager, whose own rounding reaches 7e-5 of the output on the
    deepest DenseNets: two float32 paths then differ by more than either differs from the exact result."""
    with torch.no_grad():
        return copy.deepcopy(model).double()(x.double()).float()


def calibrated(name: str):
    """(BN-calibrated eval model, input batch of 2, its exact output), built once per model."""
    if name not in _CACHE:
        torch.manual_seed(0)
        if name.startswith("det:"):
            model = calibrate(create_detector("cspresnet10", name[4:], num_classes=3, **TINY_DET))
        else:
            model = calibrate(cspnet.create_model(name))
        x = torch.randn(2, 3, SIZE, SIZE)
        ref = exact_output(model, x)
        _CACHE.clear()  # keep one model alive at a time: the list grows with every family
        _CACHE[name] = (model, x, ref)
    return _CACHE[name]


MODELS = cspnet.list_models()
DETECTORS = [f"det:{n}" for n in NECKS]


def err_fn(name):
    return det_err if name.startswith("det:") else rel_err


def check_onnx(path, model: nn.Module, x: torch.Tensor, ref: torch.Tensor, err) -> None:
    """onnxruntime on ``path`` gives ``model``'s outputs, at two batch sizes: the batch axis is dynamic."""
    session = onnx_session(path)
    for batch in (2, 3):
        xb = x if batch == 2 else torch.randn(batch, 3, SIZE, SIZE)
        refb = ref if batch == 2 else exact_output(model, xb)
        (outb,) = run_onnx(session, xb)
        assert outb.shape == refb.shape
        assert err(outb, refb) <= TOL


@pytest.mark.parametrize("name", MODELS + DETECTORS)
def test_fuse_deploy_and_onnx_match_eager(name, tmp_path):
    model, x, ref = calibrated(name)
    err = err_fn(name)
    n_bn = len(unfolded_batchnorms(model))

    fused = fuse(copy.deepcopy(model))
    assert not any(isinstance(m, ConvBnAct) for m in fused.modules())
    assert len(unfolded_batchnorms(fused)) < n_bn
    with torch.no_grad():
        assert err(fused(x), ref) <= TOL

    deployed = deploy(model)
    out = deployed(x)
    assert out.shape == ref.shape
    assert err(out, ref) <= TOL
    assert any(isinstance(m, ConvBnAct) for m in model.modules())  # deploy worked on a copy

    check_onnx(export_onnx(model, tmp_path / "m.onnx", SIZE), model, x, ref, err)


def test_fused_models_have_no_bn_after_a_conv():
    # Families built from ConvBnAct lose every BN; DenseNet keeps its pre-activation BNs
    # (they follow a concat, not a conv), which fuse must leave alone.
    for name, expect_none in (("cspresnet50", True), ("cspdarknet53", True), ("densenet121", False)):
        model = cspnet.create_model(name)
        remaining = unfolded_batchnorms(fuse(model))
        assert (remaining == []) is expect_none, (name, remaining[:3])


def test_fuse_folds_plain_sequential_pairs_and_leaves_the_rest():
    torch.manual_seed(0)
    net = nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()).train()
    with torch.no_grad():
        for _ in range(3):
            net(torch.randn(4, 3, 8, 8))
    net.eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        ref = net(x)
        fuse(net)
        out = net(x)
    assert isinstance(net[2], nn.Identity) and net[1].bias is not None
    assert unfolded_batchnorms(net) == ["0"]  # the leading BN has no conv before it
    assert rel_err(out, ref) <= 1e-6


def test_fuse_keeps_forward_hooks_of_replaced_layers():
    model = cspnet.create_model("cspresnet10").eval()
    seen = []
    model.stages[1].down[0].register_forward_hook(lambda m, i, o: seen.append(o.shape))
    fuse(model)
    assert isinstance(model.stages[1].down[0], ConvAct)
    with torch.no_grad():
        model(torch.randn(1, 3, SIZE, SIZE))
    assert len(seen) == 1


def test_deploy_keeps_every_kind_of_forward_hook_firing_with_the_eager_outputs():
    # A kwargs hook must still be called with kwargs, and the residual blocks' conv3 and add must
    # still run as modules when hooked (the fused block computes them inside one kernel).
    torch.manual_seed(0)
    model = calibrate(cspnet.create_model("cspresnet50", num_classes=10))
    block = model.stages[1].blocks[0]
    seen = {}

    def keep(name):
        return lambda module, args, output: seen.setdefault(name, output.clone())

    def keep_with_kwargs(module, args, kwargs, output):  # called without kwargs, it raises
        seen.setdefault("conv2_kwargs", output.clone())

    handles = [block.conv3.register_forward_hook(keep("conv3")), block.add.register_forward_hook(keep("add")),
               block.conv2.register_forward_hook(keep_with_kwargs, with_kwargs=True)]
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        model(x)
    eager, seen = seen, {}
    with torch.no_grad():
        deploy(model)(x)
    assert seen.keys() == eager.keys() == {"conv3", "add", "conv2_kwargs"}
    assert all(rel_err(seen[k], eager[k]) <= TOL for k in seen)
    for h in handles:
        h.remove()


@pytest.mark.parametrize("transform", [fuse, partial(deploy, copy_model=False)], ids=["fuse", "deploy"])
def test_hooks_inside_a_conv_bn_act_keep_seeing_their_maps_and_handles_still_remove_hooks(transform):
    torch.manual_seed(0)
    model = calibrate(cspnet.create_model("cspresnet10", num_classes=10))
    layer = model.stages[1].down[0]  # a ConvBnAct
    seen = {}
    handles = [getattr(layer, part).register_forward_hook(lambda m, i, o, part=part: seen.setdefault(part, o.clone()))
               for part in ("conv", "bn", "act")]
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        model(x)
    eager, seen = seen, {}
    # a hook on a whole layer moves onto its replacement; its handle must still remove it there
    moved = model.stages[2].down[0].register_forward_hook(lambda m, i, o: seen.setdefault("moved", o))
    transformed = transform(model)
    moved.remove()
    with torch.no_grad():
        transformed(x)
    assert seen.keys() == {"conv", "bn", "act"} and all(rel_err(seen[k], eager[k]) <= TOL for k in seen)
    for h in handles:
        h.remove()


def test_fuse_folds_under_global_hooks_and_past_a_hooked_activation():
    # tools hold process-wide hooks (torch's ModuleTracker); activation statistics hook every activation:
    # neither sees a different map once the BN is folded, so neither stops folding
    from torch.nn.modules.module import register_module_forward_hook

    torch.manual_seed(0)
    model = calibrate(cspnet.create_model("cspresnet10", num_classes=10))
    act = model.stages[1].down[0].act
    seen = []
    act.register_forward_hook(lambda m, i, o: seen.append(o.clone()))
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        model(x)
    handle = register_module_forward_hook(lambda m, i, o: None)
    try:
        fuse(model)
    finally:
        handle.remove()
    assert unfolded_batchnorms(model) == [] and isinstance(model.stages[1].down[0], ConvAct)
    with torch.no_grad():
        model(x)
    assert len(seen) == 2 and rel_err(seen[1], seen[0]) <= TOL


def test_detector_with_cfg_taps_deploys():
    # cspresnet50's detector reads two maps through forward hooks on layers that deploy replaces.
    torch.manual_seed(0)
    det = calibrate(create_detector("cspresnet50", "panet", num_classes=2, backbone_width=0.25, neck_width=64))
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        ref = det(x)
    assert det_err(deploy(det)(x), ref) <= TOL


def test_gfm_detector_exports_with_the_legacy_exporter(tmp_path):
    # GFM resizes every level to every other one (adaptive max-pool / nearest upsample); the
    # TorchScript-based exporter needs those sizes as constants, not read from a tensor's shape.
    model, x, ref = calibrated("det:gfm")
    check_onnx(export_onnx(model, tmp_path / "gfm.onnx", SIZE, exporter="legacy"), model, x, ref, det_err)


@pytest.mark.skipif(not onednn_available(), reason="this PyTorch build has no oneDNN fused kernels")
@pytest.mark.parametrize("act", ["leaky", "relu", "swish", "relu6", "logistic", "linear"])
def test_onednn_conv_act_matches_conv_then_act(act):
    torch.manual_seed(0)
    seq = nn.Sequential(ConvBnAct(8, 16, 3, stride=2, act=act)).train()
    with torch.no_grad():
        seq(torch.randn(4, 8, 12, 12))
    fused = use_onednn(fuse(seq))
    assert isinstance(fused[0], OneDnnConvAct)
    x = torch.randn(2, 8, 12, 12).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        fast = fused(x)
    with torch.no_grad():
        slow = fused[0].layer(x)
    assert torch.allclose(fast, slow, rtol=1e-5, atol=1e-6)


def test_onednn_paths_fall_back_outside_inference():
    model, x, ref = calibrated("cspresnet50")
    net = deploy(model).model
    assert any(isinstance(m, OneDnnResidualBlock) for m in net.modules()) == onednn_available()
    with torch.no_grad():  # grad mode off but not inference mode: the fused path; on: the fallback
        fast = net(x)
    with torch.enable_grad():
        slow = net(x).detach()
    assert rel_err(fast, ref) <= TOL and rel_err(slow, ref) <= TOL


def test_deploy_memory_format_choice():
    model = calibrate(cspnet.create_model("cspresnet10"))
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        ref = model(x)
    def spatial_weights(d):
        return [m.weight for m in d.model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1)]

    nchw = deploy(model, channels_last=False)
    assert not nchw.channels_last and all(w.is_contiguous() for w in spatial_weights(nchw))
    default = deploy(model)  # the documented rule without an example input: channels-last
    assert default.channels_last
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in spatial_weights(default))
    measured = deploy(model, example_input=x)
    assert isinstance(measured.channels_last, bool)
    for d in (nchw, default, measured):
        assert rel_err(d(x), ref) <= TOL


def test_a_deployed_model_takes_new_weights_loaded_after_its_first_call():
    # The first call packs the conv weights for oneDNN; loading others must not leave the old ones packed.
    first, second = calibrate(cspnet.create_model("cspresnet10")), calibrate(cspnet.create_model("cspresnet10"))
    x = torch.randn(2, 3, SIZE, SIZE)
    deployed = deploy(first)
    deployed(x)
    deployed.load_state_dict(deploy(second).state_dict())
    with torch.no_grad():
        assert rel_err(deployed(x), second(x)) <= TOL


def test_deploy_compile_and_inference_only():
    torch.manual_seed(0)
    model = nn.Sequential(ConvBnAct(3, 8, 3, stride=2), ConvBnAct(8, 8, 3, act="swish")).train()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        model(torch.randn(4, 3, 16, 16))
        ref = model.eval()(x)
    # The "eager" backend exercises the torch.compile plumbing without minutes of inductor codegen.
    compiled = deploy(model, compile="eager")
    assert compiled.compiled is not None
    assert rel_err(compiled(x), ref) <= TOL
    d = deploy(model)
    assert isinstance(d, DeployedModel) and not d.training
    out = d(x)
    assert out.is_inference()
    with pytest.raises(ValueError, match="inference-only"):
        d.train()


def test_deploy_compile_on_a_model_with_stages():
    # A StagedNet has no len(): the compiled wrapper must not be tested for truth.
    model, x, ref = calibrated("cspresnet10")
    compiled = deploy(model, compile="eager")
    assert rel_err(compiled(x), ref) <= TOL


def test_deploy_compile_true_uses_inductor_freezing():
    model, x, ref = calibrated("cspresnet10")
    compiled = deploy(model, compile=True)
    assert not any(type(m).__name__.startswith("OneDnn") for m in compiled.modules())  # inductor packs weights
    assert rel_err(compiled(x), ref) <= TOL
    assert rel_err(compiled(x[:1]), ref[:1]) <= TOL  # another batch size: recompiled or dynamic, still right


def test_deploy_compile_true_follows_weight_changes():
    # Inductor's freezing bakes the weights into the compiled graph as constants; every way DeployedModel
    # documents for changing weights must still reach it (a small network: each change may recompile).
    torch.manual_seed(0)
    model = nn.Sequential(ConvBnAct(3, 8, 3), ConvBnAct(8, 8, 3)).eval()
    x = torch.randn(1, 3, 16, 16)
    compiled = deploy(model, compile=True)
    eager = deploy(model, onednn=False)  # the same folded network, no packed or frozen weights
    before = compiled(x).clone()
    changes = {
        "load_state_dict": lambda: compiled.load_state_dict({k: 2 * v for k, v in compiled.state_dict().items()}),
        "in place under no_grad": lambda: [p.mul_(0.5) for p in compiled.parameters()],
        ".data, then repack()": lambda: ([p.data.add_(0.1) for p in compiled.parameters()], compiled.repack()),
    }
    for how, change in changes.items():
        with torch.no_grad():
            change()
        eager.load_state_dict(compiled.state_dict())
        out = compiled(x)
        assert not torch.equal(out, before), how
        assert rel_err(out, eager(x)) <= TOL, how
        before = out.clone()


def test_dynamo_onnx_export_keeps_the_batch_axis_dynamic(tmp_path):
    # torch.export makes a dimension of size 1 a constant: this graph, traced at batch 1, took batch 1 only.
    model, _, _ = calibrated("cspresnet50_elastic")
    path = export_onnx(model, tmp_path / "m.onnx", SIZE, opset=18, exporter="dynamo")
    x = torch.randn(3, 3, SIZE, SIZE)
    (out,) = run_onnx(onnx_session(path), x)
    with torch.no_grad():
        assert rel_err(out, exact_output(model, x)) <= TOL


def test_half_and_double_models_export_taking_their_dtype(tmp_path):
    model, x, ref = calibrated("resnet10")
    half = copy.deepcopy(model).half()
    (out,) = run_onnx(onnx_session(export_onnx(half, tmp_path / "h.onnx", SIZE)), x.half())
    assert out.dtype == torch.float16 and rel_err(out.float(), ref) <= 1e-2  # float16 keeps ~3 digits
    double = copy.deepcopy(model).double()
    traced = load_torchscript(export_torchscript(double, tmp_path / "d.pt", SIZE))
    with torch.no_grad():
        assert rel_err(traced(x.double()), double(x.double())) <= TOL
    with pytest.raises(ValueError, match="a bfloat16 model needs opset 22 or newer"):
        export_onnx(copy.deepcopy(model).bfloat16(), tmp_path / "b.onnx", SIZE)


def test_torchscript_round_trip(tmp_path):
    model, x, ref = calibrated("cspdarknet53")
    path = export_torchscript(model, tmp_path / "m.pt", SIZE)
    loaded = load_torchscript(path)
    with torch.no_grad():
        assert rel_err(loaded(x), ref) <= TOL
        x3 = torch.randn(3, 3, SIZE, SIZE)
        assert rel_err(loaded(x3), exact_output(model, x3)) <= TOL  # traced at batch 1, runs at any batch


def test_safetensors_round_trip(tmp_path):
    model, x, ref = calibrated("cspresnext50")
    path = export_safetensors(model, tmp_path / "m.safetensors")
    assert read_metadata(path)["model"] == "cspresnext50"
    again = cspnet.create_model("cspresnext50", pretrained=str(path)).eval()
    with torch.no_grad():
        assert torch.equal(again(x), model(x))


def test_onnx_refuses_old_opsets_and_unknown_exporters(tmp_path):
    model = cspnet.create_model("resnet10")
    with pytest.raises(ValueError, match="opset"):
        export_onnx(model, tmp_path / "m.onnx", SIZE, opset=13)
    with pytest.raises(ValueError, match="exporter"):
        export_onnx(model, tmp_path / "m.onnx", SIZE, exporter="magic")
    assert not (tmp_path / "m.onnx").exists()


def test_onnx_file_holds_the_opset_asked_for(tmp_path, monkeypatch, capsys):
    import onnx

    model, x, ref = calibrated("resnet10")
    path = tmp_path / "m.onnx"
    # Above the legacy exporter's newest opset (20): the dynamo exporter writes it, no legacy attempt.
    assert onnx_opset(export_onnx(model, path, SIZE, opset=21)) == 21
    (out,) = run_onnx(onnx_session(path), x)
    assert rel_err(out, ref) <= TOL
    with pytest.warns(UserWarning, match="written at opset 18, not 17"):
        assert onnx_opset(export_onnx(model, path, SIZE, exporter="dynamo")) == 18
    newest = onnx.defs.onnx_opset_version()
    with pytest.raises(ValueError, match=f"opset {newest + 1} is out of range: use 17 to {newest}"):
        export_onnx(model, tmp_path / "new.onnx", SIZE, opset=newest + 1)
    with pytest.raises(ValueError, match="the legacy exporter writes opsets up to 20, not 21"):
        export_onnx(model, tmp_path / "new.onnx", SIZE, opset=21, exporter="legacy")
    assert cli_main(["export", "resnet10", "--opset", str(newest + 1), "--out", str(tmp_path / "new.onnx")]) == 2
    assert capsys.readouterr().err.count("\n") == 1  # one line, no traceback

    # The dynamo exporter keeps opset 18 when it cannot convert its graph: such a file is refused.
    export = torch.onnx.export
    monkeypatch.setattr(torch.onnx, "export", lambda *a, **kw: export(*a, **{**kw, "opset_version": 18}))
    with pytest.raises(ValueError, match="wrote opset 18, not the 22 asked for"):
        export_onnx(model, tmp_path / "new.onnx", SIZE, opset=22)
    assert not (tmp_path / "new.onnx").exists()


def test_export_cli(tmp_path, capsys):
    weights = tmp_path / "w.safetensors"
    assert cli_main(["export", "cspresnet10", "--out", str(weights), "--num-classes", "5"]) == 0
    onnx_path = tmp_path / "m.onnx"
    rc = cli_main(["export", "cspresnet10", "--format", "onnx", "--out", str(onnx_path), "--weights", str(weights),
                   "--num-classes", "5", "--input-size", str(SIZE)])
    assert rc == 0
    out = capsys.readouterr().out
    err = float(out.rsplit(":", 1)[1])
    assert err <= TOL
    # the ONNX file holds the weights we gave it, not a fresh random init
    model = cspnet.create_model("cspresnet10", num_classes=5, pretrained=str(weights)).eval()
    x = torch.randn(2, 3, SIZE, SIZE)
    (onnx_out,) = run_onnx(onnx_session(onnx_path), x)
    with torch.no_grad():
        ref = model(x)
    assert onnx_out.shape == (2, 5) and rel_err(onnx_out, ref) <= TOL

    ts_path = tmp_path / "m.pt"
    assert cli_main(["export", "cspresnet10", "--out", str(ts_path), "--input-size", str(SIZE)]) == 0
    assert load_torchscript(ts_path)(x).shape == (2, 1000)

    # --num-classes 0: the file's backbone, its pooled features (the classifier dropped)
    feats_path = tmp_path / "feats.onnx"
    assert cli_main(["export", "cspresnet10", "--out", str(feats_path), "--weights", str(weights), "--num-classes", "0",
                     "--input-size", str(SIZE)]) == 0
    (feats,) = run_onnx(onnx_session(feats_path), x)
    with torch.no_grad():
        assert rel_err(feats, model.forward_head(model.forward_features(x), pre_logits=True)) <= TOL
    # a Darknet .weights file is named as one, with the way to use it
    dk = tmp_path / "darknet.weights"
    cspnet.darknet.write_weights(cspnet.darknet.build_model(cspnet.darknet.parse_cfg_text(
        "[net]\nwidth=8\nheight=8\nchannels=3\n[convolutional]\nfilters=4\nsize=3\npad=1\nbatch_normalize=1\n"
        "activation=leaky\n", "tiny.cfg")), dk)
    capsys.readouterr()
    assert cli_main(["export", "cspresnet10", "--out", str(tmp_path / "dk.onnx"), "--weights", str(dk)]) == 2
    assert "a Darknet weights file" in capsys.readouterr().err

    assert cli_main(["export", "cspresnet10", "--out", str(tmp_path / "m.bin")]) == 2
    assert "cannot tell the format" in capsys.readouterr().err
    assert cli_main(["export", "cspresnet1O", "--out", str(onnx_path)]) == 2
    assert "did you mean" in capsys.readouterr().err


def test_export_cli_takes_the_model_of_a_training_run(tmp_path, capsys):
    # A width-scaled grey run with its own class count: none of that is in the registered config.
    run = tmp_path / "run"
    assert cli_main(["train", "--model", "cspresnet10", "--width", "0.25", "--data", "digits", "--img-size", "24",
                     "--epochs", "1", "--train-limit", "160", "--batch-size", "32", "--ema", "0.9", "--no-progress",
                     "--threads", "1", "--out", str(run)]) == 0
    capsys.readouterr()
    path = tmp_path / "run.onnx"
    raw_path = tmp_path / "raw.onnx"
    assert cli_main(["export", "--checkpoint", str(run), "--out", str(path)]) == 0  # the EMA weights, which were scored
    assert float(capsys.readouterr().out.rsplit(":", 1)[1]) <= TOL
    assert cli_main(["export", "--checkpoint", str(run), "--raw-weights", "--out", str(raw_path)]) == 0
    capsys.readouterr()
    from cspnet.engine.classify import load_classifier

    x = torch.randn(2, 1, 24, 24)
    (onnx_out,), (raw_out,) = run_onnx(onnx_session(path), x), run_onnx(onnx_session(raw_path), x)
    with torch.no_grad():
        ema_ref, raw_ref = load_classifier(run, ema=True)[0](x), load_classifier(run, ema=False)[0](x)
        assert onnx_out.shape == (2, 10) and rel_err(onnx_out, ema_ref) <= TOL and rel_err(raw_out, raw_ref) <= TOL
        assert rel_err(ema_ref, raw_ref) > 100 * TOL
    # a detection run: its detector, classes and input size
    det_run = tmp_path / "det"
    assert cli_main(["detect", "train", "--model", "cspresnet10", "--backbone-width", "0.25", "--neck-width", "32",
                     "--neck", "efm", "--data", "scenes", "--num-scenes", "4", "--img-size", "64", "--batch-size", "4",
                     "--anchors", "yolov3", "--epochs", "1", "--no-progress", "--threads", "1", "--out", str(det_run)]) == 0
    capsys.readouterr()
    assert cli_main(["export", "--checkpoint", str(det_run), "--out", str(tmp_path / "det.onnx")]) == 0
    assert float(capsys.readouterr().out.rsplit(":", 1)[1]) <= TOL
    (boxes,) = run_onnx(onnx_session(tmp_path / "det.onnx"), torch.randn(1, 3, 64, 64))
    assert boxes.shape[0] == 1 and boxes.shape[2] == 5 + 10  # the scenes' ten classes
    assert cli_main(["export", "cspresnet10", "--checkpoint", str(run), "--out", str(path)]) == 2
    assert "drop MODEL" in capsys.readouterr().err
    assert cli_main(["export", "--out", str(path)]) == 2
    assert "MODEL or --checkpoint" in capsys.readouterr().err


def test_export_cli_detector(tmp_path, capsys):
    path = tmp_path / "det.onnx"
    rc = cli_main(["export", "cspresnet10", "--detector", "fpn", "--num-classes", "3", "--input-size", str(SIZE),
                   "--out", str(path)])
    assert rc == 0
    assert float(capsys.readouterr().out.rsplit(":", 1)[1]) <= TOL
    (out,) = run_onnx(onnx_session(path), torch.randn(1, 3, SIZE, SIZE))
    assert out.shape == (1, sum(3 * (SIZE // s) ** 2 for s in (8, 16, 32)), 5 + 3)


def test_weights_file_loads_into_a_detector_export(tmp_path):
    det = create_detector("cspresnet10", "fpn", num_classes=3, **TINY_DET)
    path = export_safetensors(det, tmp_path / "det.safetensors")
    again = create_detector("cspresnet10", "fpn", num_classes=3, **TINY_DET)
    load_into(again, load_state(path))
    assert all(torch.equal(a, b) for a, b in zip(det.state_dict().values(), again.state_dict().values()))


def test_export_cli_rebuilds_a_detector_from_its_weights_file(tmp_path, capsys):
    # Anchors (k-means on the training set) and widths are in the file's metadata, not its tensors.
    torch.manual_seed(0)
    anchors = [(5, 7), (9, 4), (12, 12), (20, 9), (14, 26), (30, 22), (40, 35), (28, 60), (60, 50)]
    det = calibrate(create_detector("cspresnet10", "fpn", num_classes=3, anchors=anchors, **TINY_DET))
    weights = export_safetensors(det, tmp_path / "det.safetensors")
    path = tmp_path / "det.onnx"
    assert cli_main(["export", "cspresnet10", "--detector", "fpn", "--weights", str(weights),
                     "--input-size", str(SIZE), "--out", str(path)]) == 0
    capsys.readouterr()
    x = torch.randn(2, 3, SIZE, SIZE)
    (out,) = run_onnx(onnx_session(path), x)
    with torch.no_grad():
        assert det_err(out, det(x)) <= TOL
    assert cli_main(["export", "cspresnet10", "--detector", "fpn", "--weights", str(weights), "--num-classes", "4",
                     "--out", str(path)]) == 2
    assert "num_classes: file 3 vs option 4" in capsys.readouterr().err
    assert cli_main(["export", "cspresnet10", "--detector", "panet", "--weights", str(weights), "--out", str(path)]) == 2
    assert "holds weights of model 'cspresnet10-fpn'" in capsys.readouterr().err


def test_keep_freed_memory_stops_page_faults_on_reuse():
    # Process-wide malloc setting: measured in a fresh interpreter so this one is not changed.
    code = """
import resource, torch
from cspnet.export import keep_freed_memory

def faults_of_second_cycle():
    torch.empty(2**24).fill_(1.0)  # 64 MiB, freed at once
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(2**24).fill_(1.0)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

plain = faults_of_second_cycle()
assert keep_freed_memory()
faults_of_second_cycle()  # the first cycle after the switch grows the heap once
print(plain, faults_of_second_cycle())
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    plain, tuned = map(int, proc.stdout.split())
    # 64 MiB in 4 KiB pages is 16,384 faults when every cycle maps fresh memory.
    assert tuned <= max(plain // 10, 64), (plain, tuned)


def test_profile_refuses_a_deployed_model():
    # Its fused kernels bypass the nn.Conv2d calls profile counts: it would report only the head.
    model = cspnet.create_model("cspresnet10").eval()
    with pytest.raises(ValueError, match="profile the model before deploying it"):
        cspnet.profile(deploy(model), SIZE)


def test_export_refuses_a_deployed_model(tmp_path):
    # Its oneDNN kernels run under inference_mode (no exporter traces them) and its weights are folded.
    deployed = deploy(cspnet.create_model("resnet10"))
    for export_fn, name in ((export_onnx, "m.onnx"), (export_torchscript, "m.pt"), (export_safetensors, "m.safetensors")):
        with pytest.raises(ValueError, match="export the model before deploying it"):
            export_fn(deployed, tmp_path / name)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("suffix", [".onnx", ".pt"])
def test_export_cli_check_reports_what_the_written_file_computes(tmp_path, capsys, monkeypatch, suffix):
    # An export gone wrong (here: a copy with its classifier doubled is what gets written) must show in the
    # number the CLI prints, and that number must be the file's difference from eager PyTorch, measured apart.
    import cspnet.export as export_mod

    weights = tmp_path / "w.safetensors"
    assert cli_main(["export", "cspresnet10", "--out", str(weights), "--num-classes", "5"]) == 0
    export, run_onnx_, load_torchscript_ = export_mod.export, export_mod.run_onnx, export_mod.load_torchscript

    def broken_export(model, path, fmt, input_size, **kwargs):
        wrong = copy.deepcopy(model)
        last = [m for m in wrong.modules() if isinstance(m, nn.Linear)][-1]
        with torch.no_grad():
            last.weight.mul_(2)
        return export(wrong, path, fmt, input_size, **kwargs)

    inputs = []  # the input the CLI's check runs the file on
    monkeypatch.setattr(export_mod, "export", broken_export)
    monkeypatch.setattr(export_mod, "run_onnx", lambda session, x: inputs.append(x) or run_onnx_(session, x))
    monkeypatch.setattr(export_mod, "load_torchscript",
                        lambda path: (lambda x, m=load_torchscript_(path): inputs.append(x) or m(x)))
    path = tmp_path / f"m{suffix}"
    capsys.readouterr()
    assert cli_main(["export", "cspresnet10", "--out", str(path), "--weights", str(weights), "--num-classes", "5",
                     "--input-size", str(SIZE)]) == 0
    reported = float(capsys.readouterr().out.rsplit(":", 1)[1])
    [x] = inputs
    with torch.no_grad():
        written = run_onnx_(onnx_session(path), x)[0] if suffix == ".onnx" else load_torchscript_(path)(x)
        eager = cspnet.create_model("cspresnet10", num_classes=5, pretrained=str(weights)).eval()(x)
    measured = rel_err(written, eager)
    assert measured > 100 * TOL
    assert reported == pytest.approx(measured, rel=0.06)  # printed to two significant digits
