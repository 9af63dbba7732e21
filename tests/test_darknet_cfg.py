"""Darknet cfg parsing and the errors a malformed cfg gets: always DarknetCfgError, always file:line."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cspnet.darknet import DarknetCfgError, DarknetNet, parse_cfg, parse_cfg_text

CFG_ROOT = Path(__file__).resolve().parents[2] / "shared" / "darknet-cfg"
NET = "[net]\nwidth=32\nheight=32\nchannels=3\n"  # 4 lines: layer sections start at line 5




def build(text: str, size=None) -> DarknetNet:
    with torch.device("meta"):
        return DarknetNet(parse_cfg_text(NET + text, "t.cfg"), size)


def error_of(text: str) -> DarknetCfgError:
    with pytest.raises(DarknetCfgError) as info:
        build(text)
    return info.value


def test_parser_keeps_file_line_and_darknet_syntax():
    cfg = parse_cfg_text(
        "# comment\n[net]\r\nwidth = 64\nheight=64\nchannels=3\n; also a comment\n\n"
        "[convolutional]\nfilters=8\nsize = 3\nfilters=16\nactivation= leaky \n[route]\nlayers = -1, -1\n",
        "x.cfg",
    )
    assert cfg.net.line == 2 and cfg.net.get_int("width") == 64
    conv, route = cfg.layers
    assert (conv.kind, conv.index, conv.line) == ("convolutional", 0, 8)
    assert conv.options["size"].line == 10
    assert conv.get_int("filters") == 8  # a repeated option keeps its first value, as darknet's option_find
    assert conv.get_str("activation") == "leaky"  # darknet strips every whitespace character
    assert (route.index, route.get_ints("layers")) == (1, [-1, -1])


def test_crlf_cfg_from_the_repo_parses():
    # enetb0.cfg has CRLF line endings and repeats decay= in [net] with another value
    cfg = parse_cfg(CFG_ROOT / "cfg" / "enetb0.cfg")
    assert cfg.net.get_float("decay") == 0.0005
    assert sum(s.kind == "scale_channels" for s in cfg.layers) == 16


@pytest.mark.parametrize(
    "text, line, words",
    [
        ("[bogus]\n", 5, ["unknown or unsupported section [bogus]"]),
        ("[convolutional]\nfilter=3\n", 6, ["unknown or unsupported option 'filter'"]),
        ("[convolutional]\nfilters=abc\n", 6, ["filters='abc' is not an integer"]),
        ("[convolutional]\nfilters=\n", 6, ["no value"]),
        ("[convolutional]\nsize=3\n", 5, ["layer 0", "missing option 'filters'"]),
        ("[convolutional]\nfilters=-4\n", 6, ["filters=-4 must be >= 1"]),
        ("[convolutional]\nfilters=4\nactivation=tanhh\n", 7, ["unsupported activation 'tanhh'"]),
        ("[convolutional]\nfilters=4\ngroups=2\n", 7, ["groups=2 must divide the input channels (3)"]),
        ("[convolutional]\nfilters=4\nsize=99\n", 5, ["output would be empty"]),
        ("[route]\nlayers=-1\n", 6, ["layers=-1 refers to layer -1, which does not exist before layer 0"]),
        ("[convolutional]\nfilters=4\n[route]\nlayers=0,7\n", 8, ["layer 1 [route]", "layers=7 refers to layer 7"]),
        ("[convolutional]\nfilters=4\n[maxpool]\nsize=2\nstride=2\n[route]\nlayers=-1,-2\n", 11,
         ["layer 2 [route]", "layer 0 is 4x32x32 but layer 1 is 4x16x16"]),
        ("[convolutional]\nfilters=4\n[route]\nlayers=-1\ngroups=3\n", 9, ["groups=3 does not divide the 4 channels"]),
        ("[convolutional]\nfilters=4\n[shortcut]\nfrom=-3\n", 8, ["from=-3 refers to layer -2"]),
        # the from map is smaller than the input: Darknet's [shortcut] cannot subsample it
        ("[convolutional]\nfilters=4\nstride=2\n[upsample]\nstride=2\n[convolutional]\nfilters=4\n[shortcut]\nfrom=-3\n",
         13, ["layer 3 [shortcut]", "from: layer 0 (4x16x16) cannot be added to the input (4x32x32)"]),
        ("[convolutional]\nfilters=18\n[yolo]\nclasses=2\nnum=3\nmask=0,1,2\nanchors=1,2,3,4,5,6\n", 8,
         ["the input has 18 channels but 3 anchors x (2 classes + 5) = 21"]),
        ("[convolutional]\nfilters=21\n[yolo]\nclasses=2\nnum=3\nmask=0,1,5\nanchors=1,2,3,4,5,6\n", 10,
         ["mask [0, 1, 5] indexes anchors outside 0..2"]),
        ("[convolutional]\nfilters=21\n[yolo]\nclasses=2\nnum=3\nanchors=1,2,3,4,5\n", 10, ["anchors holds 5 numbers"]),
        ("[convolutional]\nfilters=4\n[convolutional]\nfilters=8\nshare_index=0\n", 9, ["share_index: layer 0"]),
        ("[convolutional]\nfilters=4\nsize=1\n[avgpool]\n[scale_channels]\nfrom=-2\n[sam]\nfrom=-2\n", 12,
         ["layer 3 [sam]", "the input (4x32x32) and layer 1 (4x1x1) differ"]),
        ("[convolutional]\nfilters=4\n[avgpool]\n[convolutional]\nfilters=8\nsize=1\n[scale_channels]\nfrom=-3\n", 12,
         ["layer 3 [scale_channels]", "the input is 8x1x1 but scaling layer 0 (4x32x32) needs 4x1x1"]),
        ("[maxpool]\nmaxpool_depth=1\nout_channels=4\n", 7, ["out_channels=4 exceeds the 3 input channels"]),
        ("[net]\n", 5, ["a second [net] section"]),
        ("[dropout]\nprobability=1.5\n", 6, ["probability=1.5 must lie in [0, 1)"]),
        ("[upsample]\nstride=-2\n", 6, ["downsampling [upsample]"]),
        ("[convolutional]\nfilters=99999999999\n", 6, ["out of range"]),
        ("[yolo]\nanchors=1,,2\n", 6, ["not a comma-separated list"]),
        ("[convolutional]\nfilters 4\n", 6, ["expected key=value"]),
    ],
)
def test_malformed_cfg_names_file_and_line(text, line, words):
    err = error_of(text)
    assert (err.path, err.line) == ("t.cfg", line)
    assert str(err).startswith(f"t.cfg:{line}: ")
    for w in words:
        assert w in str(err)


@pytest.mark.parametrize(
    "text, line, words",
    [
        ("", 1, ["no [net] section"]),
        ("filters=3\n[net]\n", 1, ["before the first section"]),
        ("[convolutional]\nfilters=3\n", 1, ["the first section must be [net]"]),
        ("[net]\nwidth=8\nheight=8\nchannels=3\n", 1, ["no layers"]),
        ("[net]\nwidth=8\nchannels=3\n[avgpool]\n", 1, ["height=0"]),
        ("[net]\nwidth=8\nheight=8\nchannels=3\n[convolutional\n", 5, ["malformed section header"]),
    ],
)
def test_malformed_file_structure(text, line, words):
    with pytest.raises(DarknetCfgError) as info:
        with torch.device("meta"):
            DarknetNet(parse_cfg_text(text, "s.cfg"))
    assert info.value.line == line and str(info.value).startswith(f"s.cfg:{line}: ")
    for w in words:
        assert w in str(info.value)


def test_unreadable_cfg_file(tmp_path):
    with pytest.raises(DarknetCfgError, match="cannot read cfg"):
        parse_cfg(tmp_path / "missing.cfg")
    (tmp_path / "bin.cfg").write_bytes(b"[net]\n\xff\xfe\n")
    with pytest.raises(DarknetCfgError, match=r"bin.cfg:2: not a text file"):
        parse_cfg(tmp_path / "bin.cfg")


def test_a_bom_and_comments_in_other_encodings_are_read_as_darknet_reads_them(tmp_path):
    gbk_comment = "# 输入尺寸\n".encode("gbk")  # "input size"; not UTF-8
    lines = [b"[net]\n", b"width=8\n", b"height=8\n", b"channels=3\n", gbk_comment,
             b"[convolutional]\n", b"filters=4\n", b"size=3\n", b"pad=1\n", b"activation=leaky\n"]
    (tmp_path / "a.cfg").write_bytes(b"\xef\xbb\xbf" + b"".join(lines))  # UTF-8 BOM
    cfg = parse_cfg(tmp_path / "a.cfg")
    assert (cfg.net.get_int("width"), [(s.kind, s.line) for s in cfg.layers]) == (8, [("convolutional", 6)])
    assert DarknetNet(cfg).layers[0].out_shape == (4, 8, 8)
    assert parse_cfg_text("\ufeff[net]\nchannels=3\n[maxpool]\n").layers[0].kind == "maxpool"
    # outside a comment such bytes are refused where they are
    lines[9] = "activation=leaky # 激活\n".encode("gbk")
    (tmp_path / "b.cfg").write_bytes(b"".join(lines))
    with pytest.raises(DarknetCfgError, match=r"b.cfg:10: not a text file \(invalid UTF-8 outside a comment\)"):
        parse_cfg(tmp_path / "b.cfg")


def test_broken_official_in_progress_cfgs_fail_where_darknet_does():
    # yolov3-spp-matrix shares layer 115's weights (input 128 ch, route 110) with layer 127, whose
    # input has 256 channels (route 98); darknet's make_convolutional_layer reports the same mismatch.
    with pytest.raises(DarknetCfgError) as info, torch.device("meta"):
        DarknetNet(parse_cfg(CFG_ROOT / "in-progress" / "yolov3-spp-matrix.cfg"))
    assert info.value.line == 927 and "share_index: layer 115" in str(info.value)
    # The elastic detectors halve and re-double the stride-32 map: at their [net] size 416 it is
    # 13 -> 7 -> 14, and the route concatenating it with a 13x13 map cannot work (it does at 512).
    for name, line in (("csresnet50-elastic-panet-spp.cfg", 1084), ("csresnext50-elastic-panet-spp.cfg", 1111)):
        with pytest.raises(DarknetCfgError) as info, torch.device("meta"):
            DarknetNet(parse_cfg(CFG_ROOT / "in-progress" / name))
        assert info.value.line == line and "512x14x14" in str(info.value) and "512x13x13" in str(info.value)
        with torch.device("meta"):
            DarknetNet(parse_cfg(CFG_ROOT / "in-progress" / name), 512)


# -- property: mutated official cfgs raise DarknetCfgError or build ---------------------------------
MUTATION_CFGS = [
    CFG_ROOT / "cfg" / n
    for n in ("darknet.cfg", "resnet10.cfg", "csresnext50.cfg", "enetb0.cfg", "csmobilenet-v2.cfg",
              "csdarknet53-elastic.cfg")
] + [CFG_ROOT / "pytorch-branch" / "cfg" / "yolov3-spp.cfg", CFG_ROOT / "cfg" / "csresnext50-panet-spp.cfg"]
CFG_TEXTS = {p.name: p.read_text() for p in MUTATION_CFGS}
VALUES = ["0", "1", "-1", "2", "3", "-3", "7", "64", "-200", "1000000", "abc", "", "1.5", "nan", "1e9", "2,3", "-1,-4",
          "0,1,2", "leaky", "linear", "tanh", "255", "99999999999"]
JUNK_LINES = ["[bogus]", "[route]", "[shortcut]", "[convolutional]", "[yolo]", "[maxpool]", "[net]", "foo=1",
              "layers=-9", "from=-1", "filters=3", "groups=2", "size=0", "stride=0", "=", "[", "pad=1", "share_index=0"]


@st.composite
def mutated_cfg(draw):
    name = draw(st.sampled_from(sorted(CFG_TEXTS)))
    lines = CFG_TEXTS[name].splitlines()
    for _ in range(draw(st.integers(1, 3))):
        i = draw(st.integers(0, len(lines) - 1))
        op = draw(st.sampled_from(["delete", "duplicate", "value", "insert", "swap"]))
        if op == "delete":
            del lines[i]
        elif op == "duplicate":
            lines.insert(i, lines[i])
        elif op == "insert":
            lines.insert(i, draw(st.sampled_from(JUNK_LINES)))
        elif op == "swap":
            j = draw(st.integers(0, len(lines) - 1))
            lines[i], lines[j] = lines[j], lines[i]
        else:  # give some key=value line a new value
            keyed = [k for k, line in enumerate(lines) if "=" in line and not line.lstrip().startswith("#")]
            k = draw(st.sampled_from(keyed))
            lines[k] = lines[k].split("=")[0] + "=" + draw(st.sampled_from(VALUES))
        if not lines:
            lines = [""]
    return name, "\n".join(lines)


@settings(max_examples=30, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_cfg())
def test_mutated_cfgs_only_raise_darknet_cfg_errors(case):
    name, text = case
    try:
        cfg = parse_cfg_text(text, name)
        with torch.device("meta"):  # shapes only: a mutated filters=1000000 allocates nothing
            model = DarknetNet(cfg).eval()
            out = model(torch.zeros(1, model.in_chans, *model.input_size))
    except DarknetCfgError as e:
        assert re.match(rf"{re.escape(name)}:\d+: ", str(e)), str(e)
        assert 1 <= e.line <= text.count("\n") + 1
        return
    # A cfg that builds also runs, with the shapes the builder inferred.
    outs = out if isinstance(out, list) else [out]
    assert outs and all(isinstance(t, torch.Tensor) for t in outs)
    for i, t in zip(model.yolo_indices, outs if model.yolo_indices else []):
        assert tuple(t.shape[1:]) == model.layers[i].out_shape


def test_the_property_test_writes_nothing_where_pytest_is_started(tmp_path):
    # Hypothesis would keep its caches in <cwd>/.hypothesis; conftest.py sends them to a temporary folder.
    env = {k: v for k, v in os.environ.items() if k != "HYPOTHESIS_STORAGE_DIRECTORY"}  # as a plain `pytest` starts
    test = f"{Path(__file__).resolve()}::test_mutated_cfgs_only_raise_darknet_cfg_errors"
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test], cwd=tmp_path, env=env,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_list_option_with_a_trailing_comma_parses_as_darknet_reads_it():
    # A trailing comma (cfgs end anchors= lines with one; Darknet reads them without complaint) ends the list:
    # "mask=0,1," is [0, 1], not an error and not a third entry; only the one trailing empty item is dropped.
    cfg = parse_cfg_text(NET + "[yolo]\nmask=0,1,\nanchors=10,13,16,30,\nnum=2\n", "t.cfg")
    yolo = cfg.layers[0]
    assert yolo.get_ints("mask") == [0, 1]
    assert yolo.get_floats("anchors") == [10.0, 13.0, 16.0, 30.0]
