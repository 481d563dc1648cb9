"""The benchmarks' plain eager baseline (bench/plain_eager.py) samples the op's distribution: the same
chi-square test as the op's own, and the same test rejecting a deliberately wrong weighting. Its draws differ from
the op's (torch's RNG, not Philox), so only the distribution is compared."""

from __future__ import annotations

import os
import sys

import torch

from inputs import chi_square_p_value, distribution_inputs, expected_probabilities

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
from plain_eager import plain_eager_sampler  # noqa: E402


def test_plain_eager_sampler_follows_the_weights():
    inputs = distribution_inputs(copies=20000)
    torch.manual_seed(0)
    index, sims = plain_eager_sampler(*inputs.values(), tau=6.0)
    probabilities = expected_probabilities(inputs, 6.0)
    counts = torch.bincount(index[:, 0], minlength=probabilities.numel())
    assert chi_square_p_value(counts, probabilities) > 1e-3
    assert chi_square_p_value(counts, expected_probabilities(inputs, 3.0)) < 1e-6
    expected_sims = inputs["anchors"] @ inputs["bank"].T
    assert torch.equal(sims, expected_sims.gather(1, index))
