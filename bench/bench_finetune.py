"""Benchmark of a training step when the backbones' top layers train (``--finetune``), beside the frozen step.

    python bench/bench_finetune.py --dataset emoji --finetune 0 1 2 --write bench/RESULTS_finetune.md

Each configuration is a real run's state (``RunState``) on the data set's cached training split (run
``fne-fast train --finetune N`` first to warm the caches; a cold cache is encoded before timing starts), with the
banks filled by one warm-up pass of ``--fill-steps`` steps. Then, ``--rounds`` times, each configuration trains one
epoch of ``--steps`` steps after the warm-up (``train_one_epoch``: tops and heads, both banks, the statistics, the
sampled loss, the optimiser and the momentum copies), in turn, so that other load on the machine falls on all of
them alike. The table gives the median time per step over the rounds and its ratio to the frozen step.
``--whole-batch`` adds, for each N > 0, the step as one pass over the whole batch: what a fine-tuned step cost before
it fixed the order of its sums (units of 16 rows, so that any split over processes gives the same bits).
``--bfloat16`` adds, for each N > 0, the step with ``--finetune-precision bfloat16``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import machine_description  # noqa: E402
from fne_fast.io import atomic_write_text  # noqa: E402
from fne_fast.training.config import TrainConfig  # noqa: E402
from fne_fast.training.data import load_splits  # noqa: E402
from fne_fast.training.epoch import TIMING_SECTIONS, train_one_epoch  # noqa: E402
from fne_fast.training.state import RunState  # noqa: E402


def _state(dataset: str, finetune: int, steps: int, whole_batch: bool = False, precision: str = "float32"):
    config = TrainConfig(dataset=dataset, finetune=finetune, steps_per_epoch=steps, quiet=True, out="unused",
                         finetune_precision=precision)
    split = load_splits(config)["train"]
    run = RunState(config, split)
    if whole_batch:
        run.batch_invariant = False  # one forward and backward over the batch, as a frozen step runs
    return run, split


def _epoch_seconds(run: RunState, split, epoch: int) -> float:
    started = time.perf_counter()
    train_one_epoch(run, split, epoch, dict.fromkeys(TIMING_SECTIONS, 0.0))
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="emoji")
    parser.add_argument("--finetune", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=20, help="steps per timed epoch")
    parser.add_argument("--fill-steps", type=int, default=260, help="warm-up steps that fill the banks")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--whole-batch", action="store_true",
                        help="also time each N > 0 as one pass over the whole batch (no fixed order of the sums)")
    parser.add_argument("--bfloat16", action="store_true",
                        help="also time each N > 0 with --finetune-precision bfloat16")
    parser.add_argument("--write", help="also write the table to this file")
    args = parser.parse_args()
    if 0 not in args.finetune:
        parser.error("--finetune: include 0, the frozen step the others are compared with")

    configurations = [(str(finetune), finetune, False, "float32") for finetune in args.finetune]
    if args.whole_batch:
        configurations += [(f"{finetune}, whole batch", finetune, True, "float32")
                           for finetune in args.finetune if finetune]
    if args.bfloat16:
        configurations += [(f"{finetune}, bfloat16", finetune, False, "bfloat16")
                           for finetune in args.finetune if finetune]
    runs = {}
    for label, finetune, whole_batch, precision in configurations:
        run, split = _state(args.dataset, finetune, args.fill_steps, whole_batch, precision)
        _epoch_seconds(run, split, 0)  # the warm-up epoch fills the banks
        run.config.steps_per_epoch = args.steps
        runs[label] = (run, split)
    per_step = {label: [] for label in runs}
    for round_number in range(args.rounds):
        for label, (run, split) in runs.items():
            per_step[label].append(_epoch_seconds(run, split, 1 + round_number) / args.steps)

    frozen = statistics.median(per_step["0"])
    lines = [f"# A training step with the backbones' top layers training ({args.dataset})", "",
             f"Machine: {machine_description()}.", "",
             f"Command: `python bench/bench_finetune.py --dataset {args.dataset} --finetune "
             f"{' '.join(map(str, args.finetune))} --steps {args.steps} --rounds {args.rounds}"
             f"{' --whole-batch' if args.whole_batch else ''}{' --bfloat16' if args.bfloat16 else ''}`; "
             "batch 32 pairs, "
             f"banks of 8224 rows filled, median over {args.rounds} interleaved rounds of {args.steps} steps.", "",
             "| --finetune | ms per step | × the frozen step | spread over rounds (ms) |", "|---|---|---|---|"]
    for finetune, times in per_step.items():
        median = statistics.median(times)
        lines.append(f"| {finetune} | {1e3 * median:.1f} | {median / frozen:.2f} | "
                     f"{1e3 * min(times):.1f}–{1e3 * max(times):.1f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.write:
        atomic_write_text(args.write, text)


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
