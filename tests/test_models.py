"""The per-model suite: every registered model, parametrised over `cspnet.list_models()`."""
import pytest
import torch

import cspnet

MODELS = cspnet.list_models()
SIZE = 64  # every model's total stride divides 64


def _model(name, **kw):
    return cspnet.create_model(name, num_classes=7, **kw)


@pytest.mark.parametrize("name", MODELS)
def test_forward_backward(name):
    model = _model(name).train()
    x = torch.randn(2, 3, SIZE, SIZE)
    out = model(x)
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()
    out.logsumexp(1).sum().backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    assert not no_grad, f"parameters without gradient: {no_grad[:5]}"


@pytest.mark.parametrize("name", MODELS)
def test_eval_deterministic_batch1_channels_last(name):
    model = _model(name).eval()
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        a, b = model(x), model(x)
        model_cl = model.to(memory_format=torch.channels_last)
        c = model_cl(x.contiguous(memory_format=torch.channels_last))
    assert a.shape == (1, 7)
    assert torch.equal(a, b)
    torch.testing.assert_close(c, a, rtol=1e-4, atol=1e-4 * a.abs().max().item())


@pytest.mark.parametrize("name", MODELS)
def test_feature_info_matches_features(name):
    model = _model(name, features_only=True).eval()
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        feats = model(x)
    assert len(feats) == len(model.feature_info)
    for f, info in zip(feats, model.feature_info):
        assert f.shape[1] == info.num_chs, info
        assert SIZE // f.shape[-1] == info.reduction, info
    # the classifier model's pooled features come from the last level
    full = _model(name).eval()
    full.load_state_dict(model.state_dict(), strict=False)
    with torch.no_grad():
        last = full.forward_features(x)
    torch.testing.assert_close(last, feats[-1])


@pytest.mark.parametrize("name", MODELS)
def test_torch_export(name):
    model = _model(name).eval()
    x = torch.randn(2, 3, SIZE, SIZE)
    exported = torch.export.export(model, (x,))
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x), model(x))


@pytest.mark.parametrize("name", ["cspdarknet53", "cspresnext50"])
def test_options_in_chans_drop_rate_act(name):
    model = cspnet.create_model(name, num_classes=3, in_chans=1, drop_rate=0.2, act="mish").eval()
    assert any(isinstance(m, torch.nn.Mish) for m in model.modules())
    assert not any(isinstance(m, torch.nn.LeakyReLU) for m in model.modules())
    assert model(torch.randn(1, 1, SIZE, SIZE)).shape == (1, 3)


@pytest.mark.parametrize("name", MODELS)
def test_smallest_input(name):
    # min_input_size runs; one pixel less is refused by name rather than by a pooling error deep inside
    model = _model(name).eval()
    size = model.min_input_size
    with torch.no_grad():
        assert model(torch.randn(1, 3, size, size)).shape == (1, 7)
        if size > 1:
            with pytest.raises(ValueError, match=f"must be at least {size}"):
                model(torch.randn(1, 3, size, size - 1))
