"""The command line calls the library and reports bad input cleanly."""
import argparse
import json
import subprocess
import sys

import pytest
import torch

from cspnet.cli import main
from cspnet.cli.train import add_data_args, add_recipe_args, build_recipe, model_opts, set_threads


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


def test_a_missing_file_is_a_clean_error_not_a_traceback(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")  # the output's folder would have to be made where a file is
    assert main(["export", "resnet10", "--format", "safetensors", "--out", str(blocker / "w.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cspnet export: error:") and "a_file" in err


def test_output_piped_into_head_ends_quietly():
    # `head -1` exits after one line; the rest of the table meets a closed pipe.
    r = subprocess.run(f"{sys.executable} -m cspnet models | head -1", shell=True, capture_output=True, text=True)
    assert r.stdout.startswith("| model |") and r.stderr == ""


def test_bad_model_option_is_a_clean_error(capsys):
    assert main(["models", "cspdarknet53", "--json"]) == 0
    capsys.readouterr()
    assert main(["train", "--model", "resnet10", "--data", "digits", "--model-opt", "num_classes=5", "--out", "x"]) == 2
    assert "cannot be model options" in capsys.readouterr().err


_TRAIN = ["train", "--model", "resnet10", "--data", "digits", "--out", "never-written"]


@pytest.mark.parametrize("argv,option", [
    (_TRAIN + ["--batch-size", "0"], "--batch-size"), (_TRAIN + ["--img-size", "-32"], "--img-size"),
    (_TRAIN + ["--img-size", "0"], "--img-size"), (_TRAIN + ["--threads", "-1"], "--threads"),
    (_TRAIN + ["--label-smoothing", "1.5"], "--label-smoothing"), (_TRAIN + ["--ema", "-0.1"], "--ema"),
    (_TRAIN + ["--mixup", "-1"], "--mixup"), (_TRAIN + ["--grad-clip", "-1"], "--grad-clip"),
    (_TRAIN + ["--translate", "-3"], "--translate"), (_TRAIN + ["--checkpoint-every", "-1"], "--checkpoint-every"),
    (_TRAIN + ["--momentum", "2"], "--momentum"), (_TRAIN + ["--lr", "nan"], "--lr"), (_TRAIN + ["--width", "0"], "--width"),
    (_TRAIN + ["--in-chans", "2"], "--in-chans"),
    (["compare", "--jobs", "0"], "--jobs"), (["compare", "--bench-batch", "0"], "--bench-batch"),
    (["predict", "x.png", "--checkpoint", "r", "--batch-size", "0"], "--batch-size"),
    (["eval", "--checkpoint", "r", "--data", "digits", "--batch-size", "0"], "--batch-size"),
    (["export", "resnet10", "--out", "x.onnx", "--input-size", "0"], "--input-size"),
    (["analyze", "layers", "resnet10", "--out", "x", "--input-size", "0"], "--input-size"),
    (["analyze", "gradients", "resnet10", "--out", "x", "--batch", "1"], "--batch"),
    (["ablation", "--out", "x", "--width", "-1"], "--width"),
])
def test_bad_numbers_are_refused_while_parsing_naming_the_option(argv, option, capsys):
    # Before, these crashed mid-run (ZeroDivisionError, a torch RuntimeError) or quietly meant "off" / the default.
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert f"argument {option}" in capsys.readouterr().err


def test_fp16_on_the_cpu_is_refused_before_torch_warns(tmp_path, capsys, recwarn):
    argv = ["train", "--model", "resnet10", "--data", "digits", "--width", "0.25", "--train-limit", "100", "--batch-size", "32",
            "--img-size", "16", "--amp", "fp16", "--device", "cpu", "--no-progress", "--out", str(tmp_path / "r")]
    assert main(argv) == 2
    assert "fp16 mixed precision needs a CUDA device" in capsys.readouterr().err
    assert not [w for w in recwarn if "GradScaler" in str(w.message) or "CUDA" in str(w.message)]


def test_compare_refuses_the_same_model_twice(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", "--models", "resnet10,resnet10", "--data", "digits", "--out", str(out)]) == 2
    assert "different models" in capsys.readouterr().err and not out.exists()


def test_shared_cli_helpers_are_public():
    # cspnet train's option helpers serve the analysis and detection CLIs too (cli/ablation, analyze, detect)
    assert model_opts(["act=mish", "depths=[2, 3]", "part_ratio=0.5"]) == {"act": "mish", "depths": [2, 3], "part_ratio": 0.5}
    with pytest.raises(ValueError, match="KEY=VALUE"):
        model_opts(["act"])
    p = argparse.ArgumentParser()
    add_data_args(p)
    add_recipe_args(p, epochs=3, batch_size=32, lr=0.1)
    args = p.parse_args(["--threads", str(torch.get_num_threads())])
    cfg, recipe = build_recipe(args, n_train=960)
    assert (cfg.epochs, cfg.batch_size, cfg.burn_in) == (3, 32, 10) and recipe.translate == 2
    # the command line's recipe defaults are the library's (a Python user gets the same training)
    from cspnet.engine.classify import ClassifyRecipe

    assert recipe == ClassifyRecipe(hflip=recipe.hflip)
    set_threads(args)


_RECIPE_FLAGS = [
    "--epochs", "7", "--batch-size", "48", "--accum-steps", "3", "--seed", "5", "--optimizer", "adamw", "--lr", "0.03",
    "--momentum", "0.8", "--no-nesterov", "--weight-decay", "0.01", "--schedule", "poly", "--burn-in", "11",
    "--poly-power", "2.5", "--label-smoothing", "0.2", "--mixup", "0.3", "--cutmix", "0.7", "--translate", "4",
    "--no-hflip", "--amp", "bf16", "--ema", "0.99", "--grad-clip", "5", "--memory-efficient", "--workers", "2",
]


@pytest.mark.parametrize("command", [
    ["train", "--model", "resnet10", "--out", "never-written", "--checkpoint-every", "13"],
    ["ablation", "--out", "never-written"],
])
def test_every_recipe_flag_reaches_the_training_config(command):
    from cspnet.cli import build_parser, train as train_cmd

    args = build_parser().parse_args([*command, "--data", "digits", *_RECIPE_FLAGS])
    cfg, recipe = train_cmd.build_recipe(args, n_train=960)
    assert (cfg.epochs, cfg.batch_size, cfg.accum_steps, cfg.seed) == (7, 48, 3, 5)
    assert (cfg.optimizer, cfg.lr, cfg.momentum, cfg.nesterov, cfg.weight_decay) == ("adamw", 0.03, 0.8, False, 0.01)
    assert (cfg.schedule, cfg.burn_in, cfg.poly_power) == ("poly", 11, 2.5)
    assert (cfg.amp, cfg.ema_decay, cfg.grad_clip, cfg.memory_efficient, cfg.num_workers) == ("bf16", 0.99, 5.0, True, 2)
    assert cfg.checkpoint_every == (13 if command[0] == "train" else 0)
    assert (recipe.translate, recipe.hflip, recipe.mixup, recipe.cutmix) == (4, False, 0.3, 0.7)
    assert (recipe.label_smoothing, recipe.num_workers) == (0.2, 2)


def test_models_out_and_readme_write_every_model_only(tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text("# x\n")
    assert main(["models", "resnet10", "--out", str(tmp_path / "models.md")]) == 2
    assert "drop the pattern" in capsys.readouterr().err
    assert not (tmp_path / "models.md").exists()
    assert main(["models", "--json", "--readme", str(readme)]) == 2
    assert readme.read_text() == "# x\n"


def test_models_table_ends_with_paper_table1_for_peleenets(capsys):
    assert main(["models", "csppeleenet_table1"]) == 0
    out = capsys.readouterr().out
    assert "| csppeleenet_table1 | 0.75 | fusion_last | 1.683 | 0.707 | 0.716 | -1.2% |" in out
    assert main(["models", "csppeleenet"]) == 0  # the headline CSPPeleeNet is not Table 1's γ / fusion family
    assert "Table 1" not in capsys.readouterr().out
    assert main(["models", "resnet10"]) == 0
    assert "Table 1" not in capsys.readouterr().out


def test_models_input_size_zero_is_refused_not_ignored(capsys):
    assert main(["models", "resnet10", "--input-size", "0"]) == 2
    assert "positive integers" in capsys.readouterr().err
