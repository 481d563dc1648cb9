import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # tests/inputs.py: the shared sample_inputs


@pytest.fixture(autouse=True)
def _restore_threads():
    """Tests may change the intra-op thread count; put it back so the next test sees the default."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
