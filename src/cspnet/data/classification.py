"""Classification data: Fashion-MNIST (Debian package), scikit-learn digits, and image folders.

Every dataset yields ``(image, label)`` with ``image`` a ``uint8`` tensor ``C x S x S`` already at
the training size. Nothing random happens here: augmentation is done on whole batches by the
trainer's task with an explicit generator, so a run is a deterministic function of its seed
(exact ``--resume``, DataLoader workers or not, one process or many).

- ``fashion-mnist``: the original IDX files of Debian's ``dataset-fashion-mnist`` package in
  ``/usr/share/datasets/fashion-mnist`` (60,000 train / 10,000 test, 28x28 grey, 10 classes), gzipped
  as the package ships them or not.
- ``digits``: scikit-learn's bundled ``load_digits`` (1,797 8x8 images, 17 grey levels), split
  80/20 stratified with a fixed seed; for tests and as an offline fallback.
- a directory in ``ImageFolder`` layout (``root/<class>/<image>``), read with torchvision. If it
  has ``train/`` and ``val/`` (or ``test/``) sub-directories they are the splits; otherwise a fixed,
  seeded ``val_fraction`` of each class is held out (1.0: every image is a test image, for scoring
  a run on a folder it never saw).
"""
from __future__ import annotations

import gzip
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

FASHION_MNIST_ROOT = Path(os.environ.get("CSPNET_FASHION_MNIST", "/usr/share/datasets/fashion-mnist"))
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
BUILTIN = ("fashion-mnist", "digits")
DEFAULT_VAL_FRACTION = 0.1
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# How an image folder without train/ + val/ is split (`_holdout`), recorded with a run so that eval
# never splits the folder by another rule (runs made before this rule record none).
HOLDOUT_RULE = "per class, the lowest sha256(seed/relative path)"


class DataError(ValueError):
    """A dataset that cannot be used: missing, empty class folders, too few classes, bad files."""


class CorruptImageError(DataError):
    """An image file that cannot be decoded."""


@dataclass
class ClassificationData:
    """A train / test pair with what a model and the trainer need to know about it.

    ``hflip`` says whether a horizontal flip keeps the label (true for clothes, false for digits).
    ``skipped`` lists the corrupt files left out (``skip_corrupt=True``). ``holdout`` is the fraction
    of an image folder held out as its test split (None: the data has its own test split), chosen by
    ``holdout_rule``.
    """

    name: str
    train: Dataset
    test: Dataset
    classes: list[str]
    in_chans: int
    img_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    hflip: bool
    skipped: list[str] = field(default_factory=list)
    holdout: float | None = None
    holdout_rule: str | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def describe(self) -> dict:
        return {
            "name": self.name, "classes": self.classes, "in_chans": self.in_chans, "img_size": self.img_size,
            "mean": list(self.mean), "std": list(self.std), "hflip": self.hflip,
            "train_size": len(self.train), "test_size": len(self.test), "skipped": len(self.skipped),
            "holdout": self.holdout, "holdout_rule": self.holdout_rule,
        }


class TensorImageDataset(Dataset):
    """Images held in memory as one ``uint8`` tensor ``N x C x S x S`` with ``int64`` labels."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        if images.dtype != torch.uint8 or images.dim() != 4 or len(images) != len(labels):
            raise ValueError(f"expected uint8 images N x C x H x W and N labels, got {tuple(images.shape)} {images.dtype} and {len(labels)} labels")
        self.images = images
        self.labels = labels.long()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], int(self.labels[i])


def _resize_uint8(images: np.ndarray, size: int) -> torch.Tensor:
    """``N x H x W`` (or ``N x C x H x W``) uint8 -> ``N x C x size x size`` uint8, bilinear.

    Antialiasing is used when shrinking only (it changes nothing when enlarging, and costs time).
    """
    x = torch.from_numpy(np.ascontiguousarray(images))
    if x.dim() == 3:
        x = x[:, None]
    if x.shape[-1] == size and x.shape[-2] == size:
        return x.contiguous()
    shrink = size < max(x.shape[-2:])
    out = torch.empty(x.shape[0], x.shape[1], size, size, dtype=torch.uint8)
    for i in range(0, len(x), 8192):  # bounded memory for 60k images
        y = F.interpolate(x[i:i + 8192].float(), size=(size, size), mode="bilinear", antialias=shrink, align_corners=False)
        out[i:i + 8192] = y.add_(0.5).clamp_(0, 255)  # round half up, then the uint8 cast truncates
    return out


def _read_idx(path: Path, magic: int, rank: int) -> np.ndarray:
    """Read an IDX file (the MNIST format: big-endian magic, dims, then uint8 data), gzipped if named ``.gz``."""
    try:
        with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: cannot read ({e})") from None
    header_bytes = 4 * (rank + 1)
    if len(raw) < header_bytes:
        raise DataError(f"{path}: not an IDX file ({len(raw)} bytes, shorter than its {header_bytes}-byte header)")
    header = np.frombuffer(raw[:header_bytes], dtype=">u4")
    if header[0] != magic:
        raise DataError(f"{path}: not an IDX file (magic {header[0]}, expected {magic})")
    dims = tuple(int(d) for d in header[1:])
    data = np.frombuffer(raw, dtype=np.uint8, offset=header_bytes)
    if data.size != int(np.prod(dims)):
        raise DataError(f"{path}: truncated ({data.size} bytes of data, header says {dims})")
    return data.reshape(dims).copy()  # writable, as torch.from_numpy wants


def _idx_file(root: Path, name: str) -> Path:
    """``root/name.gz`` as Debian ships it, else ``root/name`` (gunzipped, as other mirrors ship it)."""
    packed = root / f"{name}.gz"
    if packed.is_file() or not (root / name).is_file():
        return packed  # a missing file is named by its packaged name
    return root / name


def load_fashion_mnist(img_size: int = 32, root: str | os.PathLike | None = None, *, train_limit: int | None = None,
                       test_limit: int | None = None, seed: int = 0) -> ClassificationData:
    """Fashion-MNIST from the IDX files of Debian's ``dataset-fashion-mnist`` package (``*-ubyte.gz``,
    or the same files gunzipped).

    ``train_limit`` / ``test_limit`` keep a class-balanced subset (chosen before resizing, so quick).
    """
    root = Path(root) if root is not None else FASHION_MNIST_ROOT
    if not root.is_dir():
        raise DataError(
            f"{root}: Fashion-MNIST not found; install it with `apt-get install dataset-fashion-mnist` "
            "(or set CSPNET_FASHION_MNIST to a folder holding the four *-ubyte.gz files, or them gunzipped)"
        )
    splits = {}
    for split, prefix, limit, split_seed in (("train", "train", train_limit, seed), ("test", "t10k", test_limit, seed + 1)):
        images = _read_idx(_idx_file(root, f"{prefix}-images-idx3-ubyte"), 2051, 3)
        labels_path = _idx_file(root, f"{prefix}-labels-idx1-ubyte")
        labels = _read_idx(labels_path, 2049, 1)
        if len(images) != len(labels):
            raise DataError(f"{root}: {prefix} has {len(images)} images but {len(labels)} labels")
        bad = np.flatnonzero(labels >= len(FASHION_MNIST_CLASSES))
        if bad.size:
            raise DataError(f"{labels_path}: label {labels[bad[0]]} at index {bad[0]} ({bad.size} in all) is not a class "
                            f"(0..{len(FASHION_MNIST_CLASSES) - 1})")
        keep = balanced_subset(labels, limit, split_seed)
        splits[split] = TensorImageDataset(_resize_uint8(images[keep], img_size), torch.from_numpy(labels[keep].astype(np.int64)))
    mean, std = _mean_std(splits["train"].images)
    return ClassificationData("fashion-mnist", splits["train"], splits["test"], list(FASHION_MNIST_CLASSES),
                              1, img_size, mean, std, hflip=True)


def load_digits_data(img_size: int = 32, test_fraction: float = 0.2, seed: int = 0, *, train_limit: int | None = None,
                     test_limit: int | None = None) -> ClassificationData:
    """scikit-learn's bundled 8x8 digits, upsampled to ``img_size``; an 80/20 stratified split (fixed seed 0)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    labels = digits.target.astype(np.int64)
    idx_train, idx_test = train_test_split(np.arange(len(labels)), test_size=test_fraction, stratify=labels, random_state=0)
    idx_train = idx_train[balanced_subset(labels[idx_train], train_limit, seed)]
    idx_test = idx_test[balanced_subset(labels[idx_test], test_limit, seed + 1)]
    train = TensorImageDataset(_resize_uint8(images[idx_train], img_size), torch.from_numpy(labels[idx_train]))
    test = TensorImageDataset(_resize_uint8(images[idx_test], img_size), torch.from_numpy(labels[idx_test]))
    mean, std = _mean_std(train.images)
    return ClassificationData("digits", train, test, [str(i) for i in range(10)], 1, img_size, mean, std, hflip=False)


def _mean_std(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation of ``uint8`` images in [0, 1], from value histograms."""
    values = torch.arange(256, dtype=torch.float64) / 255.0
    means, stds = [], []
    for c in range(images.shape[1]):
        counts = torch.bincount(images[:, c].reshape(-1), minlength=256).double()
        n = counts.sum()
        mean = (counts * values).sum() / n
        var = (counts * (values - mean) ** 2).sum() / (n - 1)
        means.append(mean.item())
        stds.append(var.sqrt().item())
    return tuple(means), tuple(stds)


# -- image folders -------------------------------------------------------------------------------
def _is_image(path: str) -> bool:
    from torchvision.datasets.folder import IMG_EXTENSIONS

    return path.lower().endswith(IMG_EXTENSIONS)


def _images_below(folder: Path) -> list[Path]:
    """The image files below ``folder`` (recursively, following links), sorted.

    Hidden files and folders (a name starting with '.': macOS's ``._x.png`` companions,
    ``.ipynb_checkpoints/``) are left out: they are not the images of the folder.
    """
    found = []
    for d, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = [name for name in dirs if not name.startswith(".")]
        found += [Path(d) / f for f in files if not f.startswith(".") and _is_image(f)]
    return sorted(found)


def image_files(paths: list[str | os.PathLike]) -> list[Path]:
    """The files named, and the image files below the folders named (`_images_below`), in order.

    Raises `DataError` for a path that does not exist or a folder without images.
    """
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            found = _images_below(path)
            if not found:
                raise DataError(f"{path}: no image files in this folder")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise DataError(f"{path}: no such file or folder")
    return files


def scan_folder(root: Path) -> tuple[list[str], list[tuple[str, int]]]:
    """Classes (sorted sub-directory names) and ``(path, class index)`` samples of an ImageFolder tree.

    Raises `DataError` for a missing directory, fewer than two classes, or a class folder without
    images (naming it). Hidden folders and files are no classes and no images (`_images_below`).
    """
    from torchvision.datasets.folder import IMG_EXTENSIONS

    if not root.is_dir():
        raise DataError(f"{root}: no such directory")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if len(classes) < 2:
        found = f"only {classes[0]!r}" if classes else "none"
        raise DataError(f"{root}: a classification dataset needs at least two class folders (root/<class>/<image>), found {found}")
    images = {c: _images_below(root / c) for c in classes}
    empty = [c for c in classes if not images[c]]
    if empty:
        raise DataError(f"{root}: empty class folder(s) {', '.join(str(root / c) for c in empty)} (no {'/'.join(IMG_EXTENSIONS)} files)")
    return classes, [(str(path), i) for i, c in enumerate(classes) for path in images[c]]


UNSIGNED_16_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def to_8_bits(im, path: str, file_format: str | None = None):
    """A 16-bit image scaled by its range to 8 bits (65535 -> 255); ``convert`` would clip it at 255.
    A PNG in mode ``I`` is 16-bit too (PNG has no wider samples; older Pillow versions open 16-bit
    grey PNGs so).

    32-bit integer and floating-point images (PIL modes ``I``, ``F`` …) have no fixed range to scale
    by: they raise `CorruptImageError` naming the file. Other images are returned as they are.
    """
    from PIL import Image

    if im.mode in UNSIGNED_16_BIT_MODES or (im.mode == "I" and file_format == "PNG"):
        wide = np.asarray(im).astype(np.uint32)
        return Image.fromarray(((wide * 255 + 32767) // 65535).astype(np.uint8))
    if im.mode.startswith(("I", "F")):
        raise CorruptImageError(f"{path}: a {im.mode!r} image (32-bit integer or floating point, PIL mode) has no fixed "
                                "range to read as 8 bits; save it with 8 or 16 bits per channel")
    return im


def decode_image(path: str, img_size: int, in_chans: int) -> torch.Tensor:
    """Open, turn upright (EXIF orientation), convert (grey or RGB), resize the short side to
    ``img_size``, centre-crop; ``uint8 C x S x S``. 16-bit images are scaled to 8 bits by their range.

    Raises `CorruptImageError` naming the file when it cannot be decoded.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError
    from torchvision.transforms import v2

    try:
        with Image.open(path) as im:
            # as a viewer shows it: cameras store a portrait photo as landscape plus an orientation tag
            file_format = im.format
            im = ImageOps.exif_transpose(im)  # a decoded copy
    # PIL's DecompressionBombError (too many pixels to decode safely) is no OSError
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError) as e:
        raise CorruptImageError(f"{path}: corrupt or unreadable image ({type(e).__name__}: {e})") from None
    im = to_8_bits(im, path, file_format).convert("L" if in_chans == 1 else "RGB")
    tf = v2.Compose([v2.PILToTensor(), v2.Resize(img_size, antialias=True), v2.CenterCrop(img_size)])
    return tf(im)


class FolderDataset(Dataset):
    """Image files with class indices, decoded and resized on access (DataLoader workers welcome)."""

    def __init__(self, samples: list[tuple[str, int]], img_size: int, in_chans: int):
        self.samples = samples
        self.img_size = img_size
        self.in_chans = in_chans

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[i]
        return decode_image(path, self.img_size, self.in_chans), label

    def targets(self) -> list[int]:
        return [label for _, label in self.samples]


def with_worker_errors(loader):
    """Iterate a DataLoader; a bad-input error (`ValueError`) raised in a worker process keeps its
    type and its own message (the loader prefixes the worker's traceback, which hides the file at fault)."""
    it = iter(loader)
    while True:
        try:
            batch = next(it)
        except StopIteration:
            return
        except ValueError as e:
            text = str(e)
            prefix = f"{type(e).__module__}.{type(e).__name__}: "
            last = [line for line in text.splitlines() if line.startswith(prefix)]
            if "DataLoader worker" not in text or not last:
                raise
            raise type(e)(last[-1][len(prefix):]) from None
        yield batch


def _drop_corrupt(samples: list[tuple[str, int]], img_size: int, in_chans: int) -> tuple[list[tuple[str, int]], list[str]]:
    from tqdm import tqdm

    good, bad = [], []
    for path, label in tqdm(samples, desc="checking images", unit="img", leave=False, disable=len(samples) < 1000):
        try:
            decode_image(path, img_size, in_chans)
            good.append((path, label))
        except CorruptImageError:
            bad.append(path)
    return good, bad


def _holdout(samples: list[tuple[str, int]], root: Path, fraction: float, seed: int) -> tuple[list, list]:
    """Hold out ``fraction`` of each class (at least one image of a class of two or more): `HOLDOUT_RULE`.

    Each file is ranked by a hash of the seed and its path relative to ``root``, and the lowest of
    its class are held out: files added to other classes move no file, and a file added to its own
    class moves at most one.
    """
    def rank(i: int) -> bytes:
        return hashlib.sha256(f"{seed}/{Path(samples[i][0]).relative_to(root).as_posix()}".encode()).digest()

    by_class: dict[int, list[int]] = {}
    for i, (_, label) in enumerate(samples):
        by_class.setdefault(label, []).append(i)
    test_idx = set()
    for idx in by_class.values():
        n = max(1, round(fraction * len(idx))) if len(idx) > 1 else 0
        test_idx.update(sorted(idx, key=rank)[:n])
    return [s for i, s in enumerate(samples) if i not in test_idx], [s for i, s in enumerate(samples) if i in test_idx]


def load_image_folder(
    root: str | os.PathLike,
    img_size: int = 224,
    in_chans: int = 3,
    *,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    seed: int = 0,
    skip_corrupt: bool = False,
) -> ClassificationData:
    """An ImageFolder tree (with ``train/`` + ``val/``/``test/`` splits, or one tree split by ``val_fraction``;
    1.0 makes every image a test image and leaves no training images).

    Corrupt images raise `CorruptImageError` naming the file when they are read; with
    ``skip_corrupt=True`` every image is decoded once up front and the unreadable ones are left
    out and listed in ``skipped``.
    """
    root = Path(root)
    if in_chans not in (1, 3):
        raise DataError(f"in_chans must be 1 (grey) or 3 (RGB) for image folders, got {in_chans}")
    test_dir = next((root / d for d in ("val", "test") if (root / d).is_dir()), None)
    holdout = holdout_rule = None
    if (root / "train").is_dir() and test_dir is not None:
        classes, train = scan_folder(root / "train")
        test_classes, test = scan_folder(test_dir)
        if test_classes != classes:
            raise DataError(f"{test_dir}: classes {test_classes} differ from {root / 'train'}: {classes}")
    else:
        if not 0.0 < val_fraction <= 1.0:
            raise DataError(f"val_fraction must lie in (0, 1], got {val_fraction}")
        classes, samples = scan_folder(root)
        # not through `_holdout`, which keeps the only image of a one-image class for training
        train, test = ([], samples) if val_fraction == 1.0 else _holdout(samples, root, val_fraction, seed)
        holdout, holdout_rule = val_fraction, HOLDOUT_RULE
    skipped: list[str] = []
    if skip_corrupt:
        train, bad_train = _drop_corrupt(train, img_size, in_chans)
        test, bad_test = _drop_corrupt(test, img_size, in_chans)
        skipped = bad_train + bad_test
        if bad_train and not train:
            raise DataError(f"{root}: every training image is corrupt")
    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if in_chans == 3 else ((0.5,), (0.25,))
    # named by its absolute path: eval, resume and compare may run from another working directory
    return ClassificationData(str(root.resolve()), FolderDataset(train, img_size, in_chans), FolderDataset(test, img_size, in_chans),
                              classes, in_chans, img_size, mean, std, hflip=True, skipped=skipped, holdout=holdout,
                              holdout_rule=holdout_rule)


def balanced_subset(labels: np.ndarray, n: int | None, seed: int) -> np.ndarray:
    """Sorted indices of ``n`` samples with as equal a number from every class as the classes allow,
    chosen at random with ``seed``: equal counts, not each class's share of the set.

    The classes take turns, in label order, each giving one more of its samples: every class gets
    ``n // C`` of the ``C`` classes (the first ``n % C`` one more), and a class that runs out leaves
    its turns to the others. All indices when ``n`` is None or not smaller than the set.
    """
    labels = np.asarray(labels)
    if n is None or n >= len(labels):
        return np.arange(len(labels))
    if n < 1:
        raise DataError(f"a subset limit must be positive, got {n}")
    order = np.random.default_rng(seed).permutation(len(labels))
    per_class = [order[labels[order] == c] for c in np.unique(labels)]
    # interleave the classes so that any prefix is balanced
    interleaved = [idx[i] for i in range(max(map(len, per_class))) for idx in per_class if i < len(idx)]
    return np.sort(np.asarray(interleaved[:n]))


def load_classification(
    data: str,
    img_size: int = 32,
    *,
    in_chans: int | None = None,
    train_limit: int | None = None,
    test_limit: int | None = None,
    val_fraction: float | None = None,
    skip_corrupt: bool = False,
    seed: int = 0,
) -> ClassificationData:
    """``data`` is ``"fashion-mnist"``, ``"digits"`` or a directory path; see the module docstring.

    ``val_fraction`` is the share of a folder without ``train/`` + ``val/`` held out for testing
    (default ``DEFAULT_VAL_FRACTION``; 1.0: all of it, no training images).

    ``train_limit`` / ``test_limit`` keep a class-balanced subset (for quick runs and tests).
    ``in_chans`` applies to image folders (1: grey, 3: RGB); the built-in sets are grey.
    """
    if in_chans is not None and data in BUILTIN and in_chans != 1:
        raise DataError(f"{data} images are grey (1 channel); --in-chans {in_chans} was asked for")
    if data == "fashion-mnist":
        return load_fashion_mnist(img_size, train_limit=train_limit, test_limit=test_limit, seed=seed)
    if data == "digits":
        return load_digits_data(img_size, seed=seed, train_limit=train_limit, test_limit=test_limit)
    if not os.path.isdir(data):
        raise DataError(f"--data {data!r}: not one of {', '.join(BUILTIN)} and not a directory")
    out = load_image_folder(data, img_size, in_chans or 3, val_fraction=DEFAULT_VAL_FRACTION if val_fraction is None else val_fraction, seed=seed,
                            skip_corrupt=skip_corrupt)
    for split, limit, split_seed in (("train", train_limit, seed), ("test", test_limit, seed + 1)):
        ds = getattr(out, split)
        keep = balanced_subset(np.asarray(ds.targets()), limit, split_seed)
        setattr(out, split, FolderDataset([ds.samples[i] for i in keep], ds.img_size, ds.in_chans))
    return out
