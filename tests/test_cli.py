"""The command line calls the library and reports bad input cleanly."""
import json
import subprocess
import sys

from cspnet.cli import main


def test_models_table_lists_pairs_and_paper_figures(capsys):
    assert main(["models", "csp*resnext50"]) == 0
    out = capsys.readouterr().out
    assert "| cspresnext50 ✓ | 256 |" in out
    assert "resnext50: 0.92 / 0.78" in out  # params / BFLOPs ratio CSP vs plain (-8% / -22%, README)


def test_models_json(capsys):
    assert main(["models", "darknet53", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["name"] == "darknet53" and rows[0]["conv_params"] == 41_573_216


def test_bad_pattern_is_a_clean_error(capsys):
    assert main(["models", "nosuchnet*"]) == 2
    assert "no model matches" in capsys.readouterr().err


def test_python_dash_m_works_the_same():
    r = subprocess.run([sys.executable, "-m", "cspnet", "models", "resnet10", "--json"], capture_output=True, text=True, check=True)
    assert json.loads(r.stdout)[0]["name"] == "resnet10"
