"""RunningStats against a plain per-row loop over the authors' definition (docs/DESIGN.md §1)."""

from __future__ import annotations

import math

import pytest
import torch

from fne_fast import RunningStats


def loop_statistics(batches):
    """Straightforward per-row loop: right pairs, their samples, running mean and the authors' variance."""
    positives, negatives = [], []
    positive_squares = negative_squares = 0.0
    for sim in batches:
        sim = sim.double()
        size = sim.shape[0]
        step_positive, step_negative = [], []
        for i in range(size):
            if int(sim[i].argmax()) == i and int(sim[:, i].argmax()) == i:
                step_positive.append(float(sim[i, i]))
                row = [0.0 if j == i else float(sim[i, j]) for j in range(size)]
                column = [0.0 if j == i else float(sim[j, i]) for j in range(size)]
                step_negative += [max(row), max(column)]
        positives += step_positive
        negatives += step_negative
        if positives:
            mean = sum(positives) / len(positives)
            positive_squares += sum((x - mean) ** 2 for x in step_positive)
        if negatives:
            mean = sum(negatives) / len(negatives)
            negative_squares += sum((x - mean) ** 2 for x in step_negative)

    def summary(samples, squares):
        count = len(samples)
        return (sum(samples) / count if count else 0.0), (squares / (count - 1) if count > 1 else 0.0)

    mu_pos, var_pos = summary(positives, positive_squares)
    mu_neg, var_neg = summary(negatives, negative_squares)
    return [mu_pos, var_pos, mu_neg, var_neg, float(len(positives))]


def random_batches(num_batches, size, seed=0):
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(num_batches):
        sim = torch.rand(size, size, generator=generator) * 0.6 - 0.1
        sim += torch.eye(size) * torch.rand(size, generator=generator) * 0.7  # most, not all, pairs are right
        batches.append(sim.float())
    return batches


def test_matches_the_per_row_loop():
    batches = random_batches(7, 24)
    stats = RunningStats()
    for sim in batches:
        stats.update(sim)
    expected = loop_statistics(batches)
    assert expected[4] > 20
    torch.testing.assert_close(stats.as_tensor().double(), torch.tensor(expected, dtype=torch.float64),
                               rtol=1e-6, atol=1e-7)


def test_a_wrong_variance_order_would_be_caught():
    # The authors' variance takes each step's terms about the mean *after* that step; the textbook two-pass
    # variance over all samples differs, and the test above distinguishes them on these batches.
    batches = random_batches(7, 24)
    stats = RunningStats()
    for sim in batches:
        stats.update(sim)
    loop = loop_statistics(batches)
    positives = torch.cat([sim.diagonal()[(sim.argmax(1) == torch.arange(24)) & (sim.argmax(0) == torch.arange(24))]
                           for sim in batches]).double()
    assert not math.isclose(positives.var().item(), loop[1], rel_tol=1e-6)
    assert math.isclose(stats.as_tensor()[1].item(), loop[1], rel_tol=1e-5)


def test_reset_state_dict_and_device_residency():
    batches = random_batches(3, 16, seed=1)
    stats = RunningStats()
    for sim in batches[:2]:
        stats.update(sim)
    copy = RunningStats()
    copy.load_state_dict(stats.state_dict())
    stats.update(batches[2])
    copy.update(batches[2])
    assert torch.equal(stats.as_tensor(), copy.as_tensor())
    assert stats.as_tensor().device == batches[0].device and stats.as_tensor().dtype == torch.float32
    stats.reset()
    assert torch.equal(stats.as_tensor(), torch.zeros(5))


def test_batch_without_right_pairs_changes_nothing():
    stats = RunningStats()
    stats.update(random_batches(1, 16)[0])
    before = stats.as_tensor()
    stats.update(torch.ones(8, 8) - torch.eye(8))  # every row's maximum is off the diagonal
    assert torch.equal(stats.as_tensor(), before)


def test_ema_option_tracks_recent_batches():
    stats = RunningStats(momentum=0.5)
    stats.update(torch.eye(4) * 0.9)
    stats.update(torch.eye(4) * 0.5)
    assert math.isclose(stats.as_tensor()[0].item(), 0.7, rel_tol=1e-6)
    with pytest.raises(ValueError, match="momentum"):
        RunningStats(momentum=1.5)
