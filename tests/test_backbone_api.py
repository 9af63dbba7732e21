"""The backbone contract, the same on every registered model (as detection frameworks use it)."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cspnet

SIZE = 64


def _bns(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@pytest.mark.parametrize("name", cspnet.list_models())
def test_backbone_contract(name):
    """features_only maps match feature_info; frozen_stages=1 freezes exactly stem + stage 1; the head API."""
    model = cspnet.create_model(name, features_only=True, frozen_stages=1)
    info = model.feature_info
    assert [f.module for f in info] == ["stem"] + [f"stages.{i}" for i in range(len(model.stages))]
    model.eval()
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        feats = model(x)
        assert len(feats) == len(info)
        for f, level in zip(feats, info):
            assert tuple(f.shape) == (1, level.num_chs, SIZE // level.reduction, SIZE // level.reduction), (name, level)

        # Frozen: the stem and stages[0] only, and their BN stays in eval through .train().
        model.train()
        frozen = {id(p) for m in (model.stem, model.stages[0]) for p in m.parameters()}
        for pname, p in model.named_parameters():
            assert p.requires_grad == (id(p) not in frozen), pname
        frozen_bns = _bns(model.stem) + _bns(model.stages[0])
        assert all(not bn.training for bn in frozen_bns)
        assert all(bn.training for m in model.stages[1:] for bn in _bns(m))

        # The head API on the same backbone: a head appears with reset_classifier.
        model.eval()
        assert isinstance(model.get_classifier(), torch.nn.Identity)  # features only: no classifier
        model.reset_classifier(7)
        assert model.get_classifier().out_features == 7
        pooled = model.forward_head(model.forward_features(x), pre_logits=True)
        assert pooled.shape == (1, info[-1].num_chs) == (1, model.num_features)
        assert model(x).shape == (1, 7)
        model.reset_classifier(0)
        assert torch.equal(model(x), pooled)


def test_out_indices_select_and_order_levels():
    model = cspnet.create_model("cspresnet10", features_only=True, out_indices=(1, -1)).eval()
    every = cspnet.create_model("cspresnet10", features_only=True).eval()
    every.load_state_dict(model.state_dict())
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        two, levels = model(x), every(x)
    assert len(two) == 2 and torch.equal(two[0], levels[1]) and torch.equal(two[1], levels[-1])
    with pytest.raises(ValueError, match="out_indices"):
        cspnet.create_model("cspresnet10", features_only=True, out_indices=(9,))


def test_feature_info_answers_timms_accessors_for_the_levels_returned():
    model = cspnet.create_model("cspresnet10", features_only=True, out_indices=(1, 3)).eval()
    with torch.no_grad():
        maps = model(torch.randn(1, 3, SIZE, SIZE))
    info = model.feature_info
    # timm's rules: no idx -> the levels returned; an int or a list -> any level(s), whatever out_indices says
    assert info.channels() == [m.shape[1] for m in maps] and info.channels(3) == maps[-1].shape[1]
    assert info.reduction() == [SIZE // m.shape[-1] for m in maps] and info.reduction(0) == 4
    assert info.module_name() == ["stages.0", "stages.2"] and info.module_name([0, 1]) == ["stem", "stages.0"]
    assert info.get_dicts()[1] == {"num_chs": maps[1].shape[1], "reduction": SIZE // maps[1].shape[-1], "module": "stages.2",
                                   "index": 3}
    assert info.get_dicts(keys=["num_chs"], idx=1) == {"num_chs": maps[0].shape[1]} and info.get_dicts(keys=[]) == [{}, {}]
    assert info.get("index") == [1, 3]
    assert len(info) == 5 and info[0]["num_chs"] == info[0].num_chs == info[0].get("num_chs")  # entries read as dicts
    with pytest.raises(KeyError):
        info[0]["stride"]
    timm = pytest.importorskip("timm")  # the same answers as timm's own FeatureInfo
    theirs = timm.create_model("cspresnet50", features_only=True, out_indices=(1, 3), pretrained=False).feature_info
    for call in (lambda f: f.channels(), lambda f: f.reduction(4), lambda f: len(f.get_dicts(idx=[0, 2])), lambda f: f.get_dicts(keys=["num_chs"])):
        assert type(call(theirs)) is type(call(info))


def test_feature_info_entries_are_mappings_as_timms():
    model = cspnet.create_model("cspresnet10", features_only=True, out_indices=(2, 3, 4))
    entry = model.feature_info[2]
    assert "num_chs" in entry and "stride" not in entry
    assert dict(entry) == {**entry} == {"num_chs": 128, "reduction": 8, "module": "stages.1", "index": 2}
    assert list(entry.keys()) == ["num_chs", "reduction", "module", "index"] and entry.num_chs == 128
    timm = pytest.importorskip("timm")
    theirs = timm.models.FeatureInfo(model.feature_info, (2, 3, 4))  # timm's class reads a list of entries
    assert theirs.channels() == model.feature_info.channels() and theirs.module_name() == model.feature_info.module_name()


def test_stages_after_the_last_level_asked_for_do_not_run():
    model = cspnet.create_model("cspresnet10", features_only=True, out_indices=(2, 1)).eval()
    ran = []
    for name, stage in model.stages.named_children():
        stage.register_forward_hook(lambda m, i, o, name=name: ran.append(name))
    with torch.no_grad():
        maps = model(torch.randn(1, 3, SIZE, SIZE))
    assert ran == ["0", "1"] and [m.shape[1] for m in maps] == [model.feature_info[2].num_chs, model.feature_info[1].num_chs]
    every = cspnet.profile(cspnet.create_model("cspresnet10", features_only=True), SIZE)
    run = [layer.macs for layer in every.layers if not layer.name.startswith(("stages.2.", "stages.3."))]
    assert cspnet.profile(model, SIZE).macs == sum(run) < every.macs


def test_stages_after_the_last_level_asked_for_are_not_kept():
    # they would take no part in the loss: DistributedDataParallel refuses parameters without a gradient
    model = cspnet.create_model("cspresnet10", features_only=True, out_indices=(1, 2, 3)).train()
    assert len(model.stages) == 3 and model.deleted_stages == ("stages.3",)
    assert not any(k.startswith("stages.3.") for k in model.state_dict())
    assert [f.module for f in model.feature_info] == ["stem", "stages.0", "stages.1", "stages.2", "stages.3"]
    sum(m.mean() for m in model(torch.randn(2, 3, SIZE, SIZE))).backward()
    assert all(p.grad is not None for p in model.parameters())
    assert model.num_features == model.forward_features(torch.randn(1, 3, SIZE, SIZE)).shape[1] == 256
    with pytest.raises(ValueError, match=r"out_indices \[4\]: the stages after level 3 were deleted"):
        model.keep_levels((2, 4))
    with pytest.raises(ValueError, match="a classifier reads the last feature level, whose stages this model deleted"):
        model.reset_classifier(3)


def _train_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    model.train()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    return loss.detach()


@pytest.mark.parametrize("k", [-1, 0, 1, 2, 4])
def test_frozen_stages_train_step_leaves_frozen_part_untouched(k):
    model = cspnet.create_model("cspresnet10", num_classes=3, frozen_stages=k)
    before = copy.deepcopy(model.state_dict())
    _train_step(model, torch.randn(2, 3, SIZE, SIZE), torch.tensor([0, 2]))
    frozen_prefixes = () if k < 0 else ("stem.",) + tuple(f"stages.{i}." for i in range(k))
    for key, value in model.state_dict().items():
        if not key.endswith(("running_mean", "running_var")):
            continue
        changed = not torch.equal(value, before[key])
        assert changed != key.startswith(frozen_prefixes), f"k={k}: running stat {key} changed={changed}"
    for pname, p in model.named_parameters():
        assert (p.grad is None) == pname.startswith(frozen_prefixes), pname


def test_frozen_stages_out_of_range():
    with pytest.raises(ValueError, match="frozen_stages"):
        cspnet.create_model("cspresnet10", frozen_stages=5)


def test_norm_eval_keeps_every_batchnorm_in_eval():
    model = cspnet.create_model("cspresnet10", num_classes=3, norm_eval=True)
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    _train_step(model, torch.randn(2, 3, SIZE, SIZE), torch.tensor([0, 2]))
    assert all(not bn.training for bn in _bns(model))
    assert all(p.grad is not None for p in model.parameters())  # trainable, only the statistics are fixed
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


@pytest.mark.parametrize("name", ["cspresnet10", "cspdarknet53_timm"])
def test_grad_checkpointing_gives_the_same_step(name):
    """Same loss, gradients and BN statistics with and without checkpointing.

    Recomputation re-runs each stage's forward in the backward pass; in train mode that would
    update BN running stats a second time. StagedNet restores them around the recomputation,
    so the two steps agree exactly; the forward-call count shows that recomputation happened.
    """
    plain = cspnet.create_model(name, num_classes=4, drop_rate=0.2)
    ckpt = copy.deepcopy(plain)
    ckpt.set_grad_checkpointing(True)
    calls = []
    ckpt.stages[1].register_forward_pre_hook(lambda *_: calls.append(1))
    x, y = torch.randn(2, 3, SIZE, SIZE), torch.tensor([1, 3])

    torch.manual_seed(5)
    loss_plain = _train_step(plain, x, y)
    torch.manual_seed(5)
    loss_ckpt = _train_step(ckpt, x, y)

    assert len(calls) == 2  # forward + recomputation
    assert torch.equal(loss_plain, loss_ckpt)
    for (pname, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=1e-5, atol=1e-7), pname
    for (bname, a), b in zip(plain.named_buffers(), ckpt.buffers()):
        assert torch.equal(a, b), bname


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")  # the stem conv of in_chans=0, before the check
def test_constructor_arguments_of_the_wrong_kind_are_named():
    for kwargs, message in (
        (dict(num_classes=-1), "num_classes must be an integer >= 0"), (dict(num_classes=1.5), "num_classes"),
        (dict(in_chans=0), "in_chans must be an integer >= 1"), (dict(frozen_stages=1.5), "frozen_stages"),
        (dict(out_indices=(1,)), "needs features_only|features_only=True"),
        (dict(features_only=True, out_indices=(1.0,)), "out_indices must be feature level indices"),
        (dict(features_only=True, out_indices="12"), "out_indices must be"),
        (dict(features_only=True, out_indices=9), "the last n of 5 feature levels"),
        (dict(features_only=True, out_indices=()), r"out_indices=\(\) asks for no feature map"),
    ):
        with pytest.raises(ValueError, match=message):
            cspnet.create_model("cspresnet10", **kwargs)
    # timm's convention: an int n is the last n levels
    assert cspnet.create_model("cspresnet10", features_only=True, out_indices=2).out_indices == (3, 4)


def test_reset_classifier_keeps_the_models_mode_device_and_dtype():
    model = cspnet.create_model("cspresnet10", drop_rate=0.5).eval().double()
    model.reset_classifier(10)
    x = torch.randn(2, 3, SIZE, SIZE, dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(model(x), model(x))  # eval: the new head's dropout is off
    assert model.get_classifier().weight.dtype == torch.float64


def test_reset_classifier_takes_timms_global_pool():
    model = cspnet.create_model("cspresnet10", num_classes=5).eval()
    x = torch.randn(1, 3, SIZE, SIZE)
    model.reset_classifier(3, "avg")  # timm's positional form
    assert model(x).shape == (1, 3)
    model.reset_classifier(0, global_pool=None)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.forward_features(x).mean((2, 3)))
    for pool in ("", "max", "catavgmax"):  # poolings this head does not have are named, not ignored
        with pytest.raises(ValueError, match=f"global_pool={pool!r}: the head pools by average only"):
            model.reset_classifier(3, pool)


def test_grad_checkpointing_compiles():
    # torch.compile refuses checkpoint's context_fn (the eager path's BatchNorm-statistics restore)
    torch.manual_seed(0)
    model = cspnet.create_model("cspresnet10", num_classes=3).train()
    model.set_grad_checkpointing(True)
    x = torch.randn(8, 3, 64, 64)
    eager = copy.deepcopy(model)
    eager(x).square().mean().backward()
    torch.compile(model)(x).square().mean().backward()
    # some gradients are zero up to rounding (a BN bias before a linear path and another BN): compare on one
    # scale; inductor's fused kernels differ from eager by up to ~2e-4 of it with one thread, with or without
    # checkpointing
    scale = max(q.grad.abs().max() for q in eager.parameters())
    for (name, p), q in zip(model.named_parameters(), eager.parameters()):
        torch.testing.assert_close(p.grad / scale, q.grad / scale, rtol=0, atol=2e-3, msg=name)


def test_out_indices_out_of_order_return_the_maps_in_the_order_asked():
    # timm's contract: maps come back in out_indices order, not sorted; a neck indexing them by position relies on it
    model = cspnet.create_model("cspresnet10", features_only=True, out_indices=(3, 1)).eval()
    every = cspnet.create_model("cspresnet10", features_only=True).eval()
    model.load_state_dict(every.state_dict())  # the tensors of the stage it deleted (level 4) are skipped
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        maps, levels = model(x), every(x)
    assert len(maps) == 2 and torch.equal(maps[0], levels[3]) and torch.equal(maps[1], levels[1])
    assert [m.shape[1] for m in maps] == model.feature_info.channels()
    # level 3 is at stride 16 (stem 4, then two stride-2 stages), level 1 at the stem's stride 4
    assert [SIZE // m.shape[-1] for m in maps] == model.feature_info.reduction() == [16, 4]


def test_min_input_size_counts_only_the_stages_a_features_only_model_keeps():
    # A features_only model must accept every input its kept stages run on. DenseNet's stem maps s pixels to
    # ceil(s / 4); stage i >= 1 opens with an unpadded 2x2 pool after i - 1 earlier halvings, so it needs
    # 4 * (2**i - 1) + 1 pixels: stages 0..3 need [1, 5, 13, 29]; the deleted stages must not count.
    model = cspnet.create_model("densenet121", features_only=True, out_indices=(0, 1)).eval()
    assert len(model.stages) == 1 and model.min_input_size == 1
    with torch.no_grad():
        maps = model(torch.randn(1, 3, 8, 8))
    assert [tuple(m.shape[-2:]) for m in maps] == [(2, 2), (2, 2)]
    model = cspnet.create_model("densenet121", features_only=True, out_indices=(2,)).eval()
    assert len(model.stages) == 2 and model.min_input_size == 5  # stages 0 and 1: max(1, 5)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 5, 5))[0].shape[-2:] == (1, 1)  # ceil(5 / 4) = 2, pooled to 1
        with pytest.raises(ValueError, match="at least 5"):
            model(torch.randn(1, 3, 4, 4))
