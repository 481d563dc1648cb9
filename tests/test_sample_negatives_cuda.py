"""What only the compiled CUDA kernel has: bank chunks and column splits (FNE_FAST_CUDA_CHUNK_COLS forces small
chunks, so small inputs cross many chunk and split boundaries), streams, CUDA graphs, devices, its k limit and
int64 columns. The behaviour tests are in test_sample_negatives.py.

Skips without a GPU, or when fne_fast was built without its CUDA kernel (FNE_FAST_FORCE_CPU=1, no nvcc, or a CPU
build of torch): ``ops.COMPILED_CUDA_KERNEL`` tells, where the CUDA dispatch key alone would not (the Triton
kernel may serve it).
"""

from __future__ import annotations

import pytest
import torch

import fne_fast
from fne_fast import ops
from fne_fast.ops.testing import sample_inputs
from inputs import STEEP, assert_same_draws, run_oracle

MAX_K = 64  # the CUDA kernel's limit (kMaxK in csrc/cuda/ranked_lists.cuh)

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(not ops.COMPILED_CUDA_KERNEL, reason="fne_fast was built without its CUDA kernel"),
]


def on_device(inputs, device="cuda"):
    return {name: tensor.to(device) for name, tensor in inputs.items()}


def cuda_op(*tensors, **options):
    return fne_fast.sample_negatives(*tensors, backend="cuda", **options)


def run_cuda(inputs, **options):
    """The CUDA op on a copy of CPU inputs; results back on the CPU."""
    return tuple(tensor.cpu() for tensor in cuda_op(*on_device(inputs).values(), **options))


@pytest.mark.parametrize("chunk_cols", [1, 7, 1000, 1024, 1025, 100000])
@pytest.mark.parametrize("num_rows", [1, 3, 64])
def test_chunk_and_split_sizes_do_not_change_draws(monkeypatch, chunk_cols, num_rows):
    inputs = sample_inputs(num_rows, 5000, 24, kind="exact", seed=4, num_ids=300)
    expected = run_oracle(inputs, k=5, **STEEP)
    expected_hardest = run_oracle(inputs, mode="hardest", k=5)
    monkeypatch.setenv("FNE_FAST_CUDA_CHUNK_COLS", str(chunk_cols))
    assert_same_draws(run_cuda(inputs, k=5, **STEEP), expected)
    assert_same_draws(run_cuda(inputs, mode="hardest", k=5), expected_hardest)


def test_low_precision_bank_with_float32_anchors_over_many_chunks(monkeypatch):
    # float32 anchors with a bf16 bank convert each chunk to float32; small chunks reuse that buffer.
    monkeypatch.setenv("FNE_FAST_CUDA_CHUNK_COLS", "333")
    inputs = sample_inputs(20, 2000, 33, kind="exact", bank_dtype=torch.bfloat16, seed=8)
    assert_same_draws(run_cuda(inputs, k=4, **STEEP), run_oracle(inputs, k=4, **STEEP))


def test_k_above_the_cuda_limit_is_a_clear_error():
    with pytest.raises(ValueError, match="k must be <= 64"):
        cuda_op(*on_device(sample_inputs(3, 100, 8)).values(), k=MAX_K + 1)


def test_k_at_the_cuda_limit():
    inputs = sample_inputs(37, 1100, 19, kind="exact", seed=3)
    assert_same_draws(run_cuda(inputs, k=MAX_K, **STEEP), run_oracle(inputs, k=MAX_K, **STEEP))


def test_runs_on_the_current_stream():
    inputs = on_device(sample_inputs(40, 3000, 32, kind="exact", seed=14))
    expected = cuda_op(*inputs.values(), k=3)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        result = cuda_op(*inputs.values(), k=3, check_finite=False)
    torch.cuda.current_stream().wait_stream(stream)
    for actual, wanted in zip(result, expected):
        assert torch.equal(actual, wanted)


def test_no_host_synchronisation_without_check_finite():
    # A CUDA graph capture fails on any synchronising call; the captured op must replay to the eager result.
    inputs = on_device(sample_inputs(24, 2500, 16, kind="exact", seed=15))
    eager = cuda_op(*inputs.values(), k=2, check_finite=False)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside the capture (cuBLAS handles and workspaces)
        cuda_op(*inputs.values(), k=2, check_finite=False)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = cuda_op(*inputs.values(), k=2, check_finite=False)
    graph.replay()
    torch.cuda.synchronize()
    for actual, wanted in zip(captured, eager):
        assert torch.equal(actual, wanted)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_runs_on_the_inputs_device():
    inputs = sample_inputs(10, 900, 8, kind="exact", seed=16)
    with torch.cuda.device(0):
        result = cuda_op(*on_device(inputs, "cuda:1").values(), k=2)
    assert all(tensor.device == torch.device("cuda:1") for tensor in result)
    assert_same_draws(tuple(tensor.cpu() for tensor in result), run_oracle(inputs, k=2))


def test_more_than_two_to_the_31_columns():
    # 2³¹ + 4096 bank rows of dimension 1 (fp16, 4 GiB) with int64 ids (16 GiB): the planted hardest negatives
    # sit beyond 2³¹, so any 32-bit column arithmetic would lose them.
    num_cols = 2**31 + 4096
    free, _ = torch.cuda.mem_get_info()
    if free < 32 * 2**30:
        pytest.skip("needs 32 GiB of free GPU memory")
    bank = torch.zeros(num_cols, 1, dtype=torch.float16, device="cuda")
    planted = torch.tensor([2**31 + 17, 2**31 + 4000, 5], device="cuda")
    bank[planted, 0] = torch.tensor([0.5, 0.75, 0.25], dtype=torch.float16, device="cuda")
    bank_ids = torch.zeros(num_cols, dtype=torch.int64, device="cuda")
    anchors = torch.ones(2, 1, dtype=torch.float16, device="cuda")
    args = (anchors, bank, torch.zeros(2, device="cuda"), torch.ones(2, dtype=torch.int64, device="cuda"), bank_ids,
            torch.tensor([0.3, 0.04, 0.0, 0.04, 500.0], device="cuda"))
    index, sim, valid = cuda_op(*args, k=3, mode="hardest", col_offset=2**40)
    expected = torch.tensor([2**31 + 4000, 2**31 + 17, 5], device="cuda") + 2**40
    assert valid.all()
    assert torch.equal(index, expected.expand(2, 3))
    torch.testing.assert_close(sim, torch.tensor([[0.75, 0.5, 0.25]] * 2, device="cuda"))
    # The Gumbel race over the same bank: every chosen column must be a real one.
    index, _, valid = cuda_op(*args, k=4, mode="uniform", cutdown=False, check_finite=False)
    assert valid.all() and (index >= 0).all() and (index < num_cols).all()
    del bank, bank_ids
    torch.cuda.empty_cache()
