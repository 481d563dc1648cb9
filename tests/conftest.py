import os
import sys

import pytest
import torch

# Triton picks interpreter mode when it is imported (which `import fne_fast` does): without a GPU, run its
# kernels through the interpreter on CPU tensors.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(__file__))  # tests/inputs.py: the shared sample_inputs


@pytest.fixture(autouse=True)
def _restore_threads():
    """Tests may change the intra-op thread count; put it back so the next test sees the default."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
