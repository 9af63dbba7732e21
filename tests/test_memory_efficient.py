"""Memory-efficient training (`cspnet.memory_efficient`): same numbers, less kept for backward."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cspnet
from cspnet.bench import saved_activation_bytes
from cspnet.layers import ACTIVATIONS, ConvBnAct, recomputable_cat
from cspnet.stage import CrossStage


def _train_both(model: nn.Module, x: torch.Tensor, steps: int = 2):
    """Two training steps of ``model`` and of a memory-efficient copy; returns both models and outputs."""
    plain, lean = model.train(), copy.deepcopy(model).train()
    assert cspnet.memory_efficient(lean) > 0
    outs = []
    for m in (plain, lean):
        opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
        for _ in range(steps):
            opt.zero_grad()
            out = m(x)
            out.square().mean().backward()
            opt.step()
        outs.append(out.detach())
    return plain, lean, outs


def _assert_same_training(plain: nn.Module, lean: nn.Module, outs) -> None:
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
    for (name, p), q in zip(plain.named_parameters(), lean.parameters()):
        scale = p.grad.abs().max().clamp_min(1e-8)
        assert (p.grad - q.grad).abs().max() <= 1e-4 * scale, name
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=name)
    for (name, b), c in zip(plain.named_buffers(), lean.buffers()):
        torch.testing.assert_close(c, b, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("name", ["cspdarknet53", "darknet_ref", "cspresnext50", "csppeleenet", "cspmobilenet_v2",
                                  "cspdensenet121", "densenet121", "cspdensenet201_elastic"])
def test_models_train_to_the_same_weights(name):
    torch.manual_seed(0)
    model = cspnet.create_model(name, num_classes=10)
    plain, lean, outs = _train_both(model, torch.randn(2, 3, 64, 64))
    _assert_same_training(plain, lean, outs)


@pytest.mark.parametrize("act", ACTIVATIONS)
def test_every_activation_has_its_derivative(act):
    torch.manual_seed(0)
    model = nn.Sequential(ConvBnAct(3, 8, 3, act=act), ConvBnAct(8, 8, 3, act=act), ConvBnAct(8, 4, 1, act=act))
    plain, lean, outs = _train_both(model, torch.randn(3, 3, 12, 12) * 2)
    _assert_same_training(plain, lean, outs)


def test_channels_last_model_trains_the_same():
    torch.manual_seed(0)
    model = cspnet.create_model("cspdarknet53", num_classes=10).to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    plain, lean, outs = _train_both(model, x)
    _assert_same_training(plain, lean, outs)


def test_a_layer_keeps_one_map_instead_of_two():
    # Two chained layers: plain keeps conv1-out, act1-out, conv2-out and act2-out (the output);
    # memory-efficient keeps conv1-out, conv2-out and the output, and rebuilds act1-out.
    torch.manual_seed(0)
    model = nn.Sequential(ConvBnAct(3, 16, 3), ConvBnAct(16, 16, 3)).train()
    x = torch.randn(4, 3, 32, 32)
    one_map = 4 * 16 * 32 * 32 * 4
    plain = saved_activation_bytes(model, x)
    cspnet.memory_efficient(model)
    lean = saved_activation_bytes(model, x)
    per_channel = 4096  # batch statistics and the recipes' per-channel scale and shift
    assert one_map - per_channel < plain - lean <= one_map
    assert 4 * one_map <= plain < 4 * one_map + per_channel


@pytest.mark.parametrize("name, most", [("cspdarknet53", 0.55), ("densenet121", 0.4)])
def test_models_keep_a_fraction(name, most):
    # cspdarknet53: one map per layer instead of two; DenseNet: each layer's output once instead of in
    # every later concat (and the concat's BN-act output), as torchvision's memory_efficient DenseNet.
    torch.manual_seed(0)
    model = cspnet.create_model(name).train()
    x = torch.randn(2, 3, 128, 128)
    plain = saved_activation_bytes(model, x)
    cspnet.memory_efficient(model)
    assert saved_activation_bytes(model, x) < most * plain


def test_concat_of_recomputable_maps_is_rebuilt_not_kept():
    torch.manual_seed(0)
    a, b, fuse = ConvBnAct(3, 8), ConvBnAct(3, 8), ConvBnAct(16, 8)
    model = nn.ModuleList([a, b, fuse]).train()
    x = torch.randn(2, 3, 16, 16)
    concat_bytes = 2 * 16 * 16 * 16 * 4

    def forward(rebuild_cat=True):
        return fuse(recomputable_cat([a(x), b(x)], dim=1, memory_efficient=rebuild_cat))

    expected = torch.autograd.grad(forward().sum(), list(model.parameters()))
    cspnet.memory_efficient(model)
    got = torch.autograd.grad(forward().sum(), list(model.parameters()))
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)
    kept_cat = saved_activation_bytes(lambda x: forward(rebuild_cat=False), x)
    lean = saved_activation_bytes(lambda x: forward(), x)
    assert kept_cat - concat_bytes <= lean < kept_cat - concat_bytes + 1024  # + the parts' per-channel factors


def test_maps_changed_in_place_are_kept_not_rebuilt():
    # A recipe rebuilds a map as it was made, so after an in-place change the map itself is kept.
    torch.manual_seed(0)
    first, second = ConvBnAct(3, 8, 3), ConvBnAct(8, 4, 3)
    model = nn.ModuleList([first, second]).train()
    x = torch.randn(2, 3, 10, 10)

    def forward():
        y = first(x)
        if not first.memory_efficient:
            y = y.clone()  # the plain layer's in-place activation keeps its output for backward
        return second(y.add_(1.0))

    expected = torch.autograd.grad(forward().square().sum(), list(model.parameters()))
    cspnet.memory_efficient(model)
    got = torch.autograd.grad(forward().square().sum(), list(model.parameters()))
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


def test_plain_path_outside_training_with_autograd():
    torch.manual_seed(0)
    model = cspnet.create_model("cspresnet10", num_classes=5)
    reference = copy.deepcopy(model).eval()
    cspnet.memory_efficient(model)
    x = torch.randn(2, 3, 64, 64)
    model.eval()
    torch.testing.assert_close(model(x), reference(x))
    model.train()
    with torch.no_grad():
        before = [b.clone() for b in model.buffers()]
        model(x)
    assert any(not torch.equal(b, a) for b, a in zip(model.buffers(), before))  # BN statistics still update


def test_autocast_takes_the_plain_path():
    torch.manual_seed(0)
    model = cspnet.create_model("cspresnet10", num_classes=5).train()
    lean = copy.deepcopy(model)
    cspnet.memory_efficient(lean)
    x = torch.randn(2, 3, 64, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = model(x), lean(x)
    torch.testing.assert_close(b, a)
    b.float().sum().backward()
    assert all(p.grad is not None for p in lean.parameters())


def test_switch_counts_modules_and_turns_off():
    model = cspnet.create_model("cspdarknet53")
    kinds = (ConvBnAct, CrossStage)
    n = sum(isinstance(m, kinds) for m in model.modules())
    assert cspnet.memory_efficient(model) == n
    assert all(m.memory_efficient for m in model.modules() if isinstance(m, kinds))
    assert cspnet.memory_efficient(model, enabled=False) == n
    assert not any(m.memory_efficient for m in model.modules() if isinstance(m, kinds))


def test_layers_without_running_statistics_run_plain():
    layer = ConvBnAct(3, 4).train()
    layer.bn = nn.BatchNorm2d(4, track_running_stats=False)
    cspnet.memory_efficient(layer)
    calls = []
    layer.bn.register_forward_hook(lambda *args: calls.append(True))
    F.relu(layer(torch.randn(2, 3, 4, 4))).sum().backward()
    assert calls and layer.bn.weight.grad is not None


@pytest.mark.parametrize("neck", ["fpn", "panet", "efm", "gfm"])
def test_detectors_train_to_the_same_weights(neck):
    from cspnet.detection import create_detector

    torch.manual_seed(0)
    det = create_detector("cspresnet10", neck, num_classes=3, backbone_width=0.25, neck_width=64)

    class Flat(nn.Module):  # the detector's raw training output is one map per scale
        def __init__(self, det):
            super().__init__()
            self.det = det

        def forward(self, x):
            return torch.cat([r.flatten(1) for r in self.det(x)], dim=1)

    plain, lean, outs = _train_both(Flat(det), torch.rand(2, 3, 64, 64))
    _assert_same_training(plain, lean, outs)


def test_combines_with_gradient_checkpointing():
    torch.manual_seed(0)
    model = cspnet.create_model("cspdarknet53", num_classes=10)
    checkpointed = copy.deepcopy(model)
    checkpointed.set_grad_checkpointing(True)
    cspnet.memory_efficient(checkpointed)
    x = torch.randn(2, 3, 64, 64)
    for m in (model.train(), checkpointed.train()):
        m(x).square().mean().backward()
    for (name, p), q in zip(model.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-6, msg=name)
    for (name, b), c in zip(model.named_buffers(), checkpointed.buffers()):
        torch.testing.assert_close(c, b, msg=name)  # recomputation does not count a batch twice


def test_batchnorm_in_eval_mode_takes_the_plain_path():
    # norm_eval: the model trains while its BatchNorms use (and keep) their running statistics.
    torch.manual_seed(0)
    model = cspnet.create_model("cspresnet10", num_classes=5, norm_eval=True)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
    plain, lean, outs = _train_both(model, torch.randn(2, 3, 64, 64))
    _assert_same_training(plain, lean, outs)
    assert all(torch.equal(b, c) for b, c in zip(model.buffers(), lean.buffers()))


def test_a_swapped_in_sync_batchnorm_runs_as_is():
    # Local batch statistics must not silently replace synchronised ones: SyncBatchNorm itself runs.
    layer = ConvBnAct(3, 4, 3).train()
    cspnet.memory_efficient(layer)
    layer.bn = nn.SyncBatchNorm(4)
    calls = []
    layer.bn.register_forward_hook(lambda *args: calls.append(True))
    layer(torch.randn(2, 3, 6, 6)).sum().backward()
    assert calls and layer.bn.weight.grad is not None


def test_a_part_changed_after_the_concat_raises_like_autograd():
    a, fuse = ConvBnAct(3, 8), ConvBnAct(11, 4)
    model = nn.ModuleList([a, fuse]).train()
    cspnet.memory_efficient(model)
    x = torch.randn(2, 3, 8, 8)
    plain_part = torch.randn(2, 3, 8, 8)
    out = fuse(recomputable_cat([a(x), plain_part], dim=1, memory_efficient=True))
    plain_part.mul_(2)  # the concat the conv saw is no longer what its parts make
    with pytest.raises(RuntimeError, match=r"\(2, 3, 8, 8\) tensor .* modified in place"):
        out.sum().backward()


@pytest.mark.parametrize("neck", ["panet", "efm"])
def test_detector_necks_rebuild_their_concats(neck):
    from cspnet.detection import create_detector

    torch.manual_seed(0)
    det = create_detector("cspdarknet53", neck, num_classes=3, backbone_width=0.25, neck_width=64).train()
    x = torch.randn(2, 3, 128, 128)
    plain = saved_activation_bytes(lambda t: det(t), x)
    cspnet.memory_efficient(det)
    lean = saved_activation_bytes(lambda t: det(t), x)
    cspnet.memory_efficient(det.neck, enabled=False)
    for m in det.neck.modules():  # the neck's convs stay memory-efficient; only its concats are plain
        if isinstance(m, ConvBnAct):
            m.memory_efficient = True
    plain_concats = saved_activation_bytes(lambda t: det(t), x)
    assert lean < plain_concats < plain
