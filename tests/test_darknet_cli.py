"""``cspnet darknet info`` and ``cspnet darknet convert``."""
import json
from pathlib import Path

import pytest
import torch

import cspnet
from cspnet.cli import main
from cspnet.darknet import build_model, load_model, write_weights
from cspnet.weights import read_metadata

from test_darknet_weights import SIZE, official, randomize

CFG_ROOT = Path(__file__).resolve().parents[2] / "shared" / "darknet-cfg"




def test_info_prints_darknets_table_with_params_and_bflops(capsys):
    assert main(["darknet", "info", str(CFG_ROOT / "cfg" / "csdarknet53.cfg")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "csdarknet53.cfg: input 256 x 256 x 3"
    rows = [line for line in out if line[:5].strip().isdigit()]
    assert len(rows) == 108
    assert rows[0].split()[:3] == ["0", "conv", "32"] and "256 x 256 x    3 ->  256 x 256 x   32" in rows[0]
    assert rows[1].split()[:2] == ["1", "conv"] and "->  128 x 128 x   64" in rows[1]
    assert rows[105].split()[:2] == ["105", "avg"] and "->    1 x   1 x 1024" in rows[105]
    # a [shortcut] row counts its adds, as Darknet's table does (64 x 128 x 128 elements = 0.001 BFLOPs)
    assert rows[7].split()[:4] == ["7", "shortcut", "from", "4"] and rows[7].split()[-2:] == ["0.001", "84"]
    assert out[-2].startswith("conv weights: 27.606 M") and out[-2].endswith("BFLOPs: 13.067 (conv and connected layers)")
    assert out[-1].startswith("Total BFLOPS 13.071 ")


def test_info_json_at_another_size_sums_per_layer_bflops(capsys):
    cfg = CFG_ROOT / "pytorch-branch" / "cfg" / "csresnext50-panet-spp.cfg"
    assert main(["darknet", "info", str(cfg), "--size", "608", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["input_size"] == [608, 608] and round(info["bflops"], 2) == 100.53  # conv layers
    # Darknet's total adds the SPP maxpools (size^2 x C_in per output) and the shortcuts: paper Table 4's 100.6
    assert round(info["total_bflops"], 3) == 100.606
    assert round(info["conv_params"] / 1e6, 3) == 56.853
    assert abs(sum(r["bflops"] for r in info["layers"]) - info["total_bflops"]) < 1e-9
    pools = [r for r in info["layers"] if r["kind"] == "max"]  # the stem's 2x2/2, then SPP's 5, 9, 13 (stride 1)
    assert [r["detail"] for r in pools] == ["2 x 2/ 2", "5 x 5/ 1", "9 x 9/ 1", "13 x 13/ 1"]
    assert [r["bflops"] for r in pools] == [2 * 2 * 64 * 152 * 152 / 1e9] + [k * k * 512 * 19 * 19 / 1e9 for k in (5, 9, 13)]
    yolo = [r for r in info["layers"] if r["kind"] == "yolo"]
    assert [r["out_shape"] for r in yolo] == [[255, 76, 76], [255, 38, 38], [255, 19, 19]]


def test_info_errors_are_clean(capsys):
    assert main(["darknet", "info", str(CFG_ROOT / "in-progress" / "yolov3-spp-matrix.cfg")]) == 2
    assert "yolov3-spp-matrix.cfg:927: layer 127 [convolutional]: share_index" in capsys.readouterr().err
    assert main(["darknet", "info", "missing.cfg"]) == 2
    assert "missing.cfg:0: cannot read cfg" in capsys.readouterr().err


@pytest.fixture(scope="module")
def darknet_ref_weights(tmp_path_factory):
    torch.manual_seed(0)
    model = randomize(build_model(official("darknet_ref"), SIZE), seed=5)
    path = write_weights(model, tmp_path_factory.mktemp("w") / "darknet.weights")
    return model, path


def test_convert_to_the_native_model(darknet_ref_weights, tmp_path, capsys):
    darknet, weights = darknet_ref_weights
    out = tmp_path / "darknet_ref.safetensors"
    assert main(["darknet", "convert", str(official("darknet_ref")), str(weights), str(out)]) == 0
    assert "cspnet.create_model('darknet_ref'" in capsys.readouterr().out
    meta = read_metadata(out)
    assert (meta["model"], meta["layout"], meta["darknet_cfg"], meta["darknet_header"]["minor"]) == (
        "darknet_ref", "native", "darknet.cfg", 2)
    native = cspnet.create_model("darknet_ref", pretrained=out).eval()
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        assert (native(x) - darknet(x)).abs().max() <= 1e-4


def test_convert_raw_keeps_the_cfg_layout(darknet_ref_weights, tmp_path):
    darknet, weights = darknet_ref_weights
    out = tmp_path / "raw.safetensors"
    assert main(["darknet", "convert", str(official("darknet_ref")), str(weights), str(out), "--raw"]) == 0
    assert read_metadata(out)["layout"] == "darknet"
    model = load_model(official("darknet_ref"), out, input_size=SIZE)
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        assert torch.equal(model(x), darknet(x))


def test_convert_refuses_a_cfg_that_computes_something_else(darknet_ref_weights, tmp_path, capsys):
    _, weights = darknet_ref_weights
    # same shapes as darknet.cfg, another activation: the weights fit, the function does not
    relu = tmp_path / "darknet-relu.cfg"
    relu.write_text(official("darknet_ref").read_text().replace("activation=leaky", "activation=relu"))
    out = tmp_path / "x.safetensors"
    assert main(["darknet", "convert", str(relu), str(weights), str(out), "--model", "darknet_ref"]) == 2
    assert "compute different outputs" in capsys.readouterr().err and not out.exists()
    assert main(["darknet", "convert", str(relu), str(weights), str(out), "--model", "resnet10"]) == 2
    err = capsys.readouterr().err
    assert "darknet-relu.cfg does not map onto model 'resnet10'" in err and "weighted layers cannot map onto" in err
    assert "convert with --raw" in err
    assert main(["darknet", "convert", str(relu), str(weights), str(tmp_path / "x.pt")]) == 2
    assert "must be a .safetensors file" in capsys.readouterr().err


def test_convert_a_fine_tuned_cfg_keeps_its_class_count_and_input_depth(tmp_path, capsys):
    # darknet.cfg fine-tuned on 10 grey classes: another last conv (filters) and [net] channels
    text = official("darknet_ref").read_text().replace("filters=1000", "filters=10").replace("channels=3", "channels=1")
    cfg = tmp_path / "darknet-grey10.cfg"
    cfg.write_text(text)
    darknet = randomize(build_model(cfg, SIZE), seed=6)
    weights = write_weights(darknet, tmp_path / "darknet-grey10.weights")
    out = tmp_path / "grey10.safetensors"
    assert main(["darknet", "convert", str(cfg), str(weights), str(out), "--model", "darknet_ref"]) == 0
    assert f"cspnet.create_model('darknet_ref', num_classes=10, in_chans=1, pretrained='{out}')" in capsys.readouterr().out
    native = cspnet.create_model("darknet_ref", num_classes=10, in_chans=1, pretrained=out).eval()
    x = torch.randn(2, 1, SIZE, SIZE)
    with torch.no_grad():
        assert native(x).shape == (2, 10) and (native(x) - darknet.eval()(x)).abs().max() <= 1e-4
