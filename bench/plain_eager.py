"""The "plain eager" baseline of the benchmarks: the FNE sampler as one would write it in a few lines of PyTorch.

Unlike the eager oracle (fne_fast.ops.reference, which re-derives the kernels' Philox stream in int64 arithmetic
so that its draws are bit-identical), this is what a user without fne_fast would run: one matmul, the masks, the
log-weights, torch's own random numbers for the Gumbel noise and ``topk``. It samples from the same distribution
as ``fne_fast.sample_negatives(..., mode="fne")`` but not the same draws, so it is a timing baseline, never an
oracle.
"""

from __future__ import annotations

import math

import torch

from fne_fast.ops.fne_math import fallback_candidates, race_log_weights
from fne_fast.ops.options import SamplerOptions

__all__ = ["plain_eager_sampler"]


def _similarities(anchors: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """anchors @ bank.T in float32: on a GPU a 16-bit bank stays 16-bit with a float32 output (torch.mm's
    out_dtype), elsewhere both sides are converted to float32 first (the CPU has no mixed-output matmul)."""
    low = bank.dtype in (torch.bfloat16, torch.float16)
    if low and bank.is_cuda:
        return torch.mm(anchors.to(bank.dtype), bank.T, out_dtype=torch.float32)
    return anchors.float() @ bank.float().T


def plain_eager_sampler(anchors, bank, positive_sim, anchor_ids, bank_ids, stats, *, k: int = 1,
                        margin: float = 0.2, tau: float = 0.5, prior_k: float = 10000.0, fn_margin: float = 0.999,
                        min_count: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
    """k negatives per anchor drawn with probability proportional to exp(ℓ) (docs/DESIGN.md §1, mode "fne", the
    default fn_tau = tau), by Gumbel-top-k over the whole B×N matrix: ``(indices [B, k] int64, sims [B, k]
    float32)``; an index is -1 (and its sim 0) where the row has run out of non-positive candidates.

    The masks and log-weights are the project's eager math (fne_fast.ops.fne_math, which the loss and the oracle
    also use), the rest is what a user would write. The same distribution as the op, not the same draws: the
    Gumbel noise comes from torch's generator, not from the kernels' counter-based Philox stream, and the
    similarities of a 16-bit bank are not rounded the way a given kernel rounds them. Slots the race leaves empty
    take the hardest remaining non-positive candidates, as the op's fallback does.
    """
    options = SamplerOptions(k=k, margin=margin, tau=tau, prior_k=prior_k, fn_margin=fn_margin,
                             min_count=min_count)
    sim = _similarities(anchors, bank)
    num_rows, num_cols = sim.shape
    non_positive = fallback_candidates(sim, anchor_ids, bank_ids, num_cols)
    log_weight, race = race_log_weights(sim, positive_sim, stats.to(sim.device), options, non_positive)

    # Gumbel-top-k: G = -log E with E ~ Exp(1) from torch's generator.
    keys = log_weight.sub_(torch.empty_like(sim).exponential_().log_())
    keys.masked_fill_(~race, -math.inf)
    width = min(k, num_cols)
    race_keys, race_index = keys.topk(width, dim=1)
    del keys
    won = race_keys > -math.inf
    index = race_index
    valid = won
    if not bool(won.all()):
        # Fallback: the hardest non-positive candidates not already drawn fill the slots after the winners.
        hard = sim.masked_fill(~non_positive, -math.inf)
        hard.scatter_(1, race_index, torch.where(won, -math.inf, hard.gather(1, race_index)))
        hard_sim, hard_index = hard.topk(width, dim=1)
        winners = won.sum(dim=1, keepdim=True)
        slots = torch.arange(width, device=sim.device).reshape(1, -1)
        fill = (slots - winners).clamp(min=0)
        from_race = slots < winners
        index = torch.where(from_race, race_index, hard_index.gather(1, fill))
        valid = from_race | (hard_sim.gather(1, fill) > -math.inf)
    sims = torch.where(valid, sim.gather(1, index), 0.0)
    index = torch.where(valid, index, -1)
    if width < k:  # fewer columns than slots: the rest are invalid
        index = torch.cat([index, index.new_full((num_rows, k - width), -1)], dim=1)
        sims = torch.cat([sims, sims.new_zeros(num_rows, k - width)], dim=1)
    return index, sims
