"""Bad input to sample_negatives: a clear exception naming the argument, never a crash or a stray index."""

from __future__ import annotations

import pytest
import torch

import fne_fast
from inputs import sample_inputs


def base_inputs():
    return sample_inputs(6, 40, 8, exact=True)


def with_(**changes):
    inputs = base_inputs()
    inputs.update(changes)
    return inputs


BAD_INPUTS = [
    ("anchors", lambda: with_(anchors=torch.zeros(6, 8, 1)), ValueError),
    ("bank", lambda: with_(bank=torch.zeros(40)), ValueError),
    ("embedding dimension", lambda: with_(bank=torch.zeros(40, 9)), ValueError),
    ("anchors", lambda: with_(anchors=torch.zeros(6, 8, dtype=torch.int32)), TypeError),
    ("bank", lambda: with_(bank=torch.zeros(40, 8, dtype=torch.int64)), TypeError),
    ("bank", lambda: with_(bank=torch.zeros(40, 8, dtype=torch.float64)), TypeError),
    ("anchors", lambda: with_(anchors=torch.zeros(6, 8, dtype=torch.float16),
                              bank=torch.zeros(40, 8, dtype=torch.bfloat16)), TypeError),
    ("positive_sim", lambda: with_(positive_sim=torch.zeros(5)), ValueError),
    ("positive_sim", lambda: with_(positive_sim=torch.zeros(6, dtype=torch.float64)), TypeError),
    ("anchor_ids", lambda: with_(anchor_ids=torch.zeros(6, dtype=torch.float32)), TypeError),
    ("anchor_ids", lambda: with_(anchor_ids=torch.zeros(7, dtype=torch.int64)), ValueError),
    ("bank_ids", lambda: with_(bank_ids=torch.zeros(40, dtype=torch.int32)), TypeError),
    ("bank_ids", lambda: with_(bank_ids=torch.zeros(39, dtype=torch.int64)), ValueError),
    ("stats", lambda: with_(stats=torch.zeros(4)), ValueError),
    ("stats", lambda: with_(stats=torch.zeros(5, dtype=torch.float64)), TypeError),
    ("bank", lambda: with_(bank=torch.zeros(40, 8, device="meta")), ValueError),
    ("anchors", lambda: with_(anchors=[[0.0] * 8] * 6), TypeError),
]


@pytest.mark.parametrize("name,make,error", BAD_INPUTS, ids=[f"{i}-{case[0]}" for i, case in enumerate(BAD_INPUTS)])
def test_bad_tensors_name_the_argument(name, make, error):
    with pytest.raises(error, match=name):
        fne_fast.sample_negatives(*make().values())


BAD_OPTIONS = [
    ("k", dict(k=0)), ("k", dict(k=-3)), ("k", dict(k=1.5)), ("mode", dict(mode="hard")),
    ("tau", dict(tau=-0.1)), ("tau", dict(tau=float("nan"))), ("prior_k", dict(prior_k=1.0)),
    ("prior_k", dict(prior_k=0.5)), ("fn_margin", dict(fn_margin=1.5)), ("min_count", dict(min_count=-1)),
    ("filled", dict(filled=41)), ("filled", dict(filled=-1)), ("step", dict(step=2**32)), ("step", dict(step=-1)),
    ("row_offset", dict(row_offset=2**32 - 5)), ("row_offset", dict(row_offset=-1)),
    ("col_offset", dict(col_offset=-1)), ("backend", dict(backend="gpu")), ("backend", dict(backend="cuda")),
]


@pytest.mark.parametrize("name,options", BAD_OPTIONS, ids=[f"{i}-{case[0]}" for i, case in enumerate(BAD_OPTIONS)])
def test_bad_options_name_the_argument(name, options):
    with pytest.raises(ValueError, match=name):
        fne_fast.sample_negatives(*base_inputs().values(), **options)


@pytest.mark.parametrize("name,options", [("k", dict(k=0)), ("mode", dict(mode="x")), ("filled", dict(filled=99)),
                                          ("prior_k", dict(prior_k=1.0)), ("tau", dict(tau=-1.0))])
def test_the_raw_operator_checks_too(name, options):
    # Callers that bypass the Python wrapper still get an error naming the argument, not a crash.
    args = dict(k=1, mode="fne", margin=0.2, tau=0.5, prior_k=1e4, fn_margin=0.999, min_count=200, cutdown=True,
                seed=0, step=0, row_offset=0, col_offset=0, filled=40, check_finite=True)
    args.update(options)
    with pytest.raises(ValueError, match=name):
        torch.ops.fne_fast.sample_negatives(*base_inputs().values(), *args.values())


@pytest.mark.parametrize("name", ["anchors", "bank", "positive_sim", "stats"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_inputs_raise_unless_unchecked(name, value):
    inputs = base_inputs()
    inputs[name].view(-1)[3] = value
    with pytest.raises(ValueError, match=f"{name} contains NaN or Inf"):
        fne_fast.sample_negatives(*inputs.values(), k=2)
    index, _, valid = fne_fast.sample_negatives(*inputs.values(), k=2, check_finite=False)
    assert ((index >= -1) & (index < 40)).all()
    assert (valid == (index >= 0)).all()


def test_nan_bank_with_unchecked_input_keeps_indices_in_range():
    inputs = sample_inputs(16, 300, 8)
    inputs["bank"][::3] = float("nan")
    for mode in ("fne", "hardest", "uniform"):
        index, _, valid = fne_fast.sample_negatives(*inputs.values(), k=4, mode=mode, check_finite=False)
        assert ((index >= -1) & (index < 300)).all()
        assert (valid == (index >= 0)).all()
