"""The sharded MemoryBank in real processes (gloo, CPU): against one unsharded bank fed the global batches and one
``sample_negatives`` call over the whole bank with the gathered anchors (docs/DESIGN.md §3.1), and its faults.

Each test spawns its processes once and runs all its cases inside them (a spawn costs seconds). Embeddings are
"exact" (every dot product exact in float32), so the oracle's indices must be met exactly.
"""

import time

import pytest
import torch
import torch.distributed as dist

import fne_fast
from fne_fast.ops import SamplerOptions
from fne_fast.sampling.bank import MemoryBank, remote_rows, sharded_traffic
from fne_fast.sampling.distributed import PeerFailure, count_traffic
from fne_fast.sampling.launch import results_of, run_in_processes
from fne_fast.ops.testing import EXACT_STATS

SIZE, DIM = 12, 8  # 12 rows divide by 2 and 3 ranks
GUIDE_DIM = 5  # language guidance's guides per row, in the banks that hold them
# Local batch sizes per step and rank: a partly filled bank whose last shard is still empty, a step with no rows
# at all, uneven and empty local batches, a wrap-around, and a global batch longer than the bank.
SCHEDULE = ([3, 0, 2], [0, 0, 0], [5, 4, 1], [1, 0, 0], [9, 6, 1])
# Sampler options tried at every step: every mode, k > 1, steep weights, fn_tau = inf (more fallbacks).
SAMPLINGS = (dict(mode="fne", k=1), dict(mode="fne", k=4, tau=4.0), dict(mode="hardest", k=4),
             dict(mode="uniform", k=3), dict(mode="fne", k=2, fn_tau=float("inf"), min_count=0))


def _exact(rows, seed, dim=DIM):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(-4, 5, (rows, dim), generator=generator) / 8.0


def _global_step(step, counts):
    """The global batch of a step: bank keys and ids, then anchors, positive similarities and anchor ids. Ids
    repeat every 3 rows, so an anchor's non-positive candidates can run out (invalid slots) in a small bank."""
    total = sum(counts)
    ids = (torch.arange(total) + step) % 3
    return (_exact(total, 2 * step), ids, _exact(total, 2 * step + 1), torch.full((total,), 0.5),
            (torch.arange(total) + 1) % 3)


def _check_traffic(sent, counts, rank, k, dtype, index, valid, guide_dim):
    """The bytes this rank sent for a step's enqueue and sample are docs/DESIGN.md's formula, its data-dependent
    terms (rows fetched from and served to other ranks) counted from the oracle's chosen rows."""
    fetched, served = remote_rows(counts, index, valid, SIZE // len(counts))
    expected = sharded_traffic(counts, rank, k, DIM, torch.finfo(dtype).bits // 8, rows_fetched=fetched[rank],
                               rows_served=served[rank], guide_dim=guide_dim)
    measured = {kind: sent.get(kind, 0) for kind in expected}
    assert measured == expected, (counts, rank, k, dtype, measured, expected)


def _compare_with_one_bank(rank, world_size):
    group = dist.group.WORLD
    stats = torch.tensor(EXACT_STATS)
    seen = {"fallback": 0, "invalid": 0, "checks": 0, "counted": 0}
    # float32 and bf16 banks, and a bank with language guidance's guides, every draw guided by them.
    for dtype, guide_dim in ((torch.float32, 0), (torch.bfloat16, 0), (torch.float32, GUIDE_DIM)):
        sharded = MemoryBank(SIZE, DIM, dtype=dtype, group=group, guide_dim=guide_dim)
        whole = MemoryBank(SIZE, DIM, dtype=dtype, guide_dim=guide_dim)
        guided = dict(guide_threshold=0.0) if guide_dim else {}
        for step, counts in enumerate(SCHEDULE):
            counts = counts[:world_size]
            keys, ids, anchors, positive_sim, anchor_ids = _global_step(step, counts)
            guides = _exact(sum(counts), 100 + step, GUIDE_DIM) if guide_dim else None
            mine = slice(sum(counts[:rank]), sum(counts[:rank + 1]))
            with count_traffic() as ring_sent:
                sharded.enqueue(keys[mine], ids[mine], guides=guides[mine] if guide_dim else None)
            whole.enqueue(keys, ids, guides=guides)
            rows = slice(sharded.row_begin, sharded.row_begin + sharded.shard_size)
            assert torch.equal(sharded.features, whole.features[rows]) and torch.equal(sharded.ids, whole.ids[rows])
            assert not guide_dim or torch.equal(sharded.guides, whole.guides[rows])
            assert (sharded.pointer, sharded.filled) == (whole.pointer, whole.filled)
            # A row's guide is its key's pair's; an anchor's is taken from the batch's guides shifted by one row.
            anchor_guides = torch.roll(guides, 1, 0) if guide_dim else None
            op_guides = dict(anchor_guides=anchor_guides, bank_guides=whole.guides) if guide_dim else {}
            for options in SAMPLINGS:
                options = dict(options, **guided)
                with count_traffic() as sent:
                    got = sharded.sample(anchors[mine], positive_sim[mine], anchor_ids[mine], stats,
                                         SamplerOptions(**options), seed=7, step=step,
                                         anchor_guides=anchor_guides[mine] if guide_dim else None)
                # The bank draws in its own dtype: the anchors are rounded to it first.
                index, sim, valid, key = fne_fast.sample_negatives(
                    anchors.to(dtype), whole.features, positive_sim, anchor_ids, whole.ids, stats, seed=7, step=step,
                    filled=whole.filled, return_keys=True, **op_guides, **options)
                wanted_rows = torch.where(valid.unsqueeze(-1), whole.features[index.clamp(min=0)], 0)
                wanted_ids = torch.where(valid, whole.ids[index.clamp(min=0)], -1)
                for name, actual, wanted in zip(("index", "sim", "valid", "key", "rows", "ids"), got,
                                                (index, sim, valid, key, wanted_rows, wanted_ids)):
                    assert torch.equal(actual, wanted[mine]), (name, step, options, actual, wanted[mine])
                _check_traffic(dict(sent, **ring_sent), counts, rank, options["k"], dtype, index, valid, guide_dim)
                seen["fallback"] += int((valid & ~torch.isfinite(key)).sum())
                seen["invalid"] += int((~valid).sum())
                seen["checks"] += 1
            # Per-anchor thresholds travel with the anchors, and the shards' exceedance counts add up.
            thresholds = torch.tensor([0.0, 0.25, float("inf"), -0.25, float("-inf"), 0.5] * 4)[:sum(counts)]
            options = dict(mode="fne", k=2, min_count=0, **guided)
            got = sharded.sample(anchors[mine], positive_sim[mine], anchor_ids[mine], stats, SamplerOptions(**options),
                                 seed=7, step=step, fn_thresholds=thresholds[mine], count_above=True,
                                 anchor_guides=anchor_guides[mine] if guide_dim else None)
            wanted = fne_fast.sample_negatives(anchors.to(dtype), whole.features, positive_sim, anchor_ids, whole.ids,
                                               stats, seed=7, step=step, filled=whole.filled, return_keys=True,
                                               fn_thresholds=thresholds, return_counts=True, **op_guides, **options)
            for name, actual, expected in zip(("index", "sim", "valid", "key", "above"), (*got[:4], got.above),
                                              wanted):
                assert torch.equal(actual, expected[mine]), (name, step, actual, expected[mine])
            seen["counted"] += int(wanted[4].sum())  # the global batch's, the same on every rank
        state = sharded.state_dict()
        if rank == 0:
            assert torch.equal(state["features"], whole.features) and torch.equal(state["ids"], whole.ids)
            assert not guide_dim or torch.equal(state["guides"], whole.guides)
            assert (state["pointer"], state["filled"]) == (whole.pointer, whole.filled)
        else:
            assert state is None
    return seen


@pytest.mark.parametrize("world_size", [2, 3])
def test_sharded_sample_equals_one_call_over_the_whole_bank(world_size):
    seen = results_of(run_in_processes(_compare_with_one_bank, world_size))
    assert all(counts == seen[0] for counts in seen)  # every rank checked the same global results
    assert seen[0]["checks"] == 3 * len(SCHEDULE) * len(SAMPLINGS)
    assert seen[0]["fallback"] > 0 and seen[0]["invalid"] > 0  # the cases reach fallbacks and invalid slots
    assert seen[0]["counted"] > 0  # some candidates lie above their anchors' thresholds


def _bf16_on_unit_vectors(rank, world_size):
    """A bf16 bank of realistic unit vectors, whose dot products round: the sharded bank must take one process's
    GEMM (anchors in the bank's dtype), or last-bit differences flip candidates at the cut-down and at ties. The
    cut-downs are placed exactly on similarities one process computes."""
    group = dist.group.WORLD
    generator = torch.Generator().manual_seed(11)
    size, dim, anchors_per_rank = 48, 64, (5, 3, 4)
    keys = torch.nn.functional.normalize(torch.randn(size, dim, generator=generator), dim=1)
    ids = torch.arange(size) % 7
    total = sum(anchors_per_rank[:world_size])
    anchors = torch.nn.functional.normalize(torch.randn(total, dim, generator=generator), dim=1)
    anchor_ids, positive_sim = torch.arange(total) % 5, torch.full((total,), 0.4)
    whole, sharded = MemoryBank(size, dim, dtype=torch.bfloat16), MemoryBank(size, dim, dtype=torch.bfloat16,
                                                                             group=group)
    whole.enqueue(keys, ids)
    rows = slice(rank * size // world_size, (rank + 1) * size // world_size)  # the global batch, split by rank
    sharded.enqueue(keys[rows], ids[rows])
    mine = slice(sum(anchors_per_rank[:rank]), sum(anchors_per_rank[:rank + 1]))
    hardest = whole.sample(anchors, positive_sim, anchor_ids, torch.tensor(EXACT_STATS), SamplerOptions(
        mode="hardest", k=4))
    with count_traffic() as sent:  # the anchors travel in the bank's dtype, with their ids and s⁺ as 16 bytes
        sharded.sample(anchors[mine], positive_sim[mine], anchor_ids[mine], torch.tensor(EXACT_STATS))
    assert sent["anchors"] == (world_size - 1) * max(anchors_per_rank[:world_size]) * (2 * dim + 16)
    checks = 0
    for threshold in hardest.sim[:, 1:].flatten()[:6].tolist():
        margin = SamplerOptions().margin
        stats = torch.tensor([threshold + margin, 0.01, 0.0, 0.02, 100.0])
        for options in (dict(mode="fne", k=1), dict(mode="uniform", k=2), dict(mode="hardest", k=4)):
            got = sharded.sample(anchors[mine], positive_sim[mine], anchor_ids[mine], stats,
                                 SamplerOptions(**options), seed=3, step=checks)
            wanted = whole.sample(anchors, positive_sim, anchor_ids, stats, SamplerOptions(**options), seed=3,
                                  step=checks)
            assert got.above is None and wanted.above is None
            for name, actual, expected in zip(got._fields[:6], got, wanted):
                assert torch.equal(actual, expected[mine]), (name, threshold, options)
            checks += 1
    return checks


@pytest.mark.parametrize("world_size", [2, 3])
def test_a_bf16_bank_of_unit_vectors_samples_the_negatives_of_one_process(world_size):
    checks = results_of(run_in_processes(_bf16_on_unit_vectors, world_size))
    assert checks == [18] * world_size


def _argument_errors(rank, world_size):
    group = dist.group.WORLD
    with pytest.raises(ValueError, match="size must divide by the number of processes 2"):
        MemoryBank(7, DIM, group=group)
    with pytest.raises(ValueError, match=r"disagree on size, dim, dtype, guide_dim: rank 0 has size=12, dim=8, "
                                         r"dtype=float32, guide_dim=0; rank 1 has size=12, dim=4"):
        MemoryBank(SIZE, DIM if rank == 0 else 4, group=group)
    with pytest.raises(ValueError, match=r"guide_dim=3; rank 1 has size=12, dim=8, dtype=float32, guide_dim=0"):
        MemoryBank(SIZE, DIM, group=group, guide_dim=3 if rank == 0 else 0)
    with pytest.raises(ValueError, match="dtype=bfloat16"):
        MemoryBank(SIZE, DIM, dtype=torch.float32 if rank == 0 else torch.bfloat16, group=group)
    bank = MemoryBank(SIZE, DIM, group=group)
    with pytest.raises(ValueError, match=r"MemoryBank.enqueue: rank 1: features must be \[B, 8\], got shape \(3, 5\)"):
        bank.enqueue(torch.zeros(3, DIM if rank == 0 else 5), torch.zeros(3, dtype=torch.int64))
    keys, ids, anchors, positive_sim, anchor_ids = _global_step(0, [4, 4])
    mine = slice(4 * rank, 4 * rank + 4)
    bank.enqueue(keys[mine], ids[mine])
    stats = torch.tensor(EXACT_STATS)
    arguments = (anchors[mine], positive_sim[mine], anchor_ids[mine])
    with pytest.raises(ValueError, match="disagree on k"):
        bank.sample(*arguments, stats, SamplerOptions(k=1 + rank))
    with pytest.raises(ValueError, match="rank 1: backend must be one of"):
        bank.sample(*arguments, stats, backend="cpu" if rank == 0 else "gpu")
    with pytest.raises(ValueError, match="disagree on .*other options"):
        bank.sample(*arguments, stats, SamplerOptions(tau=1.0 + rank))
    with pytest.raises(ValueError, match="disagree on .*stats"):
        bank.sample(*arguments, stats + rank)
    with pytest.raises(ValueError, match=r"rank 1: anchor_guides are read only with options.guide_threshold"):
        bank.sample(*arguments, stats, anchor_guides=torch.zeros(4, 3) if rank == 1 else None)
    with pytest.raises(ValueError, match=r"ranks 0, 1: options.guide_threshold needs a bank built with guide_dim"):
        bank.sample(*arguments, stats, SamplerOptions(guide_threshold=0.5), anchor_guides=torch.zeros(4, 3))
    with pytest.raises(ValueError, match=r"rank 1: anchors must be a \[B, 8\] tensor"):
        bank.sample(anchors[mine, :DIM - rank], positive_sim[mine], anchor_ids[mine], stats)
    # Counts a caller passes (no agreement) must name this rank's rows; a wrong one raises before any collective.
    with pytest.raises(ValueError, match=r"MemoryBank.sample: counts must name every rank's rows \(2 numbers\), "
                                         r"this rank's 4"):
        bank.sample(*arguments, stats, counts=[3, 4] if rank == 0 else [4, 3])
    with pytest.raises(ValueError, match=r"MemoryBank.enqueue: counts must name every rank's rows"):
        bank.enqueue(keys[mine], ids[mine], counts=[4])
    # No collective was left half done: the bank still works, and with the counts given it draws the same.
    index = bank.sample(*arguments, stats, SamplerOptions(k=2)).index
    assert torch.equal(bank.sample(*arguments, stats, SamplerOptions(k=2), counts=[4, 4]).index, index)
    return index.tolist()


def test_bad_arguments_are_the_same_clear_error_on_every_rank():
    results_of(run_in_processes(_argument_errors, 2))


def _sample_once(bank, rank):
    keys, ids, anchors, positive_sim, anchor_ids = _global_step(0, [2, 2])
    mine = slice(2 * rank, 2 * rank + 2)
    bank.enqueue(keys[mine], ids[mine])
    return bank.sample(anchors[mine], positive_sim[mine], anchor_ids[mine], torch.tensor(EXACT_STATS))


def _one_rank_fails(rank, world_size, how, timeout):
    bank = MemoryBank(SIZE, DIM, group=dist.group.WORLD)
    if rank == 1:
        if how == "dies":
            import os

            os._exit(3)
        time.sleep(timeout + 1.0)  # raised and is still cleaning up: it does not reach the collective in time
        return None
    started = time.time()
    with pytest.raises(PeerFailure, match="MemoryBank.enqueue failed on rank 0 of 2: another rank raised, exited"):
        _sample_once(bank, rank)
    return time.time() - started


@pytest.mark.parametrize("how,timeout", [("dies", 30.0), ("lingers", 2.0)])
def test_a_failed_rank_stops_the_others_with_a_clear_error(how, timeout):
    outcomes = run_in_processes(_one_rank_fails, 2, how, timeout, timeout=timeout, deadline=60.0)
    waited = results_of(outcomes[:1])[0]
    # A rank that died closed its connections: the others stop at once, long before the timeout; one that is
    # alive but stalled is given up on after the timeout.
    assert waited < (10.0 if how == "dies" else timeout + 3.0)
    if how == "lingers":
        assert waited >= timeout - 0.5


def _fails_inside_a_sample(rank, world_size, where):
    """Rank 1 raises inside the op, or is SIGKILLed between the candidate exchange and the row fetch; rank 0 must
    stop at its next collective with a PeerFailure naming it, at once (the dead rank closed its connections)."""
    import os
    import signal

    from fne_fast.sampling import bank as bank_module
    from fne_fast.sampling import distributed

    bank = MemoryBank(SIZE, DIM, group=dist.group.WORLD)
    if rank == 1 and where == "op":
        def broken_op(*arguments, **options):
            raise RuntimeError("the op failed on this rank")
        bank_module.sample_negatives_with_options = broken_op
    if rank == 1 and where == "between exchanges":
        def killed(*arguments, **options):
            os.kill(os.getpid(), signal.SIGKILL)
        distributed.exchange_counts = killed
    if rank == 1:
        _sample_once(bank, rank)
        return None
    started = time.time()
    collective = "all_to_all of candidates" if where == "op" else "all_to_all of the row counts"
    with pytest.raises(PeerFailure, match=f"{collective} failed on rank 0 of 2: another rank raised, exited"):
        _sample_once(bank, rank)
    return time.time() - started


@pytest.mark.parametrize("where", ["op", "between exchanges"])
def test_a_rank_that_fails_inside_a_sample_stops_the_other_with_a_clear_error(where):
    outcomes = run_in_processes(_fails_inside_a_sample, 2, where, timeout=30.0, deadline=60.0)
    assert results_of(outcomes[:1])[0] < 10.0  # long before the 30 s timeout
    assert not outcomes[1].ok
    if where == "op":
        assert "the op failed on this rank" in outcomes[1].error
    else:
        assert outcomes[1].exit_code == -9
