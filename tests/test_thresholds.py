"""GloFND's per-item thresholds (``ThresholdTable``) and their use by ``FNELoss``: the update rule against a float64
oracle, convergence to the quantile it targets with the op's own counts, the starting threshold, and the loss's
exclusion of what lies above (docs/DESIGN.md §6)."""

import math
from statistics import NormalDist

import pytest
import torch

import fne_fast
from fne_fast import SamplerOptions
from fne_fast.ops.testing import EXACT_STATS
from fne_fast.sampling.bank import MemoryBank
from fne_fast.sampling.loss import FNELoss
from fne_fast.sampling.thresholds import ThresholdTable


def _oracle_update(values, ids, used, above, filled, share, lr):
    """The rule item by item in float64: an item's step is lr × the mean of clamp(above / (share · filled) − 1,
    −1, 1) over its anchors, from the threshold its anchors used."""
    values = [float(v) for v in values]
    for item in sorted(set(ids.tolist())):
        rows = [row for row, other in enumerate(ids.tolist()) if other == item]
        step = sum(min(1.0, max(-1.0, above[row].item() / (share * filled) - 1)) for row in rows) / len(rows)
        values[item] = float(torch.tensor(used[rows[0]].item() + lr * step, dtype=torch.float32))
    return torch.tensor(values, dtype=torch.float32)


def test_update_is_the_pinball_step_averaged_over_an_items_anchors():
    table = ThresholdTable(6, share=0.1, lr=0.5)
    ids = torch.tensor([4, 1, 4, 0, 4])  # item 4 three times in one batch; items 2, 3, 5 not visited
    used = torch.tensor([0.3, -0.2, 0.3, 0.7, 0.3])
    above = torch.tensor([5, 0, 40, 100, 2])
    wanted = _oracle_update(table.values, ids, used, above, 100, 0.1, 0.5)
    table.update(ids, used, above, 100)
    torch.testing.assert_close(table.values, wanted, equal_nan=True, rtol=0, atol=1e-7)
    assert table.values[[2, 3, 5]].isnan().all()
    table.update(torch.tensor([2]), torch.tensor([math.inf]), torch.tensor([0]), 100)
    assert table.values[2].isnan()  # a start at +inf (no statistics yet) leaves the item unset
    # A rule without the mean over an item's anchors (their last step wins) must fail the same oracle.
    wrong = wanted.clone()
    wrong[4] = 0.3 + 0.5 * (2 / 10 - 1)
    assert not torch.allclose(wrong, wanted, equal_nan=True)


def test_a_never_set_threshold_starts_at_the_gaussian_quantile_of_the_negatives():
    stats = torch.tensor([0.6, 0.01, 0.2, 0.04, 50.0])
    table = ThresholdTable(3, share=0.05, lr=0.1)
    wanted = 0.2 + NormalDist().inv_cdf(0.95) * 0.2
    torch.testing.assert_close(table.lookup(torch.tensor([0, 2]), stats), torch.full((2,), wanted), rtol=0,
                               atol=1e-6)
    undefined = torch.tensor([0.6, 0.0, 0.2, 0.0, 0.0])  # no Gaussians yet: nothing excluded
    assert torch.equal(table.lookup(torch.tensor([1]), undefined), torch.tensor([math.inf]))
    table.values[1] = -0.5  # a set threshold is returned as stored
    assert table.lookup(torch.tensor([1]), stats).item() == -0.5


@pytest.mark.parametrize("share", [0.02, 0.2])
def test_thresholds_learned_from_the_ops_counts_reach_the_targeted_quantile(share):
    """Anchors revisited against a fixed bank: the table's thresholds, moved only by the counts the op returns,
    leave close to ``share`` of each anchor's candidates above them; a rule with the step's sign flipped does not."""
    generator = torch.Generator().manual_seed(3)
    anchors = torch.nn.functional.normalize(torch.randn(8, 16, generator=generator), dim=1)
    bank = torch.nn.functional.normalize(torch.randn(2000, 16, generator=generator), dim=1)
    ids, bank_ids = torch.arange(8), torch.arange(2000) + 8
    stats = torch.tensor([0.5, 0.01, 0.0, 0.06, 100.0])
    shares = {}
    for sign in (1.0, -1.0):
        table = ThresholdTable(8, share=share, lr=0.01)
        for visit in range(300):
            used = table.lookup(ids, stats)
            *_, above = fne_fast.sample_negatives(anchors, bank, torch.full((8,), 0.9), ids, bank_ids, stats,
                                                  fn_thresholds=used, return_counts=True, step=visit)
            if sign < 0:  # the deliberately wrong rule: thresholds move away from the quantile
                above = (2 * share * 2000 - above).clamp(min=0)
            table.update(ids, used, above, 2000)
        final = table.lookup(ids, stats)
        shares[sign] = ((anchors @ bank.T) > final[:, None]).double().mean(dim=1)
    assert torch.allclose(shares[1.0], torch.full((8,), share, dtype=torch.float64), atol=0.3 * share + 0.003)
    assert not torch.allclose(shares[-1.0], torch.full((8,), share, dtype=torch.float64), atol=0.3 * share + 0.003)


def _bank_and_batch():
    generator = torch.Generator().manual_seed(5)
    bank = MemoryBank(64, 8)
    bank.enqueue(torch.randint(-4, 5, (64, 8), generator=generator) / 8.0, torch.arange(64) % 16)
    anchors = torch.randint(-4, 5, (6, 8), generator=generator) / 8.0
    return bank, anchors, torch.tensor([0, 3, 3, 7, 9, 15])


def test_the_loss_never_draws_a_candidate_above_its_anchors_threshold_and_the_tables_learn():
    image_bank, image, ids = _bank_and_batch()
    text_bank, text, _ = _bank_and_batch()
    draws = []
    for bank in (image_bank, text_bank):  # record what the loss asks of each bank and what it gets
        def spy(*args, _sample=bank.sample, **kwargs):
            draws.append((kwargs["fn_thresholds"], _sample(*args, **kwargs)))
            return draws[-1][1]
        bank.sample = spy
    tables = (ThresholdTable(16, share=0.1, lr=0.2), ThresholdTable(16, share=0.1, lr=0.2))
    for table in tables:
        table.values[:] = 0.0
    loss = FNELoss("uniform", SamplerOptions(k=4, cutdown=False), thresholds=tables)
    value, sums = loss(image, text, image, text, ids, image_bank=image_bank, text_bank=text_bank, step=1)
    assert torch.isfinite(value) and len(draws) == 2
    for thresholds, draw in draws:
        assert torch.equal(thresholds, torch.zeros(6))
        assert draw.valid.any() and (draw.sim[draw.valid] <= 0).all()  # nothing above 0, fallbacks included
        assert draw.above.shape == (6,) and (draw.above > 0).any()
    # Every visited item moved by its step; the others kept their thresholds.
    visited = torch.zeros(16, dtype=torch.bool)
    visited[ids] = True
    for table in tables:
        assert (table.values[visited] != 0).all() and (table.values[~visited] == 0).all()
    assert sums["threshold_rows"].item() == 2 * ids.numel()


@pytest.mark.parametrize("arguments, message", [
    (dict(num_items=0, share=0.1, lr=0.1), "num_items"),
    (dict(num_items=4, share=1.0, lr=0.1), "share"),
    (dict(num_items=4, share=0.1, lr=float("nan")), "lr"),
])
def test_bad_settings_are_refused_naming_them(arguments, message):
    with pytest.raises(ValueError, match=message):
        ThresholdTable(arguments.pop("num_items"), **arguments)


def test_ids_outside_the_table_are_refused():
    table = ThresholdTable(4, share=0.1, lr=0.1)
    with pytest.raises(ValueError, match=r"ids must lie in \[0, 4\)"):
        table.lookup(torch.tensor([1, 4]), torch.tensor(EXACT_STATS))
    with pytest.raises(ValueError, match="ids must be a"):
        table.update(torch.tensor([[1]]), torch.zeros(1), torch.zeros(1, dtype=torch.int64), 10)


def test_the_state_round_trips_and_refuses_another_size():
    table = ThresholdTable(5, share=0.1, lr=0.1)
    table.update(torch.tensor([1, 3]), torch.tensor([0.2, 0.4]), torch.tensor([3, 0]), 10)
    other = ThresholdTable(5, share=0.1, lr=0.1)
    other.load_state_dict(table.state_dict())
    assert torch.equal(other.values.nan_to_num(7.0), table.values.nan_to_num(7.0))
    with pytest.raises(ValueError, match="threshold state"):
        ThresholdTable(6, share=0.1, lr=0.1).load_state_dict(table.state_dict())


def _steps_with_tables(group, rank=0, world_size=1):
    """Four steps of FNELoss with GloFND tables over sharded banks (a global batch of 6 split over the ranks):
    the tables after them and the losses."""
    generator = torch.Generator().manual_seed(11)
    banks = [MemoryBank(24, 8, group=group) for _ in range(2)]
    # (a share of 0.5 never clips the step: every count changes the table)
    tables = (ThresholdTable(5, share=0.5, lr=0.05), ThresholdTable(5, share=0.5, lr=0.05))
    for table in tables:
        table.values[:] = 0.0  # set thresholds: the steps follow the counts from the first one
    loss = FNELoss("fne", SamplerOptions(k=2, min_count=0), group=group, thresholds=tables)
    sizes = {1: [6], 2: [4, 2]}[world_size]
    mine = slice(sum(sizes[:rank]), sum(sizes[:rank + 1]))
    losses = []
    for step in range(4):
        image, text = (torch.nn.functional.normalize(torch.randn(6, 8, generator=generator), dim=1) for _ in "it")
        ids = torch.randint(0, 5, (6,), generator=generator)
        for bank, keys in zip(banks, (image, text)):
            bank.enqueue(keys[mine], ids[mine])
        value, sums = loss(image[mine], text[mine], image[mine], text[mine], ids[mine], image_bank=banks[0],
                           text_bank=banks[1], step=step)
        losses.append(float(sums["loss"]))
    return [table.values for table in tables], losses


def _sharded_steps(rank, world_size):
    import torch.distributed as dist

    return _steps_with_tables(dist.group.WORLD, rank, world_size)


def test_sharded_banks_keep_the_ranks_tables_equal_to_one_process():
    from fne_fast.sampling.launch import results_of, run_in_processes

    tables, losses = _steps_with_tables(None)
    per_rank = results_of(run_in_processes(_sharded_steps, 2))
    assert all((table != 0).sum() >= 3 for table in tables)  # the steps reached the tables
    for rank_tables, rank_losses in per_rank:
        for got, wanted in zip(rank_tables, tables):
            assert torch.equal(got, wanted)
    assert [sum(shares) for shares in zip(*(rank_losses for _, rank_losses in per_rank))] == pytest.approx(losses)
