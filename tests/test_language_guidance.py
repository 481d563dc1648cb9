"""Language guidance in ``sample_negatives`` (docs/DESIGN.md §1) on every backend: a candidate whose guide
similarity (the anchor's guide embedding · the bank row's) is above ``guide_threshold`` is excluded from the race
and the fallback. Against the float64 oracle, by the written rule (ties kept, NaN excludes nothing), in
distribution, across shards, dtypes and layouts, with errors that name the argument; each test also shows that a
kernel ignoring the guides would fail it.
"""

from __future__ import annotations

import math

import pytest
import torch

import fne_fast
from inputs import (MODES, STEEP, assert_matches_oracle, chi_square_p_value, distribution_inputs,
                    expected_probabilities, keeping, run_oracle)


def exact_guides(num_rows: int, num_cols: int, dim: int, seed: int) -> dict:
    """Guide embeddings with entries in {-4, ..., 4} / 8: every guide similarity is exact in float32 (a multiple
    of 1/64), so every backend sees the same numbers and ties with a threshold of that grid occur."""
    generator = torch.Generator().manual_seed(seed)
    draw = lambda rows: torch.randint(-4, 5, (rows, dim), generator=generator) / 8.0  # noqa: E731
    return dict(anchor_guides=draw(num_rows), bank_guides=draw(num_cols))


def guide_sims(guides: dict) -> torch.Tensor:
    return guides["anchor_guides"].double() @ guides["bank_guides"].double().T


def similarities(inputs: dict) -> torch.Tensor:
    return inputs["anchors"].cpu().double() @ inputs["bank"].cpu().double().T


def check(backend, inputs, **options):
    """Runs the backend and compares it with the oracle; returns the backend's result."""
    result = backend.run(inputs, **options)
    assert_matches_oracle(backend, result, inputs, **options)
    return result


def unguided(options: dict) -> dict:
    return {name: value for name, value in options.items()
            if name not in ("guide_threshold", "anchor_guides", "bank_guides")}


def chosen_guide_sims(guides: dict, index: torch.Tensor, valid: torch.Tensor, col_offset: int = 0) -> torch.Tensor:
    """The float64 guide similarity of every valid chosen slot."""
    columns = (index - col_offset).clamp(min=0)
    return torch.gather(guide_sims(guides), 1, columns)[valid]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("k", [1, 4])
def test_guidance_matches_oracle_on_exact_inputs(backend, mode, k):
    inputs = backend.inputs(37, 1100, 19, kind="exact", seed=4)
    guides = exact_guides(37, 1100, 7, seed=9)
    threshold = 0.25  # excludes about a fifth of the pairs, ties at 0.25 kept
    sims = guide_sims(guides)
    assert 0.05 < (sims > threshold).double().mean() < 0.5 and (sims == threshold).any()
    call = dict(k=k, mode=mode, seed=987654321, step=3, row_offset=2, col_offset=77, **STEEP)
    index, _, valid, _ = check(backend, inputs, guide_threshold=threshold, **guides, **call)
    assert valid.all()
    assert (chosen_guide_sims(guides, index, valid, col_offset=77) <= threshold).all()
    # Without the guides the draws take excluded pairs: a kernel that ignored them would fail the comparison above.
    plain_index, _, plain_valid, _ = run_oracle(inputs, **call)
    assert (chosen_guide_sims(guides, plain_index, plain_valid, col_offset=77) > threshold).any()


def test_guidance_on_float32_inputs_matches_oracle_up_to_near_ties(backend):
    # Random unit vectors and guides, few candidates per row (the CPU's compacted race), other criteria on too.
    rows = 128 if backend.interpreted else 512
    inputs = keeping(backend.inputs(rows, 3000, 32, seed=5), 0.05)
    generator = torch.Generator().manual_seed(8)
    guides = {name: torch.nn.functional.normalize(torch.randn(count, 40, generator=generator), dim=1)
              for name, count in (("anchor_guides", rows), ("bank_guides", 3000))}
    options = dict(k=3, seed=5, tau=4.0, center_offset=-0.05, relative_cut=0.9, guide_threshold=0.1, **guides)
    result = backend.run(inputs, **options)
    assert_matches_oracle(backend, result, inputs, max_differ=2e-3, **options)
    assert not torch.equal(result[0], run_oracle(inputs, **unguided(options))[0])


def test_guidance_excludes_from_the_fallback_too(backend):
    # Everything is cut down, so every slot is a hardest-negative fallback: the hardest pairs the guides keep.
    inputs = backend.inputs(16, 400, 8, kind="exact", seed=3)
    inputs["stats"][0] = 100.0
    guides = exact_guides(16, 400, 5, seed=2)
    index, sim, valid, key = check(backend, inputs, k=2, guide_threshold=0.0, **guides)
    assert not torch.isfinite(key).any() and valid.all()
    other = inputs["bank_ids"].reshape(1, -1) != inputs["anchor_ids"].reshape(-1, 1)
    eligible = other & (guide_sims(guides) <= 0.0)
    wanted = torch.where(eligible, similarities(inputs), -math.inf).topk(2, dim=1).values
    torch.testing.assert_close(sim.double(), wanted)
    assert not torch.equal(run_oracle(inputs, k=2)[1], sim)  # without guides the fallback takes excluded pairs


def test_guide_dtypes_and_layouts_give_the_same_draws(backend):
    inputs = backend.inputs(21, 500, 12, kind="exact", seed=7)
    guides = exact_guides(21, 500, 9, seed=4)
    options = dict(k=3, guide_threshold=0.125, seed=3, **STEEP)
    wanted = check(backend, inputs, **guides, **options)
    variants = {
        "bfloat16": {name: tensor.to(torch.bfloat16) for name, tensor in guides.items()},  # exact in bfloat16
        "float32 anchors, float16 bank": dict(guides, bank_guides=guides["bank_guides"].half()),
        "strided": dict(anchor_guides=guides["anchor_guides"].T.contiguous().T,
                        bank_guides=torch.stack([guides["bank_guides"], -guides["bank_guides"]], dim=2)[:, :, 0]),
    }
    for name, variant in variants.items():
        assert not variant["bank_guides"].is_contiguous() or name != "strided"
        for got, expected in zip(backend.run(inputs, **variant, **options), wanted):
            assert torch.equal(got, expected), name


def test_empty_guides_have_similarity_zero(backend):
    inputs = backend.inputs(9, 300, 8, kind="exact", seed=1)
    empty = dict(anchor_guides=torch.zeros(9, 0), bank_guides=torch.zeros(300, 0))
    plain = backend.run(inputs, k=2, seed=1)
    for got, expected in zip(backend.run(inputs, k=2, seed=1, guide_threshold=0.0, **empty), plain):
        assert torch.equal(got, expected)  # 0 <= 0: nothing excluded
    index, _, valid, _ = backend.run(inputs, k=2, seed=1, guide_threshold=-0.5, **empty)
    assert not valid.any() and (index == -1).all()  # 0 > -0.5: everything excluded


def test_non_finite_guides_raise_unless_unchecked_then_nan_excludes_nothing(backend):
    inputs = backend.inputs(12, 300, 8, kind="exact", seed=2)
    guides = exact_guides(12, 300, 6, seed=5)
    bad_anchor = dict(guides, anchor_guides=guides["anchor_guides"].clone())
    bad_anchor["anchor_guides"][3, 1] = math.inf
    with pytest.raises(ValueError, match="^anchor_guides contains NaN or Inf"):
        backend.run(inputs, guide_threshold=0.0, **bad_anchor)
    nan_rows = dict(guides, bank_guides=guides["bank_guides"].clone())
    nan_rows["bank_guides"][::7] = math.nan
    with pytest.raises(ValueError, match="^bank_guides contains NaN or Inf"):
        backend.run(inputs, guide_threshold=0.0, **nan_rows)
    # Unchecked, a NaN guide similarity is not above the threshold: those rows behave like rows of guide 0.
    zero_rows = dict(guides, bank_guides=torch.nan_to_num(nan_rows["bank_guides"], nan=0.0))
    options = dict(k=3, guide_threshold=0.0, seed=4, **STEEP)
    result = backend.run(inputs, check_finite=False, **nan_rows, **options)
    for got, expected in zip(result, check(backend, inputs, **zero_rows, **options)):
        assert torch.equal(got, expected)


@pytest.mark.parametrize("shards", [2, 5])
def test_merged_guided_shards_equal_one_call(backend, shards):
    inputs = backend.inputs(23, 300, 16, kind="exact", seed=6, num_ids=12)
    guides = exact_guides(23, 300, 10, seed=3)
    options = dict(k=4, seed=11, step=2, relative_cut=0.7, guide_threshold=0.0, **STEEP)
    whole = backend.run(inputs, **guides, **options)
    bounds = torch.linspace(0, 300, shards + 1).long().tolist()
    parts = [backend.run(dict(inputs, bank=inputs["bank"][begin:end], bank_ids=inputs["bank_ids"][begin:end]),
                         anchor_guides=guides["anchor_guides"], bank_guides=guides["bank_guides"][begin:end],
                         col_offset=begin, **options) for begin, end in zip(bounds[:-1], bounds[1:])]
    merged = fne_fast.merge_candidates(*(torch.cat([part[i] for part in parts], dim=1) for i in range(4)), k=4)
    for actual, wanted in zip(merged, whole):
        assert torch.equal(actual, wanted)


def test_guidance_leaves_the_exceedance_counts_alone(backend):
    inputs = backend.inputs(17, 600, 12, kind="exact", seed=5)
    thresholds = torch.linspace(-0.3, 0.5, 17)
    guides = exact_guides(17, 600, 8, seed=6)
    plain = backend.run(inputs, fn_thresholds=thresholds, return_counts=True)[-1]
    guided = backend.run(inputs, fn_thresholds=thresholds, return_counts=True, guide_threshold=-1.0, **guides)
    assert torch.equal(guided[-1], plain) and not guided[2].all()  # counted, though excluded


def test_guidance_samples_the_rest_by_their_weights(backend):
    # The guides exclude the candidates at 0.375, 0.625 and 0.875; the rest are drawn by the authors' weights.
    inputs = distribution_inputs(copies=8000 if backend.interpreted else 20000)
    rows, candidates = inputs["anchors"].shape[0], inputs["bank"].shape[0]
    sims = similarities(inputs)[0]
    excluded = torch.isin(sims, torch.tensor([0.375, 0.625, 0.875], dtype=torch.float64))
    guides = dict(anchor_guides=torch.ones(rows, 1), bank_guides=excluded.float().reshape(candidates, 1))
    tau = 6.0
    authors = expected_probabilities(inputs, tau)
    kept = torch.where(excluded, torch.zeros_like(authors), authors)
    index, _, valid, _ = backend.run(inputs, tau=tau, seed=29, guide_threshold=0.5, **guides)
    assert valid.all()
    counts = torch.bincount(index[:, 0], minlength=candidates)
    assert chi_square_p_value(counts, kept / kept.sum()) > 1e-3
    assert chi_square_p_value(counts, authors) < 1e-6  # the unguided law is rejected


_GUIDES = exact_guides(12, 40, 4, seed=1)


@pytest.mark.parametrize("changes,error,name", [
    (dict(guide_threshold=0.1), ValueError, "guide_threshold"),
    (dict(anchor_guides=_GUIDES["anchor_guides"]), ValueError, "anchor_guides"),
    (dict(bank_guides=_GUIDES["bank_guides"], guide_threshold=0.1), ValueError, "anchor_guides"),
    (dict(_GUIDES), ValueError, "anchor_guides"),  # guides without a threshold
    (dict(_GUIDES, guide_threshold=math.nan), ValueError, "guide_threshold"),
    (dict(_GUIDES, guide_threshold=math.inf), ValueError, "guide_threshold"),
    (dict(_GUIDES, anchor_guides=_GUIDES["anchor_guides"][:11], guide_threshold=0.1), ValueError, "anchor_guides"),
    (dict(_GUIDES, bank_guides=_GUIDES["bank_guides"][:, :3], guide_threshold=0.1), ValueError, "anchor_guides"),
    (dict(_GUIDES, bank_guides=_GUIDES["bank_guides"][0], guide_threshold=0.1), ValueError, "bank_guides"),
    (dict(_GUIDES, bank_guides=_GUIDES["bank_guides"].double(), guide_threshold=0.1), TypeError, "bank_guides"),
    (dict(_GUIDES, anchor_guides=_GUIDES["anchor_guides"].half(), guide_threshold=0.1), TypeError, "anchor_guides"),
    (dict(_GUIDES, bank_guides=[[0.0] * 4] * 40, guide_threshold=0.1), TypeError, "bank_guides"),
], ids=lambda value: value if isinstance(value, str) else None)
def test_bad_guides_name_the_argument(backend, changes, error, name):
    inputs = backend.inputs(12, 40, 8)
    with pytest.raises(error, match=rf"^{name}\b"):
        backend.run(inputs, **changes)


def test_guides_on_another_device_are_refused():
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    inputs = {name: tensor.cuda() for name, tensor in fne_fast.ops.testing.sample_inputs(6, 40, 8).items()}
    guides = exact_guides(6, 40, 4, seed=1)
    with pytest.raises(ValueError, match="^anchor_guides must be on the anchors' device"):
        fne_fast.sample_negatives(*inputs.values(), guide_threshold=0.0, anchor_guides=guides["anchor_guides"],
                                  bank_guides=guides["bank_guides"].cuda())
