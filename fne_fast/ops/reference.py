"""Pure-PyTorch oracle of ``sample_negatives`` (docs/DESIGN.md §1-2).

It materialises the B×N similarity and key matrices on purpose: it is the test oracle for every backend and the
"eager" baseline of the benchmarks. It draws the same Philox4x32-10 stream as the kernels, in torch integer
arithmetic on int64 tensors (16-bit limbs keep every product below 2⁶³), and computes in ``dtype`` (float64 for
tests, float32 for the eager baseline).
"""

from __future__ import annotations

import math

import torch

from fne_fast.ops.checks import raise_if_not_finite
from fne_fast.ops.fne_math import (fallback_candidates, guide_exclusions, guide_similarities, race_log_weights,
                                   row_ceilings)
from fne_fast.ops.options import SamplerOptions

__all__ = ["philox4x32_10", "gumbel_noise", "gumbel_from_bits", "sample_negatives_reference", "reference_draws",
           "candidate_keys"]

_DEFAULTS = SamplerOptions()

_MASK32 = 0xFFFFFFFF
_PHILOX_M = (0xD2511F53, 0xCD9E8D57)
_PHILOX_W = (0x9E3779B9, 0xBB67AE85)


def _mul_hi_lo(a: torch.Tensor, multiplier: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit words of a * multiplier for a in [0, 2³²), without int64 overflow."""
    m_hi, m_lo = multiplier >> 16, multiplier & 0xFFFF
    upper = a * m_hi  # < 2⁴⁸: a * m_hi * 2¹⁶ is the upper part of the product
    lower = a * m_lo  # < 2⁴⁸
    hi = (upper + (lower >> 16)) >> 16
    lo = (((upper & 0xFFFF) << 16) + lower) & _MASK32
    return hi, lo


def philox4x32_10(counter, key: tuple[int, int]) -> tuple[torch.Tensor, ...]:
    """Philox4x32-10 on broadcastable int64 tensors holding 32-bit words; key = (lo, hi) Python ints."""
    c0, c1, c2, c3 = (torch.as_tensor(c, dtype=torch.int64) for c in counter)
    k0, k1 = key[0] & _MASK32, key[1] & _MASK32
    for _ in range(10):
        hi0, lo0 = _mul_hi_lo(c0, _PHILOX_M[0])
        hi1, lo1 = _mul_hi_lo(c2, _PHILOX_M[1])
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + _PHILOX_W[0]) & _MASK32
        k1 = (k1 + _PHILOX_W[1]) & _MASK32
    return c0, c1, c2, c3


def gumbel_noise(seed: int, step: int, rows: torch.Tensor, columns: torch.Tensor,
                 dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """G[i, j] for global rows ``rows`` [B] and global columns ``columns`` [N] (int64), in ``dtype``."""
    seed &= (1 << 64) - 1
    rows = rows.to(torch.int64).reshape(-1, 1)
    columns = columns.to(torch.int64).reshape(1, -1)
    x, _, _, _ = philox4x32_10((columns & _MASK32, columns >> 32, rows & _MASK32, step & _MASK32),
                               (seed & _MASK32, seed >> 32))
    return gumbel_from_bits(x.expand(rows.shape[0], columns.shape[1]), dtype)


def gumbel_from_bits(x: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """G = -log(E), E = -log(1 - v), v = (x + ½) 2⁻³² for 32-bit words x held in int64, in ``dtype``.

    1 - v is formed exactly from the complement of x, and log1p keeps small v accurate, so the far tail
    (G up to ~22.9 at x = 0) survives in float32.
    """
    scale = 2.0 ** -32
    v = (x.to(dtype) + 0.5) * scale
    one_minus_v = ((_MASK32 - x).to(dtype) + 0.5) * scale
    exponential = torch.where(x < (1 << 31), -torch.log1p(-v), -torch.log(one_minus_v))
    return -torch.log(exponential)


def candidate_keys(anchors, bank, positive_sim, anchor_ids, bank_ids, stats,
                   options: SamplerOptions = _DEFAULTS, *, seed: int = 0, step: int = 0, row_offset: int = 0,
                   col_offset: int = 0, filled: int | None = None, dtype: torch.dtype = torch.float64,
                   fn_thresholds: torch.Tensor | None = None, anchor_guides: torch.Tensor | None = None,
                   bank_guides: torch.Tensor | None = None):
    """The full B×N race of docs/DESIGN.md §1-2: ``(keys, survives, non_positive, sim)``, each [B, N].

    ``keys`` is ℓ + G (the similarity in mode "hardest") for every pair, masked or not; ``survives`` marks the
    candidates of the race and ``non_positive`` those eligible for the hardest-negative fallback.
    """
    device = anchors.device
    num_rows, num_cols = anchors.shape[0], bank.shape[0]
    filled = num_cols if filled is None else int(filled)
    sim = anchors.to(dtype) @ bank.to(dtype).T
    guided_out = None
    if options.guide_threshold is not None:
        guided_out = guide_exclusions(guide_similarities(anchor_guides, bank_guides, dtype), options.guide_threshold)
    non_positive = fallback_candidates(sim, anchor_ids, bank_ids, filled,
                                       row_ceilings(positive_sim, options, fn_thresholds), guided_out)
    if options.mode == "hardest":
        return sim, non_positive, non_positive, sim
    weights, survives = race_log_weights(sim, positive_sim, stats, options, non_positive)
    columns = torch.arange(num_cols, device=device, dtype=torch.int64)
    rows = torch.arange(num_rows, device=device, dtype=torch.int64)
    keys = weights + gumbel_noise(seed, step, rows + row_offset, columns + col_offset, dtype)
    return keys, survives, non_positive, sim


def sample_negatives_reference(anchors, bank, positive_sim, anchor_ids, bank_ids, stats, *,
                               k: int = _DEFAULTS.k, mode: str = _DEFAULTS.mode, margin: float = _DEFAULTS.margin,
                               tau: float = _DEFAULTS.tau, fn_tau: float | None = _DEFAULTS.fn_tau,
                               prior_k: float = _DEFAULTS.prior_k,
                               fn_margin: float = _DEFAULTS.fn_margin, min_count: int = _DEFAULTS.min_count,
                               cutdown: bool = _DEFAULTS.cutdown, cut_margin: float | None = _DEFAULTS.cut_margin,
                               center_offset: float = _DEFAULTS.center_offset,
                               relative_cut: float | None = _DEFAULTS.relative_cut,
                               guide_threshold: float | None = _DEFAULTS.guide_threshold,
                               fn_thresholds: torch.Tensor | None = None, anchor_guides: torch.Tensor | None = None,
                               bank_guides: torch.Tensor | None = None, seed: int = 0, step: int = 0,
                               row_offset: int = 0, col_offset: int = 0, filled: int | None = None,
                               dtype: torch.dtype = torch.float64, return_keys: bool = False,
                               return_counts: bool = False, check_finite: bool = False):
    """The oracle: same signature and outputs as ``fne_fast.sample_negatives``.

    ``check_finite`` raises the op's errors for NaN/Inf inputs (the bank's from its live similarities).

    With ``return_keys=True`` it also returns the key of every chosen slot (``-inf`` for fallback and invalid
    slots, the similarity in mode "hardest"), which the tests use to explain near-ties; with ``return_counts=True``
    last the per-anchor count of candidates above ``fn_thresholds``.
    """
    options = SamplerOptions(mode=mode, k=k, margin=margin, tau=tau, fn_tau=fn_tau, prior_k=prior_k,
                             fn_margin=fn_margin, min_count=min_count, cutdown=cutdown, cut_margin=cut_margin,
                             center_offset=center_offset, relative_cut=relative_cut, guide_threshold=guide_threshold)
    result = reference_draws(anchors, bank, positive_sim, anchor_ids, bank_ids, stats, options, seed=seed, step=step,
                             row_offset=row_offset, col_offset=col_offset, filled=filled, dtype=dtype,
                             check_finite=check_finite, fn_thresholds=fn_thresholds, anchor_guides=anchor_guides,
                             bank_guides=bank_guides, count_above=return_counts)
    return (*result[:4 if return_keys else 3], *result[4:])


def reference_draws(anchors, bank, positive_sim, anchor_ids, bank_ids, stats, options: SamplerOptions, *,
                    seed: int = 0, step: int = 0, row_offset: int = 0, col_offset: int = 0,
                    filled: int | None = None, dtype: torch.dtype = torch.float64, check_finite: bool = False,
                    fn_thresholds: torch.Tensor | None = None, anchor_guides: torch.Tensor | None = None,
                    bank_guides: torch.Tensor | None = None, count_above: bool = False):
    """The oracle's ``(index, sim, valid, key)`` for options given as one ``SamplerOptions``, and with
    ``count_above`` a fifth tensor, ``above [B]`` int64: each anchor's candidates (another identity, a filled row,
    a finite similarity) whose similarity is above its ``fn_thresholds`` entry, ceilings or not."""
    if count_above and fn_thresholds is None:
        raise ValueError("count_above counts the candidates above fn_thresholds, which were not given")
    keys, survives, non_positive, sim = candidate_keys(anchors, bank, positive_sim, anchor_ids, bank_ids, stats,
                                                       options, seed=seed, step=step, row_offset=row_offset,
                                                       col_offset=col_offset, filled=filled, dtype=dtype,
                                                       fn_thresholds=fn_thresholds, anchor_guides=anchor_guides,
                                                       bank_guides=bank_guides)
    k = options.k
    device = anchors.device
    num_rows, num_cols = sim.shape
    if check_finite:
        live = num_cols if filled is None else filled
        guides_finite = True
        if options.guide_threshold is not None:
            guides_finite = bool(torch.isfinite(guide_similarities(anchor_guides, bank_guides, dtype)[:, :live]).all())
        raise_if_not_finite(anchors, positive_sim, stats, fn_thresholds, anchor_guides,
                            similarities_finite=bool(torch.isfinite(sim[:, :live]).all()),
                            guide_similarities_finite=guides_finite)

    neg_inf = torch.tensor(-math.inf, dtype=dtype, device=device)
    # Stable descending sorts put ties in increasing column order: ties go to the lower global index.
    race_keys, race_order = torch.sort(torch.where(survives, keys, neg_inf), dim=1, descending=True, stable=True)
    race_valid = torch.gather(survives, 1, race_order)
    chosen = torch.zeros_like(survives)
    num_race = min(k, num_cols)
    chosen.scatter_(1, race_order[:, :num_race], race_valid[:, :num_race])
    fill_candidates = non_positive & ~chosen
    _, fill_order = torch.sort(torch.where(fill_candidates, sim, neg_inf), dim=1, descending=True, stable=True)
    fill_valid = torch.gather(fill_candidates, 1, fill_order)

    # Slot t takes the t-th race winner while there are any, then the (t - m)-th hardest remaining candidate.
    num_survivors = race_valid[:, :num_race].sum(dim=1, keepdim=True)
    slots = torch.arange(k, device=device).reshape(1, -1).expand(num_rows, k)
    from_race = slots < num_survivors
    fill_slot = (slots - num_survivors).clamp(min=0)
    pad = max(k - num_cols, 0)
    if pad:
        # Fewer columns than slots: pad with never-valid positions so the gathers below stay in range.
        fill_order = torch.cat([fill_order, fill_order.new_zeros(num_rows, pad)], dim=1)
        fill_valid = torch.cat([fill_valid, fill_valid.new_zeros(num_rows, pad)], dim=1)
        race_order = torch.cat([race_order, race_order.new_zeros(num_rows, pad)], dim=1)
        race_keys = torch.cat([race_keys, race_keys.new_full((num_rows, pad), -math.inf)], dim=1)
    race_slot = slots.clamp(max=race_order.shape[1] - 1)
    column = torch.where(from_race, torch.gather(race_order, 1, race_slot), torch.gather(fill_order, 1, fill_slot))
    valid = from_race | torch.gather(fill_valid, 1, fill_slot)
    slot_keys = torch.where(from_race, torch.gather(race_keys, 1, race_slot), neg_inf)

    index = torch.where(valid, column + col_offset, torch.full_like(column, -1))
    if num_cols:
        chosen_sim = torch.gather(sim, 1, column.clamp(max=num_cols - 1))
    else:
        chosen_sim = torch.zeros(num_rows, k, dtype=dtype, device=device)
    chosen_sim = torch.where(valid, chosen_sim, torch.zeros_like(chosen_sim)).to(torch.float32)
    slot_keys = torch.where(valid, slot_keys, neg_inf)
    if not count_above:
        return index, chosen_sim, valid, slot_keys
    others = fallback_candidates(sim, anchor_ids, bank_ids, num_cols if filled is None else filled)
    above = (others & (sim > fn_thresholds.to(dtype).reshape(-1, 1))).sum(dim=1)
    return index, chosen_sim, valid, slot_keys, above
