"""Fine-tuned steps whose gradients do not depend on the split of the global batch (``fne_fast.training.units``):
the pairwise sum's block property, a step's gradients against plain autograd (float64), and W processes of batch
B against one of batch W·B, to the bit, with a split that the fixed order is needed for."""

import pytest
import torch

from fne_fast.models import MatchingHeads
from fne_fast.ops import SamplerOptions
from fne_fast.sampling.loss import FNELoss
from fne_fast.training.units import UnitStep, pairwise_sum

IMAGE_DIM, TEXT_DIM, JOINT, HIDDEN = 12, 10, 8, 16


def _parts(count: int, seed: int = 0) -> list[torch.Tensor]:
    """float32 parts of very different magnitudes, so that the order of the additions shows in the sum."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(64, generator=generator) * 10.0 ** torch.randint(-4, 5, (64,), generator=generator)
            for _ in range(count)]


@pytest.mark.parametrize("count, block", [(8, 2), (8, 4), (7, 4), (5, 2), (12, 4), (3, 1)])
def test_blocks_summed_first_give_the_whole_lists_pairwise_sum(count, block):
    parts = _parts(count)
    blocks = [pairwise_sum(parts[start:start + block]) for start in range(0, count, block)]
    assert torch.equal(pairwise_sum(blocks), pairwise_sum(parts))


def test_the_order_of_the_additions_shows_in_these_sums():
    """The data above can tell orders apart: a left fold and a block of three break the equality."""
    parts = _parts(8)
    left_fold = parts[0]
    for part in parts[1:]:
        left_fold = left_fold + part
    assert not torch.equal(left_fold, pairwise_sum(parts))
    threes = [pairwise_sum(parts[start:start + 3]) for start in range(0, 8, 3)]
    assert not torch.equal(pairwise_sum(threes), pairwise_sum(parts))
    with pytest.raises(ValueError, match="at least one part"):
        pairwise_sum([])


def _heads(dtype=torch.float32) -> MatchingHeads:
    torch.manual_seed(5)
    return MatchingHeads(IMAGE_DIM, TEXT_DIM, JOINT, HIDDEN, momentum=0.9).to(dtype)


def _batch(rows: int, dtype=torch.float32, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, IMAGE_DIM, generator=generator, dtype=dtype),
            torch.randn(rows, TEXT_DIM, generator=generator, dtype=dtype), torch.arange(rows) // 2)


def _unit_gradients(heads, image_inputs, text_inputs, ids, unit_rows, group=None):
    units = UnitStep(heads, image_inputs, text_inputs, unit_rows=unit_rows)  # (on the CPU)
    loss, _ = FNELoss("fne", SamplerOptions(margin=0.2), group=group, batch_invariant=True)(
        units.image, units.text, units.image_key, units.text_key, ids, warmup=True)
    loss.backward()
    parameters = list(heads.image_head.parameters()) + list(heads.text_head.parameters())
    units.backward(parameters, group)
    return [parameter.grad for parameter in parameters], units


@pytest.mark.parametrize("rows, unit_rows", [(10, 4), (8, 8), (3, 4)])
def test_a_steps_gradients_are_the_whole_batchs(rows, unit_rows):
    """float64, so that the order of the sums is below the tolerance: the units' gradients against autograd
    through the whole batch; the keys are the momentum copies'; the gradients keep the parameters' layout."""
    heads = _heads(torch.float64)
    image_inputs, text_inputs, ids = _batch(rows, torch.float64)
    got, units = _unit_gradients(heads, image_inputs, text_inputs, ids, unit_rows)
    image, text, image_key, text_key = heads(image_inputs, text_inputs)
    # (a product's rows can round differently with the number of rows: one reason a unit runs on its own)
    torch.testing.assert_close(units.image_key, image_key, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(units.text_key, text_key, rtol=1e-12, atol=1e-14)
    loss, _ = FNELoss("fne", SamplerOptions(margin=0.2))(image, text, image_key, text_key, ids, warmup=True)
    parameters = list(heads.image_head.parameters()) + list(heads.text_head.parameters())
    wanted = torch.autograd.grad(loss, parameters, allow_unused=True)
    for grad, expected, parameter in zip(got, wanted, parameters):
        torch.testing.assert_close(grad, torch.zeros_like(parameter) if expected is None else expected,
                                   rtol=1e-12, atol=1e-14)
        assert grad.stride() == parameter.stride()


def _ranks_gradients(rank, world_size, global_rows, batch_rows, unit_rows):
    """This rank's slice of a global batch of ``global_rows`` (rank r: rows r·B to (r+1)·B, fewer or none in an
    epoch's last batch) through one batch-invariant step."""
    import torch.distributed as dist

    image_inputs, text_inputs, ids = _batch(global_rows)
    mine = slice(min(rank * batch_rows, global_rows), min((rank + 1) * batch_rows, global_rows))
    got, _ = _unit_gradients(_heads(), image_inputs[mine], text_inputs[mine], ids[mine], unit_rows,
                             group=dist.group.WORLD)
    return got


# (W, B, the global batch's rows): full batches, and last batches that leave one rank part of a unit or nothing.
@pytest.mark.parametrize("world_size, batch_rows, global_rows", [(2, 16, 32), (4, 8, 32), (2, 16, 20), (2, 16, 10)])
def test_processes_with_batch_b_take_one_process_steps_with_batch_wb_to_the_bit(world_size, batch_rows,
                                                                               global_rows):
    from fne_fast.sampling.launch import results_of, run_in_processes

    unit_rows = 8
    # One process at the ranks' thread count (one): a product's rounding can depend on the threads too.
    one = results_of(run_in_processes(_ranks_gradients, 1, global_rows, global_rows, unit_rows))[0]
    for ranks in results_of(run_in_processes(_ranks_gradients, world_size, global_rows, batch_rows, unit_rows)):
        assert all(torch.equal(grad, expected) for grad, expected in zip(ranks, one))
    # The fixed order is what makes them equal: one process summing its rows in one unit gives other bits.
    whole = results_of(run_in_processes(_ranks_gradients, 1, global_rows, global_rows, global_rows))[0]
    assert not all(torch.equal(grad, expected) for grad, expected in zip(whole, one))
