"""Weights on disk: safetensors round trip with metadata, strict loading, never unpickling."""
import dataclasses
import json

import pytest
import torch

import cspnet
from cspnet.weights import (
    WeightsError, is_torch_save_file, load_into, load_pretrained, load_state, model_metadata, read_metadata, save_weights,
)

SIZE = 64
EXPLOITED = []


def _record_exploit():
    EXPLOITED.append(True)
    return "pwned"


class Payload:
    """Unpickling this would call ``_record_exploit``: what a malicious checkpoint does."""

    def __reduce__(self):
        return (_record_exploit, ())


def _perturbed(name: str, **kwargs):
    """A model whose weights differ from a fresh one (so a load that did nothing is noticed)."""
    model = cspnet.create_model(name, **kwargs)
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.add_(torch.rand_like(t) * 0.1)
    return model.eval()


def test_save_load_round_trip_with_metadata(tmp_path):
    model = _perturbed("cspresnet10", num_classes=10)
    meta = {**model_metadata(model), "input_size": 224, "mean": [0.5, 0.5, 0.5]}
    path = save_weights(tmp_path / "w" / "cspresnet10.safetensors", model, meta)
    assert [p.name for p in path.parent.iterdir()] == ["cspresnet10.safetensors"]  # no temp file left

    got = read_metadata(path)
    assert got["model"] == "cspresnet10" and got["num_classes"] == 10 and got["input_size"] == 224
    assert got["config"] == json.loads(json.dumps(dataclasses.asdict(model.model_cfg)))
    state = load_state(path)
    assert state.keys() == model.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())

    again = cspnet.create_model("cspresnet10", num_classes=10, pretrained=str(path)).eval()
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        assert torch.equal(again(x), model(x))


def test_features_only_backbone_takes_a_classifier_checkpoint(tmp_path):
    model = _perturbed("cspresnet10")
    path = save_weights(tmp_path / "c.safetensors", model, model_metadata(model))
    backbone = cspnet.create_model("cspresnet10", features_only=True, out_indices=(4,), pretrained=path).eval()
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        assert torch.equal(backbone(x)[0], model.forward_features(x))


def test_features_only_backbone_skips_the_stages_it_does_not_keep(tmp_path):
    model = _perturbed("cspresnet10")
    path = save_weights(tmp_path / "c.safetensors", model, model_metadata(model))
    backbone = cspnet.create_model("cspresnet10", features_only=True, out_indices=(1, 2), pretrained=path).eval()
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        assert torch.equal(backbone(x)[1], model.stages[1](model.stages[0](model.stem(x))))
    state = {**model.state_dict(), "stages.1.extra": torch.zeros(1), "stages.2.conv.weight": torch.zeros(1)}
    with pytest.raises(WeightsError, match=r"unexpected: stages\.1\.extra$"):  # only the deleted stages' keys are skipped
        load_pretrained(backbone, save_weights(tmp_path / "extra.safetensors", state))


@pytest.mark.parametrize("finetune", [False, True])
def test_pooled_features_model_takes_a_classifier_checkpoint(tmp_path, finetune):
    # timm's idiom for a pretrained backbone with pooled features: num_classes=0 ignores the file's classifier
    model = _perturbed("cspresnet10", num_classes=5)
    path = save_weights(tmp_path / "c.safetensors", model, model_metadata(model))
    pooled = cspnet.create_model("cspresnet10", num_classes=0).eval()
    assert load_pretrained(pooled, path, finetune=finetune) == []
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        assert torch.equal(pooled(x), model.forward_head(model.forward_features(x), pre_logits=True))
    state = dict(model.state_dict())
    del state["stem.0.conv.weight"]  # anything but the classifier is still named
    short = save_weights(tmp_path / "short.safetensors", state)
    with pytest.raises(WeightsError, match=r"missing: stem\.0\.conv\.weight$"):
        load_pretrained(pooled, short, finetune=finetune)


def test_weights_of_another_model_are_refused_by_name(tmp_path):
    path = save_weights(tmp_path / "r.safetensors", cspnet.create_model("resnet10"), model_metadata(cspnet.create_model("resnet10")))
    with pytest.raises(WeightsError, match=r"holds weights of model 'resnet10'.*not 'cspresnet10'"):
        cspnet.create_model("cspresnet10", pretrained=path)


def test_wrong_model_without_metadata_names_keys_and_shapes(tmp_path):
    torch.save(cspnet.create_model("resnet10").state_dict(), tmp_path / "r.pth")
    with pytest.raises(WeightsError) as err:
        cspnet.create_model("cspresnet10", pretrained=tmp_path / "r.pth")
    msg = str(err.value)
    assert "r.pth" in msg and "'cspresnet10'" in msg
    assert "missing: stages.0.cross.bn.bias" in msg  # a CSP split layer that resnet10 does not have
    assert "stages.1.blocks.0.conv1.conv.weight: file (128, 64, 3, 3) vs model (64, 64, 3, 3)" in msg
    # the other way round, the CSP layers are named as unexpected
    with pytest.raises(WeightsError, match=r"unexpected: stages\.0\.cross\.bn\.bias"):
        load_into(cspnet.create_model("resnet10"), cspnet.create_model("cspresnet10").state_dict())


def test_wrong_class_count_names_the_classifier_shapes(tmp_path):
    model = cspnet.create_model("cspresnet10", num_classes=1000)
    path = save_weights(tmp_path / "k.safetensors", model, {})  # no metadata: only shapes can tell
    c = model.num_features
    with pytest.raises(WeightsError, match=rf"head\.fc\.weight: file \(1000, {c}\) vs model \(10, {c}\)") as err:
        cspnet.create_model("cspresnet10", num_classes=10, pretrained=path)
    assert "head.fc.bias: file (1000,) vs model (10,)" in str(err.value)
    # load_into names the same problem for a model built by hand
    with pytest.raises(WeightsError, match=r"head\.fc\.bias: file \(1000,\) vs model \(10,\)"):
        load_into(cspnet.create_model("cspresnet10", num_classes=10), load_state(path))


def test_finetuning_keeps_a_fresh_classifier_and_folds_an_rgb_stem_for_grey_images(tmp_path):
    source = _perturbed("cspresnet10", num_classes=1000)
    path = save_weights(tmp_path / "imagenet.safetensors", source, model_metadata(source))
    torch.manual_seed(0)
    fresh_head = cspnet.create_model("cspresnet10", num_classes=10, in_chans=1).head.state_dict()
    torch.manual_seed(0)
    grey = cspnet.create_model("cspresnet10", num_classes=10, in_chans=1)
    adapted = load_pretrained(grey, path, finetune=True)
    assert len(adapted) == 2 and "1000 classes, the model's 10" in adapted[0] and "summed" in adapted[1]
    assert all(torch.equal(v, fresh_head[k]) for k, v in grey.head.state_dict().items())
    x = torch.rand(2, 1, SIZE, SIZE)
    with torch.no_grad():  # a grey image gives what the RGB model gave for it as three equal channels
        torch.testing.assert_close(grey.eval().forward_features(x), source.forward_features(x.expand(-1, 3, -1, -1)),
                                   rtol=1e-4, atol=1e-5)
    # a grey file spread over an RGB model, and a backbone file without a classifier
    rgb = cspnet.create_model("cspresnet10", num_classes=10)
    [spread] = load_pretrained(rgb, save_weights(tmp_path / "g.safetensors", grey), finetune=True)  # same classes: head loaded
    assert "spread over three channels" in spread
    with torch.no_grad():
        torch.testing.assert_close(rgb.eval().forward_features(x.expand(-1, 3, -1, -1)), grey.forward_features(x),
                                   rtol=1e-4, atol=1e-5)
    body = {k: v for k, v in source.state_dict().items() if not k.startswith("head.")}
    assert load_pretrained(cspnet.create_model("cspresnet10"), save_weights(tmp_path / "b.safetensors", body),
                           finetune=True) == ["head: not loaded (the file has no classifier); it starts from its initialisation"]
    # without finetune the same files are refused (an RGB stem for a grey model saying how to ask for it), and with
    # it any other mismatch still is
    with pytest.raises(WeightsError, match=r"head\.fc\.weight: file \(1000, \d+\) vs model \(10, \d+\)"):
        load_pretrained(cspnet.create_model("cspresnet10", num_classes=10), path)
    with pytest.raises(WeightsError, match=r"stem\.0\.conv\.weight: file \(64, 3, 7, 7\) vs model \(64, 1, 7, 7\); to load "
                                           r"stem\.0\.conv\.weight summed over the colour channels, ask for it: "
                                           r"load_pretrained\(model, path, finetune=True\)"):
        load_pretrained(cspnet.create_model("cspresnet10", num_classes=1000, in_chans=1), path)
    with pytest.raises(WeightsError, match=r"mis-shaped: stages\.1"):
        load_pretrained(cspnet.create_model("cspresnet10", num_classes=10), save_weights(tmp_path / "r.safetensors", cspnet.create_model("resnet10")),
                        finetune=True)


def test_darknet_weights_given_as_pretrained_point_to_the_darknet_readers(tmp_path):
    for name in ("csdarknet53.weights", "yolov4.conv.137"):
        (tmp_path / name).write_bytes(b"\0" * 64)
        with pytest.raises(WeightsError, match=rf"{name}: a Darknet weights file.*darknet_weights=.*cspnet darknet convert"):
            cspnet.create_model("cspdarknet53", pretrained=tmp_path / name)


def test_weights_for_another_config_are_refused(tmp_path):
    # Same shapes, different function: only the recorded config can tell them apart.
    mish = cspnet.create_model("cspresnet10", act="mish")
    path = save_weights(tmp_path / "m.safetensors", mish, model_metadata(mish))
    with pytest.raises(WeightsError, match=r"act: file 'mish' vs model 'leaky'"):
        cspnet.create_model("cspresnet10", pretrained=path)
    assert cspnet.create_model("cspresnet10", act="mish", pretrained=path).model_cfg.act == "mish"


def test_pretrained_must_be_a_path():
    with pytest.raises(WeightsError, match="nothing is downloaded"):
        cspnet.create_model("cspresnet10", pretrained=True)
    with pytest.raises(WeightsError, match="no such weights file"):
        cspnet.create_model("cspresnet10", pretrained="/nonexistent/w.safetensors")


def test_a_folder_or_a_text_file_given_as_weights_is_named_as_such(tmp_path):
    with pytest.raises(WeightsError, match=r"a folder, not a weights file \(a training run's weights are .*last\.safetensors\)"):
        load_state(tmp_path)
    text = tmp_path / "notes.pth"
    text.write_text("epoch 3: loss 0.41")
    with pytest.raises(WeightsError, match=r"notes\.pth: not a file written by torch\.save \(it begins with b'epoc'\)"):
        load_state(text)


def test_pth_is_read_with_weights_only_and_a_pickle_payload_is_refused(tmp_path):
    state = {"w": torch.arange(4.0)}
    torch.save({"state_dict": state}, tmp_path / "ok.pth")
    assert torch.equal(load_state(tmp_path / "ok.pth")["w"], state["w"])

    torch.save({"w": torch.zeros(1), "extra": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(WeightsError, match=r"evil\.pth: cannot be read safely with weights_only=True"):
        load_state(tmp_path / "evil.pth")
    with pytest.raises(WeightsError, match="weights_only"):
        load_pretrained(cspnet.create_model("cspresnet10"), tmp_path / "evil.pth")
    assert EXPLOITED == []


def test_corrupt_safetensors_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(WeightsError, match=r"bad\.safetensors: not a readable safetensors file"):
        load_state(bad)
    with pytest.raises(WeightsError, match=r"bad\.safetensors"):
        cspnet.create_model("cspresnet10", pretrained=bad)


def test_training_checkpoints_of_other_libraries_are_read_by_content(tmp_path):
    # timm's model_best.pth.tar and Lightning's .ckpt are torch.save files; a DDP run's keys carry "module.".
    model = cspnet.create_model("cspresnet10")
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    for name in ("model_best.pth.tar", "epoch3.ckpt"):
        torch.save({"epoch": 3, "state_dict": state}, tmp_path / name)
        again = cspnet.create_model("cspresnet10", pretrained=tmp_path / name)
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    with pytest.raises(WeightsError, match=r"name the file \.safetensors"):
        save_weights(tmp_path / "w.pth", model)


def test_a_safetensors_file_is_never_taken_for_a_torch_save_file(tmp_path):
    # A safetensors file opens with its header's length: 128 + 256k puts 0x80, pickle's first byte, first.
    from safetensors.torch import save_file

    path = tmp_path / "w.safetensors"
    for n in range(1, 300):
        save_file({"x" * n: torch.zeros(1)}, str(path))
        if path.read_bytes()[:1] == b"\x80":
            break
    assert path.read_bytes()[:1] == b"\x80"
    assert list(load_state(path)) == ["x" * n]
    torch.save({"w": torch.ones(2)}, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    assert torch.equal(load_state(tmp_path / "legacy.pth")["w"], torch.ones(2))


@pytest.mark.filterwarnings("error")  # torch's warning about the protocol is left to the error message
def test_legacy_torch_save_files_are_recognised_in_every_pickle_protocol(tmp_path):
    # The legacy format pickles its magic number first; from protocol 4 a FRAME opcode comes before it.
    for protocol in (2, 3, 4, 5):
        path = tmp_path / f"protocol{protocol}.pth"
        torch.save({"w": torch.ones(2)}, path, _use_new_zipfile_serialization=False, pickle_protocol=protocol)
        assert is_torch_save_file(path)
        if protocol <= 3:
            assert torch.equal(load_state(path)["w"], torch.ones(2))
        else:  # torch's weights-only unpickler knows protocols 2 and 3 only
            with pytest.raises(WeightsError, match=f"written by torch.save with pickle protocol {protocol}, which "
                                                   r"torch.load\(weights_only=True\) cannot read"):
                load_state(path)
    zipped = tmp_path / "zip_protocol4.pth"  # torch.save's default format, pickled with protocol 4
    torch.save({"w": torch.ones(2)}, zipped, pickle_protocol=4)
    with pytest.raises(WeightsError, match=r"zip_protocol4.pth: written by torch.save with pickle protocol 4 or 5.*save it again"):
        load_state(zipped)


def test_state_dicts_of_compiled_and_wrapped_models_load(tmp_path):
    # torch.compile prefixes every key with "_orig_mod.", DataParallel / DDP with "module.", in either nesting.
    from safetensors.torch import save_file

    model = cspnet.create_model("cspresnet10")
    compiled = torch.compile(model).state_dict()  # compiles nothing until called
    assert next(iter(compiled)).startswith("_orig_mod.")
    files = {"compiled.pth": compiled, "ddp_compiled.pth": {f"module.{k}": v for k, v in compiled.items()},
             "compiled.safetensors": {k: v.contiguous() for k, v in compiled.items()}}
    for name, state in files.items():
        if name.endswith(".pth"):
            torch.save(state, tmp_path / name)
        else:
            save_file(state, str(tmp_path / name))
        again = cspnet.create_model("cspresnet10", pretrained=tmp_path / name)
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values())), name


def test_written_files_get_the_permissions_open_would_give(tmp_path, monkeypatch):
    # safetensors creates its files owner-only; other users of a shared machine could not read the weights
    import os

    from cspnet.files import atomic_write_text

    set_umask = os.umask
    mask = set_umask(0o022)
    try:
        # the umask is read, never set: for a moment another thread's new files would be world-writable
        monkeypatch.setattr(os, "umask", lambda *_: pytest.fail("os.umask called"))
        weights = save_weights(tmp_path / "w.safetensors", {"x": torch.zeros(2)})
        text = atomic_write_text(tmp_path / "t.json", "{}")
        assert (weights.stat().st_mode & 0o777) == (text.stat().st_mode & 0o777) == 0o644
    finally:
        set_umask(mask)
