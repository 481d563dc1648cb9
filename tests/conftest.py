"""Shared fixtures. The `backend` fixture runs a test once per available kernel of sample_negatives: a new
backend gets the whole conformance suite (tests/test_sample_negatives.py) by adding one entry to BACKENDS."""

import importlib.util
import os
import sys

import pytest
import torch

# Triton decides on interpreter mode when its kernels are created (fne_fast.kernels is imported lazily, on the
# Triton kernel's first call): without a GPU, run them through the interpreter on CPU tensors.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(__file__))  # tests/inputs.py: the shared oracle and comparisons

from inputs import Backend  # noqa: E402

_HAS_TRITON = importlib.util.find_spec("triton") is not None
_HAS_GPU = torch.cuda.is_available()


def _compiled_cuda_kernel() -> bool:
    from fne_fast import ops

    return ops.COMPILED_CUDA_KERNEL


BACKENDS = [
    pytest.param(Backend("reference", "cpu"), id="reference"),
    pytest.param(Backend("cpu", "cpu"), id="cpu"),
    # Compiled on a GPU; through the interpreter on CPU tensors otherwise.
    pytest.param(Backend("triton", "cuda" if _HAS_GPU else "cpu"), id="triton",
                 marks=pytest.mark.skipif(not _HAS_TRITON, reason="Triton is not installed")),
    pytest.param(Backend("cuda", "cuda"), id="cuda",
                 marks=pytest.mark.skipif(not (_HAS_GPU and _compiled_cuda_kernel()),
                                          reason="needs a GPU and fne_fast built with its CUDA kernel")),
]


@pytest.fixture(params=BACKENDS)
def backend(request) -> Backend:
    return request.param


@pytest.fixture(scope="session", autouse=True)
def _private_feature_cache(tmp_path_factory):
    """Tests (and the runs they start in subprocesses) keep their cache files out of the user's cache."""
    previous = os.environ.get("FNE_FAST_CACHE")
    os.environ["FNE_FAST_CACHE"] = str(tmp_path_factory.mktemp("fne_fast_cache"))
    yield
    if previous is None:
        del os.environ["FNE_FAST_CACHE"]
    else:
        os.environ["FNE_FAST_CACHE"] = previous


@pytest.fixture(autouse=True)
def _restore_threads():
    """Tests may change the intra-op thread count; put it back so the next test sees the default."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
