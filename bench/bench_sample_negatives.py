"""CPU benchmark of sample_negatives: the fused op beside its baselines, in one run.

    pytest bench/                                       # pytest-benchmark table
    python bench/bench_sample_negatives.py --write bench/RESULTS.md   # medians, ratios, memory -> markdown
    python bench/bench_sample_negatives.py --low-precision --write bench/RESULTS_cpu_bf16.md   # bf16 / fp16 banks

Baselines, per shape (B, N, D), float32, 2 threads: the GEMM's own cost (``torch.mm`` into a preallocated B x N
output: the floor every table's ratio is taken against), the matmul ``anchors @ bank.T`` that allocates its output,
a plain eager sampler of the same distribution (bench/plain_eager.py: one matmul, the masks, the log-weights,
torch's RNG, ``topk``), the float64-capable oracle in float32 (fne_fast.ops.reference: Philox emulated in int64
tensor arithmetic, labelled as the oracle), and a rewrite of the authors' loss-side selection
(bench/authors_loss.py). A training step makes two calls (image→text and text→image) of the same shape, so
per-call ratios are also per-step ratios. The implementations of a shape are timed in round-robin order (one call
of each per round), so a change in the machine's load moves them together.

Cases (``--case``, default all three; fne_fast.ops.testing's kinds): ``worst`` (nothing cut down: every pair
needs its Philox word), ``training`` (the cut-down of training runs: a race of ~4 candidates per anchor) and
``middle`` (~5 % of the pairs kept). The oracle, the authors' code and the fn_tau rows run in the worst case
only.

Two more rows per shape measure what ``fn_tau`` costs: the fused op on the same tensors with statistics under
which half of the pairs are likely false negatives (P_fn > 1 - fn_margin), with the authors' weight
(``fn_tau = tau``) and with their removal (``fn_tau = inf``).

``--criteria``: what the false-negative criteria of docs/DESIGN.md §1 cost beside the plain fused op on the same
tensors, interleaved, each case: the separate cut-down margin (set to the hinge margin's value, so the same race),
the centre offset, the positive-relative cut, per-anchor thresholds (also with their exceedance counts), and all
of them at once, at settings that exclude a few candidates per row (ratios to the plain op, with three decimals:
the acceptance bound is 5 %), and language guidance with 384-dimensional guides (float32 and bf16), whose second
GEMM is measured, not bounded.

``--low-precision``: banks and anchors in bf16 and fp16 beside float32, against torch's own matmul in each dtype
(into a preallocated output, and allocating as ``anchors @ bank.T`` does): the fused op on oneDNN's bf16 kernel,
on float32 tiles (oneDNN off: the fallback, and the fp16 path), and in float32, interleaved as above; torch's CPU
fp16 matmul is slow, so the fp16 rows are also compared with the float32 one. The table gives medians of wall
time and of the process's CPU time per call, and the load average before and after.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
import fne_fast  # noqa: E402
from authors_loss import AuthorsStyleSampler  # noqa: E402
from common import SHAPES, machine_description, median_seconds, peak_extra_bytes, sample_inputs  # noqa: E402
from fne_fast.ops import reference  # noqa: E402
from fne_fast.ops.testing import kept_share  # noqa: E402
from plain_eager import plain_eager_sampler  # noqa: E402

OPTIONS = dict(k=1, mode="fne", seed=0, step=0)
# (μ⁺, σ⁺², μ⁻, σ⁻², n⁺): nothing cut down (μ⁺ - margin = -1.2), and P_fn(s) > 0.001 exactly where s > ~0, i.e. for
# half of the pairs of random unit vectors.
HALF_LIKELY_FALSE_STATS = (-1.0, 1.0, -0.32, 0.01, 500.0)
FN_TAU_ROWS = ("fused op, half likely FN, fn_tau = tau", "fused op, half likely FN, fn_tau = inf")
SLOW_BASELINES = ("eager oracle (fp32)", "authors' loss code")
WORST_CASE_ONLY = (*SLOW_BASELINES, *FN_TAU_ROWS)
CASES = {"worst": "worst_case", "training": "training", "middle": "middle"}  # --case -> sample_inputs kind
GEMM_FLOOR = "mm into preallocated output"


def preallocated_mm(anchors, bank):
    """torch.mm into an output allocated once: the GEMM's own cost, without the allocation of a B x N result."""
    out = torch.empty(anchors.shape[0], bank.shape[0], dtype=anchors.dtype)
    return lambda: torch.mm(anchors, bank.T, out=out)


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
    half_likely_false = (*args[:-1], torch.tensor(HALF_LIKELY_FALSE_STATS))
    return {
        "fused op": lambda: fne_fast.sample_negatives(*args, **OPTIONS),
        GEMM_FLOOR: preallocated_mm(inputs["anchors"], inputs["bank"]),
        "bare matmul (allocating)": lambda: inputs["anchors"] @ inputs["bank"].T,
        "plain eager sampler": lambda: plain_eager_sampler(*args, k=OPTIONS["k"]),
        "eager oracle (fp32)": lambda: reference.sample_negatives_reference(*args, dtype=torch.float32, **OPTIONS),
        "authors' loss code": authors_baseline(inputs),
        FN_TAU_ROWS[0]: lambda: fne_fast.sample_negatives(*half_likely_false, **OPTIONS),
        FN_TAU_ROWS[1]: lambda: fne_fast.sample_negatives(*half_likely_false, fn_tau=float("inf"), **OPTIONS),
    }


@pytest.fixture(autouse=True)
def _two_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", ["fused op", GEMM_FLOOR, "bare matmul (allocating)", "plain eager sampler",
                                  "eager oracle (fp32)", "authors' loss code", *FN_TAU_ROWS])
def test_sample_negatives_cpu(benchmark, shape, name):
    function = implementations(sample_inputs(*shape, kind="worst_case"))[name]
    rounds = 1 if not name.startswith("fused op") and shape == SHAPES[-1] else 3
    benchmark.pedantic(function, rounds=rounds, warmup_rounds=1)


def _interleaved(functions: dict, repeats: int) -> tuple[dict, dict]:
    """Wall and CPU seconds of ``repeats`` calls of each function, one call of each per round (after one warm-up
    call each: oneDNN kernels, thread pools), so that a change in the machine's load moves them together."""
    wall = {name: [] for name in functions}
    cpu = {name: [] for name in functions}
    for function in functions.values():
        function()
    for _ in range(repeats):
        for name, function in functions.items():
            began_wall, began_cpu = time.perf_counter(), time.process_time()
            function()
            wall[name].append(time.perf_counter() - began_wall)
            cpu[name].append(time.process_time() - began_cpu)
    return wall, cpu


def measure(shapes, cases, repeats: int, skip: tuple = ()) -> list[dict]:
    """Median seconds per call and peak memory of every implementation per shape and case; the repeated ones in
    round-robin order, a slow baseline at a large shape once."""
    rows = []
    for shape in shapes:
        for case in cases:
            inputs = sample_inputs(*shape, kind=CASES[case])
            left_out = skip + (WORST_CASE_ONLY if case != "worst" else ())
            functions = {name: function for name, function in implementations(inputs).items() if name not in left_out}
            once = {name for name in functions if name in SLOW_BASELINES and shape[0] * shape[1] > 10**7}
            times = {name: [median_seconds(functions[name], 1)] for name in once}
            times.update(_interleaved({name: functions[name] for name in functions if name not in once}, repeats)[0])
            kept = kept_share(inputs)
            for name, function in functions.items():
                seconds = statistics.median(times[name])
                rows.append({"shape": shape, "case": case, "kept": kept, "name": name, "seconds": seconds,
                             "peak": peak_extra_bytes(function)})
                print(f"{shape} {case:<8} {name:<40} {1e3 * seconds:9.1f} ms", flush=True)
    return rows


def case_label(row) -> str:
    return f"{row['case']} ({100 * row['kept']:.3g} % kept)"


def markdown(rows) -> str:
    lines = [f"Machine: {machine_description()}", "",
             "| B, N, D | case | implementation | median ms/call | vs mm into preallocated output | "
             "vs allocating matmul | fused op speed-up | peak extra MB |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for row in rows:
        same = {r["name"]: r["seconds"] for r in rows if (r["shape"], r["case"]) == (row["shape"], row["case"])}
        peak = "n/a" if row["peak"] is None else f"{row['peak'] / 2**20:.1f}"
        lines.append(f"| {', '.join(map(str, row['shape']))} | {case_label(row)} | {row['name']} | "
                     f"{1e3 * row['seconds']:.1f} | {row['seconds'] / same[GEMM_FLOOR]:.2f}x | "
                     f"{row['seconds'] / same['bare matmul (allocating)']:.2f}x | "
                     f"{row['seconds'] / same['fused op']:.1f}x | {peak} |")
    return "\n".join(lines) + "\n"


def criteria_implementations(inputs):
    """The plain fused op and the op with each criterion, on one set of inputs."""
    args = tuple(inputs.values())
    rows = inputs["anchors"].shape[0]
    # Thresholds above nearly every similarity of random unit vectors in 256 dimensions (sd 1/16): a few excluded.
    thresholds = torch.full((rows,), 0.25)
    criteria = {
        "cut_margin = margin": dict(cut_margin=0.2),
        "center_offset = -0.1": dict(center_offset=-0.1),
        "relative_cut = 0.95": dict(relative_cut=0.95),
        "fn_thresholds": dict(fn_thresholds=thresholds),
        "fn_thresholds, counted": dict(fn_thresholds=thresholds, return_counts=True),
        "all four": dict(cut_margin=0.2, center_offset=-0.1, relative_cut=0.95, fn_thresholds=thresholds),
    }
    # Language guidance with MiniLM's guide dimension (384), unit vectors like its normalised caption embeddings;
    # a threshold of 0.25 excludes few pairs of random ones (sd 1/sqrt(384)). Its cost is the second GEMM.
    generator = torch.Generator().manual_seed(1)
    guides = {name: torch.nn.functional.normalize(torch.randn(count, 384, generator=generator), dim=1)
              for name, count in (("anchor_guides", rows), ("bank_guides", inputs["bank"].shape[0]))}
    criteria["language guidance, Dg 384"] = dict(guide_threshold=0.25, **guides)
    criteria["language guidance, Dg 384, bf16 guides"] = dict(
        guide_threshold=0.25, **{name: tensor.bfloat16() for name, tensor in guides.items()})
    functions = {"fused op": lambda: fne_fast.sample_negatives(*args, **OPTIONS)}
    for name, extra in criteria.items():
        functions[f"fused op, {name}"] = (lambda extra=extra: fne_fast.sample_negatives(*args, **OPTIONS, **extra))
    return functions


def measure_criteria(shapes, cases, repeats: int) -> list[dict]:
    rows = []
    for shape in shapes:
        for case in cases:
            inputs = sample_inputs(*shape, kind=CASES[case])
            wall, _ = _interleaved(criteria_implementations(inputs), repeats)
            kept = kept_share(inputs)
            for name, times in wall.items():
                rows.append({"shape": shape, "case": case, "kept": kept, "name": name,
                             "seconds": statistics.median(times)})
                print(f"{shape} {case:<8} {name:<40} {1e3 * rows[-1]['seconds']:9.2f} ms", flush=True)
    return rows


def criteria_markdown(rows, repeats: int) -> str:
    lines = [f"Machine: {machine_description()}", "", f"Medians of {repeats} interleaved calls each.", "",
             "| B, N, D | case | implementation | median ms/call | vs plain fused op |", "|---|---|---|---:|---:|"]
    for row in rows:
        plain = next(r["seconds"] for r in rows
                     if (r["shape"], r["case"], r["name"]) == (row["shape"], row["case"], "fused op"))
        lines.append(f"| {', '.join(map(str, row['shape']))} | {case_label(row)} | {row['name']} | "
                     f"{1e3 * row['seconds']:.2f} | {row['seconds'] / plain:.3f}x |")
    return "\n".join(lines) + "\n"


LOW_PRECISION_SHAPES = [(128, 65536, 256), (256, 262144, 256)]


def low_precision_implementations(shape, case: str):
    """The implementations of the low-precision table for one shape and case, by name (float32 inputs of the
    case; the same values rounded to bf16 and fp16)."""
    float32 = sample_inputs(*shape, kind=CASES[case])
    bf16 = dict(float32, anchors=float32["anchors"].bfloat16(), bank=float32["bank"].bfloat16())
    fp16 = dict(float32, anchors=float32["anchors"].half(), bank=float32["bank"].half())

    def fused(inputs, onednn=True):
        def run():
            with torch.backends.mkldnn.flags(enabled=onednn):
                return fne_fast.sample_negatives(*inputs.values(), **OPTIONS)
        return run

    functions = {
        "fused op, bf16 (oneDNN bf16 kernel)": fused(bf16),
        "torch bf16 mm, preallocated": preallocated_mm(bf16["anchors"], bf16["bank"]),
        "torch bf16 mm": lambda: bf16["anchors"] @ bf16["bank"].T,
        "fused op, bf16, oneDNN off (float32 tiles)": fused(bf16, onednn=False),
        "fused op, fp16 (float32 tiles)": fused(fp16),
        "torch fp16 mm": lambda: fp16["anchors"] @ fp16["bank"].T,
        "fused op, float32": fused(float32),
        "torch float32 mm, preallocated": preallocated_mm(float32["anchors"], float32["bank"]),
        "torch float32 mm": lambda: float32["anchors"] @ float32["bank"].T,
    }
    return functions, kept_share(float32)


def load_average() -> str:
    try:
        return " ".join(f"{load:.2f}" for load in os.getloadavg())
    except OSError:
        return "n/a"


def measure_low_precision(shapes, cases, repeats: int) -> tuple[list[dict], str]:
    """Interleaved medians (wall and CPU time per call) and peak extra memory per implementation, shape and
    case."""
    import warnings

    warnings.filterwarnings("ignore", message="TF32 acceleration on top of oneDNN")  # from mkldnn.flags()
    rows, loads = [], [load_average()]
    for shape in shapes:
        for case in cases:
            functions, kept = low_precision_implementations(shape, case)
            wall, cpu = _interleaved(functions, repeats)
            for name, function in functions.items():
                rows.append({"shape": shape, "case": case, "kept": kept, "name": name,
                             "seconds": statistics.median(wall[name]), "cpu_seconds": statistics.median(cpu[name]),
                             "peak": peak_extra_bytes(function)})
                print(f"{shape} {case:<8} {name:<44} {1e3 * rows[-1]['seconds']:9.1f} ms", flush=True)
    loads.append(load_average())
    return rows, f"load average {loads[0]} before, {loads[-1]} after"


def low_precision_markdown(rows, load: str) -> str:
    lines = [f"Machine: {machine_description()}; oneDNN bf16 kernel used: {torch.ops.fne_fast.cpu_bf16_brgemm()}; "
             f"{load}", "",
             "Ratios against torch's matmul into a preallocated output (the GEMM's own cost) in bf16 and in float32.",
             "",
             "| B, N, D | case | implementation | median ms/call | vs bf16 mm | vs float32 mm | "
             "median CPU ms/call | CPU vs bf16 mm | peak extra MB |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        same = {r["name"]: r for r in rows if (r["shape"], r["case"]) == (row["shape"], row["case"])}
        bf16_mm, float32_mm = same["torch bf16 mm, preallocated"], same["torch float32 mm, preallocated"]
        peak = "n/a" if row["peak"] is None else f"{row['peak'] / 2**20:.1f}"
        lines.append(f"| {', '.join(map(str, row['shape']))} | {case_label(row)} | {row['name']} | "
                     f"{1e3 * row['seconds']:.1f} | {row['seconds'] / bf16_mm['seconds']:.2f}x | "
                     f"{row['seconds'] / float32_mm['seconds']:.2f}x | {1e3 * row['cpu_seconds']:.1f} | "
                     f"{row['cpu_seconds'] / bf16_mm['cpu_seconds']:.2f}x | {peak} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="CPU benchmark of sample_negatives")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--shapes", default=None, help="e.g. 32x8224x768,128x65536x256 (default: all three)")
    parser.add_argument("--write", default=None, help="write the markdown table to this file")
    parser.add_argument("--low-precision", action="store_true", help="the bf16 / fp16 table (default shapes: "
                        "128x65536x256,256x262144x256; repeats interleaved)")
    parser.add_argument("--criteria", action="store_true",
                        help="the false-negative criteria beside the plain op (default shape: 128x65536x256)")
    parser.add_argument("--case", choices=[*CASES, "all"], default="all",
                        help="worst (nothing cut down), training (~4 candidates per anchor), middle (~5 %% kept)")
    parser.add_argument("--skip-baselines", action="store_true",
                        help="leave out the eager oracle and the authors' code (the fn_tau rows in minutes)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    default_shapes = LOW_PRECISION_SHAPES if args.low_precision else [(128, 65536, 256)] if args.criteria else SHAPES
    shapes = default_shapes if args.shapes is None else [tuple(map(int, s.split("x"))) for s in args.shapes.split(",")]
    cases = list(CASES) if args.case == "all" else [args.case]
    if args.low_precision:
        table = low_precision_markdown(*measure_low_precision(shapes, cases, args.repeats))
    elif args.criteria:
        table = criteria_markdown(measure_criteria(shapes, cases, args.repeats), args.repeats)
    else:
        table = markdown(measure(shapes, cases, args.repeats, SLOW_BASELINES if args.skip_baselines else ()))
    print(table)
    if args.write:
        temporary = args.write + ".tmp"
        with open(temporary, "w") as out:
            out.write(table)
        os.replace(temporary, args.write)


if __name__ == "__main__":
    main()
