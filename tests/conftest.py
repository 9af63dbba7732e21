import os

import pytest
import torch

# Under pytest-xdist (`make test` runs two workers on the two cores) each worker computes with one
# thread; a plain `pytest` run uses both cores. More threads than cores makes torch far slower.
_default = "1" if os.environ.get("PYTEST_XDIST_WORKER") else "2"
torch.set_num_threads(int(os.environ.get("CSPNET_TEST_THREADS", _default)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
