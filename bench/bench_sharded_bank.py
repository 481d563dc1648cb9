"""Benchmark of the sharded MemoryBank (docs/DESIGN.md §3.1): traffic, memory and time of a sampling step.

    python bench/bench_sharded_bank.py --write bench/RESULTS_sharded.md --json bench/sharded_bank.json

1. Traffic: the bytes each rank sends for one enqueue and one sample of a global batch, counted from the
   collectives' tensor sizes (``fne_fast.sampling.distributed.count_traffic``), beside docs/DESIGN.md §3.1's
   formula (``fne_fast.sampling.bank.sharded_traffic``, its rows terms counted from the chosen rows) and a
   replicated bank's, for W = 2, 3 and 4, float32 and bfloat16, k = 1 and 4.
2. Scale: W = 1..4 processes over one bank of ``LARGE_SHAPE``'s 2²⁰ + 8 rows (float32, D = 256, G = 256 anchors,
   k = 1, 1 thread each): the bytes by kind against the formula, the bank memory per rank, the step time (one
   enqueue and one sample, median of ``--repeats``) and rank 0's peak memory while it writes the bank's state
   (``state_dict``: today the whole bank is gathered there).
3. Time: one ``bank.sample`` of the same global problem, (G, N, D) = (256, 262146, 256), float32, the worst case
   of the CPU benchmark (nothing cut down), k = 1, with 1 process × 2 threads (unsharded), 2 processes × 1
   thread and 3 processes × 1 thread (gloo). The configurations are launched in turn, ``--rounds`` times, so that
   other load on the machine falls on all of them alike; each launch reports the median of ``--repeats`` steps,
   and the table gives the median over rounds. The W-process indices are compared with the 1-process ones.
4. The formula on paper for W up to 512 (bfloat16, D = 256, N up to 1e9), the chosen rows spread evenly.

``--json`` writes 1, 2 and 4 as one file.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
from common import machine_description, median_seconds, peak_extra_bytes, sample_inputs  # noqa: E402
from fne_fast.sampling import distributed  # noqa: E402
from fne_fast.sampling.bank import MemoryBank, remote_rows, sharded_traffic  # noqa: E402
from fne_fast.io import atomic_write_text  # noqa: E402
from fne_fast.ops import SamplerOptions  # noqa: E402
from fne_fast.runs.shards import write_shard  # noqa: E402
from fne_fast.sampling.launch import results_of, run_in_processes  # noqa: E402

TERMS = ("anchors", "candidates", "requests", "rows", "ring")
# The large benchmark shape (256, 262144, 256) with two more bank rows: 262144 does not divide by 3,
# 262146 = 6 · 43691 does, so all three configurations solve the same problem.
TIMED_SHAPE = (256, 262146, 256)
# A bank of more than 2²⁰ rows that divides by 1, 2, 3 and 4 processes (1048584 = 12 · 87382).
LARGE_SHAPE = (256, 1048584, 256)


def _local_rows(total: int, world_size: int, rank: int) -> slice:
    """Rank ``rank``'s part of ``total`` global rows: as even as possible, the first ranks one row more."""
    base, extra = divmod(total, world_size)
    begin = rank * base + min(rank, extra)
    return slice(begin, begin + base + (rank < extra))


def formula_of_step(per_rank: list[dict], size: int, k: int, dim: int, element_bytes: int) -> list[dict]:
    """``sharded_traffic`` for each rank of one measured step, its rows terms counted from the ranks' chosen rows
    (``index`` and ``valid`` of each rank's anchors, in rank order)."""
    world_size = len(per_rank)
    counts = [rank["index"].shape[0] for rank in per_rank]
    index, valid = torch.cat([rank["index"] for rank in per_rank]), torch.cat([rank["valid"] for rank in per_rank])
    fetched, served = remote_rows(counts, index, valid, size // world_size)
    return [sharded_traffic(counts, rank, k, dim, element_bytes, rows_fetched=fetched[rank],
                            rows_served=served[rank]) for rank in range(world_size)]


def expected_traffic(world_size: int, batch: int, k: int, dim: int, element_bytes: int) -> dict[str, int]:
    """``sharded_traffic`` with every rank's local batch ``batch`` and the chosen rows spread evenly over the
    shards (each rank fetches and serves B·k·(W − 1)/W rows): the model for W beyond what runs here."""
    spread = batch * k * (world_size - 1) // world_size
    return sharded_traffic([batch] * world_size, 0, k, dim, element_bytes, rows_fetched=spread, rows_served=spread)


def _one_step(rank, world_size, shape, dtype, k, group, repeats=0):
    """Enqueue a global batch of keys into a bank of ``shape``'s N rows, then sample for a global batch of
    anchors; returns the bytes sent by kind, the chosen rows, the bank's bytes on this rank and, with
    ``repeats``, the median step time and the peak memory of writing the bank's state."""
    total, size, dim = shape
    inputs = sample_inputs(total, size, dim, kind="worst_case", bank_dtype=dtype)
    bank = MemoryBank(size, dim, dtype=dtype, group=group)
    bank.load_state_dict({"features": inputs["bank"], "ids": inputs["bank_ids"], "pointer": 0, "filled": size})
    mine = _local_rows(total, world_size, rank)
    keys, key_ids = inputs["anchors"][mine].to(dtype), inputs["anchor_ids"][mine]
    arguments = (inputs["anchors"][mine], inputs["positive_sim"][mine], inputs["anchor_ids"][mine], inputs["stats"])
    options = SamplerOptions(k=k)
    del inputs
    with distributed.count_traffic() as sent:
        bank.enqueue(keys, key_ids)
        sample = bank.sample(*arguments, options)
    result = {"sent": dict(sent), "index": sample.index, "valid": sample.valid, "bank_bytes": bank.nbytes}
    if repeats:
        result["seconds"] = median_seconds(lambda: (bank.enqueue(keys, key_ids), bank.sample(*arguments, options)),
                                           repeats)
        with tempfile.TemporaryDirectory() as out:  # a checkpoint: this rank writes its own rows' file
            result["checkpoint_peak_bytes"] = peak_extra_bytes(
                lambda: write_shard(out, 0, rank, world_size, {"bank": bank.shard_state()}))
        result["gather_peak_bytes"] = peak_extra_bytes(bank.state_dict)  # the whole bank gathered on rank 0
    return result


def _traffic_worker(rank, world_size, cases):
    return [_one_step(rank, world_size, shape, dtype, k, dist.group.WORLD) for shape, dtype, k in cases]


def _large_worker(rank, world_size, repeats):
    group = dist.group.WORLD if world_size > 1 else None
    return _one_step(rank, world_size, LARGE_SHAPE, torch.float32, 1, group, repeats)


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
        sample = bank.sample(*arguments)
    seconds = median_seconds(lambda: bank.sample(*arguments), repeats)
    return {"seconds": seconds, "index": sample.index, "valid": sample.valid, "sent": dict(sent),
            "bank_bytes": bank.nbytes}


def _rows(world_size: int, per_rank: list[dict], shape, dtype, k) -> list[dict]:
    """One record per rank: the bytes sent by kind beside the formula, and what else was measured."""
    element_bytes = torch.finfo(dtype).bits // 8
    formulas = (formula_of_step(per_rank, shape[1], k, shape[2], element_bytes) if world_size > 1
                else [dict.fromkeys(TERMS, 0)])
    return [{"W": world_size, "rank": rank, "dtype": str(dtype).replace("torch.", ""), "k": k,
             "B": measured["index"].shape[0], "N": shape[1], "D": shape[2],
             "sent": {term: measured["sent"].get(term, 0) for term in TERMS},
             "control": measured["sent"].get("control", 0), "formula": formula,
             "bank_bytes": measured["bank_bytes"],
             **{key: measured[key] for key in ("seconds", "checkpoint_peak_bytes", "gather_peak_bytes")
                if key in measured}}
            for rank, (measured, formula) in enumerate(zip(per_rank, formulas))]


def measure_traffic() -> list[dict]:
    rows = []
    for world_size in (2, 3, 4):
        total = 40 * world_size
        cases = [((total, 96, 64), dtype, k) for dtype in (torch.float32, torch.bfloat16) for k in (1, 4)]
        for (shape, dtype, k), per_rank in zip(cases, zip(*results_of(run_in_processes(
                _traffic_worker, world_size, cases)))):
            rows += _rows(world_size, list(per_rank), shape, dtype, k)
    return rows


def measure_scale(repeats: int) -> list[dict]:
    rows = []
    for world_size in (1, 2, 3, 4):
        per_rank = results_of(run_in_processes(_large_worker, world_size, repeats, threads=1, deadline=1800.0,
                                               timeout=600.0))
        rows += _rows(world_size, per_rank, LARGE_SHAPE, torch.float32, 1)
        print(f"scale: {world_size} process(es): {1e3 * max(rank['seconds'] for rank in per_rank):.0f} ms a step",
              flush=True)
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


def _traffic_table(rows: list[dict]) -> list[str]:
    lines = ["| W | rank | bank dtype | k | B | N | D | " + " | ".join(TERMS) + " | total | formula | = formula | "
             "replicated bank sends | control (agreement rows, counts) |",
             "|---|---|---|---|---|---|---|" + "---:|" * (len(TERMS) + 2) + "---|---:|---:|"]
    for row in rows:
        same = row["sent"] == row["formula"]
        lines.append(f"| {row['W']} | {row['rank']} | {row['dtype']} | {row['k']} | {row['B']} | {row['N']} | "
                     f"{row['D']} | " + " | ".join(str(row["sent"][term]) for term in TERMS)
                     + f" | {sum(row['sent'].values())} | {sum(row['formula'].values())} | "
                     f"{'yes' if same else 'NO'} | {row['formula']['ring']} | {row['control']} |")
    return lines


def _scale_table(rows: list[dict]) -> list[str]:
    lines = ["| W | candidates bytes per rank (max) | vs W = 2 | all bytes per rank (max) | bank MB per rank | "
             "ms per step (slowest rank) | rank 0's peak MB writing its checkpoint file | rank 0's peak MB in "
             "`bank.state_dict()` (the whole bank gathered; training no longer calls it with W > 1) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    by_world = {}
    for row in rows:
        by_world.setdefault(row["W"], []).append(row)
    two = max(row["sent"]["candidates"] for row in by_world.get(2, [{"sent": {"candidates": 0}}]))
    for world_size, ranks in by_world.items():
        candidates = max(row["sent"]["candidates"] for row in ranks)
        peaks = [ranks[0].get(key) for key in ("checkpoint_peak_bytes", "gather_peak_bytes")]
        lines.append(f"| {world_size} | {candidates} | {candidates / two if two else 0:.2f} | "
                     f"{max(sum(row['sent'].values()) for row in ranks)} | "
                     f"{max(row['bank_bytes'] for row in ranks) / 1e6:.1f} | "
                     f"{1e3 * max(row['seconds'] for row in ranks):.0f} | "
                     + " | ".join('n/a' if peak is None else f'{peak / 1e6:.0f}' for peak in peaks) + " |")
    return lines


def markdown(traffic: list[dict], scale: list[dict], runs: dict, rounds: int, repeats: int) -> str:
    total, size, dim = LARGE_SHAPE
    lines = [f"Machine: {machine_description()}", "",
             "### Bytes each rank sends per step and direction (one enqueue + one sample), measured vs formula", "",
             "The rows and requests terms depend on where the chosen rows lie: the formula counts them from the "
             "chosen rows.", "", *_traffic_table(traffic), "",
             f"### W = 1..4 over one bank of {size} rows (float32, D = {dim}, G = {total}, k = 1, 1 thread each)",
             "", *_scale_table(scale), "", *_traffic_table(scale)]
    total, size, dim = TIMED_SHAPE
    single = statistics.median(max(rank["seconds"] for rank in outcome) for outcome in runs[(1, 2)])
    reference_index = runs[(1, 2)][0][0]["index"]
    lines += ["", f"### One sampling step of (G, N, D) = ({total}, {size}, {dim}), float32, worst case, k = 1", "",
              f"Median over {rounds} interleaved rounds of each launch's median of {repeats} steps (the slowest "
              "rank's). Bytes: what each rank sends in that step (the most of any rank), and the formula's "
              "sampling terms for that rank.", "",
              "| processes × threads | local batch B | ms / step | vs 1 process | bank MB per rank | bytes sent "
              "per rank | formula | indices = 1 process |", "|---|---|---:|---:|---:|---:|---:|---|"]
    for (processes, threads), outcomes in runs.items():
        seconds = statistics.median(max(rank["seconds"] for rank in outcome) for outcome in outcomes)
        first = outcomes[0]
        sent = [sum(rank["sent"].get(term, 0) for term in TERMS) for rank in first]
        busiest = max(range(processes), key=sent.__getitem__)
        expected = (sum(value for term, value in formula_of_step(first, size, 1, dim, 4)[busiest].items()
                        if term != "ring") if processes > 1 else 0)
        same_index = torch.equal(torch.cat([rank["index"] for rank in first]), reference_index)
        lines.append(f"| {processes} × {threads} | {first[0]['index'].shape[0]} | {1e3 * seconds:.1f} | "
                     f"{seconds / single:.2f}x | {max(rank['bank_bytes'] for rank in first) / 1e6:.1f} | "
                     f"{sent[busiest]} | {expected} | {'yes' if same_index else 'NO'} |")
    return "\n".join(lines) + "\n"


PAPER_WORLDS, PAPER_SIZES = (1, 2, 3, 4, 8, 64, 512), (64_000_000, 1_000_000_000)


def paper_rows(batch: int = 256, dim: int = 256, k: int = 1) -> list[dict]:
    """The formula for W up to 512: bfloat16 (s = 2), ``batch`` anchors per rank, the chosen rows spread evenly;
    writing a checkpoint, a rank holds its own rows' file (N/W rows); ``bank.state_dict()`` would gather on rank 0
    the shards and their concatenation (2 · N rows)."""
    row_bytes = dim * 2 + 8
    return [{"W": world_size, "N": size, "B": batch, "D": dim, "k": k, "dtype": "bfloat16",
             "sent": expected_traffic(world_size, batch, k, dim, 2), "bank_bytes": size * row_bytes // world_size,
             "replicated_bank_bytes": size * row_bytes,
             "checkpoint_peak_bytes": size * row_bytes // world_size,
             "gather_peak_bytes": 2 * size * row_bytes if world_size > 1 else size * row_bytes}
            for world_size in PAPER_WORLDS for size in PAPER_SIZES]


def paper_table(rows: list[dict]) -> str:
    first = rows[0]
    lines = [f"### On paper: bfloat16, D = {first['D']}, B = {first['B']} anchors per rank, k = {first['k']} (per "
             "step and direction, the chosen rows spread evenly over the shards)", "",
             "| W | N | sharded bank MB per rank | replicated bank MB per rank | sharded sends MB per rank "
             f"({' + '.join(TERMS)}) | replicated sends MB per rank | checkpoint file MB per rank | rank 0's MB in "
             "`bank.state_dict()` |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        if row["W"] < 8:
            continue
        terms = row["sent"]
        lines.append(f"| {row['W']} | {row['N']:.1e} | {row['bank_bytes'] / 1e6:,.0f} | "
                     f"{row['replicated_bank_bytes'] / 1e6:,.0f} | {sum(terms.values()) / 1e6:,.2f} ("
                     + " + ".join(f"{terms[term] / 1e6:,.2f}" for term in TERMS)
                     + f") | {terms['ring'] / 1e6:,.2f} | {row['checkpoint_peak_bytes'] / 1e6:,.0f} | "
                     f"{row['gather_peak_bytes'] / 1e6:,.0f} |")
    return "\n".join(lines) + "\n"


def _plain(rows: list[dict]) -> list[dict]:
    return [{key: value for key, value in row.items() if not isinstance(value, torch.Tensor)} for row in rows]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Benchmark of the sharded MemoryBank")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--write", default=None, help="write the markdown tables to this file")
    parser.add_argument("--json", default=None, help="write the traffic, the W = 1..4 scale run and the model "
                        "for W up to 512 to this JSON file")
    args = parser.parse_args(argv)
    load_before = os.getloadavg()[0]
    traffic = measure_traffic()
    scale = measure_scale(args.repeats)
    runs = measure_time(args.rounds, args.repeats)
    paper = paper_rows()
    # Other jobs on the machine slow every configuration; the load average says how busy it was.
    load = f"Load average (1 min) at the start and the end: {load_before:.1f}, {os.getloadavg()[0]:.1f}\n\n"
    table = load + markdown(traffic, scale, runs, args.rounds, args.repeats) + "\n" + paper_table(paper)
    print(table)
    if args.write:
        atomic_write_text(args.write, table)
    if args.json:
        atomic_write_text(args.json, json.dumps({"machine": machine_description(), "terms": list(TERMS),
                                                 "traffic": _plain(traffic), "scale": _plain(scale),
                                                 "model": paper}, indent=1) + "\n")


if __name__ == "__main__":
    main()
