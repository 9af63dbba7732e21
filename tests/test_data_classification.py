"""Classification data: Fashion-MNIST IDX files, scikit-learn digits, image folders and their errors."""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cspnet.cli import main
from cspnet.data import CorruptImageError, DataError, load_classification, load_digits_data, load_fashion_mnist
from cspnet.data.classification import FASHION_MNIST_ROOT, decode_image, image_files
from cspnet.engine.checkpoint import read_checkpoint_record


def _raw_idx(path, offset):
    with gzip.open(path) as f:
        return np.frombuffer(f.read(), np.uint8, offset=offset)


@pytest.mark.skipif(not FASHION_MNIST_ROOT.is_dir(), reason="dataset-fashion-mnist not installed")
def test_fashion_mnist_matches_the_raw_idx_files():
    data = load_fashion_mnist(img_size=28)
    # independent read, as the research note's snippet does it
    x = _raw_idx(FASHION_MNIST_ROOT / "t10k-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28)
    y = _raw_idx(FASHION_MNIST_ROOT / "t10k-labels-idx1-ubyte.gz", 8)
    assert len(data.train) == 60000 and len(data.test) == 10000
    assert torch.equal(data.test.images[:, 0], torch.from_numpy(x.copy()))
    assert torch.equal(data.test.labels, torch.from_numpy(y.astype(np.int64)))
    assert torch.bincount(data.train.labels).tolist() == [6000] * 10
    assert data.classes[0] == "T-shirt/top" and data.num_classes == 10 and data.in_chans == 1 and data.hflip
    # normalised by the training images' statistics: Fashion-MNIST's published 0.2860 / 0.3530
    assert data.mean == pytest.approx((0.28604,), abs=1e-5) and data.std == pytest.approx((0.35302,), abs=1e-5)


@pytest.mark.skipif(not FASHION_MNIST_ROOT.is_dir(), reason="dataset-fashion-mnist not installed")
def test_fashion_mnist_at_32_pixels_and_balanced_subsets():
    data = load_classification("fashion-mnist", 32, train_limit=500, test_limit=100)
    assert tuple(data.train.images.shape) == (500, 1, 32, 32) and data.train.images.dtype == torch.uint8
    assert torch.bincount(data.train.labels).tolist() == [50] * 10
    assert torch.bincount(data.test.labels).tolist() == [10] * 10
    # the same subset at 28 pixels: upsampling keeps each picture's mean brightness
    same28 = load_fashion_mnist(28, train_limit=500, test_limit=100)
    assert torch.equal(same28.train.labels, data.train.labels)
    diff = data.train.images.float().mean((1, 2, 3)) - same28.train.images.float().mean((1, 2, 3))
    assert diff.abs().max() < 2.0


def test_fashion_mnist_missing_gives_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="dataset-fashion-mnist"):
        load_fashion_mnist(32, root=tmp_path / "nowhere")
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(b"\x00\x00\x08\x01" + b"\x00" * 12))
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz: not an IDX file"):
        load_fashion_mnist(32, root=tmp_path)


def test_digits_split_is_stratified_and_exact():
    from sklearn.datasets import load_digits

    data = load_digits_data(img_size=8)
    assert len(data.train) + len(data.test) == 1797 and len(data.test) == 360
    per_class = np.bincount(load_digits().target)
    test_counts = torch.bincount(data.test.labels).numpy()
    assert np.all(np.abs(test_counts - 0.2 * per_class) <= 1)  # stratified: 20% of every class
    raw = np.round(load_digits().images * 255 / 16).astype(np.uint8)
    # every test image is one of the originals, unchanged at 8x8
    originals = {r.tobytes() for r in raw}
    assert all(img[0].numpy().tobytes() in originals for img in data.test.images[:50])
    assert not data.hflip  # a mirrored digit is another symbol


def test_digits_are_normalised_by_their_training_images_statistics():
    data = load_digits_data(img_size=8)
    train = data.train.images.numpy() / 255.0
    assert data.mean == pytest.approx((train.mean(),), rel=1e-9)
    assert data.std == pytest.approx((train.std(ddof=1),), rel=1e-9)
    test = data.test.images.numpy() / 255.0
    assert abs(test.mean() - train.mean()) > 1e-4  # the test images' statistics would differ


def _folder(root, spec):
    """spec: {class: number of images}; images are small PNGs with class-dependent brightness."""
    rng = np.random.default_rng(0)
    for ci, (cls, n) in enumerate(spec.items()):
        d = root / cls
        d.mkdir(parents=True)
        for i in range(n):
            arr = (rng.random((12, 10, 3)) * 60 + 80 * ci).astype(np.uint8)
            Image.fromarray(arr).save(d / f"{i}.png")
    return root


def test_image_folder_loads_and_splits(tmp_path):
    root = _folder(tmp_path / "ds", {"cat": 10, "dog": 10})
    data = load_classification(str(root), 16, val_fraction=0.2)
    assert data.classes == ["cat", "dog"] and data.in_chans == 3
    assert len(data.train) == 16 and len(data.test) == 4
    img, label = data.train[0]
    assert img.dtype == torch.uint8 and tuple(img.shape) == (3, 16, 16) and label in (0, 1)
    train_paths = {p for p, _ in data.train.samples}
    assert not train_paths & {p for p, _ in data.test.samples}
    grey = load_classification(str(root), 16, in_chans=1)
    assert tuple(grey.train[0][0].shape) == (1, 16, 16)


def test_image_folder_with_train_val_dirs(tmp_path):
    _folder(tmp_path / "ds" / "train", {"a": 4, "b": 4})
    _folder(tmp_path / "ds" / "val", {"a": 2, "b": 2})
    data = load_classification(str(tmp_path / "ds"), 8)
    assert (len(data.train), len(data.test)) == (8, 4)


def test_corrupt_image_is_named_or_skipped_and_counted(tmp_path):
    root = _folder(tmp_path / "ds", {"a": 6, "b": 6})
    bad = root / "b" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not a picture")
    data = load_classification(str(root), 8, val_fraction=0.25)
    ds, index = next((ds, i) for ds in (data.train, data.test) for i, (p, _) in enumerate(ds.samples) if p == str(bad))
    with pytest.raises(CorruptImageError, match="broken.png"):
        ds[index]
    skipped = load_classification(str(root), 8, val_fraction=0.25, skip_corrupt=True)
    assert skipped.skipped == [str(bad)]
    assert len(skipped.train) + len(skipped.test) == 12


def test_empty_class_folder_and_too_few_classes(tmp_path):
    root = _folder(tmp_path / "ds", {"a": 3, "b": 3})
    (root / "empty").mkdir()
    (root / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(DataError, match="empty class folder.*empty"):
        load_classification(str(root), 8)
    one = _folder(tmp_path / "one", {"only": 3})
    with pytest.raises(DataError, match="at least two class folders.*'only'"):
        load_classification(str(one), 8)
    with pytest.raises(DataError, match="not one of fashion-mnist, digits"):
        load_classification(str(tmp_path / "missing"), 8)


def test_cli_reports_data_errors_cleanly(tmp_path, capsys):
    root = _folder(tmp_path / "ds", {"a": 3, "b": 3})
    (root / "c").mkdir()
    rc = main(["train", "--model", "resnet10", "--data", str(root), "--out", str(tmp_path / "run"), "--epochs", "1"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "empty class folder" in err and str(root / "c") in err and "Traceback" not in err


def test_cli_names_a_corrupt_image_read_by_a_worker_or_skips_it(tmp_path, capsys):
    root = _folder(tmp_path / "ds", {"a": 8, "b": 8})
    (root / "a" / "zz_broken.png").write_bytes(b"not an image at all")
    args = ["train", "--model", "resnet10", "--width", "0.25", "--data", str(root), "--img-size", "16", "--epochs", "1",
            "--batch-size", "8", "--val-fraction", "0.1", "--workers", "1", "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "r1")]) == 2
    err = capsys.readouterr().err
    assert "zz_broken.png: corrupt or unreadable image" in err and "Traceback" not in err
    assert main([*args, "--skip-corrupt", "--out", str(tmp_path / "r2")]) == 0
    assert "skipped 1 corrupt image(s)" in capsys.readouterr().err


def test_eval_of_a_folder_run_uses_its_split_and_channels_and_checks_its_classes(tmp_path, capsys, monkeypatch):
    root = _folder(tmp_path / "ds", {"a": 10, "b": 10})
    run = tmp_path / "run"
    monkeypatch.chdir(tmp_path)  # the run is given the folder relative to where it is started ...
    assert main(["train", "--model", "resnet10", "--width", "0.25", "--data", "ds", "--in-chans", "1", "--img-size", "16",
                 "--epochs", "1", "--batch-size", "8", "--val-fraction", "0.3", "--no-progress", "--out", str(run)]) == 0
    capsys.readouterr()
    assert read_checkpoint_record(run)["state"]["run"]["data"]["name"] == str(root.resolve())
    monkeypatch.chdir(run)  # ... and evaluated from elsewhere: it still knows the folder as its own
    # No --val-fraction, no --in-chans: the run's held-out 30% (6 images), grey as trained.
    assert main(["eval", "--checkpoint", str(run), "--data", str(root)]) == 0
    assert json.loads(capsys.readouterr().out)["images"] == 6
    # Another held-out share of the same folder would score training images.
    assert main(["eval", "--checkpoint", str(run), "--data", str(root), "--val-fraction", "0.5"]) == 2
    assert "would score images it was trained on" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(run), "--data", str(root), "--in-chans", "3"]) == 2
    assert "trained on 1-channel" in capsys.readouterr().err
    # A run made before the split rule was recorded held out other images: refused, not mixed.
    record = json.loads((run / "last.json").read_text())
    del record["state"]["run"]["data"]["holdout_rule"]
    (run / "last.json").write_text(json.dumps(record))
    assert main(["eval", "--checkpoint", str(run), "--data", str(root)]) == 2
    assert "by another rule (an older one, not recorded)" in capsys.readouterr().err
    # Two classes of other names: the run's outputs mean a and b, not these.
    other = _folder(tmp_path / "other", {"x": 4, "y": 4})
    assert main(["eval", "--checkpoint", str(run), "--data", str(other)]) == 2
    assert "wrong labels" in capsys.readouterr().err


def test_16_bit_images_are_scaled_not_clipped_and_wider_ones_are_named(tmp_path):
    ramp = np.linspace(0, 65535, 64 * 64).round().astype(np.uint16).reshape(64, 64)
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    for chans in (1, 3):
        got = decode_image(str(tmp_path / "g16.png"), 64, chans)
        want = torch.from_numpy((ramp.astype(np.float64) / 257).round().astype(np.uint8))
        assert (got.int() - want.int()).abs().max() <= 1  # convert("L") clipped all but the darkest to 255
    Image.fromarray(np.full((8, 8), 0.5, np.float32)).save(tmp_path / "f32.tif")
    with pytest.raises(CorruptImageError, match=r"f32.tif: a 'F' image .*8 or 16 bits"):
        decode_image(str(tmp_path / "f32.tif"), 8, 1)
    # older Pillow versions open a 16-bit grey PNG in mode "I": a PNG holds no wider samples
    from cspnet.data.classification import to_8_bits

    as_i = Image.open(tmp_path / "g16.png").convert("I")
    scaled = np.asarray(to_8_bits(as_i, "g16.png", "PNG"))
    assert np.abs(scaled.astype(int) - (ramp / 257).round()).max() <= 1
    with pytest.raises(CorruptImageError, match="'I' image"):
        to_8_bits(as_i, "x.tif", "TIFF")  # a 32-bit TIFF has no fixed range


def test_exif_orientation_is_applied(tmp_path):
    stored = np.zeros((20, 40), np.uint8)
    stored[:, :20] = 255  # stored landscape, left half white; orientation 6: shown turned 90 deg clockwise
    img = Image.fromarray(stored)
    exif = img.getexif()
    exif[0x0112] = 6
    img.save(tmp_path / "turned.png", exif=exif.tobytes())
    got = decode_image(str(tmp_path / "turned.png"), 16, 1)[0].float()
    assert got[:6].mean() > 250 and got[-6:].mean() < 5  # upright: the white half on top


def test_hidden_files_and_folders_in_class_folders_are_no_images(tmp_path):
    root = _folder(tmp_path / "ds", {"cat": 4, "dog": 4})
    (root / "cat" / "._0.png").write_bytes(b"\x00\x05\x16\x07" + bytes(80))  # macOS AppleDouble companion
    (root / "dog" / ".ipynb_checkpoints").mkdir()
    Image.new("RGB", (8, 8)).save(root / "dog" / ".ipynb_checkpoints" / "0-checkpoint.png")
    (root / "dog" / "more").mkdir()
    Image.new("RGB", (8, 8)).save(root / "dog" / "more" / "9.png")  # a visible subfolder still counts
    data = load_classification(str(root), 8, val_fraction=0.25)
    paths = sorted(p for ds in (data.train, data.test) for p, _ in ds.samples)
    assert paths == sorted(str(p) for p in [*(root / "cat").glob("[0-9].png"), *(root / "dog").glob("[0-9].png"),
                                            root / "dog" / "more" / "9.png"])
    assert image_files([root]) == [Path(p) for p in paths]
    # a class folder holding hidden files only is empty
    (root / "bird").mkdir()
    (root / "bird" / "._1.png").write_bytes(bytes(10))
    with pytest.raises(DataError, match="empty class folder.*bird"):
        load_classification(str(root), 8)


def test_held_out_files_of_a_class_do_not_depend_on_the_other_classes(tmp_path):
    root = _folder(tmp_path / "ds", {"a": 7, "b": 20})

    def held_out(seed=0):
        data = load_classification(str(root), 8, val_fraction=0.2, seed=seed)
        return {p for p, _ in data.test.samples}

    before = held_out()
    assert sum("/a/" in p for p in before) == 1 and sum("/b/" in p for p in before) == 4  # 20% of each class
    _folder(tmp_path / "more", {"a": 30})  # more images of class a, under other names
    for path in (tmp_path / "more" / "a").iterdir():
        path.rename(root / "a" / f"new_{path.name}")
    after = held_out()
    assert {p for p in after if "/b/" in p} == {p for p in before if "/b/" in p}
    assert sum("/a/" in p for p in after) == 7
    assert held_out(seed=1) != after


def test_a_decompression_bomb_is_a_corrupt_image_named_or_skipped(tmp_path, monkeypatch):
    from PIL import Image as PILImage

    root = _folder(tmp_path / "ds", {"a": 4, "b": 4})
    PILImage.new("L", (64, 64)).save(root / "a" / "huge.png")
    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 1000)  # 64 x 64 is over twice this: PIL refuses to decode it
    with pytest.raises(CorruptImageError, match="huge.png: corrupt or unreadable image .DecompressionBombError"):
        decode_image(str(root / "a" / "huge.png"), 8, 3)
    data = load_classification(str(root), 8, val_fraction=0.25, skip_corrupt=True)
    assert data.skipped == [str(root / "a" / "huge.png")]


def _write_idx_set(root, labels=(0, 1, 2, 3, 9, 9), packed=True, labels_bytes=None):
    """A tiny Fashion-MNIST folder: the four IDX files, gzipped as Debian ships them or not."""
    import struct

    root.mkdir(parents=True, exist_ok=True)
    n = len(labels)
    images = struct.pack(">IIII", 2051, n, 28, 28) + np.arange(n * 28 * 28, dtype=np.uint8).tobytes()
    label_file = struct.pack(">II", 2049, n) + bytes(labels) if labels_bytes is None else labels_bytes
    for prefix in ("train", "t10k"):
        for name, raw in ((f"{prefix}-images-idx3-ubyte", images), (f"{prefix}-labels-idx1-ubyte", label_file)):
            if packed:
                (root / f"{name}.gz").write_bytes(gzip.compress(raw))
            else:
                (root / name).write_bytes(raw)
    return root


def test_fashion_mnist_idx_files_gunzipped_are_read_and_bad_ones_named(tmp_path):
    packed = load_fashion_mnist(28, _write_idx_set(tmp_path / "gz"))
    raw = load_fashion_mnist(28, _write_idx_set(tmp_path / "raw", packed=False))
    assert torch.equal(raw.train.images, packed.train.images) and torch.equal(raw.test.labels, packed.test.labels)
    assert raw.test.labels.tolist() == [0, 1, 2, 3, 9, 9]
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte.gz: label 12 at index 2 \(1 in all\) is not a class \(0..9\)"):
        load_fashion_mnist(28, _write_idx_set(tmp_path / "badlabel", labels=(0, 1, 12, 3, 4, 5)))
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte: not an IDX file \(6 bytes, shorter than its 8-byte header\)"):
        load_fashion_mnist(28, _write_idx_set(tmp_path / "short", packed=False, labels_bytes=b"\x00\x00\x08\x01\x00\x00"))
    (tmp_path / "gz" / "t10k-images-idx3-ubyte.gz").unlink()
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte.gz: cannot read"):
        load_fashion_mnist(28, tmp_path / "gz")
