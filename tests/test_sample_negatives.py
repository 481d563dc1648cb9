"""The conformance suite of fne_fast.sample_negatives: every behaviour, once, against every available backend
(the `backend` fixture of conftest.py: reference, cpu, triton — through its interpreter without a GPU — and
cuda), with the float64 oracle fne_fast.ops.reference as the expected result and errors that name the argument.

Backend-specific tests live beside it: test_sample_negatives_cpu.py (tiles, threads, the Philox loops),
test_sample_negatives_cuda.py (chunks, streams, CUDA graphs, int64 columns), test_sample_negatives_triton.py
(building blocks, tile configs, code generation).
"""

from __future__ import annotations

import math

import pytest
import torch

import fne_fast
from fne_fast.ops import SamplerOptions, reference
from fne_fast.ops.testing import sample_inputs
from inputs import (MODES, STEEP, assert_matches_oracle, assert_same_draws, chi_square_p_value,
                    distribution_inputs, expected_probabilities, keeping, pair_p_values, run_oracle, strided_copy)

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check(backend, inputs, **options):
    """Runs the backend and compares it with the oracle; returns the backend's result."""
    result = backend.run(inputs, **options)
    assert_matches_oracle(backend, result, inputs, **options)
    return result


# --- draws against the oracle ---------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize("bank_dtype", DTYPES)
def test_matches_oracle_on_exact_inputs(backend, mode, k, bank_dtype):
    inputs = backend.inputs(37, 1100, 19, kind="exact", bank_dtype=bank_dtype, seed=k)
    check(backend, inputs, k=k, mode=mode, seed=123456789, step=7, row_offset=5, col_offset=1000, **STEEP)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", MODES)
def test_low_precision_anchors_with_matching_bank(backend, dtype, mode):
    inputs = backend.inputs(9, 600, 40, kind="exact", bank_dtype=dtype, anchor_dtype=dtype)
    check(backend, inputs, k=3, mode=mode)


@pytest.mark.parametrize("mode", MODES)
def test_float32_rows_match_oracle_up_to_near_ties(backend, mode):
    # Random float32 inputs: similarities round differently from float64, so a few rows may pick another
    # candidate, and each such pick must be a near-tie of the float64 keys.
    num_rows = 256 if backend.interpreted else 1000
    inputs = backend.inputs(num_rows, 1500, 48, seed=3)
    options = dict(k=2, mode=mode, seed=99, **STEEP)
    result = backend.run(inputs, **options)
    assert_matches_oracle(backend, result, inputs, max_differ=1e-3, **options)
    # The reported similarity is the float32 similarity of the reported column.
    _, _, _, full_sim = reference.candidate_keys(*inputs.values(), SamplerOptions(mode="hardest"))
    torch.testing.assert_close(result[1].double(), torch.gather(full_sim, 1, result[0]), rtol=0, atol=1e-5)


@pytest.mark.parametrize("options", [dict(cutdown=False), dict(fn_margin=0.0), dict(fn_margin=1.0), dict(tau=0.0),
                                     dict(margin=-0.5), dict(prior_k=1.5, tau=3.0), dict(min_count=10**6),
                                     dict(fn_tau=0.0), dict(fn_tau=7.5), dict(fn_tau=math.inf),
                                     dict(fn_tau=math.inf, fn_margin=1.0), dict(fn_tau=math.inf, prior_k=2.0)],
                         ids=lambda options: ",".join(f"{key}={value}" for key, value in options.items()))
def test_weight_parameters(backend, options):
    inputs = backend.inputs(30, 2000, 16, kind="exact", seed=20)
    check(backend, inputs, k=3, **options)


def test_bayesian_branch_switches_on_above_min_count(backend):
    inputs = backend.inputs(64, 800, 16, kind="exact", seed=13)
    below = dict(inputs, stats=inputs["stats"].clone())
    below["stats"][4] = 200.0  # n⁺ must exceed min_count
    below_result = check(backend, below, **STEEP)
    assert not torch.equal(below_result[0], check(backend, inputs, **STEEP)[0])


def test_similarity_equal_to_the_cut_down_threshold_is_cut(backend):
    # μ⁺ - margin = 0.5 - 0.25 is exact, and exact inputs hit s = 0.25 often: "s <= threshold" is cut down.
    inputs = backend.inputs(24, 300, 4, kind="exact", seed=8)
    inputs["stats"][0] = 0.5
    sims = inputs["anchors"].cpu().double() @ inputs["bank"].cpu().double().T
    assert (sims == 0.25).sum() > 50
    check(backend, inputs, k=4, mode="uniform", margin=0.25, seed=6)


def test_seed_is_taken_modulo_two_to_the_64(backend):
    inputs = backend.inputs(16, 400, 8, kind="exact")
    assert_same_draws(backend.run(inputs, seed=-1), run_oracle(inputs, seed=(1 << 64) - 1))
    assert_same_draws(backend.run(inputs, seed=(1 << 64) + 5), backend.run(inputs, seed=5))


def test_different_seeds_and_steps_give_different_draws(backend):
    inputs = backend.inputs(64, 2000, 16, kind="exact")
    base = backend.run(inputs, mode="uniform", cutdown=False)[0]
    assert not torch.equal(base, backend.run(inputs, mode="uniform", cutdown=False, seed=1)[0])
    assert not torch.equal(base, backend.run(inputs, mode="uniform", cutdown=False, step=1)[0])


def test_counters_beyond_32_bits(backend):
    # Global columns that cross 2³² inside the bank, or start above it, use the high word of the Philox counter;
    # rows and steps at the top of their 32-bit range.
    inputs = backend.inputs(16, 700, 12, kind="exact", seed=21)
    for col_offset in (2**32 - 300, 2**40 + 3):
        options = dict(k=3, col_offset=col_offset, step=2**32 - 1, row_offset=2**32 - 16, **STEEP)
        index, _, valid, _ = check(backend, inputs, seed=(1 << 64) - 5, **options)
        assert (index[valid] >= col_offset).all()


@pytest.mark.parametrize("share", [0.002, 0.03, 0.3])
@pytest.mark.parametrize("mode", ["fne", "uniform"])
def test_few_candidates_per_row_draw_their_own_words(backend, share, mode):
    # Training cuts almost every pair down: a backend that draws words only for the candidates (compacted to
    # (row, column) pairs) must still give each its own counter's word, in rows of every 16-row block (40 rows:
    # a partial last block) and across 2³² in the middle of the bank.
    inputs = keeping(backend.inputs(40, 1500, 12, kind="exact", seed=22), share)
    check(backend, inputs, mode=mode, k=3, col_offset=2**32 - 700, step=5, **STEEP)


def shard_bounds(num_cols: int, shards: int) -> list[int]:
    """Uneven column ranges: a shard of a single row, an empty one where there are enough shards, the rest
    of unequal lengths."""
    cuts = {0, num_cols, 1, num_cols // 3, num_cols // 3 + 7, num_cols // 2 + 1, (4 * num_cols) // 5,
            num_cols - 2}
    inner = sorted(cut for cut in cuts if 0 < cut < num_cols)
    picked = inner[:shards - 1] if shards - 1 <= len(inner) else inner
    return [0, *picked, num_cols]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("k", [1, 4, 16])
@pytest.mark.parametrize("shards", [2, 3, 7])
def test_merged_shards_equal_one_call_over_the_whole_bank(backend, mode, k, shards):
    # Two anchors have only 5 non-positive bank rows (k = 16 leaves them invalid slots), and at k = 16 rows run
    # out of candidates above the cut-down and fall back to the hardest negatives.
    inputs = backend.inputs(23, 300, 16, kind="exact", seed=6, num_ids=12)
    inputs["anchor_ids"][:2] = 99
    inputs["bank_ids"][5:] = 99
    options = dict(mode=mode, seed=2024, step=3, **STEEP)
    whole = backend.run(inputs, k=k, **options)
    bounds = shard_bounds(300, shards)
    parts = [backend.run(dict(inputs, bank=inputs["bank"][begin:end], bank_ids=inputs["bank_ids"][begin:end]),
                         k=k, col_offset=begin, **options) for begin, end in zip(bounds[:-1], bounds[1:])]
    merged = fne_fast.merge_candidates(*(torch.cat([part[i] for part in parts], dim=1) for i in range(4)), k=k)
    for actual, wanted in zip(merged, whole):
        assert torch.equal(actual, wanted)
    if k == 16:
        assert not whole[2][:2].any(dim=0)[5:].any()  # the two anchors ran out after 5 slots...
        if mode != "hardest":
            assert (whole[2] & ~torch.isfinite(whole[3])).any()  # ...and rows fell back


def test_merge_rejects_mismatched_shapes():
    index = torch.zeros(3, 4, dtype=torch.int64)
    with pytest.raises(ValueError, match="one shape"):
        fne_fast.merge_candidates(index, torch.zeros(3, 5), index.bool(), torch.zeros(3, 4), k=2)
    with pytest.raises(ValueError, match="k must be"):
        fne_fast.merge_candidates(index, torch.zeros(3, 4), index.bool(), torch.zeros(3, 4), k=5)


# --- distribution ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode,tau", [("fne", 6.0), ("uniform", 0.0)])
def test_sampled_frequencies_follow_the_weights(backend, mode, tau):
    inputs = distribution_inputs(copies=8000 if backend.interpreted else 20000)  # 8000 rejects tau/2 at p ~ 1e-114
    probabilities = expected_probabilities(inputs, tau, mode=mode)
    index, _, valid, _ = backend.run(inputs, mode=mode, tau=tau, seed=31)
    assert valid.all()
    counts = torch.bincount(index[:, 0], minlength=probabilities.numel())
    assert chi_square_p_value(counts, probabilities) > 1e-3
    if mode == "fne":
        assert probabilities.max() / probabilities[probabilities > 0].min() > 3  # far from flat
        # The same test rejects a deliberately wrong weighting (the weights of tau / 2).
        assert chi_square_p_value(counts, expected_probabilities(inputs, tau / 2)) < 1e-6


@pytest.mark.parametrize("fn_tau", [1.0, math.inf])
def test_fn_tau_weights_likely_false_negatives(backend, fn_tau):
    # The candidates with P_fn > 1 - fn_margin (s >= 0.5 here) are drawn with weight exp(-fn_tau P_fn); with
    # fn_tau = inf never, and exactly the others in proportion to their weights.
    inputs = distribution_inputs(copies=8000 if backend.interpreted else 20000)
    tau = 6.0
    probabilities = expected_probabilities(inputs, tau, fn_tau=fn_tau)
    index, _, valid, key = backend.run(inputs, tau=tau, fn_tau=fn_tau, seed=41)
    assert valid.all() and torch.isfinite(key).all()  # every row has candidates left: no fallback
    counts = torch.bincount(index[:, 0], minlength=probabilities.numel())
    assert chi_square_p_value(counts, probabilities) > 1e-3
    assert chi_square_p_value(counts, expected_probabilities(inputs, tau)) < 1e-6  # the authors' fn_tau = tau
    if math.isinf(fn_tau):
        assert (probabilities[5:] == 0).all() and probabilities[2:5].sum() == 1


def test_excluded_false_negatives_can_still_be_the_hardest_fallback(backend):
    # With fn_tau = inf and everything else cut down, the likely false negatives are out of the race but remain
    # non-positive candidates of the fallback: each row takes the hardest of them.
    inputs = distribution_inputs(copies=50)
    inputs["stats"][0] = 0.74  # cut-down threshold 0.54: only s >= 0.625 survives it, all with P_fn > 0.001
    index, sim, valid, key = check(backend, inputs, k=2, tau=6.0, fn_tau=math.inf)
    assert valid.all() and not torch.isfinite(key).any()
    assert (index == torch.tensor([9, 8])).all()


def test_second_slot_is_sampling_without_replacement(backend):
    # 8000 copies reject independent slots at p ~ 1e-41 (the interpreter's size), 40000 at p ~ 1e-227.
    inputs = distribution_inputs(sims=(0.0625, 0.125, 0.25, 0.375, 0.875, 1.0),
                                 copies=8000 if backend.interpreted else 40000)
    tau = 6.0
    index, _, valid, _ = backend.run(inputs, k=2, tau=tau, seed=8)
    assert valid.all()
    without_replacement, independent = pair_p_values(index, expected_probabilities(inputs, tau))
    assert without_replacement > 1e-3
    assert independent < 1e-6  # sampling with replacement must be rejected


# --- edge cases -----------------------------------------------------------------------------------------------

def test_empty_bank_and_empty_batch(backend):
    index, sim, valid, _ = backend.run(backend.inputs(5, 0, 8), k=3)
    assert index.shape == (5, 3) and (index == -1).all() and not valid.any() and (sim == 0).all()
    index, sim, valid, _ = backend.run(backend.inputs(0, 50, 8), k=2)
    assert index.shape == sim.shape == valid.shape == (0, 2)


@pytest.mark.parametrize("filled", [0, 1, 333, 1000])
def test_partly_filled_bank(backend, filled):
    inputs = backend.inputs(17, 1000, 12, kind="exact", seed=2)
    inputs["bank"][filled:] = float("nan")  # rows >= filled are never read (check_finite stays quiet)
    index, sim, valid, _ = backend.run(inputs, k=2, filled=filled)
    assert (index < filled).all()
    inputs["bank"][filled:] = 0
    assert_matches_oracle(backend, (index, sim, valid), inputs, k=2, filled=filled)


def test_all_candidates_positive(backend):
    inputs = backend.inputs(4, 50, 8, kind="exact")
    inputs["bank_ids"][:] = 3
    inputs["anchor_ids"][:] = 3
    index, sim, valid, _ = backend.run(inputs, k=2)
    assert (index == -1).all() and not valid.any() and (sim == 0).all()


@pytest.mark.parametrize("mode", MODES)
def test_more_slots_than_survivors_falls_back_to_hardest(backend, mode):
    inputs = backend.inputs(12, 40, 8, kind="exact", seed=9, num_ids=5)
    index, _, valid, _ = check(backend, inputs, k=45, mode=mode)  # k > N: every row runs out
    for row in range(12):
        chosen = index[row][valid[row]]
        assert len(set(chosen.tolist())) == len(chosen)  # distinct
        assert valid[row].sum() == (inputs["bank_ids"] != inputs["anchor_ids"][row]).sum()


def test_everything_cut_down_takes_the_hardest_negative(backend):
    inputs = backend.inputs(8, 200, 8, kind="exact")
    inputs["stats"][0] = 100.0  # cut-down threshold above every similarity
    _, sim, valid, _ = check(backend, inputs, k=3)
    _, _, _, full_sim = reference.candidate_keys(*inputs.values(), SamplerOptions(mode="hardest"))
    hardest = torch.where(inputs["bank_ids"] != inputs["anchor_ids"].reshape(-1, 1), full_sim, -math.inf)
    assert valid.all()
    torch.testing.assert_close(sim[:, 0].double(), hardest.max(dim=1).values)


def test_single_anchor_and_repeated_ids(backend):
    check(backend, backend.inputs(1, 500, 5, kind="exact", num_ids=2), k=5, **STEEP)


@pytest.mark.parametrize("dim", [0, 1, 3, 129])
@pytest.mark.parametrize("bank_dtype", [torch.float32, torch.bfloat16])
def test_odd_embedding_dimensions(backend, dim, bank_dtype):
    check(backend, backend.inputs(11, 700, dim, kind="exact", seed=17, num_ids=100, bank_dtype=bank_dtype),
          k=4, **STEEP)


@pytest.mark.parametrize("bank_dtype", [torch.float32, torch.bfloat16])
def test_non_contiguous_inputs_match_contiguous(backend, bank_dtype):
    inputs = backend.inputs(20, 600, 16, kind="exact", seed=12, bank_dtype=bank_dtype)
    strided = strided_copy(inputs)
    assert not strided["bank"].is_contiguous() and not strided["anchors"].is_contiguous()
    for actual, wanted in zip(backend.run(strided, k=3), backend.run(inputs, k=3)):
        assert torch.equal(actual, wanted)


# --- bad input --------------------------------------------------------------------------------------------------

def _with(backend, **changes):
    inputs = backend.inputs(6, 40, 8, kind="exact")
    inputs.update(changes)
    return inputs


BAD_TENSORS = [
    ("anchors", dict(anchors=torch.zeros(6, 8, 1)), ValueError),
    ("bank", dict(bank=torch.zeros(40)), ValueError),
    ("anchors and bank", dict(bank=torch.zeros(40, 9)), ValueError),  # the same embedding dimension
    ("anchors", dict(anchors=torch.zeros(6, 8, dtype=torch.int32)), TypeError),
    ("bank", dict(bank=torch.zeros(40, 8, dtype=torch.int64)), TypeError),
    ("bank", dict(bank=torch.zeros(40, 8, dtype=torch.float64)), TypeError),
    ("anchors", dict(anchors=torch.zeros(6, 8, dtype=torch.float16), bank=torch.zeros(40, 8, dtype=torch.bfloat16)),
     TypeError),
    ("positive_sim", dict(positive_sim=torch.zeros(5)), ValueError),
    ("positive_sim", dict(positive_sim=torch.zeros(6, dtype=torch.float64)), TypeError),
    ("anchor_ids", dict(anchor_ids=torch.zeros(6, dtype=torch.float32)), TypeError),
    ("anchor_ids", dict(anchor_ids=torch.zeros(7, dtype=torch.int64)), ValueError),
    ("bank_ids", dict(bank_ids=torch.zeros(40, dtype=torch.int32)), TypeError),
    ("bank_ids", dict(bank_ids=torch.zeros(39, dtype=torch.int64)), ValueError),
    ("stats", dict(stats=torch.zeros(4)), ValueError),
    ("stats", dict(stats=torch.zeros(5, dtype=torch.float64)), TypeError),
    ("bank", dict(bank=torch.zeros(40, 8, device="meta")), ValueError),
    ("anchors", dict(anchors=[[0.0] * 8] * 6), TypeError),
]


@pytest.mark.parametrize("name,changes,error", BAD_TENSORS, ids=[f"{i}-{case[0]}" for i, case in enumerate(BAD_TENSORS)])
def test_bad_tensors_name_the_argument(backend, name, changes, error):
    inputs = _with(backend, **{key: value.to(backend.device) if isinstance(value, torch.Tensor)
                               and value.device.type != "meta" else value for key, value in changes.items()})
    with pytest.raises(error, match=_names(name)):
        fne_fast.sample_negatives(*inputs.values(), backend=backend.name)


def _names(argument: str) -> str:
    """The pattern of an error message about ``argument``: the message starts with the argument's whole name."""
    return rf"^{argument}\b"


BAD_OPTIONS = [
    ("k", dict(k=0)), ("k", dict(k=-3)), ("k", dict(k=1.5)), ("mode", dict(mode="hard")),
    ("tau", dict(tau=-0.1)), ("tau", dict(tau=float("nan"))), ("prior_k", dict(prior_k=1.0)),
    ("prior_k", dict(prior_k=0.5)), ("fn_margin", dict(fn_margin=1.5)), ("min_count", dict(min_count=-1)),
    ("margin", dict(margin=float("inf"))), ("cutdown", dict(cutdown=None)), ("fn_tau", dict(fn_tau=-0.5)),
    ("fn_tau", dict(fn_tau=float("nan"))),
    ("filled", dict(filled=41)), ("filled", dict(filled=-1)), ("step", dict(step=2**32)), ("step", dict(step=-1)),
    ("step", dict(step=2**70)), ("row_offset", dict(row_offset=2**32 - 5)), ("row_offset", dict(row_offset=-1)),
    ("col_offset", dict(col_offset=-1)), ("seed", dict(seed=1.5)), ("backend", dict(backend="gpu")),
]


@pytest.mark.parametrize("name,options", BAD_OPTIONS, ids=[f"{i}-{case[0]}" for i, case in enumerate(BAD_OPTIONS)])
def test_bad_options_name_the_argument(backend, name, options):
    with pytest.raises((ValueError, TypeError), match=_names(name)):
        fne_fast.sample_negatives(*_with(backend).values(), **{"backend": backend.name, **options})


def test_the_argument_names_are_matched_whole():
    import re

    # "bank" must not pass for a message about bank_ids, nor "tau" for fn_tau, nor "k" for any word holding a k.
    assert not re.search(_names("bank"), "bank_ids must have length 40, got 39")
    assert not re.search(_names("tau"), "fn_tau must be None (= tau), a number >= 0, or inf, got -0.5")
    assert not re.search(_names("k"), "backend must be one of ('auto', 'cpu'), got 'gpu'")
    assert re.search(_names("k"), "k must be an integer >= 1, got 0")


def test_backend_must_match_the_device():
    with pytest.raises(ValueError, match="backend"):
        fne_fast.sample_negatives(*sample_inputs(6, 40, 8).values(), backend="cuda")


@pytest.mark.parametrize("name", ["anchors", "bank", "positive_sim", "stats"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_inputs_raise_unless_unchecked(backend, name, value):
    inputs = _with(backend)
    inputs[name].view(-1)[3] = value
    with pytest.raises(ValueError, match=f"{name} contains NaN or Inf"):
        backend.run(inputs, k=2)
    # Unchecked, the draws are the oracle's: a non-finite similarity is never a candidate, and a non-finite
    # positive_sim or stats keeps the pairs it touches out of the race (their keys are NaN).
    assert_same_draws(backend.run(inputs, k=2, check_finite=False), run_oracle(inputs, k=2))


@pytest.mark.parametrize("mode", MODES)
def test_non_finite_similarities_are_never_chosen_without_check_finite(backend, mode):
    inputs = backend.inputs(6, 300, 8, kind="exact", seed=18)
    inputs["bank"][::2] = float("inf")
    inputs["bank"][1::4] = float("nan")
    index, _, valid, _ = backend.run(inputs, k=8, mode=mode, check_finite=False)
    assert valid.any(dim=1).all()
    assert ((index[valid] % 4) == 3).all()  # the only rows with finite similarities


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a GPU"))])
@pytest.mark.parametrize("name,options", [("k", dict(k=0)), ("mode", dict(mode="x")), ("filled", dict(filled=99)),
                                          ("prior_k", dict(prior_k=1.0)), ("tau", dict(tau=-1.0)),
                                          ("fn_tau", dict(fn_tau=-1.0)), ("fn_tau", dict(fn_tau=math.nan)),
                                          ("center_offset", dict(center_offset=math.inf)),
                                          ("relative_cut", dict(relative_cut=-0.5)),
                                          ("fn_thresholds", dict(fn_thresholds=torch.zeros(5))),
                                          ("count_above", dict(count_above=True)),
                                          ("guide_threshold", dict(guide_threshold=0.5)),
                                          ("anchor_guides", dict(anchor_guides=torch.zeros(6, 3), bank_guides=torch.zeros(40, 3))),
                                          ("bank_guides", dict(anchor_guides=torch.zeros(6, 3), bank_guides=torch.zeros(39, 3),
                                                               guide_threshold=0.5))])
def test_the_raw_operator_checks_too(device, name, options):
    # Callers that bypass the Python wrapper still get an error naming the argument, not a crash.
    args = dict(fn_thresholds=None, anchor_guides=None, bank_guides=None, k=1, mode="fne", margin=0.2, tau=0.5,
                fn_tau=0.5, prior_k=1e4, fn_margin=0.999, min_count=200, cutdown=True, center_offset=0.0,
                relative_cut=None, guide_threshold=None, seed=0, step=0, row_offset=0, col_offset=0, filled=40,
                check_finite=True, count_above=False)
    args.update({key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in options.items()})
    with pytest.raises(ValueError, match=name):
        torch.ops.fne_fast.sample_negatives(*sample_inputs(6, 40, 8, device=device).values(), *args.values())


# --- the operator under torch.library and torch.compile ---------------------------------------------------------

def test_opcheck_and_torch_compile(backend):
    if backend.name == "reference" or backend.interpreted:
        pytest.skip("not served through the dispatcher")  # the interpreter's CPU tensors go to the C++ kernel
    from fne_fast import ops

    if backend.name == "triton" and not ops.TRITON_SERVES_CUDA:
        pytest.skip("the compiled CUDA kernel serves the CUDA key")
    inputs = {name: tensor.to(backend.device) for name, tensor in backend.inputs(6, 80, 8, kind="exact").items()}
    # fn_thresholds, anchor_guides, bank_guides; the options (SCHEMA_FIELDS); the counters
    args = (*inputs.values(), None, None, None, 2, "fne", 0.2, 0.5, 0.5, 10000.0, 0.999, 200, True, 0.0, None, None,
            3, 1, 0, 0, 80, True, False)
    torch.library.opcheck(torch.ops.fne_fast.sample_negatives.default, args)
    # The optional tensors and floats given, counted.
    thresholds = torch.linspace(-0.5, 1.0, 6, device=backend.device)
    guides = [(torch.randint(-4, 5, (rows, 5)) / 8.0).to(backend.device) for rows in (6, 80)]
    criteria = (*inputs.values(), thresholds, *guides, *args[9:18], -0.125, 0.9, 0.25, *args[21:-1], True)
    torch.library.opcheck(torch.ops.fne_fast.sample_negatives.default, criteria)

    @torch.compile(backend="eager", fullgraph=True)
    def compiled(*tensors):
        return fne_fast.sample_negatives(*tensors, k=2, seed=3, step=1)

    assert_same_draws(compiled(*inputs.values()), fne_fast.sample_negatives(*inputs.values(), k=2, seed=3, step=1))
    keys = fne_fast.sample_negatives(*inputs.values(), k=2, seed=3, return_keys=True)
    assert len(keys) == 4 and keys[3].dtype == torch.float32 and keys[3].shape == (6, 2)
