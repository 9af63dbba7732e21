import os

import pytest
import torch

# Two cores: keep intra-op threads at the machine's size, and make CPU runs deterministic.
torch.set_num_threads(int(os.environ.get("CSPNET_TEST_THREADS", "2")))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
