"""The method's math at run time (docs/DESIGN.md §1), in torch on any device and dtype: the false-negative
probability, the Bayesian-branch test, the log-weights and the race's masks.

It mirrors csrc/fne_math.h (the C++ and CUDA kernels) and the epilogue of fne_fast/kernels/sample_negatives.py (Triton,
which forms the same quantities from the statistics on the device inside its kernel; its Gumbel noise is in
fne_fast/kernels/jit_helpers.py). The loss's diagnostics, the epoch's bank diagnostics, the plots and the reference
oracle use these functions; the kernels never call them.
"""

from __future__ import annotations

import math

import torch

from fne_fast.ops.options import SamplerOptions

__all__ = ["fn_logit_threshold", "false_negative_logit", "false_negative_probability", "gaussians_defined",
           "bayes_active", "safe_stats", "weight_centres", "row_ceilings", "log_weights", "fallback_candidates",
           "guide_similarities", "guide_exclusions", "race_log_weights"]

# Statistics whose Gaussians are the standard normal: stand-ins where the running statistics define no model yet,
# so that the formulas stay finite (the caller masks their result).
_STANDARD_STATS = (0.0, 1.0, 0.0, 1.0, 0.0)


def fn_logit_threshold(fn_margin: float) -> float:
    """logit(1 - fn_margin): the Bayesian weight applies where z = logit(P_fn) exceeds it (±inf at the ends)."""
    threshold = 1.0 - fn_margin
    if threshold <= 0.0:
        return -math.inf
    if threshold >= 1.0:
        return math.inf
    return math.log(threshold) - math.log1p(-threshold)


def false_negative_logit(sim: torch.Tensor, stats: torch.Tensor, prior_k: float) -> torch.Tensor:
    """z(s) = log p⁺(s) - log p⁻(s) - log(K - 1): two Gaussian log-densities, never a ratio of underflowed
    densities; in sim's dtype. ``stats`` = (μ⁺, σ⁺², μ⁻, σ⁻², n⁺)."""
    mu_pos, var_pos, mu_neg, var_neg = (stats[i].to(sim.dtype) for i in range(4))
    return (0.5 * torch.log(var_neg) - 0.5 * torch.log(var_pos) - math.log(prior_k - 1.0)
            - (sim - mu_pos) ** 2 / (2 * var_pos) + (sim - mu_neg) ** 2 / (2 * var_neg))


def false_negative_probability(sim: torch.Tensor, stats: torch.Tensor, prior_k: float) -> torch.Tensor:
    """P_fn(s) = sigmoid(z(s)), in sim's dtype."""
    return torch.sigmoid(false_negative_logit(sim, stats, prior_k))


def gaussians_defined(stats: torch.Tensor) -> torch.Tensor:
    """Whether the statistics define both Gaussians: means and variances finite, variances positive (a 0-d bool
    tensor on the statistics' device: no host synchronisation)."""
    s = stats.to(torch.float64)
    return (s[1] > 0) & (s[3] > 0) & torch.isfinite(s[:4]).all()


def bayes_active(stats: torch.Tensor, min_count: int) -> torch.Tensor:
    """Whether the Bayesian branch is on: n⁺ > min_count and both Gaussians defined (a 0-d bool tensor)."""
    return (stats[4].to(torch.float64) > min_count) & gaussians_defined(stats)


def safe_stats(stats: torch.Tensor, usable: torch.Tensor) -> torch.Tensor:
    """``stats`` where ``usable`` (a 0-d bool tensor), else standard-normal stand-ins, so that P_fn computed from
    them is finite; the caller masks what it computed from the stand-ins."""
    return torch.where(usable, stats, torch.tensor(_STANDARD_STATS, dtype=stats.dtype, device=stats.device))


def weight_centres(positive_sim: torch.Tensor, options: SamplerOptions) -> torch.Tensor:
    """The centre c = s⁺ + b of the base log-weight -τ (s - c)², formed in float32 as every kernel forms it
    (positive_sim unchanged where b = 0)."""
    if options.center_offset == 0.0:
        return positive_sim
    offset = torch.tensor(options.center_offset, dtype=torch.float32, device=positive_sim.device)
    return (positive_sim.to(torch.float32) + offset).to(positive_sim.dtype)


def row_ceilings(positive_sim: torch.Tensor, options: SamplerOptions,
                 fn_thresholds: torch.Tensor | None = None) -> torch.Tensor | None:
    """The per-anchor ceiling c [B] (float32) of docs/DESIGN.md §1: a candidate with s > c is excluded from the race
    and the fallback; None where neither the positive-relative cut nor per-anchor thresholds are on.

    c = min(s⁺ - (1 - relative_cut) |s⁺|, fn_thresholds), each term in float32 (one rounding per operation, the
    C++ kernels' host code forms the same tensor with the same operations); a NaN term is ignored, and a row whose
    terms are all NaN has c = +inf (nothing excluded)."""
    ceilings = None
    if options.relative_cut is not None:
        positive = positive_sim.to(torch.float32)
        gap = torch.tensor(1.0 - options.relative_cut, dtype=torch.float32, device=positive.device)
        ceilings = positive - gap * positive.abs()
    if fn_thresholds is not None:
        ceilings = fn_thresholds if ceilings is None else torch.fmin(ceilings, fn_thresholds)
    if ceilings is None:
        return None
    return torch.nan_to_num(ceilings, nan=math.inf, posinf=math.inf, neginf=-math.inf)


def log_weights(sim: torch.Tensor, positive_sim: torch.Tensor, stats: torch.Tensor,
                options: SamplerOptions = SamplerOptions()) -> torch.Tensor:
    """ℓ[i, j] of docs/DESIGN.md §1 for similarities sim [B, N] (no masking), in sim's dtype: ``-τ (s - s⁺ - b)²``,
    or ``-fn_tau P_fn(s)`` where the Bayesian branch applies (-inf with fn_tau = inf: weight 0); zero in mode
    "uniform". Mode "hardest" has no weights (its key is the similarity) and is refused."""
    if options.mode == "hardest":
        raise ValueError("mode 'hardest' has no log-weights: its key is the similarity")
    if options.mode == "uniform":
        return torch.zeros_like(sim)
    base = -options.tau * (sim - weight_centres(positive_sim, options).to(sim.dtype).reshape(-1, 1)) ** 2
    z = false_negative_logit(sim, stats, options.prior_k)
    use_bayes = bayes_active(stats, options.min_count) & (z > fn_logit_threshold(options.fn_margin))
    fn_tau = options.effective_fn_tau
    likely_false = torch.full_like(sim, -math.inf) if math.isinf(fn_tau) else -fn_tau * torch.sigmoid(z)
    return torch.where(use_bayes, likely_false, base)


def fallback_candidates(sim: torch.Tensor, anchor_ids: torch.Tensor, bank_ids: torch.Tensor, filled: int,
                        ceilings: torch.Tensor | None = None, guided_out: torch.Tensor | None = None) -> torch.Tensor:
    """[B, N] bool: the pairs eligible for the hardest-negative fallback, the race's superset: another identity, a
    filled slot, a finite similarity (a non-finite one, from non-finite inputs, is never a candidate), with
    ``ceilings`` (``row_ceilings``) a similarity at most the row's ceiling, and with ``guided_out``
    (``guide_exclusions``) not excluded by language guidance."""
    columns = torch.arange(sim.shape[1], device=sim.device)
    eligible = ((bank_ids.reshape(1, -1) != anchor_ids.reshape(-1, 1)) & (columns < filled).reshape(1, -1)
                & torch.isfinite(sim))
    if ceilings is not None:
        eligible &= sim <= ceilings.to(sim.dtype).reshape(-1, 1)
    if guided_out is not None:
        eligible &= ~guided_out
    return eligible


def guide_similarities(anchor_guides: torch.Tensor, bank_guides: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, N] guide similarities g = anchor_guides · bank_guidesᵀ in ``dtype``."""
    return anchor_guides.to(dtype) @ bank_guides.to(dtype).T


def guide_exclusions(guide_sim: torch.Tensor, guide_threshold: float) -> torch.Tensor:
    """[B, N] bool: the pairs language guidance excludes, g > guide_threshold with the threshold rounded to float32
    as the kernels hold it (a NaN g excludes nothing)."""
    threshold = torch.tensor(guide_threshold, dtype=torch.float32).to(guide_sim.dtype)
    return guide_sim > threshold


def race_log_weights(sim: torch.Tensor, positive_sim: torch.Tensor, stats: torch.Tensor, options: SamplerOptions,
                     non_positive: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ℓ [B, N] of every pair, the race [B, N] bool)`` of modes "fne" and "uniform": the non-positive
    candidates above the cut-down (when on) whose weight is not 0 (fn_tau = inf removes likely false negatives
    like cut-down ones). The cut-down threshold μ⁺ - cut_margin is formed in float32, as the kernels form it, so
    that it is the same number everywhere."""
    race = non_positive
    if options.cutdown:
        cut_margin = torch.tensor(options.effective_cut_margin, dtype=torch.float32)
        cut = (stats[0].to(torch.float32) - cut_margin).to(sim.dtype)
        race = race & (sim > cut)
    weights = log_weights(sim, positive_sim, stats, options)
    return weights, race & (weights > -math.inf)
