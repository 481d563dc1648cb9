"""MemoryBank against a plain-Python ring buffer oracle: wrap-around, odd batch sizes, oversized batches."""

import pytest
import torch

from fne_fast.ops import SamplerOptions
from fne_fast.sampling.bank import MemoryBank


class _ListRing:
    """The oracle: a Python list written one row at a time."""

    def __init__(self, size):
        self.rows, self.ids, self.next, self.count = [None] * size, [-1] * size, 0, 0

    def enqueue(self, features, ids):
        for row, identity in zip(features, ids.tolist()):
            self.rows[self.next], self.ids[self.next] = row.clone(), identity
            self.next = (self.next + 1) % len(self.rows)
            self.count = min(len(self.rows), self.count + 1)


@pytest.mark.parametrize("size,batch_sizes", [(10, [3] * 9), (7, [4, 1, 6, 2, 5]), (5, [12, 3, 9]),
                                              (16, [16, 16, 1]), (1, [1, 3])])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_enqueue_matches_a_row_by_row_ring(size, batch_sizes, dtype):
    generator = torch.Generator().manual_seed(size)
    bank, oracle = MemoryBank(size, 4, dtype=dtype), _ListRing(size)
    next_id = 0
    for rows in batch_sizes:
        features = torch.randn(rows, 4, generator=generator)
        ids = torch.arange(next_id, next_id + rows)
        next_id += rows
        bank.enqueue(features, ids)
        oracle.enqueue(features, ids)
        assert bank.filled == oracle.count and bank.pointer == oracle.next
        assert bank.ids.tolist() == oracle.ids
        for slot, row in enumerate(oracle.rows):
            expected = torch.zeros(4) if row is None else row
            torch.testing.assert_close(bank.features[slot].float(), expected.to(dtype).float())


def test_state_dict_round_trip_continues_identically():
    first, second = MemoryBank(6, 3), MemoryBank(6, 3)
    first.enqueue(torch.randn(4, 3), torch.arange(4))
    second.load_state_dict(first.state_dict())
    batch, ids = torch.randn(5, 3), torch.arange(4, 9)
    first.enqueue(batch, ids)
    second.enqueue(batch, ids)
    assert torch.equal(first.features, second.features) and torch.equal(first.ids, second.ids)
    assert first.filled == second.filled == 6 and first.pointer == second.pointer == 3


def test_rejects_wrong_shapes_with_named_arguments():
    bank = MemoryBank(4, 3)
    with pytest.raises(ValueError, match="features must be"):
        bank.enqueue(torch.randn(2, 5), torch.arange(2))
    with pytest.raises(ValueError, match="ids must be"):
        bank.enqueue(torch.randn(2, 3), torch.arange(3))
    with pytest.raises(ValueError, match="size and dim"):
        MemoryBank(0, 3)
    with pytest.raises(ValueError, match="bank state has shape"):
        MemoryBank(5, 3).load_state_dict(bank.state_dict())


@pytest.mark.parametrize("k", [1, 3])
def test_unsharded_sample_is_the_op_over_the_filled_rows_plus_their_features(k):
    from fne_fast import sample_negatives
    from fne_fast.ops.testing import sample_inputs

    inputs = sample_inputs(5, 9, 4, kind="exact", seed=k, num_ids=3)
    bank = MemoryBank(12, 4)
    bank.enqueue(inputs["bank"], inputs["bank_ids"])  # 9 of 12 rows filled
    arguments = (inputs["anchors"], inputs["positive_sim"], inputs["anchor_ids"], inputs["stats"])
    draw = bank.sample(*arguments, SamplerOptions(k=k), seed=4, step=2)
    index, sim, valid, key, rows, ids = draw[:6]
    assert draw.above is None  # counted only when asked
    wanted = sample_negatives(inputs["anchors"], bank.features, *arguments[1:3], bank.ids, inputs["stats"], k=k,
                              seed=4, step=2, filled=9, return_keys=True)
    for actual, expected in zip((index, sim, valid, key), wanted):
        assert torch.equal(actual, expected)
    assert (index < 9).all()
    assert torch.equal(rows, torch.where(valid.unsqueeze(-1), bank.features[index.clamp(min=0)], 0))
    assert torch.equal(ids, torch.where(valid, bank.ids[index.clamp(min=0)], -1))


def test_sample_draws_in_the_banks_dtype():
    from fne_fast import sample_negatives
    from fne_fast.ops.testing import sample_inputs

    inputs = sample_inputs(5, 9, 4, kind="random", seed=3, num_ids=3)
    bank = MemoryBank(9, 4, dtype=torch.bfloat16)
    bank.enqueue(inputs["bank"], inputs["bank_ids"])
    anchors = inputs["anchors"].double()  # as a float64 gradient check passes them
    draw = bank.sample(anchors, inputs["positive_sim"], inputs["anchor_ids"], inputs["stats"])
    wanted = sample_negatives(anchors.to(torch.bfloat16), bank.features, inputs["positive_sim"],
                              inputs["anchor_ids"], bank.ids, inputs["stats"], return_keys=True)
    for actual, expected in zip(draw[:4], wanted):
        assert torch.equal(actual, expected)
    assert draw.rows.dtype == torch.bfloat16


def test_sample_rejects_bad_arguments_naming_them():
    bank = MemoryBank(4, 3)
    anchors, positive_sim, ids, stats = torch.zeros(2, 3), torch.zeros(2), torch.zeros(2, dtype=torch.int64), \
        torch.zeros(5)
    with pytest.raises(TypeError, match="filled"):  # the bank sets it
        bank.sample(anchors, positive_sim, ids, stats, filled=2)
    with pytest.raises(ValueError, match="^options must be a SamplerOptions, got dict"):
        bank.sample(anchors, positive_sim, ids, stats, {"k": 2})
    with pytest.raises(ValueError, match="^backend must be one of"):
        bank.sample(anchors, positive_sim, ids, stats, backend="gpu")
    with pytest.raises(ValueError, match=r"anchors must be a \[B, 3\] tensor"):
        bank.sample(torch.zeros(2, 4), positive_sim, ids, stats)
    with pytest.raises(ValueError, match="anchor_ids must be a \\[2\\] int64 tensor"):
        bank.sample(anchors, positive_sim, ids.int(), stats)


def test_a_bank_with_guides_guides_its_draws_and_keeps_them_in_its_state():
    from fne_fast import sample_negatives
    from fne_fast.ops.testing import sample_inputs

    inputs = sample_inputs(6, 10, 4, kind="exact", seed=2, num_ids=3)
    guides = sample_inputs(6, 10, 3, kind="exact", seed=5)
    bank = MemoryBank(12, 4, guide_dim=3)
    bank.enqueue(inputs["bank"], inputs["bank_ids"], guides=guides["bank"])
    assert torch.equal(bank.guides[:10], guides["bank"]) and not bank.guides[10:].any()
    arguments = (inputs["anchors"], inputs["positive_sim"], inputs["anchor_ids"], inputs["stats"])
    options = SamplerOptions(k=2, guide_threshold=0.0)
    draw = bank.sample(*arguments, options, seed=3, anchor_guides=guides["anchors"])
    wanted = sample_negatives(inputs["anchors"], bank.features, *arguments[1:3], bank.ids, inputs["stats"], k=2,
                              seed=3, filled=10, guide_threshold=0.0, anchor_guides=guides["anchors"],
                              bank_guides=bank.guides, return_keys=True)
    for actual, expected in zip(draw[:4], wanted):
        assert torch.equal(actual, expected)
    unguided = bank.sample(*arguments, SamplerOptions(k=2), seed=3)
    assert not torch.equal(unguided.index, draw.index)  # the guides changed the draws
    copy = MemoryBank(12, 4, guide_dim=3)
    copy.load_state_dict(bank.state_dict())
    assert torch.equal(copy.guides, bank.guides)
    with pytest.raises(ValueError, match="holds guides, and this bank has none"):
        MemoryBank(12, 4).load_state_dict(bank.state_dict())


def test_guides_are_checked_naming_the_argument():
    bank, plain = MemoryBank(4, 3, guide_dim=2), MemoryBank(4, 3)
    with pytest.raises(ValueError, match=r"^guides must be a \[2, 2\] tensor"):
        bank.enqueue(torch.zeros(2, 3), torch.arange(2))
    with pytest.raises(ValueError, match="^guides given, but this bank has no guides"):
        plain.enqueue(torch.zeros(2, 3), torch.arange(2), guides=torch.zeros(2, 2))
    with pytest.raises(ValueError, match="^guide_dim must be an integer >= 0"):
        MemoryBank(4, 3, guide_dim=-1)
    arguments = (torch.zeros(2, 3), torch.zeros(2), torch.zeros(2, dtype=torch.int64), torch.zeros(5))
    guided = SamplerOptions(guide_threshold=0.5)
    with pytest.raises(ValueError, match="^options.guide_threshold needs a bank built with guide_dim"):
        plain.sample(*arguments, guided, anchor_guides=torch.zeros(2, 2))
    with pytest.raises(ValueError, match=r"^anchor_guides must be a \[2, 2\] tensor"):
        bank.sample(*arguments, guided)
    with pytest.raises(ValueError, match="^anchor_guides are read only with options.guide_threshold"):
        bank.sample(*arguments, anchor_guides=torch.zeros(2, 2))
