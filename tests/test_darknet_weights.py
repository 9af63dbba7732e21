""".weights I/O and the native <-> Darknet mapping: random weights written by our writer load into the
cfg-built network and the native model with equal outputs; files round-trip bit-exactly."""
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

import cspnet
from cspnet.darknet import (
    DarknetNet, DarknetWeightsError, WeightsHeader, build_model, load_darknet_weights, native_records, parse_cfg,
    parse_cfg_text, read_header, read_weights, save_darknet_weights, write_weights,
)
from cspnet.darknet.build import BN_MOMENTUM
from cspnet.darknet.mapping import official_cfg_named_by
from cspnet.detection import create_detector

CFG_ROOT = Path(__file__).resolve().parents[2] / "shared" / "darknet-cfg"
SIZE = 64




def randomize(model: DarknetNet, seed: int = 0) -> DarknetNet:
    """Random weights with BN running stats measured on random images (then perturbed), so that
    activations stay O(1) through deep nets and the comparison below has signal."""
    g = torch.Generator().manual_seed(seed)
    records = model.weight_records()
    with torch.no_grad():
        for r in records:
            r.weight.copy_(torch.randn(r.weight.shape, generator=g) * (2.0 / r.weight[0].numel()) ** 0.5)
            r.bias.copy_(torch.randn(r.bias.shape, generator=g) * 0.1)
            if r.bn is not None:
                r.bn.weight.copy_(torch.rand(r.bn.weight.shape, generator=g) + 0.5)
                r.bn.reset_running_stats()
                r.bn.momentum = None  # one batch: running stats = that batch's statistics
        model.train()(torch.randn(4, model.in_chans, SIZE, SIZE, generator=g))
        for r in records:
            if r.bn is not None:
                r.bn.momentum = BN_MOMENTUM
                r.bn.running_mean.add_(torch.randn(r.bn.running_mean.shape, generator=g) * 0.1)
                r.bn.running_var.mul_(torch.rand(r.bn.running_var.shape, generator=g) * 0.5 + 0.75).clamp_(min=1e-3)
        # residual sums still grow with depth: scale the (linear) classifier so the logits are O(1)
        out = model.eval()(torch.randn(2, model.in_chans, SIZE, SIZE, generator=g))
        records[-1].weight.div_(out.std())
    return model


def official(name: str) -> Path:
    return CFG_ROOT / "cfg" / cspnet.get_spec(name).darknet_cfg


MAPPED = [n for n in cspnet.list_models() if cspnet.get_spec(n).darknet_cfg]


def test_models_with_official_cfgs_are_mapped():
    # the list; the test below runs for every registered model with a darknet_cfg
    assert {"darknet53", "cspdarknet53", "resnet50", "cspresnet50", "resnext50", "cspresnext50", "resnet10",
            "darknet_ref"} <= set(MAPPED)


@pytest.mark.parametrize("name", MAPPED)
def test_native_model_computes_what_the_cfg_computes(name, tmp_path):
    darknet = randomize(build_model(official(name), SIZE))
    path = write_weights(darknet, tmp_path / f"{name}.weights")
    x = torch.randn(2, 3, SIZE, SIZE)
    native = cspnet.create_model(name).eval()
    load_darknet_weights(native, path)
    with torch.no_grad():
        expected = darknet(x)
        for r in darknet.weight_records():  # forget everything, then read it back
            for t in r.tensors:
                t.zero_()
        read_weights(darknet, path)
        from_file = darknet(x)
        got = native(x)
    path.unlink()
    torch.testing.assert_close(from_file, expected, rtol=0, atol=0)
    assert got.shape == expected.shape == (2, 1000)
    assert (expected[0] - expected[1]).abs().max() > 0.1  # the outputs depend on the image: the test has signal
    assert (got - expected).abs().max() <= 1e-4
    # and back: the records the native model exports (save_darknet_weights) are the file's, in order
    for a, b in zip(native_records(native), darknet.weight_records(), strict=True):
        assert all(torch.equal(u.reshape(v.shape), v) for u, v in zip(a.tensors, b.tensors)), a.name


def test_create_model_reads_and_save_darknet_weights_writes(tmp_path):
    darknet = randomize(build_model(official("resnet10"), SIZE))
    path = write_weights(darknet, tmp_path / "resnet10.weights", header=WeightsHeader(0, 2, 5, seen=64000))
    model = cspnet.create_model("resnet10", darknet_weights=path).eval()
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        assert (model(x) - darknet(x)).abs().max() <= 1e-4
    export = save_darknet_weights(model, tmp_path / "export.weights", header=WeightsHeader(0, 2, 5, seen=64000))
    assert export.read_bytes() == path.read_bytes()
    with pytest.raises(DarknetWeightsError, match=r"the classifier sizes differ: the file's classifier is 1000-way, that "
                       r"of model 'resnet10' 10-way \(over 512 features\). To load the backbone alone, build the model "
                       r"with num_classes=0 or features_only=True \(then reset_classifier\(10\)"):
        cspnet.create_model("resnet10", num_classes=10, darknet_weights=path)
    with pytest.raises(ValueError, match="no official Darknet cfg"):
        cspnet.create_model("cspresnet10", darknet_weights=path)


# -- the file format ---------------------------------------------------------------------------
TINY = ("[net]\nwidth=8\nheight=8\nchannels=2\n"
        "[convolutional]\nfilters=3\nsize=3\npad=1\nbatch_normalize=1\nactivation=leaky\n"
        "[convolutional]\nfilters=3\nsize=1\nactivation=linear\n"
        "[convolutional]\nshare_index=-1\nfilters=3\nsize=1\nactivation=relu\n"  # shares layer 1: no record
        "[maxpool]\nsize=2\nstride=2\n"
        "[connected]\noutput=5\nbatch_normalize=1\nactivation=linear\n"
        "[connected]\noutput=2\nactivation=linear\n")


def tiny() -> DarknetNet:
    return DarknetNet(parse_cfg_text(TINY, "tiny.cfg")).eval()


def test_file_layout_is_darknets(tmp_path):
    model = tiny()
    with torch.no_grad():
        for k, t in enumerate(p for p in model.state_dict().values() if p.is_floating_point()):
            t.copy_(torch.arange(t.numel(), dtype=torch.float32).reshape(t.shape) + 1000 * k)
    path = write_weights(model, tmp_path / "t.weights", header=WeightsHeader(0, 2, 5, seen=2**40 + 7))
    data = path.read_bytes()
    assert struct.unpack_from("<iiiQ", data) == (0, 2, 5, 2**40 + 7)
    floats = np.frombuffer(data, "<f4", offset=20)
    c0, c1, fc0, fc1 = model.layers[0], model.layers[1], model.layers[4], model.layers[5]
    expected = [
        c0.bn.bias, c0.bn.weight, c0.bn.running_mean, c0.bn.running_var, c0.conv.weight,  # conv: bias, BN, weights
        c1.conv.bias, c1.conv.weight,                                                    # conv without BN
        fc0.bn.bias, fc0.fc.weight, fc0.bn.weight, fc0.bn.running_mean, fc0.bn.running_var,  # connected: BN last
        fc1.fc.bias, fc1.fc.weight,
    ]
    np.testing.assert_array_equal(floats, torch.cat([t.detach().flatten() for t in expected]).numpy())
    assert model.layers[2].conv is model.layers[1].conv  # shared weights are stored once


def test_write_read_round_trip_is_bit_exact(tmp_path):
    source = randomize(build_model(official("darknet_ref"), SIZE), seed=3)
    for header in (WeightsHeader(0, 2, 5, seen=123456789012), WeightsHeader(0, 1, 0, seen=4000000000)):
        first = write_weights(source, tmp_path / "a.weights", header=header)
        target = build_model(official("darknet_ref"), SIZE)
        assert read_weights(target, first) == header
        second = write_weights(target, tmp_path / "b.weights", header=header)
        assert first.read_bytes() == second.read_bytes()
        for (k, a), b in zip(source.state_dict().items(), target.state_dict().values()):
            assert k.endswith("num_batches_tracked") or torch.equal(a, b), k  # the only state not in the file
    # version 0.1 files store `seen` as 32 bits: 16-byte header
    assert first.stat().st_size == 16 + 4 * sum(r.num_floats for r in source.weight_records())


def test_transposed_connected_weights_are_read(tmp_path):
    model = tiny()
    records = model.weight_records()
    rng = np.random.default_rng(0)
    values = [rng.standard_normal(t.numel()).astype("<f4") for r in records for t in r.tensors]
    last = records[-1]  # connected without BN: bias, weights (stored inputs x outputs when transposed)
    out_f, in_f = last.weight.shape
    w = values[-1].reshape(out_f, in_f)
    header = WeightsHeader(0, 1001, 0)  # minor > 1000: darknet's "transpose" flag
    body = b"".join(v.tobytes() for v in values[:-1]) + np.ascontiguousarray(w.T).tobytes()
    (tmp_path / "t.weights").write_bytes(header.pack() + body)
    read_weights(model, tmp_path / "t.weights")
    np.testing.assert_array_equal(last.weight.detach().numpy(), w)


def test_partial_files_and_cutoff(tmp_path):
    source = randomize(build_model(official("cspdarknet53"), SIZE), seed=1)
    partial = write_weights(source, tmp_path / "csdarknet53.conv.104", cutoff=104)  # darknet partial ... 104
    n_all, n_backbone = len(source.weight_records()), len(source.weight_records(104))
    # layers 0..103: all but the last transition (layer 104) and the classifier (layer 106)
    assert [r.layer for r in source.weight_records()[n_backbone:]] == [104, 106]
    target = build_model(official("cspdarknet53"), SIZE)
    head_before = target.layers[106].conv.weight.clone()
    read_weights(target, partial)  # cutoff 104 from the file name
    for a, b in zip(source.weight_records(104), target.weight_records(104)):
        assert all(torch.equal(x, y) for x, y in zip(a.tensors, b.tensors))
    assert torch.equal(target.layers[106].conv.weight, head_before)  # past the cutoff: untouched
    # create_model reads the cut as darknet partial does: the layers after it keep their initialisation
    for kw, total in (({}, 73), ({"features_only": True}, 72)):  # 72 convolutions, and the classifier
        with pytest.warns(UserWarning, match=f"read 71 of the {total} convolutions of model 'cspdarknet53'"):
            cut = cspnet.create_model("cspdarknet53", darknet_weights=partial, **kw)
        records = native_records(cut)
        assert all(torch.equal(a.weight, b.weight) for a, b in zip(records, source.weight_records(104)))
        assert not torch.equal(records[len(source.weight_records(104))].weight, source.weight_records()[-2].weight)
    # the same file read as a complete one: the error says so, and how to read it
    renamed = partial.rename(tmp_path / "backbone.weights")
    with pytest.raises(DarknetWeightsError) as info:
        read_weights(target, renamed)
    total = sum(r.num_floats for r in source.weight_records())
    found = sum(r.num_floats for r in source.weight_records(104))
    msg = str(info.value)
    assert f"expected {total} floats" in msg and f"found {found}" in msg
    assert f"first {n_backbone} of {n_all} weighted layers" in msg and "cutoff=N with 103 <= N <= 104" in msg
    # a native model takes the backbone with partial=True; its classifier keeps its values
    native = cspnet.create_model("cspdarknet53")
    with pytest.raises(DarknetWeightsError, match=r"a partial file\? \(read it with partial=True, as create_model"):
        load_darknet_weights(native, renamed)
    fc_before = native.head.fc.weight.clone()
    load_darknet_weights(native, renamed, partial=True)
    assert torch.equal(native.head.fc.weight, fc_before)
    assert torch.equal(native_records(native)[0].weight, source.weight_records()[0].weight)


def test_a_backbone_without_its_classifier_reads_the_whole_imagenet_file(tmp_path):
    torch.manual_seed(1)
    source = cspnet.create_model("cspdarknet53").eval()  # other random weights than the backbone's own below
    path = save_darknet_weights(source, tmp_path / "csdarknet53.weights")
    backbone = cspnet.create_model("cspdarknet53", features_only=True, darknet_weights=path).eval()
    pooled = cspnet.create_model("cspdarknet53", num_classes=0, darknet_weights=path).eval()  # an Identity classifier
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        assert torch.equal(backbone(x)[-1], source.forward_features(x))
        assert torch.equal(pooled(x), source.forward_head(source.forward_features(x), pre_logits=True))
    # a surplus that is no classifier over the last features (C + 1 floats per class) is still refused
    (tmp_path / "odd.weights").write_bytes(path.read_bytes() + b"\0" * 4 * (backbone.num_features + 2))
    with pytest.raises(DarknetWeightsError, match="more weights than this network.*a classifier's weights for a backbone"):
        load_darknet_weights(cspnet.create_model("cspdarknet53", features_only=True), tmp_path / "odd.weights")


def test_wrong_lengths_say_expected_and_found(tmp_path):
    model = tiny()
    good = write_weights(model, tmp_path / "good.weights").read_bytes()
    n = sum(r.num_floats for r in model.weight_records())
    cases = {
        "short.weights": (good[:-4], f"expected {n} floats for 4 weighted layers (all layers), found {n - 1}"),
        "long.weights": (good + b"\0" * 8, f"found {n + 2}; the file holds more weights than this network"),
        "ragged.weights": (good + b"\0", "not a whole number of float32 values"),
        "header.weights": (good[:10], "too short for a Darknet weights header"),
        "v1header.weights": (struct.pack("<iii", 0, 1, 0), "too short for a version 0.1 header"),
    }
    for name, (data, words) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(DarknetWeightsError) as info:
            read_weights(model, tmp_path / name)
        assert str(info.value).startswith(str(tmp_path / name)) and words in str(info.value), str(info.value)
    with pytest.raises(DarknetWeightsError, match="cannot read weights"):
        read_weights(model, tmp_path / "missing.weights")
    with pytest.raises(ValueError, match="cutoff=9 out of range"):
        write_weights(model, tmp_path / "x.weights", cutoff=9)
    assert read_header(good) == WeightsHeader()


def test_native_records_follow_module_order():
    model = cspnet.create_model("cspdarknet53")
    records = native_records(model)
    assert records[0].name == "stem.conv" and records[-1].name == "head.fc"
    assert [r.name for r in records[1:4]] == ["stages.0.down.conv", "stages.0.cross.conv", "stages.0.main.conv"]
    assert all(r.bn is not None for r in records[:-1]) and records[-1].bn is None


# -- the official cfgs' -gamma / -omega variants ----------------------------------------------------
def _layer_options(cfg: str) -> list[tuple[str, dict[str, str]]]:
    return [(s.kind, {k: o.value for k, o in s.options.items()}) for s in parse_cfg(CFG_ROOT / "cfg" / cfg).layers]


@pytest.mark.parametrize("base", ["csdarknet53", "csresnet50", "csresnext50"])
def test_gamma_cfgs_are_the_base_network_and_omega_cfgs_swap_leaky_for_mish(base):
    # so -gamma weights load exactly into the leaky model, and -omega weights into it built with act="mish"
    plain = _layer_options(f"{base}.cfg")
    assert _layer_options(f"{base}-gamma.cfg") == plain
    mish = [(kind, {k: "mish" if (k, v) == ("activation", "leaky") else v for k, v in opts.items()}) for kind, opts in plain]
    assert _layer_options(f"{base}-omega.cfg") == mish != plain


def test_omega_weights_load_into_the_mish_model_and_are_refused_by_the_leaky_one(tmp_path):
    darknet = randomize(build_model(CFG_ROOT / "cfg" / "csdarknet53-omega.cfg", SIZE))
    path = write_weights(darknet, tmp_path / "csdarknet53-omega_final.weights")
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        expected = darknet(x)
        for model in (cspnet.create_model("cspdarknet53_omega", darknet_weights=path),
                      cspnet.create_model("cspdarknet53", act="mish", darknet_weights=path)):  # the same network
            assert (model.eval()(x) - expected).abs().max() <= 1e-4
    # the leaky model has the same shapes and would read the file silently, computing something else
    refused = r"named for csdarknet53-omega.cfg, but model 'cspdarknet53' is csdarknet53.cfg's network; load it into model 'cspdarknet53_omega'"
    with pytest.raises(DarknetWeightsError, match=refused):
        cspnet.create_model("cspdarknet53", darknet_weights=path)
    with pytest.raises(DarknetWeightsError, match=refused):  # cspnet detect train --backbone-weights
        create_detector("cspdarknet53", "panet", num_classes=2).load_backbone_weights(path)
    # -gamma files are csdarknet53.cfg's network; a .conv.N cut is named for its cfg too
    assert official_cfg_named_by("csdarknet53-gamma_final.weights") == "csdarknet53.cfg"
    assert official_cfg_named_by("csdarknet53-omega.conv.104") == "csdarknet53-omega.cfg"
    assert official_cfg_named_by("darknet53.weights") == "darknet53.cfg"  # not darknet.cfg
    assert official_cfg_named_by("my_backbone.weights") is None


@pytest.mark.parametrize("name, cfg", [("cspresnet50", "csresnet50-omega.cfg"), ("cspresnext50", "csresnext50-omega.cfg")])
def test_resnet_omega_weights_load_into_the_omega_models_and_are_refused_by_the_leaky_ones(name, cfg, tmp_path):
    darknet = randomize(build_model(CFG_ROOT / "cfg" / cfg, SIZE))
    path = write_weights(darknet, tmp_path / cfg.replace(".cfg", ".weights"))
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        for model in (cspnet.create_model(f"{name}_omega", darknet_weights=path),
                      cspnet.create_model(name, act="mish", darknet_weights=path)):  # the same network
            assert (model.eval()(x) - darknet(x)).abs().max() <= 1e-4
    with pytest.raises(DarknetWeightsError, match=f"load it into model '{name}_omega'"):
        cspnet.create_model(name, darknet_weights=path)
