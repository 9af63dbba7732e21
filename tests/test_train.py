"""The training engine in-process: learning on digits, schedules, optimizer groups, augmentation,
EMA, checkpoints (round trip, crash at every write step, errors, no unpickling), NaN stop, eval."""
from __future__ import annotations

import json
import math
import pickle
from pathlib import Path

import pytest
import torch
from PIL import Image

import cspnet
from cspnet.cli import main
from cspnet.data import load_digits_data
from cspnet.engine import checkpoint as ckpt_mod
from cspnet.engine.checkpoint import CheckpointError, load_checkpoint, read_checkpoint_record, save_checkpoint
from cspnet.engine.models import model_record, rebuild_model
from cspnet.engine.classify import ClassificationTask, ClassifyRecipe, load_classifier, normalize
from cspnet.engine.ema import ModelEMA
from cspnet.engine.optim import LrSchedule, build_optimizer, param_groups
from cspnet.engine.train import TrainConfig, TrainingDiverged, fit
from cspnet.weights import load_state, model_metadata, read_metadata, save_weights

TINY = ["--data", "digits", "--width", "0.25", "--batch-size", "32", "--threads", "1", "--no-progress"]


@pytest.mark.parametrize("model", ["cspresnet10", "resnet10"])
def test_short_digits_run_learns(model, tmp_path, capsys):
    out = tmp_path / model
    rc = main(["train", "--model", model, *TINY, "--img-size", "24", "--epochs", "3", "--lr", "0.1", "--out", str(out)])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["top1"] > 0.8  # chance is 0.1
    rows = (out / "metrics.csv").read_text().strip().splitlines()
    assert rows[0].startswith("epoch,step,lr,train_loss,train_acc,val_top1,val_top5") and len(rows) == 4
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3
    assert Image.open(out / "curves.png").size[0] > 100
    state = load_state(out / "last.safetensors")
    meta = read_metadata(out / "last.safetensors")
    assert meta["model"] == model and meta["num_classes"] == 10 and meta["epoch"] == 3
    assert state["head.fc.weight"].shape[0] == 10


def test_progress_bar_shows_loss_accuracy_speed_and_eta_and_tensorboard_is_optional(tmp_path, capsys):
    import importlib.util

    rc = main(["train", "--model", "resnet10", "--data", "digits", "--width", "0.25", "--batch-size", "32", "--img-size", "16",
               "--epochs", "1", "--train-limit", "256", "--tensorboard", "--out", str(tmp_path / "r")])
    assert rc == 0
    err = capsys.readouterr().err
    for piece in ("loss=", "acc=", "img_s=", "run_eta=", "<"):  # tqdm prints "elapsed<remaining"
        assert piece in err
    if importlib.util.find_spec("tensorboard") is None:
        assert "tensorboard is not installed" in err
    else:  # what `make test` installs: the event file holds the epoch's scalars
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        [events] = (tmp_path / "r" / "tensorboard").glob("events.out.tfevents.*")
        logged = EventAccumulator(str(events)).Reload()
        assert {"train_loss", "val_top1", "lr"} <= set(logged.Tags()["scalars"])
        metrics = (tmp_path / "r" / "metrics.csv").read_text().splitlines()
        row = dict(zip(metrics[0].split(","), metrics[1].split(",")))
        assert logged.Scalars("val_top1")[0].value == pytest.approx(float(row["val_top1"]), rel=1e-6)


def test_bf16_autocast_on_cpu_trains(tmp_path):
    data = load_digits_data(16, train_limit=256, test_limit=100)
    model = cspnet.create_model("cspresnet10", num_classes=10, in_chans=1, **_narrow("cspresnet10"))
    result = fit(ClassificationTask(data), model, TrainConfig(epochs=2, batch_size=32, lr=0.05, amp="bf16"), tmp_path, progress=False)
    assert all(math.isfinite(r["train_loss"]) for r in result.history)
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]


def _narrow(name):
    from cspnet.engine.models import scale_widths

    cfg = scale_widths(cspnet.get_spec(name).cfg, 0.25)
    return {"stages": cfg.stages, "stem_chs": cfg.stem_chs}


# -- schedules and optimizer ------------------------------------------------------------------------
def _torch_lrs(scheduler_cls, steps, **kw):
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = scheduler_cls(opt, **kw)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_schedules_match_torch_and_darknet():
    total = 40
    cos = LrSchedule(total, "cosine")
    assert [cos(s) for s in range(total)] == pytest.approx(_torch_lrs(torch.optim.lr_scheduler.CosineAnnealingLR, total, T_max=total))
    poly = LrSchedule(total, "poly", power=4.0)
    assert [poly(s) for s in range(total)] == pytest.approx(_torch_lrs(torch.optim.lr_scheduler.PolynomialLR, total, total_iters=total, power=4.0))
    step = LrSchedule(total, "step", milestones=(0.5, 0.75), gamma=0.1)
    assert [step(s) for s in range(total)] == pytest.approx(_torch_lrs(torch.optim.lr_scheduler.MultiStepLR, total, milestones=[20, 30], gamma=0.1))
    # Darknet burn_in: lr * (batch / burn_in) ** power, power 4, with batch = step + 1 (Darknet's first
    # update is batch 1: no step runs at rate 0)
    warm = LrSchedule(total, "cosine", burn_in=8)
    assert warm(0) == pytest.approx((1 / 8) ** 4) and warm(3) == pytest.approx(0.5**4)
    assert warm(7) == pytest.approx(1.0) and warm(8) == pytest.approx(1.0)
    assert warm(total) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="schedule must be one of"):
        LrSchedule(10, "linear")


def test_no_weight_decay_on_batchnorm_and_biases():
    model = cspnet.create_model("cspresnet10", num_classes=10, in_chans=1)
    decay, no_decay = param_groups(model, 5e-4)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 5e-4 and no_decay["weight_decay"] == 0.0
    assert all(names[id(p)].endswith(("conv.weight", "fc.weight")) for p in decay["params"])
    assert all(names[id(p)].endswith(("bn.weight", "bn.bias", "fc.bias")) for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    opt = build_optimizer(model, "sgd", 0.1, 5e-4, nesterov=True)
    assert opt.param_groups[0]["nesterov"] and isinstance(build_optimizer(model, "adamw", 1e-3, 0.05), torch.optim.AdamW)


# -- augmentation, loss, EMA ---------------------------------------------------------------------------
def _batch(n=8, size=16):
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, 1, size, size), generator=g, dtype=torch.uint8), torch.arange(n) % 10


def test_augmentation_is_a_function_of_the_seed():
    data = load_digits_data(16, train_limit=100, test_limit=20)
    task = ClassificationTask(data, ClassifyRecipe(translate=3, hflip=True))
    a = task.prepare(_batch(), device=torch.device("cpu"), seed=7)
    b = task.prepare(_batch(), device=torch.device("cpu"), seed=7)
    c = task.prepare(_batch(), device=torch.device("cpu"), seed=8)
    assert torch.equal(a.images, b.images) and not torch.equal(a.images, c.images)
    plain = ClassificationTask(data, ClassifyRecipe(translate=0, hflip=False)).prepare(_batch(), device=torch.device("cpu"), seed=7)
    x = _batch()[0].float() / 255
    assert torch.allclose(plain.images, (x - data.mean[0]) / data.std[0])


def test_mixup_and_cutmix_labels():
    data = load_digits_data(16, train_limit=100, test_limit=20)
    cpu = torch.device("cpu")
    plain = ClassificationTask(data, ClassifyRecipe(translate=0, hflip=False)).prepare(_batch(), device=cpu, seed=1).images
    mix = ClassificationTask(data, ClassifyRecipe(translate=0, hflip=False, mixup=0.4)).prepare(_batch(), device=cpu, seed=1)
    assert 0 < mix.lam < 1 and torch.equal(mix.mixed_labels, _batch()[1].flip(0))
    assert torch.allclose(mix.images, mix.lam * plain + (1 - mix.lam) * plain.flip(0), atol=1e-6)
    cut = ClassificationTask(data, ClassifyRecipe(translate=0, hflip=False, cutmix=1.0)).prepare(_batch(), device=cpu, seed=3)
    pasted = (cut.images != plain).any(1)  # pixels that came from the partner image
    assert cut.lam == pytest.approx(1 - pasted[0].float().mean().item(), abs=0.02)
    # the mixed loss is the lam-weighted sum of the two cross-entropies (with label smoothing)
    task = ClassificationTask(data, ClassifyRecipe(label_smoothing=0.1))
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(256, 10))
    loss, stats = task.loss(model, mix)
    logits = model(mix.images)
    ce = torch.nn.functional.cross_entropy
    expected = mix.lam * ce(logits, mix.labels, label_smoothing=0.1) + (1 - mix.lam) * ce(logits, mix.mixed_labels, label_smoothing=0.1)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6) and 0 <= stats["acc"] <= 8


def test_ema_follows_the_polyak_formula():
    model = torch.nn.Linear(3, 2)
    ema = ModelEMA(model, decay=0.9)
    w0 = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    d = min(0.9, 2 / 11)  # warm-up of the decay after one update
    assert torch.allclose(ema.module.weight, d * w0 + (1 - d) * model.weight)


def test_ema_averages_batchnorm_statistics_and_copies_the_batch_count():
    torch.manual_seed(0)
    model = torch.nn.BatchNorm1d(3, momentum=0.5)
    ema = ModelEMA(model, decay=0.6)
    expected_mean, expected_var = model.running_mean.clone(), model.running_var.clone()
    for n in range(1, 5):
        model(torch.randn(16, 3) * n + n)  # train mode: moves running_mean / running_var
        ema.update(model)
        d = min(0.6, (1 + n) / (10 + n))
        expected_mean = d * expected_mean + (1 - d) * model.running_mean
        expected_var = d * expected_var + (1 - d) * model.running_var
        assert torch.allclose(ema.module.running_mean, expected_mean)
        assert torch.allclose(ema.module.running_var, expected_var)
        assert ema.module.num_batches_tracked.item() == model.num_batches_tracked.item() == n
    # the statistics really moved away from BN's initial 0 / 1, so an EMA that left them there fails
    assert ema.module.running_mean.abs().min() > 0.5 and ema.module.running_var.min() > 1.5


# -- checkpoints ------------------------------------------------------------------------------------
def _trained_objects(steps=3, seed=0):
    torch.manual_seed(seed)
    model = cspnet.create_model("resnet10", num_classes=10, in_chans=1, **_narrow("resnet10"))
    opt = build_optimizer(model, "adamw", 1e-3, 0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, LrSchedule(100, "cosine", burn_in=5))
    ema = ModelEMA(model, 0.99)
    for _ in range(steps):
        torch.nn.functional.cross_entropy(model(torch.randn(4, 1, 16, 16)), torch.arange(4)).backward()
        opt.step()
        opt.zero_grad()
        sched.step()
        ema.update(model)
    return model, opt, sched, ema


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoint_round_trip_is_exact(tmp_path):
    model, opt, sched, ema = _trained_objects()
    save_checkpoint(tmp_path, model=model, optimizer=opt, scheduler=sched, ema=ema, state={"epoch": 1, "step": 3, "note": "x"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.json", "last.safetensors", "last.state.safetensors"]
    expected_rng = torch.get_rng_state()
    torch.manual_seed(123)
    m2, o2, s2, e2 = _trained_objects(steps=1, seed=1)
    state = load_checkpoint(tmp_path, model=m2, optimizer=o2, scheduler=s2, ema=e2)
    assert state == {"epoch": 1, "step": 3, "note": "x"}
    assert _same(model.state_dict(), m2.state_dict()) and _same(ema.module.state_dict(), e2.module.state_dict())
    assert e2.updates == 3 and s2.last_epoch == sched.last_epoch and o2.param_groups[0]["betas"] == (0.9, 0.999)
    for k, v in opt.state_dict()["state"].items():
        assert _same(v, o2.state_dict()["state"][k])
    assert torch.equal(torch.get_rng_state(), expected_rng)


@pytest.mark.parametrize("name", cspnet.list_models())
def test_width_scales_every_family(name):
    # Every channel count scales, whatever the family calls it (stage *_chs, growth_rate, per-layer
    # widths): half the width leaves about a quarter of the weights, as 1x1 and 3x3 convs go with C_in x C_out.
    from cspnet.engine.models import build_model

    def count(width):
        return sum(p.numel() for p in build_model(name, num_classes=10, in_chans=1, width=width).parameters())

    assert 0.24 < count(0.5) / count(1.0) < 0.28
    # grouped convs (ResNeXt, 32 groups) get widths their group count divides; where widths come from
    # ratios of those (timm's layout) a width too small for the groups is named
    try:
        count(0.125)
    except ValueError as e:
        assert name == "cspresnext50_timm" and "use a larger width" in str(e)


def test_checkpoint_record_gives_back_tuples_and_rebuilds_the_model(tmp_path):
    # Model options such as DenseNet's ``depths`` are tuples; the JSON record stores them as
    # {"__tuple__": [...]}. The record read back holds the tuples again, ready for rebuild_model.
    from cspnet.engine.models import build_model, model_record, rebuild_model

    options = {"depths": (2, 3), "growth_rate": 8, "stem_chs": 16}
    rec = model_record("densenet121", num_classes=10, in_chans=1, options=options)
    torch.manual_seed(0)
    model = build_model(**{k: rec[k] for k in ("name", "num_classes", "in_chans", "width", "options")})
    save_checkpoint(tmp_path, model=model, state={"epoch": 1, "step": 2, "run": {"model": rec}})
    assert '"__tuple__"' in (tmp_path / "last.json").read_text()

    record = read_checkpoint_record(tmp_path)
    saved = record["state"]["run"]["model"]
    assert saved == rec and type(saved["options"]["depths"]) is tuple
    again = rebuild_model(saved)
    state = load_checkpoint(tmp_path, model=again, restore_rng=False)
    assert state == record["state"]
    assert _same(model.state_dict(), again.state_dict())
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), again.eval()(x))


def test_rebuild_model_with_a_seed_draws_the_same_initial_weights_whatever_ran_before():
    from cspnet.engine.models import model_record, rebuild_model

    rec = model_record("resnet10", num_classes=10, in_chans=1, width=0.25)
    torch.manual_seed(1)
    first = rebuild_model(rec, seed=3)
    torch.rand(1000)  # other work in the same process
    assert _same(first.state_dict(), rebuild_model(rec, seed=3).state_dict())
    assert not _same(first.state_dict(), rebuild_model(rec, seed=4).state_dict())


# Crash points of a write: before each of the five renames (model, state, JSON = the commit, then
# the two renames to plain names), or while a temp file is half written.
CRASHES = [("rename", i) for i in range(5)] + [("torn", "model"), ("torn", "state"), ("torn", "json")]


@pytest.mark.parametrize("crash", CRASHES, ids=[f"{a}-{b}" for a, b in CRASHES])
def test_checkpoint_killed_mid_write_keeps_the_last_good_one(tmp_path, monkeypatch, crash):
    """A process dying at any point of a write leaves a complete checkpoint: the old one or the new one.

    An exception escaping the writer leaves the same files as SIGKILL at that point (nothing is
    cleaned up on the way out); the real SIGKILL case is in test_train_resume.py.
    """
    import cspnet.weights as weights_mod

    old, opt_old, _, _ = _trained_objects(steps=1)
    save_checkpoint(tmp_path, model=old, optimizer=opt_old, state={"step": 1})
    new, opt_new, _, _ = _trained_objects(steps=2, seed=5)

    class Killed(BaseException):
        pass

    kind, where = crash
    renames = {"n": 0}
    real_replace = ckpt_mod.os.replace

    def replace(src, dst):
        if kind == "rename" and renames["n"] == where:
            raise Killed
        renames["n"] += 1
        real_replace(src, dst)

    def torn(real):
        def write(tensors, path, metadata=None):
            real(tensors, path, metadata=metadata)
            with open(path, "r+b") as f:
                f.truncate(100)
            raise Killed
        return write

    def torn_json(obj, f):
        f.write(json.dumps(obj)[:50])
        raise Killed

    monkeypatch.setattr(ckpt_mod.os, "replace", replace)  # the os module is shared with cspnet.weights
    if crash == ("torn", "model"):
        monkeypatch.setattr(weights_mod, "save_file", torn(weights_mod.save_file))
    if crash == ("torn", "state"):
        monkeypatch.setattr(ckpt_mod, "save_file", torn(ckpt_mod.save_file))
    if crash == ("torn", "json"):
        monkeypatch.setattr(ckpt_mod.json, "dump", torn_json)
    with pytest.raises(Killed):
        save_checkpoint(tmp_path, model=new, optimizer=opt_new, state={"step": 2})
    monkeypatch.undo()

    probe, opt_probe, _, _ = _trained_objects(steps=1, seed=9)
    state = load_checkpoint(tmp_path, model=probe, optimizer=opt_probe)
    committed = kind == "rename" and where >= 3  # the JSON was renamed into place before these points
    assert state["step"] == (2 if committed else 1)
    assert _same(probe.state_dict(), (new if committed else old).state_dict())
    # the next write works and leaves no debris
    save_checkpoint(tmp_path, model=new, optimizer=opt_new, state={"step": 3})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.json", "last.safetensors", "last.state.safetensors"]


def test_checkpoint_errors_name_the_file_and_key(tmp_path):
    model, opt, _, _ = _trained_objects(steps=1)
    save_checkpoint(tmp_path / "a", model=model, optimizer=opt, state={"step": 1})
    with pytest.raises(CheckpointError, match=r"last.safetensors: checkpoint of model 'resnet10'.*'cspresnet10'"):
        load_checkpoint(tmp_path / "a", model=cspnet.create_model("cspresnet10", num_classes=10, in_chans=1))
    with pytest.raises(CheckpointError, match=r"num_classes=10 .*num_classes=5.*head.fc.weight: file \(10, \d+\) vs model \(5, \d+\)"):
        load_checkpoint(tmp_path / "a", model=cspnet.create_model("resnet10", num_classes=5, in_chans=1, **_narrow("resnet10")))
    with pytest.raises(CheckpointError, match="no checkpoint here"):
        load_checkpoint(tmp_path / "none", model=model)
    with pytest.raises(CheckpointError, match="key 'scheduler' is missing"):
        sched = torch.optim.lr_scheduler.LambdaLR(opt, LrSchedule(10))
        load_checkpoint(tmp_path / "a", model=model, scheduler=sched)
    # files of two different writes are not mixed
    save_checkpoint(tmp_path / "b", model=model, state={"step": 2})
    (tmp_path / "a" / "last.safetensors").write_bytes((tmp_path / "b" / "last.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="belongs to another write"):
        load_checkpoint(tmp_path / "a", model=model)
    with pytest.raises(CheckpointError, match=r"state must be JSON-able.*state.x"):
        save_checkpoint(tmp_path / "c", model=model, state={"x": torch.zeros(1)})
    (tmp_path / "b" / "last.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"last.json: corrupt checkpoint record"):
        load_checkpoint(tmp_path / "b", model=model)


def test_checkpoints_never_unpickle(tmp_path, monkeypatch):
    model, opt, sched, ema = _trained_objects()
    save_checkpoint(tmp_path, model=model, optimizer=opt, scheduler=sched, ema=ema, state={"step": 3})

    def forbidden(*a, **k):
        raise AssertionError("unpickling attempted")

    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "Unpickler", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    m2, o2, s2, e2 = _trained_objects(steps=1, seed=2)
    assert load_checkpoint(tmp_path, model=m2, optimizer=o2, scheduler=s2, ema=e2)["step"] == 3
    # and nothing in the files is a pickle
    for f in tmp_path.iterdir():
        assert not f.read_bytes().startswith(b"\x80")


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    data = load_digits_data(16, train_limit=320, test_limit=50)

    class BreaksAtStep7(ClassificationTask):
        calls = 0

        def loss(self, model, batch):
            loss, stats = super().loss(model, batch)
            BreaksAtStep7.calls += 1
            return (loss * math.nan if BreaksAtStep7.calls == 7 else loss), stats

    model = cspnet.create_model("resnet10", num_classes=10, in_chans=1, **_narrow("resnet10"))
    cfg = TrainConfig(epochs=2, batch_size=32, lr=0.05, checkpoint_every=3)
    with pytest.raises(TrainingDiverged, match=r"loss became nan at epoch 1, step 7.*last.json \(step 6\) is kept"):
        fit(BreaksAtStep7(data), model, cfg, tmp_path, progress=False)
    assert read_checkpoint_record(tmp_path)["state"]["step"] == 6
    assert all(torch.isfinite(t).all() for t in load_state(tmp_path / "last.safetensors").values())


# -- eval ---------------------------------------------------------------------------------------
def test_evaluation_scores_top1_top5_and_loss_as_the_logits_say():
    from cspnet.engine.classify import evaluate_classifier

    data = load_digits_data(16, train_limit=32, test_limit=120)
    torch.manual_seed(0)
    model = cspnet.create_model("resnet10", num_classes=10, in_chans=1, drop_rate=0.0).eval()
    result = evaluate_classifier(model, data, batch_size=32)
    with torch.no_grad():  # independently: the whole test set in one batch
        images = torch.stack([data.test[i][0] for i in range(len(data.test))])
        labels = torch.tensor([int(data.test[i][1]) for i in range(len(data.test))])
        logits = model(normalize(images, data.mean, data.std))
    top5 = (logits.topk(5, 1).indices == labels[:, None]).any(1).float().mean().item()
    assert result["top5"] == pytest.approx(top5) and result["top1"] == pytest.approx((logits.argmax(1) == labels).float().mean().item())
    assert result["loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, labels).item(), rel=1e-5)
    assert result["top5"] > result["top1"]  # an untrained model: top-5 holds far more than top-1


def test_eval_prints_top1_top5_per_class_and_catches_wrong_heads(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--model", "resnet10", *TINY, "--img-size", "16", "--epochs", "1", "--train-limit", "320", "--out", str(out)]) == 0
    trained = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    import cspnet.engine.classify as classify

    evaluated = []
    real_evaluate = classify.evaluate_classifier
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(classify, "evaluate_classifier", lambda model, *a, **k: evaluated.append(model) or real_evaluate(model, *a, **k))
        assert main(["eval", "--checkpoint", str(out), "--data", "digits", "--json-out", str(tmp_path / "e.json")]) == 0
    # eval runs the model with its BatchNorms folded into the convs, and scores as training did
    assert len(evaluated) == 1 and not any(isinstance(m, torch.nn.BatchNorm2d) for m in evaluated[0].modules())
    result = json.loads(capsys.readouterr().out)
    assert result["top1"] == pytest.approx(trained["top1"]) and result["top5"] >= result["top1"]
    assert len(result["per_class"]) == 10 and sum(map(sum, result["confusion"])) == result["images"] == 360
    assert json.loads((tmp_path / "e.json").read_text())["top1"] == result["top1"]
    assert main(["eval", "--checkpoint", str(out), "--data", "digits", "--num-classes", "7"]) == 2
    err = capsys.readouterr().err
    assert "num_classes=10" in err and "num_classes=7" in err and "head.fc.weight" in err
    assert main(["eval", "--checkpoint", str(tmp_path / "missing"), "--data", "digits"]) == 2
    assert "no checkpoint here" in capsys.readouterr().err
    # a new run into the folder of a finished one is refused instead of overwriting it
    assert main(["train", "--model", "resnet10", *TINY, "--img-size", "16", "--epochs", "1", "--out", str(out)]) == 2
    assert "holds the checkpoints of a training run" in capsys.readouterr().err
    # resuming with another recipe is refused instead of silently changing the run
    assert main(["train", "--model", "resnet10", *TINY, "--img-size", "16", "--epochs", "1", "--train-limit", "320",
                 "--out", str(out), "--resume", "--lr", "0.5"]) == 2
    assert "lr: checkpoint 0.1 vs now 0.5" in capsys.readouterr().err
    # ... and so is another augmentation / loss (the task's recipe) or another model configuration
    assert main(["train", "--model", "resnet10", *TINY, "--img-size", "16", "--epochs", "1", "--train-limit", "320",
                 "--out", str(out), "--resume", "--label-smoothing", "0", "--translate", "0"]) == 2
    err = capsys.readouterr().err
    assert "recipe.label_smoothing: checkpoint 0.1 vs now 0.0" in err and "recipe.translate" in err
    assert main(["train", "--model", "resnet10", *TINY, "--img-size", "16", "--epochs", "1", "--train-limit", "320",
                 "--out", str(out), "--resume", "--model-opt", "act=mish"]) == 2
    assert "model.options: checkpoint {} vs now {'act': 'mish'}" in capsys.readouterr().err
    # a run's metrics give the rate its last step used: cosine to the end, so 0 is only reached after it
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert 0 < rows[-1]["lr"] < 0.1


def test_a_class_without_test_images_has_no_accuracy_rather_than_zero():
    import dataclasses

    from cspnet.data.classification import TensorImageDataset
    from cspnet.engine.classify import evaluate_classifier

    data = load_digits_data(16, train_limit=100, test_limit=50)
    keep = data.test.labels != 9
    data = dataclasses.replace(data, test=TensorImageDataset(data.test.images[keep], data.test.labels[keep]))
    model = cspnet.create_model("resnet10", num_classes=10, in_chans=1, **_narrow("resnet10")).eval()
    result = evaluate_classifier(model, data, batch_size=16)
    assert result["per_class"]["9"] is None
    assert all(isinstance(v, float) for k, v in result["per_class"].items() if k != "9")
    assert sum(map(sum, result["confusion"])) == result["images"] == int(keep.sum())


def test_predict_gives_the_trained_models_top_k_for_image_files(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--model", "resnet10", *TINY, "--img-size", "16", "--epochs", "1", "--train-limit", "320", "--out", str(out)]) == 0
    capsys.readouterr()
    images = load_digits_data(16).test.images[:12]
    nested = tmp_path / "imgs" / "nested"
    nested.mkdir(parents=True)
    for i, image in enumerate(images):
        Image.fromarray(image[0].numpy()).save(nested / f"{i:02d}.png")
    (tmp_path / "imgs" / "notes.txt").write_text("not an image")  # a searched folder's non-images are passed over
    import cspnet.engine.classify as classify

    predicted_with = []
    real_classify = classify.classify_files
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(classify, "classify_files", lambda model, *a, **k: predicted_with.append(model) or real_classify(model, *a, **k))
        assert main(["predict", str(tmp_path / "imgs"), "--checkpoint", str(out), "--topk", "3", "--batch-size", "5",
                     "--no-progress", "--json-out", str(tmp_path / "p.json")]) == 0
    assert len(predicted_with) == 1 and not any(isinstance(m, torch.nn.BatchNorm2d) for m in predicted_with[0].modules())
    result = json.loads(capsys.readouterr().out)
    assert json.loads((tmp_path / "p.json").read_text()) == result
    rows = result["predictions"]
    assert [Path(r["image"]).name for r in rows] == [f"{i:02d}.png" for i in range(12)] and result["skipped"] == []
    # the same images, straight from the dataset, through the trained weights and the training normalisation
    model, run = load_classifier(out)
    with torch.no_grad():
        probs = model(normalize(images, tuple(run["data"]["mean"]), tuple(run["data"]["std"]))).softmax(1)
    top = probs.topk(3, dim=1)
    for row, p, idx in zip(rows, top.values.tolist(), top.indices.tolist()):
        assert [t["index"] for t in row["top"]] == idx
        assert [t["prob"] for t in row["top"]] == pytest.approx(p, abs=1e-5)
        assert [t["class"] for t in row["top"]] == [run["data"]["classes"][i] for i in idx]

    (nested / "broken.png").write_bytes(b"not a png")
    assert main(["predict", str(nested), "--checkpoint", str(out), "--no-progress"]) == 2
    assert "broken.png: corrupt or unreadable image" in capsys.readouterr().err
    assert main(["predict", str(nested), "--checkpoint", str(out), "--no-progress", "--skip-corrupt", "--topk", "50"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert result["images"] == 12 and len(result["skipped"]) == 1 and "broken.png" in captured.err
    assert all(len(r["top"]) == 10 for r in result["predictions"])  # topk beyond the classes lists them all
    for args, message in ((["--topk", "0"], "topk must be >= 1"), ([], "no such file or folder")):
        target = str(tmp_path / "missing.png") if not args else str(nested)
        assert main(["predict", target, "--checkpoint", str(out), "--no-progress", *args]) == 2
        assert message in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["predict", str(tmp_path / "empty"), "--checkpoint", str(out)]) == 2
    assert "no image files in this folder" in capsys.readouterr().err
    assert main(["predict", str(nested), "--checkpoint", str(nested / "00.png")]) == 2
    assert "00.png: a file, not a run directory" in capsys.readouterr().err


def test_train_starts_from_pretrained_weights_made_for_other_data(tmp_path, capsys):
    # an "ImageNet" file for the run's architecture: RGB input, 1000 classes
    source = rebuild_model(model_record("resnet10", num_classes=1000, in_chans=3, width=0.25), seed=1)
    path = save_weights(tmp_path / "in1k.safetensors", source, model_metadata(source))
    out = tmp_path / "ft"
    args = ["train", "--model", "resnet10", *TINY, "--img-size", "16", "--epochs", "1", "--train-limit", "64",
            "--lr", "1e-9", "--weight-decay", "0", "--pretrained", str(path), "--out", str(out)]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "head: not loaded (the file's classifier has 1000 classes, the model's 10)" in err
    assert "summed over the colour channels" in err
    trained, src = load_state(out / "last.safetensors"), source.state_dict()
    stem = next(n for n, m in source.named_modules() if isinstance(m, torch.nn.Conv2d)) + ".weight"
    torch.testing.assert_close(trained[stem], src[stem].sum(1, keepdim=True), rtol=0, atol=1e-6)  # lr 1e-9: where it began
    body = [k for k in src if k.endswith("conv.weight") and k != stem]
    assert body and all(torch.allclose(trained[k], src[k], rtol=0, atol=1e-6) for k in body)
    assert read_checkpoint_record(out)["state"]["run"]["pretrained"] == str(path)
    path.unlink()  # resuming takes the weights from the checkpoint, not from the file
    assert main([*args, "--resume"]) == 0
    assert main(["train", "--model", "resnet10", *TINY, "--pretrained", str(path), "--out", str(tmp_path / "x")]) == 2
    assert "in1k.safetensors: no such weights file" in capsys.readouterr().err


def test_gradient_clipping_bounds_every_update(tmp_path):
    data = load_digits_data(16, train_limit=320, test_limit=50)

    def moved(clip):
        torch.manual_seed(0)
        model = cspnet.create_model("resnet10", num_classes=10, in_chans=1, **_narrow("resnet10"))
        before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
        cfg = TrainConfig(epochs=1, batch_size=32, lr=0.1, weight_decay=0.0, grad_clip=clip, schedule="constant")
        fit(ClassificationTask(data), model, cfg, tmp_path / str(clip), progress=False)
        return (torch.cat([p.detach().flatten() for p in model.parameters()]) - before).norm().item()

    # Nesterov SGD moves by lr * (g + m * buf) with |buf| <= |g| / (1 - m): at most 10 * lr * clip per step
    steps, clip = 10, 1e-6
    assert moved(clip) <= steps * 10 * 0.1 * clip * 1.001
    assert moved(0.0) > 0.01


def test_ema_weights_are_evaluated_and_kept(tmp_path, capsys):
    out = tmp_path / "ema"
    assert main(["train", "--model", "resnet10", *TINY, "--img-size", "16", "--epochs", "1", "--train-limit", "320",
                 "--ema", "0.9", "--out", str(out)]) == 0
    trained = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # by default eval scores the weights fit scored, the EMA's (as for detection runs)
    for ema_args in ([], ["--ema"]):
        assert main(["eval", "--checkpoint", str(out), "--data", "digits", *ema_args]) == 0
        with_ema = json.loads(capsys.readouterr().out)
        assert with_ema["ema"] and with_ema["loss"] == pytest.approx(trained["loss"], rel=1e-6)
    assert main(["eval", "--checkpoint", str(out), "--data", "digits", "--raw-weights"]) == 0
    raw_eval = json.loads(capsys.readouterr().out)
    assert not raw_eval["ema"] and raw_eval["loss"] != pytest.approx(trained["loss"], rel=1e-6)
    raw, ema = load_state(out / "last.safetensors"), load_state(out / "last.state.safetensors")
    assert not torch.equal(raw["head.fc.weight"], ema["ema.weights.head.fc.weight"])
    for kwargs, want in (({}, ema["ema.weights.head.fc.weight"]), ({"ema": False}, raw["head.fc.weight"])):
        model, run = load_classifier(out, **kwargs)
        assert torch.equal(model.head.fc.weight, want) and run["weights"] == ("raw" if kwargs else "ema")
        assert all(p.requires_grad for p in model.parameters())  # the model, not the EMA's frozen copy
    # a run without an EMA gives its only weights, and no EMA when one is asked for
    plain = tmp_path / "plain"
    assert main(["train", "--model", "resnet10", *TINY, "--img-size", "16", "--epochs", "1", "--train-limit", "64",
                 "--out", str(plain)]) == 0
    assert load_classifier(plain)[1]["weights"] == "raw"
    with pytest.raises(CheckpointError, match="'ema' is missing"):
        load_classifier(plain, ema=True)


# -- curves -------------------------------------------------------------------------------------
@pytest.mark.parametrize("history", [[], [{"epoch": 0, "train_loss": 2.3}], [{"epoch": 0, "val_top1": 0.1}]],
                         ids=["empty", "loss-only", "accuracy-only"])
def test_plot_curves_warns_not_about_empty_legends(history, tmp_path, recwarn):
    # an axis with nothing to plot gets no legend, so matplotlib has no "No artists with labels" to say
    from cspnet.engine.train import plot_curves

    path = plot_curves({"": history}, tmp_path / "curves.png")
    assert path.is_file()
    assert not [w for w in recwarn if "No artists with labels" in str(w.message)]


def test_memory_efficient_run_trains_the_same_weights_and_may_resume_a_plain_run(tmp_path, monkeypatch):
    from cspnet.engine import train as train_mod
    from cspnet.engine.train import _check_resume_config

    switched = []
    real_switch = train_mod.memory_efficient
    monkeypatch.setattr(train_mod, "memory_efficient", lambda m, on: switched.append((on, real_switch(m, on))))

    args = ["train", "--model", "cspresnet10", "--data", "digits", "--width", "0.25", "--batch-size", "32",
            "--img-size", "16", "--epochs", "1", "--train-limit", "128", "--threads", "1", "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "plain")]) == 0
    assert main([*args, "--memory-efficient", "--out", str(tmp_path / "lean")]) == 0
    assert [on for on, _ in switched] == [False, True] and switched[1][1] > 0  # layers switched in the second run
    plain, lean = load_state(tmp_path / "plain" / "last.safetensors"), load_state(tmp_path / "lean" / "last.safetensors")
    assert plain.keys() == lean.keys()
    state = read_checkpoint_record(tmp_path / "plain")["state"]
    saved = state["train_config"]
    # Rebuilding activations for backward changes float rounding (by up to 1e-4 of a weight on some CPUs), not
    # the update: each tensor's difference from the plain run is held against how far training moved it. A
    # wrong gradient, or BatchNorm statistics updated twice, differs by a sizable part of the move.
    init = rebuild_model(state["run"]["model"], seed=saved["seed"]).state_dict()
    for key in plain:
        moved = (plain[key] - init[key]).abs().max().item()
        assert (lean[key] - plain[key]).abs().max().item() <= 0.02 * moved + 1e-6, key
    assert saved["memory_efficient"] is False
    _check_resume_config(state, TrainConfig(**{**saved, "step_milestones": tuple(saved["step_milestones"]),
                                               "memory_efficient": True}), state["run"], "plain")
    with pytest.raises(CheckpointError, match="lr"):
        _check_resume_config(state, TrainConfig(**{**saved, "step_milestones": tuple(saved["step_milestones"]), "lr": 1.0}),
                             state["run"], "plain")


def test_resume_on_other_data_is_refused_naming_the_field(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--model", "resnet10", *TINY, "--epochs", "1", "--train-limit", "64", "--test-limit", "20", "--out", str(out)]
    assert main([*args, "--img-size", "16"]) == 0
    capsys.readouterr()
    assert main([*args, "--img-size", "24", "--resume"]) == 2  # same steps per epoch, other images
    assert "data.img_size: checkpoint 16 vs now 24" in capsys.readouterr().err
    assert read_checkpoint_record(out)["state"]["epoch"] == 1
    # another test subset changes how the run is scored, not what it trains on
    assert main([*args, "--img-size", "16", "--test-limit", "30", "--resume"]) == 0


def test_resume_of_a_folder_run_that_recorded_its_path_as_given(tmp_path, monkeypatch):
    # runs before folders were named by their absolute path recorded "ds"; resuming from the same place works
    from cspnet.engine.checkpoint import CheckpointError
    from cspnet.engine.train import _check_resume_config

    monkeypatch.chdir(tmp_path)
    cfg = TrainConfig(epochs=1)
    saved = {"train_config": cfg.as_dict(), "run": {"data": {"name": "ds", "img_size": 16}}}
    _check_resume_config(saved, cfg, {"data": {"name": str(tmp_path / "ds"), "img_size": 16}}, "last.json")
    with pytest.raises(CheckpointError, match="data.name: checkpoint 'ds' vs now"):
        _check_resume_config(saved, cfg, {"data": {"name": str(tmp_path / "other"), "img_size": 16}}, "last.json")


def test_fp16_resume_restores_the_gradient_scaler(tmp_path, monkeypatch, capsys):
    """fp16 runs on CUDA; torch's CPU autocast and GradScaler('cpu') run the same code path here."""
    import contextlib

    from cspnet.engine import train as train_mod

    scalers = []

    class CpuScaler(torch.amp.GradScaler):
        def __init__(self, device="cuda"):
            # grows every 2 good steps, so that the scale moves up and down within a few steps
            super().__init__("cpu", growth_interval=2)
            scalers.append(self)

    monkeypatch.setattr(torch.amp, "GradScaler", CpuScaler)
    monkeypatch.setattr(train_mod, "amp_context", lambda mode, device: contextlib.nullcontext() if mode == "none"
                        else torch.autocast(device.type, dtype=torch.float16))
    data = load_digits_data(16, train_limit=128, test_limit=50)  # 4 steps per epoch
    cfg = TrainConfig(epochs=2, batch_size=32, lr=0.05, amp="fp16")

    class StopsInEpoch2(ClassificationTask):
        calls = 0

        def prepare(self, batch, **kw):
            StopsInEpoch2.calls += 1
            if StopsInEpoch2.calls == 5:
                raise KeyboardInterrupt
            return super().prepare(batch, **kw)

    def model():
        return rebuild_model(model_record("resnet10", num_classes=10, in_chans=1, width=0.25), seed=0)

    fit(ClassificationTask(data), model(), cfg, tmp_path / "whole", progress=False)
    whole_scale = scalers[-1].get_scale()
    with pytest.raises(KeyboardInterrupt):
        fit(StopsInEpoch2(data), model(), cfg, tmp_path / "cut", progress=False)
    assert read_checkpoint_record(tmp_path / "cut")["scaler"]["scale"] != 65536.0  # moved in epoch 1
    fit(ClassificationTask(data), model(), cfg, tmp_path / "cut", resume=True, progress=False)
    assert scalers[-1].get_scale() == whole_scale
    a, b = load_state(tmp_path / "whole" / "last.safetensors"), load_state(tmp_path / "cut" / "last.safetensors")
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    # a checkpoint of a version that kept no scaler state still resumes, with a fresh scaler and a warning
    StopsInEpoch2.calls = 0
    with pytest.raises(KeyboardInterrupt):
        fit(StopsInEpoch2(data), model(), cfg, tmp_path / "old", progress=False)
    record_path = tmp_path / "old" / "last.json"
    record = json.loads(record_path.read_text())
    del record["scaler"]
    record_path.write_text(json.dumps(record))
    fit(ClassificationTask(data), model(), cfg, tmp_path / "old", resume=True, progress=False)
    assert "saved without the fp16 gradient scaler's state" in capsys.readouterr().err


def test_a_crash_while_best_is_written_does_not_lose_it(tmp_path, monkeypatch):
    from cspnet.engine import train as train_mod

    real_save = train_mod.save_checkpoint

    def crashing_save(out_dir, **kw):
        if kw["name"] == "best":
            raise KeyboardInterrupt  # the process dies as best.* is being written
        return real_save(out_dir, **kw)

    data = load_digits_data(16, train_limit=128, test_limit=50)  # 4 steps per epoch
    cfg = TrainConfig(epochs=1, batch_size=32, lr=0.05, checkpoint_every=2)

    def model():
        return rebuild_model(model_record("resnet10", num_classes=10, in_chans=1, width=0.25), seed=0)

    monkeypatch.setattr(train_mod, "save_checkpoint", crashing_save)
    with pytest.raises(KeyboardInterrupt):
        fit(ClassificationTask(data), model(), cfg, tmp_path, progress=False)
    monkeypatch.setattr(train_mod, "save_checkpoint", real_save)
    # the last checkpoint is one that does not claim a best checkpoint not on disk
    assert not (tmp_path / "best.json").exists() and read_checkpoint_record(tmp_path)["state"]["best"] is None
    result = fit(ClassificationTask(data), model(), cfg, tmp_path, resume=True, progress=False)
    best = read_checkpoint_record(tmp_path, "best")["state"]
    assert best["epoch"] == 1 and best["best"] == result.history[-1]["val_top1"]


def test_fit_restores_the_process_determinism_settings(tmp_path):
    # fit turned torch's deterministic mode on for the whole process (NaN-filling every new tensor) and left it on
    data = load_digits_data(16, train_limit=64, test_limit=32)
    seen = []

    class RecordsTheSettings(ClassificationTask):
        def loss(self, model, batch):
            seen.append((torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory))
            return super().loss(model, batch)

    model = cspnet.create_model("resnet10", num_classes=10, in_chans=1, **_narrow("resnet10"))
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.backends.cudnn.benchmark, torch.utils.deterministic.fill_uninitialized_memory)
    fit(RecordsTheSettings(data), model, TrainConfig(epochs=1, batch_size=32, lr=0.05), tmp_path, progress=False)
    assert seen and all(s == (True, False) for s in seen)  # deterministic kernels, no NaN-filling
    assert (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
            torch.backends.cudnn.benchmark, torch.utils.deterministic.fill_uninitialized_memory) == before


def test_burn_in_longer_than_the_run_is_capped_at_half_of_it():
    # a fixed burn-in of 100 steps on a 9-step run left the whole run warming up (lr ended at 9% of lr);
    # the warm-up now takes at most half the run, and the schedule records the burn-in as requested
    total = 9
    sched = LrSchedule(total, "cosine", burn_in=100)
    assert sched.burn_in_steps == 4 and sched.burn_in == 100
    lrs = [sched(s) for s in range(total)]
    assert lrs[3] == pytest.approx(1.0) and max(lrs) == pytest.approx(1.0)
    assert lrs[0] == pytest.approx((1 / 4) ** 4) and lrs[-1] < lrs[4]
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    assert torch.optim.lr_scheduler.LambdaLR(opt, sched).state_dict()["lr_lambdas"][0]["burn_in"] == 100
    assert LrSchedule(40, "cosine", burn_in=8).burn_in_steps == 8  # a burn-in within half the run is kept


def test_fit_says_when_it_caps_the_burn_in(tmp_path, capsys):
    data = load_digits_data(16, train_limit=64, test_limit=32)
    model = cspnet.create_model("resnet10", num_classes=10, in_chans=1, **_narrow("resnet10"))
    fit(ClassificationTask(data), model, TrainConfig(epochs=1, batch_size=32, lr=0.05, burn_in=50), tmp_path, progress=False)
    assert "the burn-in of 50 steps is more than half of this run's 2 optimizer steps; warming up for 1" in capsys.readouterr().err
