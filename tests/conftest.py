import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(autouse=True)
def one_torch_thread():
    """The test models are tiny and the cores shared: one thread avoids start-up costs that dominate
    their run time. A test may ask for more; the next one starts at one again."""
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(1)
