"""A partial Darknet file (darknet ``partial``, ``x.conv.N``) is never taken for a whole model: create_model warns
how many convolutions it read, and ``cspnet darknet convert`` writes the same file every time and says what
the unread layers hold."""
import warnings

import pytest
import torch
from safetensors.torch import load_file

import cspnet
from cspnet.cli import main
from cspnet.darknet import build_model, write_weights
from cspnet.darknet.mapping import native_records
from cspnet.weights import read_metadata

from test_darknet_weights import SIZE, official, randomize

CUTOFF = 3  # darknet.cfg: conv, max, conv -> the first 2 of its weighted layers


@pytest.fixture(scope="module")
def partial_file(tmp_path_factory):
    darknet = randomize(build_model(official("darknet_ref"), SIZE), seed=3)
    return write_weights(darknet, tmp_path_factory.mktemp("w") / f"darknet.conv.{CUTOFF}", cutoff=CUTOFF)


def test_create_model_warns_how_many_convolutions_a_partial_file_holds(partial_file):
    total = len(native_records(cspnet.create_model("darknet_ref")))
    with pytest.warns(UserWarning, match=rf"read 2 of the {total} convolutions of model 'darknet_ref' \(a partial "
                                         rf"Darknet file\); the other {total - 2} keep their random initialisation"):
        cspnet.create_model("darknet_ref", darknet_weights=partial_file)


def test_create_model_is_silent_for_a_whole_file(tmp_path):
    darknet = randomize(build_model(official("darknet_ref"), SIZE), seed=4)
    whole = write_weights(darknet, tmp_path / f"darknet.conv.{len(darknet.layers)}", cutoff=len(darknet.layers))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cspnet.create_model("darknet_ref", darknet_weights=whole)


@pytest.mark.parametrize("raw", [False, True])
def test_converting_a_partial_file_twice_writes_the_same_tensors_and_says_so(partial_file, tmp_path, capsys, raw):
    outs = [tmp_path / f"{k}.safetensors" for k in range(2)]
    for k, out in enumerate(outs):
        torch.manual_seed(k)  # the caller's random state must not reach the file
        assert main(["darknet", "convert", str(official("darknet_ref")), str(partial_file), str(out)]
                    + (["--raw"] if raw else [])) == 0
    printed = capsys.readouterr().out
    first, second = (load_file(str(o)) for o in outs)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    total = read_metadata(outs[0])["darknet_records_total"]
    assert read_metadata(outs[0])["darknet_records_read"] == 2 and total > 2
    assert (f"holds the first 2 of the {total} weighted layers; the other {total - 2} are written with their "
            "random initial values (torch seed 0), not trained weights") in printed
