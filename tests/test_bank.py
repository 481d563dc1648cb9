"""MemoryBank against a plain-Python ring buffer oracle: wrap-around, odd batch sizes, oversized batches."""

import pytest
import torch

from fne_fast.bank import MemoryBank


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
