"""The sampler's false-negative criteria and weight options (docs/DESIGN.md §1) on every backend: the separate
cut-down margin, the centre offset b of the base log-weight, the positive-relative cut and per-anchor thresholds,
against the float64 oracle, by their written rules (ties, s⁺ <= 0, NaN), in distribution, across shards, and
with errors that name the argument. Each test also shows that a kernel ignoring its option would fail it.
"""

from __future__ import annotations

import math

import pytest
import torch

import fne_fast
from inputs import (MODES, STEEP, assert_matches_oracle, chi_square_p_value, distribution_inputs,
                    expected_probabilities, keeping, run_oracle)

CRITERIA = [dict(cut_margin=0.05), dict(cut_margin=0.6, margin=0.1), dict(center_offset=-0.125),
            dict(center_offset=0.25), dict(relative_cut=0.95), dict(relative_cut=0.0), dict(relative_cut=1.0),
            dict(relative_cut=0.5, center_offset=-0.1, cut_margin=0.3)]
# Which modes each option changes (the centre only weights mode "fne"; the cut-down margin is not in "hardest").
_CHANGES = {"cut_margin": ("fne", "uniform"), "center_offset": ("fne",), "relative_cut": MODES}


def check(backend, inputs, **options):
    """Runs the backend and compares it with the oracle; returns the backend's result."""
    result = backend.run(inputs, **options)
    assert_matches_oracle(backend, result, inputs, **options)
    return result


def ceilings_by_rule(positive_sim: torch.Tensor, relative_cut: float) -> torch.Tensor:
    """s⁺ - (1 - relative_cut) |s⁺|, written out in float64 (the op rounds each step to float32)."""
    positive = positive_sim.cpu().double()
    return positive - (1 - relative_cut) * positive.abs()


def similarities(inputs: dict) -> torch.Tensor:
    return inputs["anchors"].cpu().double() @ inputs["bank"].cpu().double().T


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("options", CRITERIA, ids=lambda options: ",".join(f"{k}={v}" for k, v in options.items()))
def test_criteria_match_oracle_on_exact_inputs(backend, mode, options):
    inputs = backend.inputs(37, 1100, 19, kind="exact", seed=4)
    call = dict(k=4, mode=mode, seed=987654321, step=3, row_offset=2, col_offset=77, **STEEP)
    result = check(backend, inputs, **call, **options)
    if any(mode in _CHANGES.get(name, ()) for name in options):
        # The option changes the oracle's draws here: a kernel that ignored it would fail the comparison above.
        assert not torch.equal(result[0], run_oracle(inputs, **call)[0])


def test_criteria_on_float32_inputs_match_oracle_up_to_near_ties(backend):
    # Random unit vectors, few candidates per row (the CPU's compacted race), every criterion at once.
    inputs = keeping(backend.inputs(128 if backend.interpreted else 512, 3000, 32, seed=5), 0.02)
    generator = torch.Generator().manual_seed(3)
    thresholds = 0.1 + 0.4 * torch.rand(inputs["anchors"].shape[0], generator=generator)
    options = dict(k=3, seed=5, tau=4.0, center_offset=-0.05, relative_cut=0.9, fn_thresholds=thresholds)
    result = backend.run(inputs, **options)
    assert_matches_oracle(backend, result, inputs, max_differ=2e-3, **options)


def test_relative_cut_keeps_a_tie_and_cuts_below_a_non_positive_positive(backend):
    # Exact inputs (similarities are multiples of 1/64) and exact positives: the ceilings are 0.25 (s⁺ = 0.5),
    # 0 (s⁺ = 0) and -0.375 (s⁺ = -0.25: below the positive, not 0.5 s⁺ = -0.125 above it).
    inputs = backend.inputs(30, 900, 6, kind="exact", seed=12)
    inputs["positive_sim"] = torch.tensor([0.5, 0.0, -0.25] * 10)
    ceiling = ceilings_by_rule(inputs["positive_sim"], 0.5)
    assert ceiling[:3].tolist() == [0.25, 0.0, -0.375]
    sims = similarities(inputs)
    eligible = (inputs["bank_ids"].reshape(1, -1) != inputs["anchor_ids"].reshape(-1, 1)) & (sims <= ceiling[:, None])
    assert (eligible & (sims == ceiling[:, None])).any(dim=1).all()  # every row has a candidate at its ceiling
    index, sim, valid, _ = check(backend, inputs, k=3, mode="hardest", relative_cut=0.5)
    # NV-Retriever's rule in mode "hardest": the hardest candidates at or below the ceiling, the tie included.
    assert valid.all() and (sim[:, 0].double() == ceiling).all()
    torch.testing.assert_close(sim.double(), torch.where(eligible, sims, -math.inf).topk(3, dim=1).values)
    index, sim, valid, _ = check(backend, inputs, k=6, mode="uniform", relative_cut=0.5, seed=4)
    assert valid.all() and (sim.double() <= ceiling[:, None]).all()
    assert not (run_oracle(inputs, k=6, mode="uniform", seed=4)[1].double() <= ceiling[:, None]).all()


def test_ceilings_exclude_from_the_fallback_too(backend):
    # Everything is cut down, so every slot is a hardest-negative fallback: taken at or below the ceiling.
    inputs = backend.inputs(16, 400, 8, kind="exact", seed=3)
    inputs["stats"][0] = 100.0
    thresholds = torch.tensor([0.125, -0.25, math.inf, -math.inf] * 4)
    index, sim, valid, key = check(backend, inputs, k=2, fn_thresholds=thresholds)
    assert not torch.isfinite(key).any()
    sims = similarities(inputs)
    other = inputs["bank_ids"].reshape(1, -1) != inputs["anchor_ids"].reshape(-1, 1)
    eligible = other & (sims <= thresholds[:, None])
    wanted = torch.where(eligible, sims, -math.inf).topk(2, dim=1).values
    assert torch.equal(valid, torch.isfinite(wanted))
    assert not valid[3::4].any()  # a threshold of -inf excludes every candidate
    torch.testing.assert_close(sim.double()[valid], wanted[valid])
    assert (run_oracle(inputs, k=2)[1][0::4] > 0.125).any()  # without thresholds the fallback is above them


def test_per_anchor_thresholds_and_relative_cut_take_the_lower(backend):
    inputs = backend.inputs(40, 1200, 12, kind="exact", seed=7)
    generator = torch.Generator().manual_seed(1)
    thresholds = torch.randint(-8, 33, (40,), generator=generator) / 64.0
    thresholds[::5] = math.inf
    options = dict(k=4, relative_cut=0.8, fn_thresholds=thresholds, **STEEP)
    _, sim, valid, _ = check(backend, inputs, **options)
    ceiling = torch.minimum(ceilings_by_rule(inputs["positive_sim"], 0.8), thresholds.double())
    assert (sim.double()[valid] <= ceiling[:, None].expand_as(sim)[valid]).all()
    for one_rule in (dict(relative_cut=0.8), dict(fn_thresholds=thresholds)):
        assert not torch.equal(run_oracle(inputs, k=4, **one_rule, **STEEP)[0], run_oracle(inputs, **options)[0])


def test_nan_thresholds_raise_unless_unchecked_then_exclude_nothing(backend):
    inputs = backend.inputs(12, 300, 8, kind="exact", seed=2)
    thresholds = torch.full((12,), 0.125)
    thresholds[::3] = math.nan
    with pytest.raises(ValueError, match="^fn_thresholds contains NaN"):
        backend.run(inputs, fn_thresholds=thresholds)
    result = check(backend, inputs, k=3, fn_thresholds=thresholds, check_finite=False)
    without_nan = check(backend, inputs, k=3, fn_thresholds=torch.where(thresholds.isnan(), math.inf, thresholds))
    for got, wanted in zip(result, without_nan):
        assert torch.equal(got, wanted)


@pytest.mark.parametrize("changes,error", [(dict(fn_thresholds=torch.zeros(11)), ValueError),
                                           (dict(fn_thresholds=torch.zeros(12, 1)), ValueError),
                                           (dict(fn_thresholds=torch.zeros(12, dtype=torch.float64)), TypeError),
                                           (dict(fn_thresholds=[0.0] * 12), TypeError),
                                           (dict(relative_cut=-0.1), ValueError),
                                           (dict(relative_cut=math.inf), ValueError),
                                           (dict(center_offset=math.nan), ValueError),
                                           (dict(cut_margin=-math.inf), ValueError)],
                         ids=lambda value: repr(value)[:40] if isinstance(value, dict) else value.__name__)
def test_bad_criteria_name_the_argument(backend, changes, error):
    inputs = backend.inputs(12, 40, 8)
    (name, value), = changes.items()
    with pytest.raises(error, match=rf"^{name}\b"):
        backend.run(inputs, **changes)


def test_thresholds_on_another_device_are_refused():
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    inputs = {name: tensor.cuda() for name, tensor in fne_fast.ops.testing.sample_inputs(6, 40, 8).items()}
    with pytest.raises(ValueError, match="^fn_thresholds must be on the anchors' device"):
        fne_fast.sample_negatives(*inputs.values(), fn_thresholds=torch.zeros(6))


@pytest.mark.parametrize("shards", [2, 5])
def test_merged_shards_with_ceilings_equal_one_call(backend, shards):
    inputs = backend.inputs(23, 300, 16, kind="exact", seed=6, num_ids=12)
    thresholds = torch.linspace(-0.2, 0.6, 23)
    options = dict(k=4, seed=11, step=2, relative_cut=0.7, center_offset=-0.1, fn_thresholds=thresholds, **STEEP)
    whole = backend.run(inputs, **options)
    bounds = torch.linspace(0, 300, shards + 1).long().tolist()
    parts = [backend.run(dict(inputs, bank=inputs["bank"][begin:end], bank_ids=inputs["bank_ids"][begin:end]),
                         col_offset=begin, **options) for begin, end in zip(bounds[:-1], bounds[1:])]
    merged = fne_fast.merge_candidates(*(torch.cat([part[i] for part in parts], dim=1) for i in range(4)), k=4)
    for actual, wanted in zip(merged, whole):
        assert torch.equal(actual, wanted)


# --- distribution ---------------------------------------------------------------------------------------------

def test_center_offset_moves_the_sampled_distribution(backend):
    # The Bayesian branch off (min_count above n⁺): every survivor is drawn with weight exp(-τ (s - s⁺ - b)²).
    inputs = distribution_inputs(copies=8000 if backend.interpreted else 20000)
    tau, offset = 6.0, -0.375
    sims = similarities(inputs)[0]
    survives = sims > inputs["stats"][0].item() - 0.2

    def law(b):
        weights = torch.where(survives, torch.exp(-tau * (sims - 0.8 - b) ** 2), torch.zeros_like(sims))
        return weights / weights.sum()

    index, _, valid, _ = backend.run(inputs, tau=tau, center_offset=offset, min_count=10**6, seed=17)
    assert valid.all()
    counts = torch.bincount(index[:, 0], minlength=sims.numel())
    assert chi_square_p_value(counts, law(offset)) > 1e-3
    assert chi_square_p_value(counts, law(0.0)) < 1e-6  # the uncentred weights are rejected


def test_relative_cut_samples_the_rest_by_their_weights(backend):
    # Ceiling 0.8 - 0.25 * 0.8 = 0.6: the candidates at 0.625 and above are never drawn, the rest in proportion
    # to the authors' weights (the Bayesian branch on).
    inputs = distribution_inputs(copies=8000 if backend.interpreted else 20000)
    tau = 6.0
    sims = similarities(inputs)[0]
    authors = expected_probabilities(inputs, tau)
    kept = torch.where(sims <= 0.6, authors, torch.zeros_like(authors))
    index, _, valid, key = backend.run(inputs, tau=tau, relative_cut=0.75, seed=23)
    assert valid.all() and torch.isfinite(key).all()
    counts = torch.bincount(index[:, 0], minlength=sims.numel())
    assert chi_square_p_value(counts, kept / kept.sum()) > 1e-3
    assert chi_square_p_value(counts, authors) < 1e-6  # without the cut: rejected


# --- exceedance counts ----------------------------------------------------------------------------------------

def counts_by_rule(inputs: dict, thresholds: torch.Tensor, filled: int | None = None) -> torch.Tensor:
    """Each anchor's candidates (another identity, a filled row) whose float64 similarity is above its threshold."""
    sims = similarities(inputs)
    columns = torch.arange(sims.shape[1])
    other = (inputs["bank_ids"].reshape(1, -1) != inputs["anchor_ids"].reshape(-1, 1))
    other &= (columns < (sims.shape[1] if filled is None else filled)).reshape(1, -1)
    return (other & (sims > thresholds.double().reshape(-1, 1))).sum(dim=1)


@pytest.mark.parametrize("mode", MODES)
def test_exceedance_counts_follow_their_rule_whatever_else_is_on(backend, mode):
    # Exact similarities and thresholds (multiples of 1/64): a tie at the threshold is not above it.
    inputs = backend.inputs(40, 1500, 9, kind="exact", seed=10)
    generator = torch.Generator().manual_seed(2)
    thresholds = torch.randint(-16, 40, (40,), generator=generator) / 64.0
    thresholds[:3] = torch.tensor([math.inf, -math.inf, math.nan])
    sims = similarities(inputs)
    assert (sims == thresholds.double().reshape(-1, 1)).any(dim=1).sum() > 20  # ties occur
    options = dict(k=3, mode=mode, relative_cut=0.8, fn_thresholds=thresholds, filled=1200, check_finite=False,
                   **STEEP)
    *draws, above = backend.run(inputs, return_counts=True, **options)
    wanted = counts_by_rule(inputs, thresholds, filled=1200)
    assert above.dtype == torch.int64 and torch.equal(above, wanted)
    assert above[0] == 0 and above[2] == 0 and above[1] == wanted[1] > 0  # +inf, NaN: none; -inf: every candidate
    # Counting changes no draw, and the oracle counts the same.
    for counted, plain in zip(draws, backend.run(inputs, **options)):
        assert torch.equal(counted, plain)
    assert torch.equal(run_oracle(inputs, return_counts=True, **options)[-1], wanted)
    # A count that ignored the identities or the fill would differ here.
    assert not torch.equal(wanted, counts_by_rule(inputs, thresholds))


def test_exceedance_counts_of_shards_add_up(backend):
    inputs = backend.inputs(17, 600, 12, kind="exact", seed=5)
    thresholds = torch.linspace(-0.3, 0.5, 17)
    whole = backend.run(inputs, fn_thresholds=thresholds, return_counts=True)[-1]
    parts = sum(backend.run(dict(inputs, bank=inputs["bank"][begin:end], bank_ids=inputs["bank_ids"][begin:end]),
                            col_offset=begin, fn_thresholds=thresholds, return_counts=True)[-1]
                for begin, end in ((0, 250), (250, 251), (251, 600)))
    assert torch.equal(parts, whole) and torch.equal(whole, counts_by_rule(inputs, thresholds))


def test_counts_need_thresholds_and_empty_calls_count_nothing(backend):
    inputs = backend.inputs(6, 40, 8)
    with pytest.raises(ValueError, match="^count_above"):
        backend.run(inputs, return_counts=True)
    empty_bank = backend.run(backend.inputs(5, 0, 8), fn_thresholds=torch.zeros(5), return_counts=True)[-1]
    assert torch.equal(empty_bank, torch.zeros(5, dtype=torch.int64))
    empty_batch = backend.run(backend.inputs(0, 40, 8), fn_thresholds=torch.zeros(0), return_counts=True)[-1]
    assert empty_batch.shape == (0,) and empty_batch.dtype == torch.int64
