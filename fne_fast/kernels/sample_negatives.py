"""Triton kernel of ``fne_fast::sample_negatives`` (docs/DESIGN.md §2): the fully fused GPU sampler.

Layout of the work. The grid is (anchor blocks × bank splits); program (m, s) owns ``BLOCK_M`` anchors and a
contiguous range of bank columns, which it walks ``BLOCK_N`` columns at a time. For each tile it computes the
similarity tile with ``tl.dot`` (float32 accumulation), applies the identity / fill / cut-down masks, draws the
Philox word of every pair, forms the keys ``ℓ + G`` in registers and updates two running top-k lists per anchor:
the Gumbel race and the hardest non-positive candidates (the fallback). No similarity is ever written to memory.
Each program writes its lists to small partial buffers ``[B, splits·k]``; a second small kernel merges them
exactly (keys, then the lower global index on ties) and writes the output slots. Extra memory is
``O(B · splits · k)``, independent of N. With language guidance (``HAS_GUIDES``, compiled out without it) each tile
also forms the guide-similarity tile with ``tl.dot`` in a k-loop of its own over the guide dimension, and pairs above
``guide_threshold`` leave both lists, as pairs above their ceiling do (the exceedance counts still see them).

Why it is cheap after the first few tiles. Log-weights are <= 0, so a pair can enter a full race list only if its
Gumbel noise alone beats the list's k-th key T; G decreases in the Philox word, which turns that into an integer
bound per row. Tiles where no pair passes the bound (most of them, once each row has seen many times more
candidates than a tile holds) skip the logarithms, the weights and the top-k update; the hardest list is skipped
the same way with one float max per row. The Philox words are computed only in tiles where some pair survives the
masks and the cut-down (in training, a few pairs per anchor of the whole bank: most tiles have none), then for
the whole tile, and broadcasting computes the products of the first rounds once per row or column
(fne_fast/kernels/jit_helpers.py).

Random numbers follow docs/DESIGN.md §2 bit for bit (counter = (global column lo, hi, row_offset + i, step), key =
seed). The epilogue float math mirrors csrc/fne_math.h with two deliberate substitutes, both within a few float32
ulps: ``-log1p(-v)`` uses its series below v = 2⁻⁴ (Triton has log1p only in libdevice, which the interpreter
lacks, and log(1 - v) would lose small v to the rounding of 1 - v), and the logit offset is formed in float32
from the statistics on the device (no host synchronisation to read them).

Precision. Products are accumulated in float32. bf16/fp16 banks with anchors of the same dtype use the tensor
cores natively. Float32 (or mixed) inputs are converted to float32 and use ``input_precision``, which by default
follows torch's TF32 setting like the cuBLAS GEMM of the CUDA backend: "ieee" (exact float32 products) unless
``torch.backends.cuda.matmul.allow_tf32`` is on, then "tf32" (inputs rounded to 10-bit mantissas, faster).
The guide product follows the same rule with the guides' own dtypes. Under ``TRITON_INTERPRET=1`` everything runs
in float32 with "ieee" (the interpreter's bf16 arithmetic is wrong).
Compiled, ``tl.log`` / ``tl.exp`` and the division are the GPU's approximate instructions (about 2 ulp each) and
multiply-adds are fused, so a key ℓ + G (G up to ~23, where a float32 ulp is 1.9e-6) may differ from the CPU's by
a few ulps even on exactly representable inputs: two logarithms in G and one exp in the weight put it within
5 ulps, 1e-5. Candidates whose float64 keys are closer than that are near-ties that may go either way; the tests
allow exactly that much on a GPU (``Backend.key_tolerance`` in tests/inputs.py), and identical draws elsewhere.

Tiles. ``default_config`` (configs.py) picks 8 warps and tiles whose epilogue fits the registers without
spilling on sm_90; scripts/triton_resources.py compiles every shipped configuration without a GPU and reports its
registers, stack (spills) and shared memory, and the test suite fails on any spill. The device helpers (Philox,
Gumbel noise, the top-k lists in registers) are jit_helpers.py.

Dispatch. fne_fast/ops/dispatch.py calls :func:`sample_negatives_triton` for ``backend="triton"``, and registers
it for the CUDA key of ``fne_fast::sample_negatives`` when no compiled CUDA kernel was built, so ``backend="auto"``
on CUDA tensors runs the compiled CUDA C++ kernel when it exists and this kernel otherwise. That rule stands until
both are measured on a GPU (bench/bench_sample_negatives_gpu.py times both side by side). This module imports
only public modules of fne_fast.ops (options, checks, fne_math): never the wrapper (dispatch), so there is no
cycle.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from fne_fast.kernels.configs import (TritonConfig, default_config, guide_block_k, input_precision, merge_config,
                                     num_splits)
from fne_fast.kernels.jit_helpers import (EMPTY_KEY, FLOAT_MAX, PAD_KEY, best_of, from_ordered, gumbel_from_bits,
                                          insert_tile, pack, philox_first_word, store_list)
from fne_fast.ops.checks import raise_if_not_finite
from fne_fast.ops.fne_math import fn_logit_threshold, row_ceilings, weight_centres
from fne_fast.ops.options import SamplerOptions

__all__ = ["sample_negatives_triton", "is_interpreted"]


@triton.jit(do_not_specialize=["num_rows", "live_cols", "cols_per_split", "col_offset", "row_offset",
                               "step", "seed_lo", "seed_hi"])
def _sample_negatives_kernel(
        anchors_ptr, bank_ptr, centre_ptr, ceiling_ptr, count_threshold_ptr, anchor_ids_ptr, bank_ids_ptr, stats_ptr,
        anchor_guides_ptr, bank_guides_ptr,
        race_key_ptr, race_idx_ptr, race_sim_ptr, hard_key_ptr, hard_idx_ptr, hard_sim_ptr, flag_ptr, above_ptr,
        num_rows, live_cols, dim, guide_dim, cols_per_split,
        stride_am, stride_ad, stride_bn, stride_bd, stride_centre, stride_ceiling, stride_count_threshold,
        stride_aid, stride_bid, stride_stats, stride_agm, stride_agd, stride_bgn, stride_bgd,
        col_offset, row_offset, step, seed_lo, seed_hi,
        margin, tau, fn_tau, min_count, log_prior, z_threshold, guide_threshold,
        K: tl.constexpr, KP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        BLOCK_G: tl.constexpr,
        HAS_RACE: tl.constexpr, HAS_WEIGHTS: tl.constexpr, HAS_CUTDOWN: tl.constexpr, HAS_CEILING: tl.constexpr,
        HAS_COUNT: tl.constexpr, HAS_GUIDES: tl.constexpr, CHECK_FINITE: tl.constexpr, FN_EXCLUDES: tl.constexpr,
        DOT_FP32: tl.constexpr, GUIDE_DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
        ONE_K_STEP: tl.constexpr):
    pid_m = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    width = tl.num_programs(1).to(tl.int64) * K
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    row_ok = rows < num_rows
    anchor_id = tl.load(anchor_ids_ptr + rows * stride_aid, mask=row_ok, other=0)
    offs_n = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_g = tl.arange(0, BLOCK_G)

    # Per-call scalars (csrc/fne_math.h make_weight_params), from the statistics on the device.
    mu_pos = tl.load(stats_ptr)
    var_pos = tl.load(stats_ptr + stride_stats)
    mu_neg = tl.load(stats_ptr + 2 * stride_stats)
    var_neg = tl.load(stats_ptr + 3 * stride_stats)
    n_pos = tl.load(stats_ptr + 4 * stride_stats)
    bayes = ((n_pos > min_count) & (var_pos > 0) & (var_neg > 0) & (var_pos <= FLOAT_MAX)
             & (var_neg <= FLOAT_MAX) & (tl.abs(mu_pos) <= FLOAT_MAX) & (tl.abs(mu_neg) <= FLOAT_MAX))
    safe_var_pos = tl.where(bayes, var_pos, 1.0)
    safe_var_neg = tl.where(bayes, var_neg, 1.0)
    half_inv_var_pos = tl.where(bayes, 0.5 / safe_var_pos, 0.0)
    half_inv_var_neg = tl.where(bayes, 0.5 / safe_var_neg, 0.0)
    z_offset = tl.where(bayes, 0.5 * tl.log(safe_var_neg / safe_var_pos) - log_prior, 0.0)
    # The Bayesian weight applies where bayes and z > z_threshold; folded into one threshold (+inf when off).
    bayes_threshold = tl.where(bayes, z_threshold, float("inf"))
    cut = mu_pos - margin
    # The log-weight's centre s⁺ + b, and the ceiling above which a candidate is excluded (fne_math.row_ceilings).
    centre = tl.load(centre_ptr + rows * stride_centre, mask=row_ok, other=0.0)
    if HAS_CEILING:
        ceiling = tl.load(ceiling_ptr + rows * stride_ceiling, mask=row_ok, other=0.0)
    if HAS_COUNT:
        # The exceedances of fn_thresholds, counted over this program's columns (the host adds the splits).
        count_threshold = tl.load(count_threshold_ptr + rows * stride_count_threshold, mask=row_ok, other=0.0)
        above = tl.zeros([BLOCK_M], dtype=tl.int32)
    saw_non_finite = tl.zeros([BLOCK_M], dtype=tl.int32)
    if CHECK_FINITE:
        # abs(NaN) <= FLOAT_MAX is false, so these comparisons catch NaN as well as Inf.
        stats_finite = ((tl.abs(mu_pos) <= FLOAT_MAX) & (tl.abs(var_pos) <= FLOAT_MAX)
                        & (tl.abs(mu_neg) <= FLOAT_MAX) & (tl.abs(var_neg) <= FLOAT_MAX)
                        & (tl.abs(n_pos) <= FLOAT_MAX))
        centre_finite = tl.abs(centre) <= FLOAT_MAX  # s⁺ + b, finite exactly where s⁺ is (b is finite)
        saw_non_finite = tl.where(centre_finite, 0, 1) | tl.where(stats_finite, 0, 1)  # masked rows load 0
        # A non-finite guide similarity of a live pair: NaN / Inf bank guides, or anchor guides (the host tells
        # which), since one non-finite entry of an anchor's guide makes all its guide similarities non-finite.
        saw_guide_non_finite = tl.zeros([BLOCK_M], dtype=tl.int32)

    key_lo = seed_lo.to(tl.uint32)
    key_hi = seed_hi.to(tl.uint32)
    counter_row = (row_offset + rows).to(tl.uint32)[:, None]
    counter_step = step.to(tl.uint32)

    slots = tl.arange(0, KP)[None, :]
    empty_key = tl.where(slots < K, EMPTY_KEY, PAD_KEY) + tl.zeros([BLOCK_M, KP], dtype=tl.int32)
    empty_idx = (-1 - slots).to(tl.int64) + tl.zeros([BLOCK_M, KP], dtype=tl.int64)
    hard_key = empty_key
    hard_idx = empty_idx
    hard_sim = tl.zeros([BLOCK_M, KP], dtype=tl.float32)
    race_key = empty_key
    race_idx = empty_idx
    race_sim = tl.zeros([BLOCK_M, KP], dtype=tl.float32)

    if ONE_K_STEP:
        # The whole embedding fits one step: the anchor tile stays on chip for the whole split, and the tile loop
        # itself is the loop that the compiler software-pipelines (bank loads run ahead of the epilogue).
        anchor_tile = tl.load(anchors_ptr + rows[:, None] * stride_am + offs_k[None, :] * stride_ad,
                              mask=row_ok[:, None] & (offs_k < dim)[None, :], other=0.0)
        if DOT_FP32:
            anchor_tile = anchor_tile.to(tl.float32)

    col_begin = split * cols_per_split
    col_end = tl.minimum(col_begin + cols_per_split, live_cols)
    for tile_start in range(col_begin, col_end, BLOCK_N):
        cols = tile_start + offs_n
        col_ok = cols < col_end
        if ONE_K_STEP:
            b = tl.load(bank_ptr + cols[None, :] * stride_bn + offs_k[:, None] * stride_bd,
                        mask=(offs_k < dim)[:, None] & col_ok[None, :], other=0.0)
            if DOT_FP32:
                s = tl.dot(anchor_tile, b.to(tl.float32), input_precision=INPUT_PRECISION)
            else:
                s = tl.dot(anchor_tile, b)
        else:
            s = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for d in range(0, dim, BLOCK_K):
                ds = d + offs_k
                a = tl.load(anchors_ptr + rows[:, None] * stride_am + ds[None, :] * stride_ad,
                            mask=row_ok[:, None] & (ds < dim)[None, :], other=0.0)
                b = tl.load(bank_ptr + cols[None, :] * stride_bn + ds[:, None] * stride_bd,
                            mask=(ds < dim)[:, None] & col_ok[None, :], other=0.0)
                if DOT_FP32:
                    s = tl.dot(a.to(tl.float32), b.to(tl.float32), s, input_precision=INPUT_PRECISION)
                else:
                    s = tl.dot(a, b, s)
        if HAS_GUIDES:
            # Language guidance (fne_math.guide_exclusions): the tile's guide similarities, formed while s is the
            # only other tile held (later the masks are too, and float32 products then spilled on sm_90). A pair
            # above the threshold leaves the race and the fallback like a pair above its ceiling (below, after the
            # counts, which ignore both).
            g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            # Not software-pipelined: the tile loop around it is, and prefetched guide tiles spilled on sm_90.
            for d in tl.range(0, guide_dim, BLOCK_G, num_stages=1):
                gs = d + offs_g
                anchor_guide = tl.load(anchor_guides_ptr + rows[:, None] * stride_agm + gs[None, :] * stride_agd,
                                       mask=row_ok[:, None] & (gs < guide_dim)[None, :], other=0.0)
                bank_guide = tl.load(bank_guides_ptr + cols[None, :] * stride_bgn + gs[:, None] * stride_bgd,
                                     mask=(gs < guide_dim)[:, None] & col_ok[None, :], other=0.0)
                if GUIDE_DOT_FP32:
                    g = tl.dot(anchor_guide.to(tl.float32), bank_guide.to(tl.float32), g,
                               input_precision=INPUT_PRECISION)
                else:
                    g = tl.dot(anchor_guide, bank_guide, g)
            guide_kept = ~(g > guide_threshold)  # a NaN g excludes nothing
            if CHECK_FINITE:
                guide_live_non_finite = row_ok[:, None] & col_ok[None, :] & ~(tl.abs(g) <= FLOAT_MAX)
                saw_guide_non_finite = saw_guide_non_finite | tl.max(tl.where(guide_live_non_finite, 1, 0), axis=1)
        bank_id = tl.load(bank_ids_ptr + cols * stride_bid, mask=col_ok, other=0)
        # A non-finite similarity (NaN or Inf inputs, or float32 overflow) is never a candidate, as in the C++
        # kernels; abs(NaN) <= FLOAT_MAX is false.
        finite = tl.abs(s) <= FLOAT_MAX
        live = row_ok[:, None] & col_ok[None, :]
        non_positive = live & finite & (bank_id[None, :] != anchor_id[:, None])
        if HAS_COUNT:
            above += tl.sum((non_positive & (s > count_threshold[:, None])).to(tl.int32), axis=1)
        if HAS_CEILING:
            non_positive = non_positive & (s <= ceiling[:, None])
        if CHECK_FINITE:
            saw_non_finite = saw_non_finite | tl.max(tl.where(live & ~finite, 1, 0), axis=1)
        if HAS_GUIDES:
            non_positive = non_positive & guide_kept
        global_base = col_offset + tile_start

        # Hardest non-positive candidates (the fallback; the answer in mode "hardest").
        hard_worst = tl.min(hard_key, axis=1)
        hard_floor = tl.where(hard_worst == EMPTY_KEY, -float("inf"), from_ordered(hard_worst))
        row_hardest = tl.max(tl.where(non_positive, s, -float("inf")), axis=1)
        if tl.max((row_hardest > hard_floor).to(tl.int32), axis=0) > 0:
            hard_key, hard_idx, hard_sim = insert_tile(pack(s, non_positive, BLOCK_N), s, hard_key, hard_idx,
                                                       hard_sim, global_base, K, BLOCK_N, True)

        if HAS_RACE:
            survives = non_positive
            if HAS_CUTDOWN:
                survives = survives & (s > cut)
            # A pair that is excluded or cut down needs no Philox word. In training the race holds a few candidates
            # per anchor of the whole bank, so most tiles have no survivor at all (at ~4 per 65536 columns, 78 % of
            # 4096-pair tiles) and skip the words, which are about half the epilogue's instructions.
            if tl.max(tl.max(survives.to(tl.int32), axis=1), axis=0) > 0:
                # Largest Philox word whose noise can still beat the row's k-th key T: G(x) > T needs
                # v < 1 - exp(-e^-T) <= e^-T. The slack (factor 1.001: 2³² · 1.001 = 4299262263, plus 64 words)
                # covers float32 rounding of G, of the key and of the bound.
                race_worst = tl.min(race_key, axis=1)
                threshold = tl.where(race_worst == EMPTY_KEY, -float("inf"), from_ordered(race_worst))
                bound = tl.minimum(tl.exp(-threshold) * 4299262263.0 + 64.0, 4294967295.0)
                limit = tl.minimum(bound.to(tl.int64), 4294967295).to(tl.uint32)
                column = global_base + offs_n
                hi_first = global_base >> 32
                if hi_first == (global_base + BLOCK_N - 1) >> 32:
                    # The usual case: one high word for the whole tile keeps the first rounds' products 1-D.
                    words = philox_first_word(column.to(tl.uint32)[None, :], hi_first.to(tl.uint32), counter_row,
                                               counter_step, key_lo, key_hi)
                else:
                    words = philox_first_word(column.to(tl.uint32)[None, :], (column >> 32).to(tl.uint32)[None, :],
                                               counter_row, counter_step, key_lo, key_hi)
                candidates = survives & (words <= limit[:, None])
                if tl.max(tl.max(candidates.to(tl.int32), axis=1), axis=0) > 0:
                    key = gumbel_from_bits(words)
                    if HAS_WEIGHTS:
                        dp = s - mu_pos
                        dn = s - mu_neg
                        z = z_offset - dp * dp * half_inv_var_pos + dn * dn * half_inv_var_neg
                        dpos = s - centre[:, None]
                        if FN_EXCLUDES:  # fn_tau = inf: a likely false negative has weight 0 (log-weight -inf)
                            likely_false = -float("inf")
                        else:
                            likely_false = -fn_tau / (1.0 + tl.exp(-z))
                        weight = tl.where(z > bayes_threshold, likely_false, -tau * dpos * dpos)
                        key = weight + key
                        # A key of -inf (weight 0) or NaN (non-finite positive_sim or stats) is not a race candidate.
                        candidates = candidates & (key > -float("inf"))
                    race_key, race_idx, race_sim = insert_tile(pack(key, candidates, BLOCK_N), s, race_key, race_idx,
                                                               race_sim, global_base, K, BLOCK_N, False)

    store_list(hard_key_ptr, hard_idx_ptr, hard_sim_ptr, hard_key, hard_idx, hard_sim, rows, row_ok, split, width,
               K, KP)
    if HAS_RACE:
        store_list(race_key_ptr, race_idx_ptr, race_sim_ptr, race_key, race_idx, race_sim, rows, row_ok, split,
                   width, K, KP)
    if CHECK_FINITE:
        program = pid_m * tl.num_programs(1) + split
        tl.store(flag_ptr + program, tl.max(saw_non_finite, axis=0))
        if HAS_GUIDES:  # the flags' second row
            programs = tl.num_programs(0).to(tl.int64) * tl.num_programs(1)
            tl.store(flag_ptr + programs + program, tl.max(saw_guide_non_finite, axis=0))
    if HAS_COUNT:
        tl.store(above_ptr + rows * tl.num_programs(1) + split, above, mask=row_ok)


@triton.jit(do_not_specialize=["num_rows", "width"])
def _merge_kernel(race_key_ptr, race_idx_ptr, race_sim_ptr, hard_key_ptr, hard_idx_ptr, hard_sim_ptr,
                  index_ptr, sim_ptr, valid_ptr, key_ptr, num_rows, width,
                  K: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr, HAS_RACE: tl.constexpr):
    """Exact merge of the per-split lists: slot t is the t-th race winner (with its key) while there are any, then
    the hardest non-positive candidate not chosen yet (key -inf), else invalid (docs/DESIGN.md §2). In mode "hardest"
    the hardest list is the answer and its key is the similarity."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    row_ok = rows < num_rows
    offs = tl.arange(0, BLOCK_W)
    partial = rows[:, None] * width + offs[None, :]
    mask = row_ok[:, None] & (offs < width)[None, :]
    hard_key = tl.load(hard_key_ptr + partial, mask=mask, other=EMPTY_KEY)
    hard_idx = tl.load(hard_idx_ptr + partial, mask=mask, other=-1)
    hard_sim = tl.load(hard_sim_ptr + partial, mask=mask, other=0.0)
    if HAS_RACE:
        race_key = tl.load(race_key_ptr + partial, mask=mask, other=EMPTY_KEY)
        race_idx = tl.load(race_idx_ptr + partial, mask=mask, other=-1)
        race_sim = tl.load(race_sim_ptr + partial, mask=mask, other=0.0)
    for t in range(K):
        hard_best, hard_best_idx, hard_best_sim = best_of(hard_key, hard_idx, hard_sim)
        out_idx = tl.where(hard_best != EMPTY_KEY, hard_best_idx, -1)
        out_sim = tl.where(hard_best != EMPTY_KEY, hard_best_sim, 0.0)
        if HAS_RACE:
            race_best, race_best_idx, race_best_sim = best_of(race_key, race_idx, race_sim)
            from_race = race_best != EMPTY_KEY
            out_idx = tl.where(from_race, race_best_idx, out_idx)
            out_sim = tl.where(from_race, race_best_sim, out_sim)
            out_key = tl.where(from_race, from_ordered(race_best), -float("inf"))
            race_key = tl.where(from_race[:, None] & (race_idx == race_best_idx[:, None]), EMPTY_KEY, race_key)
        else:
            out_key = tl.where(hard_best != EMPTY_KEY, from_ordered(hard_best), -float("inf"))
        valid = out_idx >= 0
        # A chosen column leaves the fallback list whichever list it came from.
        hard_key = tl.where(valid[:, None] & (hard_idx == out_idx[:, None]), EMPTY_KEY, hard_key)
        tl.store(index_ptr + rows * K + t, out_idx, mask=row_ok)
        tl.store(sim_ptr + rows * K + t, out_sim, mask=row_ok)
        tl.store(valid_ptr + rows * K + t, valid, mask=row_ok)
        tl.store(key_ptr + rows * K + t, out_key, mask=row_ok)


def is_interpreted() -> bool:
    """Whether this module's kernels were created under TRITON_INTERPRET=1 (they then run on CPU tensors)."""
    return isinstance(_sample_negatives_kernel, InterpretedFunction)


def sample_negatives_triton(anchors, bank, positive_sim, anchor_ids, bank_ids, stats,
                            options: SamplerOptions = SamplerOptions(), *, fn_thresholds=None, anchor_guides=None,
                            bank_guides=None, seed=0, step=0, row_offset=0, col_offset=0, filled=None,
                            check_finite=True, count_above=False, config: TritonConfig | None = None):
    """``fne_fast.sample_negatives`` on the Triton kernels, for arguments already checked (fne_fast.ops.dispatch
    checks them before calling this).

    ``seed`` is an int in [0, 2⁶⁴). ``count_above`` appends the exceedance counts of ``fn_thresholds`` (int64
    [B]). ``anchor_guides`` and ``bank_guides`` are read exactly when ``options.guide_threshold`` is set (language
    guidance). ``config`` overrides the tile sizes (tests and benchmarks). With
    ``check_finite`` the kernel flags non-finite similarities, positive_sim or stats, and non-finite guide
    similarities, and the flags are read back (one host synchronisation, which also looks for NaN in
    fn_thresholds); pass ``check_finite=False`` in training loops that must stay asynchronous.
    """
    if anchors.device.type == "cpu" and not is_interpreted():
        raise RuntimeError("the Triton kernel runs on CPU tensors only under TRITON_INTERPRET=1, which must be set "
                           "before fne_fast.kernels is imported")
    k, mode = options.k, options.mode
    num_rows, num_cols = anchors.shape[0], bank.shape[0]
    filled = num_cols if filled is None else int(filled)
    device = anchors.device
    if num_rows == 0 or filled == 0:
        if check_finite and num_rows:
            raise_if_not_finite(anchors, positive_sim, stats, fn_thresholds, anchor_guides)
        empty = (torch.full((num_rows, k), -1, dtype=torch.int64, device=device),
                 torch.zeros((num_rows, k), dtype=torch.float32, device=device),
                 torch.zeros((num_rows, k), dtype=torch.bool, device=device),
                 torch.full((num_rows, k), -math.inf, dtype=torch.float32, device=device))
        return (*empty, torch.zeros(num_rows, dtype=torch.int64, device=device)) if count_above else empty

    interpreted = device.type != "cuda"
    low_precision = anchors.dtype == bank.dtype and bank.dtype != torch.float32
    has_guides = options.guide_threshold is not None
    # None without language guidance, else whether both guide tensors are bf16 / fp16 of one dtype.
    guide_low_precision = (anchor_guides.dtype == bank_guides.dtype and bank_guides.dtype != torch.float32
                           if has_guides else None)
    converted_bank = anchors.dtype == torch.float32 and bank.dtype != torch.float32
    config = config or default_config(num_rows, anchors.shape[1], k, low_precision, device, guide_low_precision,
                                      converted_bank)
    kp = triton.next_power_of_2(k)
    row_blocks = triton.cdiv(num_rows, config.block_m)
    tiles = triton.cdiv(filled, config.block_n)
    multiprocessors = torch.cuda.get_device_properties(device).multi_processor_count if not interpreted else None
    splits = num_splits(config, row_blocks, tiles, k, multiprocessors)
    cols_per_split = triton.cdiv(tiles, splits) * config.block_n
    splits = triton.cdiv(filled, cols_per_split)  # no split without columns
    width = splits * k

    has_race = mode != "hardest"
    hard_key = torch.empty((num_rows, width), dtype=torch.int32, device=device)
    hard_idx = torch.empty((num_rows, width), dtype=torch.int64, device=device)
    hard_sim = torch.empty((num_rows, width), dtype=torch.float32, device=device)
    if has_race:
        race_key, race_idx, race_sim = (torch.empty_like(partial) for partial in (hard_key, hard_idx, hard_sim))
    else:  # never read or written: the HAS_RACE branches are compiled out
        race_key, race_idx, race_sim = hard_key, hard_idx, hard_sim
    # Per program: whether it saw a non-finite similarity (or positive_sim / stats), and with guides a second row,
    # whether it saw a non-finite guide similarity.
    flags = torch.empty((1 + has_guides, row_blocks * splits) if check_finite else (1,), dtype=torch.int32,
                        device=device)
    if has_guides:
        guides, guide_dim = (anchor_guides, bank_guides), anchor_guides.shape[1]
        guide_strides = (*anchor_guides.stride(), *bank_guides.stride())
    else:  # never read: the HAS_GUIDES branches are compiled out
        guides, guide_dim, guide_strides = (anchors, bank), 0, (0, 0, 0, 0)
    # Per (row, split) counts, int32: a split spans fewer than 2³¹ columns.
    above = torch.empty((num_rows, splits) if count_above else (1,), dtype=torch.int32, device=device)

    centres = weight_centres(positive_sim, options)
    ceilings = row_ceilings(positive_sim, options, fn_thresholds)
    dot_fp32 = interpreted or not low_precision
    # Beside a float32 similarity product the guides take it too (bf16 / fp16 products are exact in float32): a
    # tensor-core guide tile beside it needs layout conversions, which spilled on sm_90.
    guide_dot_fp32 = dot_fp32 or not guide_low_precision
    _sample_negatives_kernel[(row_blocks, splits)](
        anchors, bank, centres, centres if ceilings is None else ceilings,
        fn_thresholds if count_above else centres, anchor_ids, bank_ids, stats, *guides,
        race_key, race_idx, race_sim, hard_key, hard_idx, hard_sim, flags, above,
        num_rows, filled, anchors.shape[1], guide_dim, cols_per_split,
        anchors.stride(0), anchors.stride(1), bank.stride(0), bank.stride(1), centres.stride(0),
        0 if ceilings is None else ceilings.stride(0), fn_thresholds.stride(0) if count_above else 0,
        anchor_ids.stride(0), bank_ids.stride(0), stats.stride(0), *guide_strides,
        col_offset, row_offset, step, seed & 0xFFFFFFFF, seed >> 32,
        options.effective_cut_margin, options.tau, min(options.effective_fn_tau, FLOAT_MAX.value),
        float(options.min_count),
        math.log(options.prior_k - 1.0), fn_logit_threshold(options.fn_margin),
        options.guide_threshold if has_guides else 0.0,
        K=k, KP=kp, BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        BLOCK_G=guide_block_k(guide_dim, not guide_dot_fp32, device),
        HAS_RACE=has_race, HAS_WEIGHTS=mode == "fne", HAS_CUTDOWN=has_race and options.cutdown,
        HAS_CEILING=ceilings is not None, HAS_COUNT=bool(count_above), HAS_GUIDES=has_guides,
        CHECK_FINITE=bool(check_finite), FN_EXCLUDES=math.isinf(options.effective_fn_tau), DOT_FP32=dot_fp32,
        GUIDE_DOT_FP32=guide_dot_fp32,
        INPUT_PRECISION="ieee" if interpreted else input_precision(config),
        ONE_K_STEP=config.block_k >= anchors.shape[1],
        num_warps=config.num_warps, num_stages=config.num_stages)
    # Every slot is written by the merge kernel.
    index = torch.empty((num_rows, k), dtype=torch.int64, device=device)
    sim = torch.empty((num_rows, k), dtype=torch.float32, device=device)
    valid = torch.empty((num_rows, k), dtype=torch.bool, device=device)
    key = torch.empty((num_rows, k), dtype=torch.float32, device=device)
    merge = merge_config(width)
    _merge_kernel[(triton.cdiv(num_rows, merge.block_r),)](
        race_key, race_idx, race_sim, hard_key, hard_idx, hard_sim, index, sim, valid, key, num_rows, width,
        K=k, BLOCK_R=merge.block_r, BLOCK_W=merge.block_w, HAS_RACE=has_race, num_warps=merge.num_warps)
    if check_finite:
        thresholds_nan = fn_thresholds is not None and bool(torch.isnan(fn_thresholds).any())
        flagged = flags.any(dim=1).tolist()
        similarities_finite = not flagged[0]
        guide_similarities_finite = not (has_guides and flagged[1])
        if thresholds_nan or not (similarities_finite and guide_similarities_finite):
            # Which input it was is worked out on the host, only on this error path.
            raise_if_not_finite(anchors, positive_sim, stats, fn_thresholds, anchor_guides,
                                similarities_finite=similarities_finite,
                                guide_similarities_finite=guide_similarities_finite)
    if count_above:
        return index, sim, valid, key, above.sum(dim=1, dtype=torch.int64)
    return index, sim, valid, key
