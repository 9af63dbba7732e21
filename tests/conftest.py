import gzip
import importlib.util
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

# Under pytest-xdist (`make test` runs two workers on the two cores) each worker computes with one
# thread; a plain `pytest` run uses both cores. More threads than cores makes torch far slower.
_default = "1" if os.environ.get("PYTEST_XDIST_WORKER") else "2"
torch.set_num_threads(int(os.environ.get("CSPNET_TEST_THREADS", _default)))

# Hypothesis caches what it reads from the source under <cwd>/.hypothesis, wherever pytest was started
# (its example database too, were a test not derandomized): a test run keeps them in a temporary folder
# that is removed when the run ends, unless the caller chose a storage folder.
if "HYPOTHESIS_STORAGE_DIRECTORY" not in os.environ:
    _hypothesis_home = tempfile.TemporaryDirectory(prefix="cspnet-tests-hypothesis-")
    os.environ["HYPOTHESIS_STORAGE_DIRECTORY"] = _hypothesis_home.name


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """Compute with one thread, restored after: for tiny detectors per-op thread synchronisation dominates,
    and on a shared machine two threads made the overfit test ~50x slower than one (379 s vs 8 s measured)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def fashion_root(monkeypatch, tmp_path):
    """Point the Fashion-MNIST folder (CSPNET_FASHION_MNIST's setting) at ``tmp_path / "fm"``, absent until a
    test writes it (`write_idx`): the scenes then fall back to digits."""
    from cspnet.data import classification, detection

    monkeypatch.setattr(classification, "FASHION_MNIST_ROOT", tmp_path / "fm")
    detection.object_images.cache_clear()
    yield tmp_path / "fm"
    detection.object_images.cache_clear()


def write_idx(path: Path, magic: int, array: np.ndarray) -> None:
    """Write ``array`` as a gzipped IDX file (Fashion-MNIST's format) with the given magic number."""
    with gzip.open(path, "wb") as f:
        f.write(np.array([magic, *array.shape], ">u4").tobytes() + array.astype(np.uint8).tobytes())


@pytest.fixture
def benchmark_script():
    """Load ``benchmarks/<name>.py`` as a module (the scripts are not part of the package)."""

    def load(name: str):
        path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(f"{name}_script", path)
        script = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = script  # dataclasses look their module up there
        spec.loader.exec_module(script)
        return script

    return load
