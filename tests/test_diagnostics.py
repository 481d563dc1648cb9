"""The per-epoch bank diagnostics against the oracle: the race is the reference's, the expected false-negative rate
is the exact probability of the weighted draw, and the op's own draws reproduce it."""

import math

import pytest
import torch

from fne_fast import sample_negatives
from fne_fast.ops import SamplerOptions
from fne_fast.ops.fne_math import log_weights
from fne_fast.ops.reference import candidate_keys
from fne_fast.training.diagnostics import bank_diagnostics, summarise

ROWS, BANK, DIM, GROUPS = 6, 40, 8, 5
STATS = torch.tensor([0.3, 0.04, 0.1, 0.05, 500.0])


def _case(seed=0, rows=ROWS, bank_rows=BANK):
    generator = torch.Generator().manual_seed(seed)
    anchors = torch.nn.functional.normalize(torch.randn(rows, DIM, generator=generator), dim=1)
    bank = torch.nn.functional.normalize(torch.randn(bank_rows, DIM, generator=generator), dim=1)
    # Pull some bank rows towards the anchors so the race and the Bayesian branch have members.
    bank[:rows] = torch.nn.functional.normalize(anchors + 0.4 * bank[:rows], dim=1)
    positive_sim = 0.4 + 0.4 * torch.rand(rows, generator=generator)
    anchor_ids = torch.arange(rows)
    bank_ids = torch.randint(0, 3 * rows, (bank_rows,), generator=generator)
    group_of_id = torch.arange(3 * rows) % GROUPS
    return anchors, bank, positive_sim, anchor_ids, bank_ids, group_of_id


def _diagnose(case, options, *, sampler=None, filled=BANK, groups=True):
    anchors, bank, positive_sim, anchor_ids, bank_ids, group_of_id = case
    sampler = sampler or options.mode
    sums = bank_diagnostics(anchors, positive_sim, anchor_ids, bank, bank_ids, filled, STATS, options, sampler=sampler,
                            group_of_id=group_of_id if groups else None)
    return summarise(sums, sampler=sampler, has_groups=groups)


def _oracle(options, filled, case):
    """Race size, expected FN rate of a draw and mean entropy from the reference's masks, in float64."""
    anchors, bank, positive_sim, anchor_ids, bank_ids, group_of_id = case
    _, survives, non_positive, sim = candidate_keys(anchors, bank, positive_sim, anchor_ids, bank_ids, STATS, options,
                                                    filled=filled)
    same = group_of_id[bank_ids][None, :] == group_of_id[anchor_ids][:, None]
    if options.mode == "hardest":
        return {"non_positive": non_positive, "sim": sim, "same": same}
    weights = log_weights(sim, positive_sim.double(), STATS.double(), options).masked_fill(~survives, -math.inf)
    drawing = survives.any(dim=1)
    probability = torch.softmax(weights[drawing], dim=1)
    entropy = -(probability * torch.log(probability.clamp(min=1e-300))).sum(dim=1)
    return {"race": survives.sum().item() / ROWS, "expected_fn": (probability * same[drawing]).sum().item()
            / drawing.sum().item(), "entropy": entropy.mean().item(), "fallback": 1 - drawing.double().mean().item(),
            "non_positive": non_positive, "sim": sim, "same": same}


@pytest.mark.parametrize("options", [SamplerOptions(), SamplerOptions(fn_tau=float("inf"), prior_k=1000.0),
                                     SamplerOptions(mode="uniform"), SamplerOptions(tau=4.0, cutdown=False)],
                         ids=["authors", "fn_tau_inf", "uniform", "no_cutdown"])
def test_race_expected_fn_rate_and_entropy_match_the_oracle(options):
    case = _case()
    filled = BANK - 3
    found = _diagnose(case, options, filled=filled)
    expected = _oracle(options, filled, case)
    assert 0 < expected["race"] < BANK  # the case exercises the masks
    assert found["race_per_anchor"] == pytest.approx(expected["race"])
    assert found["expected_fn_rate"] == pytest.approx(expected["expected_fn"], rel=1e-6)
    assert found["entropy"] == pytest.approx(expected["entropy"], rel=1e-6)
    assert found["fallback_share"] == pytest.approx(expected["fallback"])
    assert found["candidates_per_anchor"] == pytest.approx(expected["non_positive"].sum().item() / ROWS)


def test_fn_tau_inf_takes_likely_false_negatives_out_of_the_race():
    case = _case()
    authors = SamplerOptions(prior_k=2000.0)
    removing = authors.replace(fn_tau=float("inf"))
    sums = {name: _diagnose(case, options) for name, options in (("authors", authors), ("removing", removing))}
    assert 0 < sums["authors"]["bayes_share_race"] < 1  # some race members are likely false negatives ...
    assert sums["removing"]["bayes_share_race"] == 0  # ... and with fn_tau = inf none is left in the race
    assert sums["removing"]["race_per_anchor"] == pytest.approx(
        sums["authors"]["race_per_anchor"] * (1 - sums["authors"]["bayes_share_race"]))


def test_hardest_and_top_share_against_direct_computation():
    case = _case(1)
    found = _diagnose(case, SamplerOptions(mode="hardest"))
    oracle = _oracle(SamplerOptions(mode="hardest"), BANK, case)
    masked = oracle["sim"].masked_fill(~oracle["non_positive"], -math.inf)
    hardest_same = torch.gather(oracle["same"], 1, masked.argmax(dim=1, keepdim=True))
    assert found["expected_fn_rate"] == pytest.approx(hardest_same.double().mean().item())
    assert found["entropy"] == 0.0 and found["race_per_anchor"] is None
    top = torch.gather(oracle["same"], 1, masked.topk(1, dim=1).indices)  # 1 % of 40 rows rounds up to 1
    assert found["top1pct_fn_rate"] == pytest.approx(top.double().mean().item())
    assert sum(found["sim_hist_same_group"]) + sum(found["sim_hist_other"]) == oracle["non_positive"].sum().item()


def test_the_ops_draws_reproduce_the_expected_false_negative_rate():
    """Thousands of draws of the C++ kernel land in the anchor's group as often as predicted. Each anchor is
    repeated over many rows: the Gumbel noise is counted by row, so every copy draws independently."""
    case = _case(3)
    anchors, bank, positive_sim, anchor_ids, bank_ids, group_of_id = case
    options = SamplerOptions(tau=30.0, cutdown=False)
    found = _diagnose(case, options)
    # The weights matter here: a uniform draw would land in the group about half as often (0.155 against 0.287).
    assert found["expected_fn_rate"] - _diagnose(case, options.replace(mode="uniform"))["expected_fn_rate"] > 0.1
    copies, steps = 100, 30
    hits = 0
    for step in range(steps):
        index, _, valid = sample_negatives(anchors.repeat(copies, 1), bank, positive_sim.repeat(copies),
                                           anchor_ids.repeat(copies), bank_ids, STATS, step=step, backend="cpu",
                                           **options.as_kwargs())
        assert valid.all()
        hits += (group_of_id[bank_ids[index[:, 0]]] == group_of_id[anchor_ids.repeat(copies)]).sum().item()
    trials = steps * copies * ROWS
    rate, expected = hits / trials, found["expected_fn_rate"]
    assert 0.05 < expected < 0.95
    assert abs(rate - expected) < 5 * math.sqrt(expected * (1 - expected) / trials)


def test_inbatch_sampler_has_no_draw_statistics_and_no_groups_gives_none():
    case = _case()
    found = _diagnose(case, SamplerOptions(mode="hardest"), sampler="inbatch-hardest", groups=False)
    assert found["entropy"] is None and found["expected_fn_rate"] is None and found["top1pct_fn_rate"] is None
    assert found["bayes_share_all"] is not None and found["p_fn_hist_other"] is not None


# 24 anchors against 480 rows (the top 1 % holds 5 of them), partly filled in two cases.
_SHARDED_ROWS, _SHARDED_BANK = 24, 480
_SHARDED_CASES = [(SamplerOptions(), "fne", 480), (SamplerOptions(mode="uniform"), "uniform", 300),
                  (SamplerOptions(mode="hardest"), "hardest", 250), (SamplerOptions(), "inbatch-hardest", 480)]


def _sharded_diagnostics(rank, world_size):
    """Each rank scores its shard of the case's bank; the combined sums are summarised on every rank."""
    import torch.distributed as dist

    from fne_fast.training.diagnostics import reduce_sums

    anchors, bank, positive_sim, anchor_ids, bank_ids, group_of_id = _case(3, _SHARDED_ROWS, _SHARDED_BANK)
    rows = slice(rank * _SHARDED_BANK // world_size, (rank + 1) * _SHARDED_BANK // world_size)
    results = []
    for options, sampler, filled in _SHARDED_CASES:
        sums = bank_diagnostics(anchors, positive_sim, anchor_ids, bank[rows], bank_ids[rows], filled, STATS, options,
                                sampler=sampler, group_of_id=group_of_id, chunk=4, col_offset=rows.start,
                                group=dist.group.WORLD)
        results.append(summarise(reduce_sums(sums, dist.group.WORLD), sampler=sampler, has_groups=True))
    return results


@pytest.mark.parametrize("world_size", [2, 4])
def test_sharded_diagnostics_equal_the_whole_banks(world_size):
    """The draw's normalisation, the hardest candidate and the top 1 % combined across the shards (with a partly
    filled bank whose last shards are empty) give the whole bank's diagnostics: to 1e-9, because the float32
    similarity product over a shard may round in the last bit otherwise than over the whole bank (seen: entropy
    2.4e-11 apart with 4 shards)."""
    from fne_fast.sampling.launch import results_of, run_in_processes

    per_rank = results_of(run_in_processes(_sharded_diagnostics, world_size))
    anchors, bank, positive_sim, anchor_ids, bank_ids, group_of_id = _case(3, _SHARDED_ROWS, _SHARDED_BANK)
    for index, (options, sampler, filled) in enumerate(_SHARDED_CASES):
        whole = summarise(bank_diagnostics(anchors, positive_sim, anchor_ids, bank, bank_ids, filled, STATS, options,
                                           sampler=sampler, group_of_id=group_of_id, chunk=4),
                          sampler=sampler, has_groups=True)
        for results in per_rank:
            got = results[index]
            assert got.keys() == whole.keys()
            for key, wanted in whole.items():
                assert got[key] == pytest.approx(wanted, rel=1e-9, abs=1e-12), (sampler, key)
