"""Benchmark of the sharded MemoryBank (docs/DESIGN.md §3.1): traffic, memory and time of a sampling step.

    python bench/bench_sharded_bank.py --write bench/RESULTS_sharded.md

1. Traffic: the bytes each rank sends for one enqueue and one sample of a global batch, counted from the
   collectives' tensor sizes (``fne_fast.sampling.distributed.count_traffic``), beside docs/DESIGN.md §3.1's
   formula and a replicated bank's, for W = 2 and 3, float32 and bfloat16, k = 1 and 4.
2. Time: one ``bank.sample`` of the same global problem, (G, N, D) = (256, 262146, 256), float32, the worst case
   of the CPU benchmark (nothing cut down), k = 1, with 1 process × 2 threads (unsharded), 2 processes × 1
   thread and 3 processes × 1 thread (gloo). The configurations are launched in turn, ``--rounds`` times, so that
   other load on the machine falls on all of them alike; each launch reports the median of ``--repeats`` steps,
   and the table gives the median over rounds. The W-process indices are compared with the 1-process ones.
3. The formula on paper for W = 8, 64, 512 (bfloat16, D = 256, N up to 1e9).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
from common import machine_description, median_seconds, sample_inputs  # noqa: E402
from fne_fast.sampling import distributed  # noqa: E402
from fne_fast.sampling.bank import MemoryBank  # noqa: E402
from fne_fast.io import atomic_write_text  # noqa: E402
from fne_fast.ops import SamplerOptions  # noqa: E402
from fne_fast.sampling.launch import results_of, run_in_processes  # noqa: E402

TERMS = ("anchors", "candidates", "rows", "ids", "ring")
# The large benchmark shape (256, 262144, 256) with two more bank rows: 262144 does not divide by 3,
# 262146 = 6 · 43691 does, so all three configurations solve the same problem.
TIMED_SHAPE = (256, 262146, 256)


def formula(world_size: int, batch: int, k: int, dim: int, element_bytes: int,
            total: int | None = None) -> dict[str, int]:
    """docs/DESIGN.md §3.1: bytes one rank sends per step and direction, by term; ``batch`` is the local batch (the
    largest one when they differ: the collectives pad to it), ``total`` the global batch (default W·batch: the
    candidates of every global anchor are gathered unpadded)."""
    others, total = world_size - 1, world_size * batch if total is None else total
    return {"anchors": others * batch * (dim * element_bytes + 16), "candidates": 16 * others * total * k,
            "rows": others * batch * k * dim * element_bytes, "ids": others * batch * k * 8,
            "ring": others * batch * (dim * element_bytes + 8)}


def _local_rows(total: int, world_size: int, rank: int) -> slice:
    """Rank ``rank``'s part of ``total`` global rows: as even as possible, the first ranks one row more."""
    base, extra = divmod(total, world_size)
    begin = rank * base + min(rank, extra)
    return slice(begin, begin + base + (rank < extra))


def _one_step(rank, world_size, shape, dtype, k, group):
    """Enqueue a global batch of keys into a bank of ``shape``'s N rows, then sample for a global batch of
    anchors; returns the bytes sent by label, the bank's bytes on this rank and the local batch size."""
    total, size, dim = shape
    inputs = sample_inputs(total, size, dim, kind="worst_case", bank_dtype=dtype)
    bank = MemoryBank(size, dim, dtype=dtype, group=group)
    bank.load_state_dict({"features": inputs["bank"], "ids": inputs["bank_ids"], "pointer": 0, "filled": size})
    mine = _local_rows(total, world_size, rank)
    with distributed.count_traffic() as sent:
        bank.enqueue(inputs["anchors"][mine].to(dtype), inputs["anchor_ids"][mine])
        bank.sample(inputs["anchors"][mine], inputs["positive_sim"][mine], inputs["anchor_ids"][mine],
                    inputs["stats"], SamplerOptions(k=k))
    return dict(sent), bank.nbytes, mine.stop - mine.start


def _traffic_worker(rank, world_size, cases):
    return [_one_step(rank, world_size, shape, dtype, k, dist.group.WORLD) for shape, dtype, k in cases]


def _timing_worker(rank, world_size, shape, repeats):
    total, size, dim = shape
    group = dist.group.WORLD if world_size > 1 else None
    inputs = sample_inputs(total, size, dim, kind="worst_case")
    bank = MemoryBank(size, dim, group=group)
    bank.load_state_dict({"features": inputs["bank"], "ids": inputs["bank_ids"], "pointer": 0, "filled": size})
    mine = _local_rows(total, world_size, rank)
    arguments = (inputs["anchors"][mine], inputs["positive_sim"][mine], inputs["anchor_ids"][mine], inputs["stats"])
    del inputs
    with distributed.count_traffic() as sent:
        index = bank.sample(*arguments).index
    seconds = median_seconds(lambda: bank.sample(*arguments), repeats)
    return {"seconds": seconds, "index": index, "sent": dict(sent), "bank_bytes": bank.nbytes}


def measure_traffic() -> list[dict]:
    rows = []
    for world_size in (2, 3):
        total = 40 * world_size
        cases = [((total, 96, 64), dtype, k) for dtype in (torch.float32, torch.bfloat16) for k in (1, 4)]
        for (shape, dtype, k), per_rank in zip(cases, zip(*results_of(run_in_processes(
                _traffic_worker, world_size, cases)))):
            element_bytes = torch.finfo(dtype).bits // 8
            for rank, (sent, bank_bytes, batch) in enumerate(per_rank):
                rows.append({"W": world_size, "rank": rank, "dtype": str(dtype).replace("torch.", ""), "k": k,
                             "B": batch, "D": shape[2], "sent": sent, "bank_bytes": bank_bytes,
                             "formula": formula(world_size, batch, k, shape[2], element_bytes)})
    return rows


def measure_time(rounds: int, repeats: int) -> dict[tuple[int, int], dict]:
    configurations = [(1, 2), (2, 1), (3, 1)]  # (processes, threads each)
    runs: dict[tuple[int, int], list] = {configuration: [] for configuration in configurations}
    for round_number in range(rounds):
        for processes, threads in configurations:
            outcome = results_of(run_in_processes(_timing_worker, processes, TIMED_SHAPE, repeats,
                                                  threads=threads, deadline=900.0))
            runs[(processes, threads)].append(outcome)
            print(f"round {round_number}: {processes} process(es) x {threads} thread(s): "
                  f"{1e3 * max(rank['seconds'] for rank in outcome):.1f} ms", flush=True)
    return runs


def _mb(nbytes: float) -> str:
    return f"{nbytes / 1e6:.3f}"


def markdown(traffic: list[dict], runs: dict, rounds: int, repeats: int) -> str:
    lines = [f"Machine: {machine_description()}", "",
             "### Bytes each rank sends per step and direction (one enqueue + one sample), measured vs formula", "",
             "| W | rank | bank dtype | k | B | D | anchors | candidates | rows | ids | ring | total | formula | "
             "= formula | replicated bank sends | control (agreement rows) |",
             "|---|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|"]
    for row in traffic:
        measured = sum(row["sent"].get(term, 0) for term in TERMS)
        expected = sum(row["formula"].values())
        same = all(row["sent"].get(term, 0) == row["formula"][term] for term in TERMS)
        lines.append(f"| {row['W']} | {row['rank']} | {row['dtype']} | {row['k']} | {row['B']} | {row['D']} | "
                     + " | ".join(str(row["sent"].get(term, 0)) for term in TERMS)
                     + f" | {measured} | {expected} | {'yes' if same else 'NO'} | {row['formula']['ring']} | "
                     f"{row['sent'].get('control', 0)} |")
    total, size, dim = TIMED_SHAPE
    single = statistics.median(max(rank["seconds"] for rank in outcome) for outcome in runs[(1, 2)])
    reference_index = runs[(1, 2)][0][0]["index"]
    lines += ["", f"### One sampling step of (G, N, D) = ({total}, {size}, {dim}), float32, worst case, k = 1", "",
              f"Median over {rounds} interleaved rounds of each launch's median of {repeats} steps (the slowest "
              "rank's). Bytes: what each rank sends in that step, and the formula's sampling terms (anchors, "
              "candidates, rows) with B = the largest local batch and the candidates of the G global anchors.",
              "",
              "| processes × threads | local batch B | ms / step | vs 1 process | bank MB per rank | bytes sent "
              "per rank | formula | indices = 1 process |", "|---|---|---:|---:|---:|---:|---:|---|"]
    for (processes, threads), outcomes in runs.items():
        seconds = statistics.median(max(rank["seconds"] for rank in outcome) for outcome in outcomes)
        first = outcomes[0]
        batch = _local_rows(total, processes, 0).stop
        sent = max(sum(rank["sent"].get(term, 0) for term in TERMS) for rank in first)
        expected = sum(value for term, value in formula(processes, batch, 1, dim, 4, total).items()
                       if term != "ring")
        same_index = torch.equal(torch.cat([rank["index"] for rank in first]), reference_index)
        lines.append(f"| {processes} × {threads} | {batch} | {1e3 * seconds:.1f} | {seconds / single:.2f}x | "
                     f"{max(rank['bank_bytes'] for rank in first) / 1e6:.1f} | {sent} | "
                     f"{expected if processes > 1 else 0} | {'yes' if same_index else 'NO'} |")
    return "\n".join(lines) + "\n"


def paper_table(batch: int = 256, dim: int = 256, k: int = 1) -> str:
    """Memory and communication per rank from the formula: bfloat16 (s = 2), ``batch`` anchors per rank."""
    lines = [f"### On paper: bfloat16, D = {dim}, B = {batch} anchors per rank, k = {k} (per step and direction)",
             "", "| W | N | sharded bank MB per rank | replicated bank MB per rank | sharded sends MB per rank "
             "(anchors + candidates + rows + ring) | replicated sends MB per rank |",
             "|---|---|---:|---:|---:|---:|"]
    for world_size in (8, 64, 512):
        for size in (64_000_000, 1_000_000_000):
            row_bytes = dim * 2 + 8
            terms = formula(world_size, batch, k, dim, 2)
            lines.append(f"| {world_size} | {size:.1e} | {size * row_bytes / world_size / 1e6:,.0f} | "
                         f"{size * row_bytes / 1e6:,.0f} | {sum(terms.values()) / 1e6:,.1f} ("
                         + " + ".join(f"{terms[term] / 1e6:,.1f}" for term in TERMS)
                         + f") | {terms['ring'] / 1e6:,.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Benchmark of the sharded MemoryBank")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--write", default=None, help="write the markdown tables to this file")
    args = parser.parse_args(argv)
    load_before = os.getloadavg()[0]
    traffic = measure_traffic()
    runs = measure_time(args.rounds, args.repeats)
    # Other jobs on the machine slow every configuration; the load average says how busy it was.
    load = f"Load average (1 min) at the start and the end: {load_before:.1f}, {os.getloadavg()[0]:.1f}\n\n"
    table = load + markdown(traffic, runs, args.rounds, args.repeats) + "\n" + paper_table()
    print(table)
    if args.write:
        atomic_write_text(args.write, table)


if __name__ == "__main__":
    main()
