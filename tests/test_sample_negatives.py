"""fne_fast.sample_negatives (the C++ CPU kernel) against the float64 oracle fne_fast.reference."""

from __future__ import annotations

import math
import os

import pytest
import torch

import fne_fast
from fne_fast import reference
from inputs import (assert_same_draws, chi_square_p_value, distribution_inputs, expected_probabilities,
                    pair_p_values, run_oracle, sample_inputs, strided_copy)

MODES = ("fne", "hardest", "uniform")
# A tau large enough that the weights are far from flat (0.5 gives nearly uniform weights).
STEEP = dict(tau=4.0)


def run_op(inputs, **options):
    return fne_fast.sample_negatives(*inputs.values(), **options)


def test_philox_known_answer_vectors():
    # Random123's known-answer vectors for Philox4x32-10 (DESIGN.md §2).
    vectors = [
        ((0, 0), (0, 0, 0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 2, (0xFFFFFFFF,) * 4, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        ((0xA4093822, 0x299F31D0), (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
         (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
    ]
    for key, counter, expected in vectors:
        assert tuple(int(word) for word in reference.philox4x32_10(counter, key)) == expected


def test_gumbel_float32_keeps_the_far_tail():
    # x = 0 is v = 2⁻³³: G ≈ 22.87, where a float32 -log(-log u) would cap near 16.6 (DESIGN.md §2).
    words = torch.tensor([0, 1, 2**20, 2**31 - 1, 2**31, 2**32 - 2, 2**32 - 1])
    in_float32 = reference.gumbel_from_bits(words, torch.float32).double()
    in_float64 = reference.gumbel_from_bits(words, torch.float64)
    torch.testing.assert_close(in_float32, in_float64, rtol=1e-6, atol=1e-6)
    assert in_float32[0] > 22.8
    v = (words.double() + 0.5) * 2.0**-32
    torch.testing.assert_close(in_float64, -torch.log(-torch.log1p(-v)), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize("bank_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_matches_oracle_on_exact_inputs(mode, k, bank_dtype):
    inputs = sample_inputs(37, 1100, 19, exact=True, bank_dtype=bank_dtype, seed=k)
    options = dict(k=k, mode=mode, seed=123456789, step=7, row_offset=5, col_offset=1000, **STEEP)
    assert_same_draws(run_op(inputs, **options), run_oracle(inputs, **options))


def test_low_precision_anchors_with_matching_bank():
    inputs = sample_inputs(9, 300, 8, exact=True, bank_dtype=torch.bfloat16, anchor_dtype=torch.bfloat16)
    assert_same_draws(run_op(inputs, k=2), run_oracle(inputs, k=2))


@pytest.mark.parametrize("mode", MODES)
def test_float32_rows_match_oracle_up_to_near_ties(mode):
    inputs = sample_inputs(1000, 1500, 48, seed=3)
    options = dict(k=2, mode=mode, seed=99, **STEEP)
    index, _, valid = run_op(inputs, **options)
    ref_index, _, ref_valid = run_oracle(inputs, **options)
    differ = (index != ref_index).any(dim=1) | (valid != ref_valid).any(dim=1)
    assert differ.float().mean() <= 1e-3
    if differ.any():
        # Every disagreement must be a near-tie of the float64 keys: float32 similarities, weights and Gumbel
        # noise are each within ~1e-6 of float64, so keys agree to well within 1e-4.
        keys, _, _, _ = reference.candidate_keys(*inputs.values(), mode=mode, seed=99, **STEEP)
        rows = differ.nonzero().flatten()
        ours = torch.gather(keys[rows], 1, index[rows].clamp(min=0))
        theirs = torch.gather(keys[rows], 1, ref_index[rows].clamp(min=0))
        assert (ours - theirs).abs().max() < 1e-4


def test_seed_is_taken_modulo_two_to_the_64():
    inputs = sample_inputs(16, 400, 8, exact=True)
    assert_same_draws(run_op(inputs, seed=-1), run_oracle(inputs, seed=(1 << 64) - 1))
    assert_same_draws(run_op(inputs, seed=(1 << 64) + 5), run_op(inputs, seed=5))


def test_different_seeds_and_steps_give_different_draws():
    inputs = sample_inputs(64, 2000, 16, exact=True)
    base = run_op(inputs, mode="uniform", cutdown=False)[0]
    assert not torch.equal(base, run_op(inputs, mode="uniform", cutdown=False, seed=1)[0])
    assert not torch.equal(base, run_op(inputs, mode="uniform", cutdown=False, step=1)[0])


# --- invariance: tiling, threads, shards ---------------------------------------------------------------------

@pytest.mark.parametrize("tile_rows,tile_cols", [(1, 1), (7, 33), (128, 512), (1000, 5000)])
@pytest.mark.parametrize("threads", [1, 2])
def test_tiling_and_threads_do_not_change_draws(monkeypatch, tile_rows, tile_cols, threads):
    exact = sample_inputs(29, 1300, 24, exact=True, seed=4)
    # In mode "uniform" without cut-down the draws depend on the random stream only, so even similarities that
    # round differently under another blocking cannot change them.
    stream_only = sample_inputs(29, 1300, 24, seed=5)
    expected_exact = run_op(exact, k=3, **STEEP)
    expected_stream = run_op(stream_only, k=3, mode="uniform", cutdown=False)
    monkeypatch.setenv("FNE_FAST_CPU_TILE_ROWS", str(tile_rows))
    monkeypatch.setenv("FNE_FAST_CPU_TILE_COLS", str(tile_cols))
    torch.set_num_threads(threads)
    assert_same_draws(run_op(exact, k=3, **STEEP), expected_exact)
    assert_same_draws(run_op(stream_only, k=3, mode="uniform", cutdown=False), expected_stream)


def test_portable_philox_path_gives_the_same_draws(tmp_path):
    # The kernel picks its AVX-512 Philox loop once per process; a fresh process with FNE_FAST_CPU_PORTABLE=1
    # runs the portable loop on the same inputs, including columns whose global index crosses 2³².
    import subprocess
    import sys

    inputs = sample_inputs(9, 700, 8, exact=True, seed=21)
    options = dict(k=3, col_offset=2**32 - 350, **STEEP)
    torch.save(inputs, tmp_path / "inputs.pt")
    script = ("import sys, torch, fne_fast; inputs = torch.load(sys.argv[1]); "
              f"torch.save(fne_fast.sample_negatives(*inputs.values(), **{options!r}), sys.argv[2])")
    env = dict(os.environ, FNE_FAST_CPU_PORTABLE="1")
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "inputs.pt"), str(tmp_path / "out.pt")],
                   env=env, check=True)
    assert_same_draws(torch.load(tmp_path / "out.pt"), run_op(inputs, **options))
    assert_same_draws(run_op(inputs, **options), run_oracle(inputs, **options))


def merge_shards(inputs, shard_results, k, **options):
    """Exact merge of per-shard top-k lists, ranking race winners by their (float64 oracle) keys."""
    keys, survives, _, sim = reference.candidate_keys(*inputs.values(), **options)
    rows = torch.arange(keys.shape[0]).reshape(-1, 1)
    index = torch.cat([result[0] for result in shard_results], dim=1)
    valid = torch.cat([result[2] for result in shard_results], dim=1)
    column = index.clamp(min=0)
    in_race = valid & survives[rows, column]
    merged = []
    for row in range(index.shape[0]):
        race = sorted({(-keys[row, c].item(), c.item()) for c in column[row][in_race[row]]})[:k]
        chosen = [c for _, c in race]
        fill = sorted({(-sim[row, c].item(), c.item()) for c in column[row][valid[row] & ~in_race[row]]})
        chosen += [c for _, c in fill if c not in chosen][:k - len(chosen)]
        merged.append(chosen + [-1] * (k - len(chosen)))
    return torch.tensor(merged, dtype=torch.int64)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("k", [1, 3])
def test_shards_with_column_offsets_merge_to_one_call(mode, k):
    inputs = sample_inputs(23, 900, 16, exact=True, seed=6, num_ids=12)
    options = dict(mode=mode, seed=2024, step=3, **STEEP)
    whole = run_op(inputs, k=k, **options)
    bounds = [0, 250, 251, 640, 900]  # uneven shards, one of a single row
    shards = []
    for begin, end in zip(bounds[:-1], bounds[1:]):
        shard = dict(inputs, bank=inputs["bank"][begin:end], bank_ids=inputs["bank_ids"][begin:end])
        shards.append(run_op(shard, k=k, col_offset=begin, **options))
    assert torch.equal(merge_shards(inputs, shards, k, **options), whole[0])


# --- distribution ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("tile_cols", ["1", "512"])
def test_sampled_frequencies_follow_the_weights(monkeypatch, tile_cols):
    monkeypatch.setenv("FNE_FAST_CPU_TILE_COLS", tile_cols)
    inputs = distribution_inputs()
    tau = 6.0
    probabilities = expected_probabilities(inputs, tau)
    assert probabilities.max() / probabilities[probabilities > 0].min() > 3  # far from flat
    index, _, valid = run_op(inputs, tau=tau, seed=31)
    assert valid.all()
    counts = torch.bincount(index[:, 0], minlength=probabilities.numel())
    assert chi_square_p_value(counts, probabilities) > 1e-3
    # The same test rejects a deliberately wrong weighting (here: the weights of tau / 2).
    assert chi_square_p_value(counts, expected_probabilities(inputs, tau / 2)) < 1e-6


def test_second_slot_is_sampling_without_replacement():
    inputs = distribution_inputs(sims=(0.0625, 0.125, 0.25, 0.375, 0.875, 1.0), copies=40000)
    tau = 6.0
    index, _, valid = run_op(inputs, k=2, tau=tau, seed=8)
    assert valid.all()
    without_replacement, independent = pair_p_values(index, expected_probabilities(inputs, tau))
    assert without_replacement > 1e-3
    assert independent < 1e-6  # sampling with replacement must be rejected


def test_uniform_mode_is_uniform_over_survivors():
    inputs = distribution_inputs()
    probabilities = expected_probabilities(inputs, 0.0, mode="uniform")
    index, _, _ = run_op(inputs, mode="uniform", seed=5)
    counts = torch.bincount(index[:, 0], minlength=probabilities.numel())
    assert chi_square_p_value(counts, probabilities) > 1e-3


# --- edge cases -----------------------------------------------------------------------------------------------

def test_empty_bank_gives_invalid_slots():
    inputs = sample_inputs(5, 0, 8)
    index, sim, valid = run_op(inputs, k=3)
    assert index.shape == (5, 3) and (index == -1).all() and not valid.any() and (sim == 0).all()
    assert_same_draws((index, sim, valid), run_oracle(inputs, k=3))


def test_empty_anchor_batch():
    index, sim, valid = run_op(sample_inputs(0, 50, 8), k=2)
    assert index.shape == sim.shape == valid.shape == (0, 2)


@pytest.mark.parametrize("filled", [0, 1, 333, 1000])
def test_partly_filled_bank(filled):
    inputs = sample_inputs(17, 1000, 12, exact=True, seed=2)
    inputs["bank"][filled:] = float("nan")  # rows >= filled are never read
    index, sim, valid = run_op(inputs, k=2, filled=filled)
    assert (index < filled).all()
    inputs["bank"][filled:] = 0
    assert_same_draws((index, sim, valid), run_oracle(inputs, k=2, filled=filled))


def test_all_candidates_positive():
    inputs = sample_inputs(4, 50, 8, exact=True)
    inputs["bank_ids"][:] = 3
    inputs["anchor_ids"][:] = 3
    index, _, valid = run_op(inputs, k=2)
    assert (index == -1).all() and not valid.any()


@pytest.mark.parametrize("mode", MODES)
def test_more_slots_than_survivors_falls_back_to_hardest(mode):
    inputs = sample_inputs(12, 40, 8, exact=True, seed=9, num_ids=5)
    index, sim, valid = run_op(inputs, k=45, mode=mode)  # k > N: every row runs out
    assert_same_draws((index, sim, valid), run_oracle(inputs, k=45, mode=mode))
    for row in range(12):
        chosen = index[row][valid[row]]
        assert len(set(chosen.tolist())) == len(chosen)  # distinct
        assert valid[row].sum() == (inputs["bank_ids"] != inputs["anchor_ids"][row]).sum()


def test_everything_cut_down_takes_the_hardest_negative():
    inputs = sample_inputs(8, 200, 8, exact=True)
    inputs["stats"][0] = 100.0  # cut-down threshold above every similarity
    index, sim, valid = run_op(inputs)
    _, _, _, full_sim = reference.candidate_keys(*inputs.values(), mode="hardest")
    hardest = torch.where(inputs["bank_ids"] != inputs["anchor_ids"].reshape(-1, 1), full_sim, -math.inf)
    assert valid.all()
    torch.testing.assert_close(sim[:, 0].double(), hardest.max(dim=1).values)


def test_single_anchor_and_repeated_ids():
    inputs = sample_inputs(1, 500, 5, exact=True, num_ids=2)
    assert_same_draws(run_op(inputs, k=5, **STEEP), run_oracle(inputs, k=5, **STEEP))


def test_non_contiguous_inputs_match_contiguous():
    inputs = sample_inputs(20, 600, 16, exact=True, seed=12)
    strided = strided_copy(inputs)
    assert not strided["bank"].is_contiguous()
    assert_same_draws(run_op(strided, k=3), run_op(inputs, k=3))


def test_bayesian_branch_switches_on_above_min_count():
    inputs = sample_inputs(64, 800, 16, exact=True, seed=13)
    below = dict(inputs, stats=inputs["stats"].clone())
    below["stats"][4] = 200.0  # n⁺ must exceed min_count
    assert_same_draws(run_op(below, **STEEP), run_oracle(below, **STEEP))
    assert not torch.equal(run_op(below, **STEEP)[0], run_op(inputs, **STEEP)[0])


def test_torch_compile_and_opcheck():
    inputs = sample_inputs(6, 80, 8, exact=True)
    args = (*inputs.values(), 2, "fne", 0.2, 0.5, 10000.0, 0.999, 200, True, 3, 1, 0, 0, 80, True)
    torch.library.opcheck(torch.ops.fne_fast.sample_negatives.default, args)

    @torch.compile(backend="eager", fullgraph=True)
    def compiled(*tensors):
        return fne_fast.sample_negatives(*tensors, k=2, seed=3, step=1)

    assert_same_draws(compiled(*inputs.values()), run_op(inputs, k=2, seed=3, step=1))
