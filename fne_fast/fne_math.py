"""The method's math at run time (DESIGN.md §1), in torch on any device and dtype: the false-negative
probability, the Bayesian-branch test and the log-weights.

It mirrors csrc/fne_math.h (the C++ and CUDA kernels) and the epilogue of kernels/sample_negatives.py (Triton,
which forms the same quantities from the statistics on the device inside its kernel). The loss's diagnostics,
the plots and the reference oracle use these functions; the kernels never call them.
"""

from __future__ import annotations

import math

import torch

from fne_fast.options import SamplerOptions

__all__ = ["fn_logit_threshold", "false_negative_logit", "false_negative_probability", "bayes_active",
           "log_weights"]


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


def bayes_active(stats: torch.Tensor, min_count: int) -> torch.Tensor:
    """Whether the Bayesian branch is on: n⁺ > min_count and both variances positive and finite (a 0-d bool
    tensor on the statistics' device: no host synchronisation)."""
    s = stats.to(torch.float64)
    return (s[4] > min_count) & (s[1] > 0) & (s[3] > 0) & torch.isfinite(s[:4]).all()


def log_weights(sim: torch.Tensor, positive_sim: torch.Tensor, stats: torch.Tensor,
                options: SamplerOptions = SamplerOptions()) -> torch.Tensor:
    """ℓ[i, j] of DESIGN.md §1 for similarities sim [B, N] (no masking), in sim's dtype: ``-τ (s - s⁺)²``, or
    ``-fn_tau P_fn(s)`` where the Bayesian branch applies (-inf with fn_tau = inf: weight 0); zero in mode
    "uniform". Mode "hardest" has no weights (its key is the similarity) and is refused."""
    if options.mode == "hardest":
        raise ValueError("mode 'hardest' has no log-weights: its key is the similarity")
    if options.mode == "uniform":
        return torch.zeros_like(sim)
    base = -options.tau * (sim - positive_sim.to(sim.dtype).reshape(-1, 1)) ** 2
    z = false_negative_logit(sim, stats, options.prior_k)
    use_bayes = bayes_active(stats, options.min_count) & (z > fn_logit_threshold(options.fn_margin))
    fn_tau = options.effective_fn_tau
    likely_false = torch.full_like(sim, -math.inf) if math.isinf(fn_tau) else -fn_tau * torch.sigmoid(z)
    return torch.where(use_bayes, likely_false, base)
