"""torch.fx: every family traces with plain ``torch.fx.symbolic_trace``, so torchvision's feature extraction
(``create_feature_extractor``, ``get_graph_node_names``) works on the models without ``leaf_modules``, and the
traced graph computes what the model computes, run-time paths (in place, memory-efficient, hooks) included."""
from pathlib import Path

import pytest
import torch
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

import cspnet
from cspnet.bench import saved_activation_bytes
from cspnet.darknet import DarknetNet, build_model, parse_cfg_text
from cspnet.detection import create_detector
from cspnet.detection.necks import NECKS
from cspnet.layers import ConvBnAct, ConvOutputBatchNorm2d

SMALL_DENSE = {"depths": (2, 2, 2, 2)}  # a few dense layers per stage keep the DenseNets quick
FAMILIES = {
    "cspresnet10": {},
    "cspresnext50": {},
    "cspresnet50_timm": {},
    "resnet50_tv": {},
    "cspdarknet53": {},
    "darknet53": {},
    "csppeleenet": {},
    "peleenet": {},
    "cspdensenet121": SMALL_DENSE,
    "densenet121": SMALL_DENSE,
    "cspmobilenet_v2": {},
    "mobilenet_v2": {},
    "cspdarknet53_elastic": {},
    "cspdensenet201_elastic": SMALL_DENSE,  # ELASTIC dense layers
    "cspdensenet_ref": {},
    "darknet_ref": {},
}


@pytest.mark.parametrize("name", FAMILIES)
def test_feature_extractor_and_traced_model_equal_the_model(name):
    torch.manual_seed(0)
    model = cspnet.create_model(name, num_classes=5, **FAMILIES[name]).eval()
    x = torch.randn(2, 3, 64, 64)

    # Each feature level by the name of the module that makes it, as feature_info gives it.
    levels = {info.module: f"level{info.index}" for info in model.feature_info}
    _, nodes = get_graph_node_names(model)  # eval-mode nodes: module paths, and ops inside traced modules
    assert all(any(n == module or n.startswith(module + ".") for n in nodes) for module in levels)
    extractor = create_feature_extractor(model, return_nodes=levels)
    with torch.no_grad():
        maps, expected = extractor(x), model.forward_levels(x)
    assert list(maps) == list(levels.values())
    for got, want in zip(maps.values(), expected):
        assert torch.equal(got, want)

    traced = torch.fx.symbolic_trace(model)
    with torch.no_grad():
        assert torch.equal(traced(x), model(x))

    features = cspnet.create_model(name, features_only=True, out_indices=(2, 3, 4), **FAMILIES[name]).eval()
    features.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("head.")})
    traced = torch.fx.symbolic_trace(features)
    with torch.no_grad():
        got, want = traced(x), features(x)
    assert len(got) == 3 and all(torch.equal(g, w) for g, w in zip(got, want))
    assert all(torch.equal(g, expected[i]) for g, i in zip(got, (2, 3, 4)))


def test_layers_that_decide_at_run_time_are_single_nodes_of_the_graph():
    model = cspnet.create_model("cspdensenet_ref", num_classes=3)
    modules = dict(model.named_modules())
    leaves = {type(modules[n.target]).__name__ for n in torch.fx.symbolic_trace(model).graph.nodes if n.op == "call_module"}
    assert {"ConvBnAct", "DenseLayer", "BnActConv", "BnAct"} <= leaves
    with pytest.raises(TypeError, match="ConvBnAct is traced as one node"):
        torch.fx.symbolic_trace(ConvBnAct(3, 8))  # alone it would be the whole graph


def test_traced_graph_keeps_the_in_place_batchnorm_and_hooks():
    torch.manual_seed(0)
    model = nn.Sequential(ConvBnAct(3, 8, 3)).eval()
    traced = torch.fx.symbolic_trace(model)
    layer = model[0]
    calls = []
    real = layer.bn.normalize_in_place
    layer.bn.normalize_in_place = lambda t: calls.append(t.shape) or real(t)
    side = int((ConvOutputBatchNorm2d.IN_PLACE_MIN_NUMEL / 8) ** 0.5) + 1  # a map the BN normalizes in place
    x = torch.randn(1, 3, side, side)
    with torch.no_grad():
        out = traced(x)
        assert calls == [(1, 8, side, side)]
        kept = []
        layer.conv.register_forward_hook(lambda module, inputs, output: kept.append(output))
        assert torch.allclose(traced(x), out, rtol=1e-5, atol=1e-5)
        assert len(calls) == 1 and torch.equal(kept[0], layer.conv(x))  # a hook sees the conv output unchanged


@pytest.mark.parametrize("name", ["cspdensenet121", "cspdarknet53"])
def test_traced_memory_efficient_model_trains_the_same_and_keeps_as_little(name):
    torch.manual_seed(0)
    model = cspnet.create_model(name, num_classes=4, **(SMALL_DENSE if "dense" in name else {})).train()
    x = torch.randn(2, 3, 64, 64)
    plain_bytes = saved_activation_bytes(model, x)
    cspnet.memory_efficient(model)
    traced = torch.fx.symbolic_trace(model)  # shares the model's modules and parameters
    lean_bytes = saved_activation_bytes(model, x)
    assert saved_activation_bytes(traced, x) == lean_bytes < 0.8 * plain_bytes
    grads = []
    for net in (model, traced):
        model.zero_grad()
        net(x).square().mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for eager, graph in zip(*grads):
        torch.testing.assert_close(graph, eager, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("neck", NECKS)
@pytest.mark.parametrize("backbone", ["cspresnet50", "cspdensenet121"])  # cfg taps by forward hook; DenseNet's rounding down
def test_traced_detector_equals_the_detector_in_both_modes(backbone, neck):
    torch.manual_seed(0)
    det = create_detector(backbone, neck, num_classes=2, neck_width=32,
                          backbone_kwargs=SMALL_DENSE if "dense" in backbone else {})
    # odd sides: the neck's stride-2 steps round up where DenseNet's transitions round down (crop_to, resize_to)
    sizes = [(64, 64), (72, 100)]
    for training in (True, False):
        det.train(training)
        traced = torch.fx.symbolic_trace(det)
        for h, w in sizes:
            x = torch.randn(1, 3, h, w)
            with torch.no_grad():
                got, want = traced(x), det(x)
            if training:  # the raw map of each level
                assert len(got) == len(want) == 3 and all(torch.equal(g, e) for g, e in zip(got, want))
            else:  # the decoded rows
                assert got.shape == want.shape and torch.equal(got, want)
    if backbone == "cspresnet50":  # the cfg's tap, read by a hook in the model, is a node of the graph
        assert "backbone.body.stages.2.down.0" in {n.target for n in traced.graph.nodes if n.op == "call_module"}


def test_traced_memory_efficient_detector_keeps_as_little_and_trains_the_same():
    torch.manual_seed(0)
    det = create_detector("cspresnet50", "panet", num_classes=2, neck_width=32).train()
    x = torch.randn(2, 3, 64, 64)
    cspnet.memory_efficient(det)  # the neck's concats too (recomputable_cat decides when the graph runs)
    traced = torch.fx.symbolic_trace(det)
    assert saved_activation_bytes(traced, x) == saved_activation_bytes(det, x)
    grads = []
    for net in (det, traced):
        det.zero_grad()
        sum(r.square().mean() for r in net(x)).backward()
        grads.append([p.grad.clone() for p in det.parameters()])
    for eager, graph in zip(*grads):
        torch.testing.assert_close(graph, eager, rtol=1e-5, atol=1e-6)


DARKNET_CFGS = Path(__file__).resolve().parents[2] / "shared" / "darknet-cfg"


@pytest.mark.parametrize("cfg", [
    "cfg/csresnext50.cfg",  # a classifier: the 1x1 map flattened to logits
    "cfg/csdarknet53.cfg",  # the route layers' groups
    "cfg/csresnet50-panet-spp.cfg",  # [yolo] outputs, [upsample], SPP's max pools
    "maxout",  # maxpool_depth: Maxout over channel groups
])
def test_traced_darknet_cfg_network_equals_the_network(cfg):
    torch.manual_seed(0)
    if cfg == "maxout":
        text = "[net]\nwidth=16\nheight=16\nchannels=3\n[convolutional]\nfilters=7\nsize=3\npad=1\n" \
               "[maxpool]\nmaxpool_depth=1\nout_channels=3\n"
        model = DarknetNet(parse_cfg_text(text, "maxout.cfg")).eval()
    else:
        model = build_model(DARKNET_CFGS / cfg, 64).eval()
    traced = torch.fx.symbolic_trace(model)
    for side in (64, 96):  # traced once, run at any size
        x = torch.randn(1, 3, side, side)
        with torch.no_grad():
            got, want = traced(x), model(x)
        if isinstance(want, list):
            assert len(got) == len(want) == len(model.yolo_indices) and all(torch.equal(g, w) for g, w in zip(got, want))
        else:
            assert got.shape == want.shape and torch.equal(got, want)
