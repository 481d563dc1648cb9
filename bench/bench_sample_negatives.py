"""CPU benchmark of sample_negatives: the fused op beside its baselines, in one run.

    pytest bench/                                       # pytest-benchmark table
    python bench/bench_sample_negatives.py --write bench/RESULTS.md   # medians, ratios, memory -> markdown

Baselines, per shape (B, N, D), float32, 2 threads: the bare matmul ``anchors @ bank.T`` (the floor), the
eager PyTorch oracle in float32 (fne_fast.reference), and a rewrite of the authors' loss-side selection
(bench/authors_loss.py). A training step makes two calls (image→text and text→image) of the same shape, so
per-call ratios are also per-step ratios.
"""

from __future__ import annotations

import argparse
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
import fne_fast  # noqa: E402
from authors_loss import AuthorsStyleSampler  # noqa: E402
from common import SHAPES, machine_description, median_seconds, peak_extra_bytes, sample_inputs  # noqa: E402
from fne_fast import reference  # noqa: E402

OPTIONS = dict(k=1, mode="fne", seed=0, step=0)


def authors_baseline(inputs):
    sampler = AuthorsStyleSampler()
    # Warm statistics, so that the Bayesian branch runs as it does after the first few hundred steps.
    sampler.pos.count, sampler.pos.total, sampler.pos.squares = 1000, 600.0, 10.0
    sampler.neg.count, sampler.neg.total, sampler.neg.squares = 2000, 200.0, 20.0
    batch_keys = inputs["anchors"] + 0.1 * torch.randn_like(inputs["anchors"])

    def run():
        return sampler(inputs["anchors"], inputs["bank"], inputs["positive_sim"], inputs["anchor_ids"],
                       inputs["bank_ids"], batch_keys)

    return run


def implementations(inputs):
    args = tuple(inputs.values())
    return {
        "fused op": lambda: fne_fast.sample_negatives(*args, **OPTIONS),
        "bare matmul": lambda: inputs["anchors"] @ inputs["bank"].T,
        "eager oracle (fp32)": lambda: reference.sample_negatives_reference(*args, dtype=torch.float32, **OPTIONS),
        "authors' loss code": authors_baseline(inputs),
    }


@pytest.fixture(autouse=True)
def _two_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", ["fused op", "bare matmul", "eager oracle (fp32)", "authors' loss code"])
def test_sample_negatives_cpu(benchmark, shape, name):
    function = implementations(sample_inputs(*shape, kind="worst_case"))[name]
    rounds = 1 if name != "fused op" and shape == SHAPES[-1] else 3
    benchmark.pedantic(function, rounds=rounds, warmup_rounds=1)


def measure(shapes, repeats: int) -> list[dict]:
    rows = []
    for shape in shapes:
        inputs = sample_inputs(*shape, kind="worst_case")
        for name, function in implementations(inputs).items():
            slow = name != "fused op" and shape[0] * shape[1] > 10**7
            seconds = median_seconds(function, 1 if slow else repeats)
            rows.append({"shape": shape, "name": name, "seconds": seconds, "peak": peak_extra_bytes(function)})
            print(f"{shape} {name:<22} {1e3 * seconds:9.1f} ms", flush=True)
    return rows


def markdown(rows) -> str:
    lines = [f"Machine: {machine_description()}", "",
             "| B, N, D | implementation | median ms/call | vs bare matmul | fused op speed-up | peak extra MB |",
             "|---|---|---:|---:|---:|---:|"]
    for row in rows:
        same = {r["name"]: r["seconds"] for r in rows if r["shape"] == row["shape"]}
        peak = "n/a" if row["peak"] is None else f"{row['peak'] / 2**20:.1f}"
        lines.append(f"| {', '.join(map(str, row['shape']))} | {row['name']} | {1e3 * row['seconds']:.1f} | "
                     f"{row['seconds'] / same['bare matmul']:.2f}x | {row['seconds'] / same['fused op']:.1f}x | "
                     f"{peak} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="CPU benchmark of sample_negatives")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--shapes", default=None, help="e.g. 32x8224x768,128x65536x256 (default: all three)")
    parser.add_argument("--write", default=None, help="write the markdown table to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    shapes = SHAPES if args.shapes is None else [tuple(map(int, s.split("x"))) for s in args.shapes.split(",")]
    table = markdown(measure(shapes, args.repeats))
    print(table)
    if args.write:
        temporary = args.write + ".tmp"
        with open(temporary, "w") as out:
            out.write(table)
        os.replace(temporary, args.write)


if __name__ == "__main__":
    main()
