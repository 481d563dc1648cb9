"""fne_fast.sample_negatives on CUDA (csrc/cuda) against the float64 oracle and the CPU kernel.

Skips without a GPU, or when fne_fast was built without its CUDA kernel (FNE_FAST_FORCE_CPU=1, no nvcc, or a CPU
build of torch). FNE_FAST_CUDA_CHUNK_COLS forces small bank chunks so that small inputs cross many chunk and split
boundaries.
"""

from __future__ import annotations

import pytest
import torch

import fne_fast
from fne_fast import reference
from inputs import (assert_same_draws, chi_square_p_value, distribution_inputs, expected_probabilities,
                    pair_p_values, run_oracle, sample_inputs, strided_copy)

MODES = ("fne", "hardest", "uniform")
STEEP = dict(tau=4.0)  # weights far from flat
MAX_K = 64  # the CUDA kernel's limit (csrc/cuda/sample_negatives_cuda.cu)


def _cuda_kernel_built() -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key("fne_fast::sample_negatives", "CUDA")


pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(torch.cuda.is_available() and not _cuda_kernel_built(),
                       reason="fne_fast was built without its CUDA kernel"),
]


def on_device(inputs, device="cuda"):
    return {name: tensor.to(device) for name, tensor in inputs.items()}


def cuda_op(*tensors, **options):
    """The CUDA kernel itself (backend="auto" may pick another GPU backend)."""
    return fne_fast.sample_negatives(*tensors, backend="cuda", **options)


def run_cuda(inputs, **options):
    """The CUDA op on a copy of CPU inputs; results back on the CPU."""
    return tuple(tensor.cpu() for tensor in cuda_op(*on_device(inputs).values(), **options))


def run_cpu(inputs, **options):
    return fne_fast.sample_negatives(*inputs.values(), backend="cpu", **options)


# --- agreement with the oracle and the CPU kernel -------------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("k", [1, 4, MAX_K])
@pytest.mark.parametrize("bank_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_matches_oracle_and_cpu_on_exact_inputs(mode, k, bank_dtype):
    inputs = sample_inputs(37, 1100, 19, exact=True, bank_dtype=bank_dtype, seed=k)
    options = dict(k=k, mode=mode, seed=123456789, step=7, row_offset=5, col_offset=1000, **STEEP)
    result = run_cuda(inputs, **options)
    assert_same_draws(result, run_oracle(inputs, **options))
    assert_same_draws(result, run_cpu(inputs, **options))


@pytest.mark.parametrize("options", [dict(cutdown=False), dict(fn_margin=0.0), dict(fn_margin=1.0), dict(tau=0.0),
                                     dict(margin=-0.5), dict(prior_k=1.5, tau=3.0), dict(min_count=10**6)],
                         ids=lambda options: ",".join(f"{key}={value}" for key, value in options.items()))
def test_weight_parameters_match_oracle_and_cpu(options):
    # The weight parameters are folded on the device from `stats` (double precision there, as on the CPU).
    inputs = sample_inputs(30, 2000, 16, exact=True, seed=20)
    result = run_cuda(inputs, k=3, **options)
    assert_same_draws(result, run_oracle(inputs, k=3, **options))
    assert_same_draws(result, run_cpu(inputs, k=3, **options))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_anchors_with_matching_bank(dtype):
    # The bf16/fp16 GEMM with a float32 output: exact inputs make its accumulation exact too.
    inputs = sample_inputs(9, 3000, 40, exact=True, bank_dtype=dtype, anchor_dtype=dtype)
    for mode in MODES:
        assert_same_draws(run_cuda(inputs, k=3, mode=mode), run_oracle(inputs, k=3, mode=mode))


@pytest.mark.parametrize("mode", MODES)
def test_float32_rows_match_oracle_up_to_near_ties(mode):
    inputs = sample_inputs(1000, 1500, 48, seed=3)
    options = dict(k=2, mode=mode, seed=99, **STEEP)
    index, sim, valid = run_cuda(inputs, **options)
    ref_index, _, ref_valid = run_oracle(inputs, **options)
    differ = (index != ref_index).any(dim=1) | (valid != ref_valid).any(dim=1)
    assert differ.float().mean() <= 1e-3
    keys, _, _, full_sim = reference.candidate_keys(*inputs.values(), mode=mode, seed=99, **STEEP)
    # The reported similarity is the float32 GEMM's value of the reported column.
    assert valid.all()
    torch.testing.assert_close(sim.double(), torch.gather(full_sim, 1, index), rtol=0, atol=1e-5)
    if differ.any():
        # Disagreements must be near-ties of the float64 keys (float32 keys agree to well within 1e-4).
        rows = differ.nonzero().flatten()
        ours = torch.gather(keys[rows], 1, index[rows].clamp(min=0))
        theirs = torch.gather(keys[rows], 1, ref_index[rows].clamp(min=0))
        assert (ours - theirs).abs().max() < 1e-4


def test_column_offsets_beyond_32_bits_use_the_high_counter_word():
    inputs = sample_inputs(16, 700, 12, exact=True, seed=21)
    for col_offset in (2**32 - 300, 2**40 + 3):  # one crosses 2³² inside the bank, one starts above it
        options = dict(k=3, col_offset=col_offset, seed=-5, step=2**32 - 1, row_offset=2**32 - 16, **STEEP)
        index, sim, valid = run_cuda(inputs, **options)
        assert_same_draws((index, sim, valid), run_oracle(inputs, **dict(options, seed=(1 << 64) - 5)))
        assert (index[valid] >= col_offset).all()


# --- invariance: chunks, splits, streams, devices -------------------------------------------------------------

@pytest.mark.parametrize("chunk_cols", [1, 7, 1000, 1024, 1025, 100000])
@pytest.mark.parametrize("num_rows", [1, 3, 64])
def test_chunk_and_split_sizes_do_not_change_draws(monkeypatch, chunk_cols, num_rows):
    inputs = sample_inputs(num_rows, 5000, 24, exact=True, seed=4, num_ids=300)
    options = dict(k=5, **STEEP)
    expected = run_oracle(inputs, **options)
    monkeypatch.setenv("FNE_FAST_CUDA_CHUNK_COLS", str(chunk_cols))
    assert_same_draws(run_cuda(inputs, **options), expected)
    assert_same_draws(run_cuda(inputs, mode="hardest", k=5), run_oracle(inputs, mode="hardest", k=5))


def test_low_precision_bank_with_float32_anchors_over_many_chunks(monkeypatch):
    # float32 anchors with a bf16 bank convert each chunk to float32; small chunks reuse that buffer.
    monkeypatch.setenv("FNE_FAST_CUDA_CHUNK_COLS", "333")
    inputs = sample_inputs(20, 2000, 33, exact=True, bank_dtype=torch.bfloat16, seed=8)
    assert_same_draws(run_cuda(inputs, k=4, **STEEP), run_oracle(inputs, k=4, **STEEP))


def test_runs_on_the_current_stream():
    inputs = on_device(sample_inputs(40, 3000, 32, exact=True, seed=14))
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
    inputs = on_device(sample_inputs(24, 2500, 16, exact=True, seed=15))
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
    inputs = sample_inputs(10, 900, 8, exact=True, seed=16)
    with torch.cuda.device(0):
        result = cuda_op(*on_device(inputs, "cuda:1").values(), k=2)
    assert all(tensor.device == torch.device("cuda:1") for tensor in result)
    assert_same_draws(tuple(tensor.cpu() for tensor in result), run_oracle(inputs, k=2))


# --- distribution ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode,tau", [("fne", 6.0), ("uniform", 0.0)])
def test_sampled_frequencies_follow_the_weights(mode, tau):
    inputs = distribution_inputs()
    probabilities = expected_probabilities(inputs, tau, mode=mode)
    index, _, valid = run_cuda(inputs, mode=mode, tau=tau, seed=31)
    assert valid.all()
    counts = torch.bincount(index[:, 0], minlength=probabilities.numel())
    assert chi_square_p_value(counts, probabilities) > 1e-3
    if mode == "fne":  # the same test rejects a wrong weighting
        assert chi_square_p_value(counts, expected_probabilities(inputs, tau / 2)) < 1e-6


def test_second_slot_is_sampling_without_replacement():
    inputs = distribution_inputs(sims=(0.0625, 0.125, 0.25, 0.375, 0.875, 1.0), copies=40000)
    tau = 6.0
    index, _, valid = run_cuda(inputs, k=2, tau=tau, seed=8)
    assert valid.all()
    without_replacement, independent = pair_p_values(index, expected_probabilities(inputs, tau))
    assert without_replacement > 1e-3
    assert independent < 1e-6  # sampling with replacement must be rejected


def test_empty_anchor_batch():
    index, sim, valid = run_cuda(sample_inputs(0, 50, 8), k=2)
    assert index.shape == sim.shape == valid.shape == (0, 2)


@pytest.mark.parametrize("filled", [0, 1, 333, 1000])
def test_partly_filled_bank(filled):
    inputs = sample_inputs(17, 1000, 12, exact=True, seed=2)
    inputs["bank"][filled:] = float("nan")  # rows >= filled are never read (check_finite stays quiet)
    index, sim, valid = run_cuda(inputs, k=2, filled=filled)
    assert (index < filled).all()
    inputs["bank"][filled:] = 0
    assert_same_draws((index, sim, valid), run_oracle(inputs, k=2, filled=filled))


def test_all_candidates_positive():
    inputs = sample_inputs(4, 50, 8, exact=True)
    inputs["bank_ids"][:] = 3
    inputs["anchor_ids"][:] = 3
    index, sim, valid = run_cuda(inputs, k=2)
    assert (index == -1).all() and not valid.any() and (sim == 0).all()


@pytest.mark.parametrize("mode", MODES)
def test_more_slots_than_survivors_falls_back_to_hardest(mode):
    inputs = sample_inputs(12, 40, 8, exact=True, seed=9, num_ids=5)
    index, sim, valid = run_cuda(inputs, k=45, mode=mode)  # k > N: every row runs out
    assert_same_draws((index, sim, valid), run_oracle(inputs, k=45, mode=mode))
    for row in range(12):
        chosen = index[row][valid[row]]
        assert len(set(chosen.tolist())) == len(chosen)
        assert valid[row].sum() == (inputs["bank_ids"] != inputs["anchor_ids"][row]).sum()


def test_everything_cut_down_takes_the_hardest_negative():
    inputs = sample_inputs(8, 200, 8, exact=True)
    inputs["stats"][0] = 100.0  # cut-down threshold above every similarity
    assert_same_draws(run_cuda(inputs, k=3), run_oracle(inputs, k=3))


@pytest.mark.parametrize("dim", [0, 1, 3, 129])
def test_odd_embedding_dimensions(dim):
    inputs = sample_inputs(11, 1500, dim, exact=True, seed=17, num_ids=100)
    for bank_dtype in (torch.float32, torch.bfloat16):
        case = dict(inputs, bank=inputs["bank"].to(bank_dtype))
        assert_same_draws(run_cuda(case, k=4, **STEEP), run_oracle(case, k=4, **STEEP))


def test_single_anchor_and_repeated_ids():
    inputs = sample_inputs(1, 5000, 5, exact=True, num_ids=2)
    assert_same_draws(run_cuda(inputs, k=5, **STEEP), run_oracle(inputs, k=5, **STEEP))


@pytest.mark.parametrize("bank_dtype", [torch.float32, torch.bfloat16])
def test_non_contiguous_inputs_match_contiguous(bank_dtype):
    inputs = on_device(sample_inputs(20, 600, 16, exact=True, seed=12, bank_dtype=bank_dtype))
    strided = strided_copy(inputs)
    assert not strided["bank"].is_contiguous() and not strided["anchors"].is_contiguous()
    expected = cuda_op(*inputs.values(), k=3)
    for actual, wanted in zip(cuda_op(*strided.values(), k=3), expected):
        assert torch.equal(actual, wanted)


def test_bayesian_branch_switches_on_above_min_count():
    inputs = sample_inputs(64, 800, 16, exact=True, seed=13)
    below = dict(inputs, stats=inputs["stats"].clone())
    below["stats"][4] = 200.0  # n⁺ must exceed min_count
    assert_same_draws(run_cuda(below, **STEEP), run_oracle(below, **STEEP))
    assert_same_draws(run_cuda(inputs, **STEEP), run_oracle(inputs, **STEEP))


def test_k_above_the_cuda_limit_is_a_clear_error():
    inputs = on_device(sample_inputs(3, 100, 8))
    with pytest.raises(ValueError, match="k must be <= 64"):
        cuda_op(*inputs.values(), k=MAX_K + 1)


@pytest.mark.parametrize("name", ["anchors", "bank", "positive_sim", "stats"])
def test_check_finite_names_the_input(name):
    inputs = sample_inputs(6, 300, 8, exact=True)
    inputs[name] = inputs[name].clone()
    inputs[name].view(-1)[0] = float("nan")
    with pytest.raises(ValueError, match=name):
        run_cuda(inputs)


def test_non_finite_similarities_are_never_chosen_without_check_finite():
    inputs = sample_inputs(6, 300, 8, exact=True, seed=18)
    inputs["bank"][::2] = float("inf")
    inputs["bank"][1::4] = float("nan")
    index, _, valid = run_cuda(inputs, k=8, check_finite=False)
    assert ((index[valid] % 4) == 3).all()


def test_opcheck_on_cuda():
    inputs = on_device(sample_inputs(6, 80, 8, exact=True))
    args = (*inputs.values(), 2, "fne", 0.2, 0.5, 10000.0, 0.999, 200, True, 3, 1, 0, 0, 80, False)
    torch.library.opcheck(torch.ops.fne_fast.sample_negatives.default, args)


# --- large N: int64 column indices ----------------------------------------------------------------------------

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

