"""Inputs and timing shared by the tests, the benchmarks and ``fne-fast-demo``: one input builder, one timer.

``sample_inputs`` returns the six tensor arguments of ``sample_negatives`` as a dict (in argument order), of one
of five kinds:

* ``"exact"``: embedding entries from {-4, ..., 4} / 8, representable in bfloat16 and float16, and every dot
  product exact in float32 (|s| · 64 < 2²⁴), so all backends see bit-identical similarities;
* ``"random"``: L2-normalised Gaussian rows, as in training;
* ``"worst_case"``: random rows with nothing cut down, no positives in the bank and the Bayesian branch on: every
  pair pays for Philox and the race (the benchmarks' worst case);
* ``"training"``: the same rows with the cut-down where training puts it: a race of about ``TRAINING_RACE`` (4)
  candidates per anchor, every other pair cut down (docs/RESULTS.md measures ~4 of 65536 in training runs);
* ``"middle"``: the same with about ``MIDDLE_KEPT`` (5 %) of the pairs kept.

In "training" and "middle" the cut-down threshold is the quantile of the similarity of two random unit vectors in
D dimensions (about N(0, 1/D)) that keeps that share; the benchmarks report the share they really kept.

In "exact" and "random", ids repeat, so each anchor has a few positives in the bank, and the statistics switch
the Bayesian branch on (n⁺ = 500) with a cut-down threshold inside the range of the similarities, so every
branch of docs/DESIGN.md §1 runs.
"""

from __future__ import annotations

import statistics
import time

import torch

from fne_fast.ops.options import SamplerOptions

__all__ = ["sample_inputs", "kept_share", "median_seconds", "EXACT_STATS", "RANDOM_STATS", "WORST_CASE_STATS",
           "KINDS", "TRAINING_RACE", "MIDDLE_KEPT"]

KINDS = ("exact", "random", "worst_case", "training", "middle")
TRAINING_RACE = 4  # race candidates per anchor in the "training" kind
MIDDLE_KEPT = 0.05  # share of pairs kept in the "middle" kind
EXACT_STATS = (0.3, 0.04, 0.0, 0.04, 500.0)
RANDOM_STATS = (0.2, 0.01, 0.0, 0.01, 500.0)
WORST_CASE_STATS = (-1.0, 0.01, 0.0, 0.01, 500.0)  # cut-down threshold -1.2: below every similarity
_CHUNK_ROWS = 2**20  # rows generated at a time, so that the bank is the only large allocation


def _embeddings(rows: int, dim: int, kind: str, dtype, device, generator) -> torch.Tensor:
    out = torch.empty(rows, dim, dtype=dtype, device=device)
    for begin in range(0, rows, _CHUNK_ROWS):
        end = min(rows, begin + _CHUNK_ROWS)
        if kind == "exact":
            chunk = torch.randint(-4, 5, (end - begin, dim), generator=generator, device=generator.device) / 8.0
        else:
            chunk = torch.randn(end - begin, dim, generator=generator, device=generator.device)
            chunk = torch.nn.functional.normalize(chunk, dim=1)
        out[begin:end] = chunk.to(device=device, dtype=dtype)
    return out


def _kept_share_stats(kept: float, dim: int) -> tuple:
    """Statistics whose cut-down threshold μ⁺ - margin (the default margin) keeps about ``kept`` of the pairs of
    random unit vectors in ``dim`` dimensions, with the Bayesian branch on as in the worst case."""
    threshold = statistics.NormalDist(0.0, dim**-0.5).inv_cdf(1.0 - kept)
    return (threshold + SamplerOptions().margin, 0.01, 0.0, 0.01, 500.0)


def kept_share(inputs: dict, chunk_rows: int = 2**18) -> float:
    """The share of the pairs of ``inputs`` above their cut-down threshold μ⁺ - margin (the default margin): what
    the benchmarks report beside each case. Chunks of bank rows, so that no B x N matrix is formed."""
    anchors, bank = inputs["anchors"].float(), inputs["bank"]
    cut = float(inputs["stats"][0]) - SamplerOptions().margin
    kept = sum(int((anchors @ bank[begin:begin + chunk_rows].float().T > cut).sum())
               for begin in range(0, bank.shape[0], chunk_rows))
    return kept / max(1, anchors.shape[0] * bank.shape[0])


def sample_inputs(num_rows: int, num_cols: int, dim: int, *, kind: str = "random", bank_dtype=torch.float32,
                  anchor_dtype=torch.float32, seed: int = 0, num_ids: int | None = None, stats=None,
                  device: str | torch.device = "cpu", generator_device: str | torch.device = "cpu") -> dict:
    """Positional arguments of ``sample_negatives`` as a dict (see the module's doc for ``kind``).

    Values depend only on the arguments and ``generator_device`` (the CPU by default, so that every device gets
    the same numbers; large GPU benchmarks generate on the GPU). ``stats`` overrides the kind's statistics.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    generator = torch.Generator(device=generator_device).manual_seed(seed)
    anchors = _embeddings(num_rows, dim, kind, anchor_dtype, device, generator)
    bank = _embeddings(num_cols, dim, kind, bank_dtype, device, generator)
    if kind in ("worst_case", "training", "middle"):
        positive_sim = torch.full((num_rows,), 0.5)
        anchor_ids = torch.arange(num_rows)
        bank_ids = torch.arange(num_cols) % max(num_cols // 2, 1) + num_rows  # no positives
        default_stats = {"worst_case": WORST_CASE_STATS,
                         "training": _kept_share_stats(min(1.0, TRAINING_RACE / max(num_cols, 1)), dim),
                         "middle": _kept_share_stats(MIDDLE_KEPT, dim)}[kind]
    else:
        num_ids = num_ids or max(num_cols // 4, 1)
        on = generator.device
        positive_sim = 0.3 + 0.6 * torch.rand(num_rows, generator=generator, device=on)
        anchor_ids = torch.randint(0, num_ids, (num_rows,), generator=generator, device=on)
        bank_ids = torch.randint(0, num_ids, (num_cols,), generator=generator, device=on)
        default_stats = EXACT_STATS if kind == "exact" else RANDOM_STATS
    return {
        "anchors": anchors,
        "bank": bank,
        "positive_sim": positive_sim.to(device),
        "anchor_ids": anchor_ids.to(device),
        "bank_ids": bank_ids.to(device),
        "stats": torch.tensor(default_stats if stats is None else stats, dtype=torch.float32, device=device),
    }


def median_seconds(function, repeats: int = 5, *, warmup: int = 1, device=None,
                   target_seconds: float | None = None, max_repeats: int = 25) -> float:
    """Median wall time of ``function()`` over ``repeats`` calls after ``warmup`` calls. On a CUDA ``device``
    each call is timed with CUDA events. With ``target_seconds``, the repeats grow (up to ``max_repeats``) until
    they fill about that much time, judged from the first call."""
    on_cuda = device is not None and torch.device(device).type == "cuda"
    for _ in range(warmup):
        function()
    if on_cuda:
        torch.cuda.synchronize(device)
    times: list[float] = []
    while len(times) < repeats:
        if on_cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            function()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            begin = time.perf_counter()
            function()
            times.append(time.perf_counter() - begin)
        if len(times) == 1 and target_seconds is not None:
            repeats = max(repeats, min(max_repeats, int(target_seconds / max(times[0], 1e-6))))
    return statistics.median(times)
