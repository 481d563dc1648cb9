"""The ``@triton.jit`` device helpers of the sampler's kernels (sample_negatives.py): the first Philox word,
the Gumbel noise of a word, order-preserving int32 keys, and the running top-k lists a program keeps in registers.

Philox. The rounds are written out (not ``tl.philox``) because the counter is (column, column >> 32, row, step):
the first two rounds' products then depend on the row or on the column only, and broadcasting computes them once
per row or column.

The lists. Each row holds ``KP`` slots of (ordered int32 key, int64 global index, float32 similarity); ``pack``
turns a tile into one int64 per pair whose row maximum is the best candidate (ties to the lower column), and
``insert_tile`` moves the tile's candidates that beat a row's worst slot into it, best first. Slots ``>= K`` hold
``PAD_KEY`` and are never the worst entry, so a power-of-two ``KP`` serves any ``K``.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["philox_first_word", "gumbel_from_bits", "to_ordered", "from_ordered", "pack", "insert_tile",
           "store_list", "best_of", "EMPTY_KEY", "PAD_KEY", "NO_CANDIDATE", "FLOAT_MAX"]

# Philox4x32-10 constants (csrc/philox.h).
PHILOX_M0 = tl.constexpr(0xD2511F53)
PHILOX_M1 = tl.constexpr(0xCD9E8D57)
PHILOX_W0 = tl.constexpr(0x9E3779B9)
PHILOX_W1 = tl.constexpr(0xBB67AE85)
# Sentinels: an empty list slot (below every ordered float key) and a packed tile entry that is not a candidate.
EMPTY_KEY = tl.constexpr(-(2**31))
PAD_KEY = tl.constexpr(2**31 - 1)  # list slots >= k: never the worst entry, never written
NO_CANDIDATE = tl.constexpr(-(2**63))
FLOAT_MAX = tl.constexpr(3.4028234663852886e38)


@triton.jit
def philox_first_word(c0, c1, c2, c3, k0, k1):
    """First output word of Philox4x32-10 (csrc/philox.h philox_first_word); uint32 operands that broadcast."""
    # Wrapping uint32 arithmetic is the algorithm, so the overflow sanitizer (on in debug and interpreter runs)
    # must not check it. Each round's two products are formed in 64 bits, whose halves are the high and low words:
    # one IMAD.WIDE.U32 on sm_90 instead of IMAD.HI + IMAD (the (128, 4M, 256) kernel: 881 -> 706 multiplies
    # under Triton 3.9, 4624 -> 4416 instructions under 3.6).
    for _ in tl.static_range(9):
        product1 = c2.to(tl.uint64) * tl.full([], PHILOX_M1, tl.uint64)
        product0 = c0.to(tl.uint64) * tl.full([], PHILOX_M0, tl.uint64)
        n0 = (product1 >> 32).to(tl.uint32) ^ c1 ^ k0
        n2 = (product0 >> 32).to(tl.uint32) ^ c3 ^ k1
        c1 = product1.to(tl.uint32)
        c3 = product0.to(tl.uint32)
        c0 = n0
        c2 = n2
        k0 = tl.add(k0, PHILOX_W0, sanitize_overflow=False)
        k1 = tl.add(k1, PHILOX_W1, sanitize_overflow=False)
    return tl.umulhi(c2, PHILOX_M1) ^ c1 ^ k0


@triton.jit
def gumbel_from_bits(x):
    """G = -log(E), E = -log(1 - v), v = (x + ½) 2⁻³² (csrc/fne_math.h gumbel_from_bits) for uint32 words x."""
    low = x < 0x80000000
    # f is v for low words and the exactly formed 1 - v for high ones, as in the C++ kernel.
    # x ^ 0xFFFFFFFF is ~x (which the interpreter of Triton 3.6 rejects for uint32).
    f = (tl.where(low, x, x ^ 0xFFFFFFFF).to(tl.float32) + 0.5) * 2.3283064365386963e-10
    # -log(1 - v) = v + v²/2 + ... ; seven terms are exact to float32 for v < 2⁻⁴ (the rest is below v⁸).
    series = f * (1.0 + f * (0.5 + f * (0.33333334 + f * (0.25 + f * (0.2 + f * (0.16666667 + f * 0.14285715))))))
    exponential = tl.where(x < 0x10000000, series, -tl.log(tl.where(low, 1.0 - f, f)))
    return -tl.log(exponential)


@triton.jit
def to_ordered(key):
    """int32 whose signed order is the float order of key (for non-NaN keys)."""
    bits = key.to(tl.int32, bitcast=True)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit
def from_ordered(ordered):
    bits = ordered ^ ((ordered >> 31) & 0x7FFFFFFF)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def pack(key, mask, BLOCK_N: tl.constexpr):
    """One int64 per pair whose row maximum is the best key, ties to the lower column (the tile's order)."""
    rank = (BLOCK_N - 1 - tl.arange(0, BLOCK_N)).to(tl.int64)
    return tl.where(mask, (to_ordered(key).to(tl.int64) << 32) | rank[None, :], NO_CANDIDATE)


@triton.jit
def _move_best(packed, sims, list_key, list_idx, list_sim, best, worst, take, col_base, BLOCK_N: tl.constexpr,
               KEY_IS_SIM: tl.constexpr):
    """One round of insert_tile: each row that takes moves its best tile entry into its worst list slot."""
    best_key = (best >> 32).to(tl.int32)
    column = (BLOCK_N - 1) - (best & 0xFFFFFFFF).to(tl.int32)
    hit = tl.arange(0, BLOCK_N)[None, :] == column[:, None]
    if KEY_IS_SIM:
        chosen_sim = from_ordered(best_key)
    else:
        chosen_sim = tl.sum(tl.where(hit, sims, 0.0), axis=1)
    # Evict the worst entry; among equal keys the one with the larger index ranks last.
    is_worst = list_key == worst[:, None]
    evicted = tl.max(tl.where(is_worst, list_idx, NO_CANDIDATE), axis=1)
    slot = is_worst & (list_idx == evicted[:, None]) & take[:, None]
    list_key = tl.where(slot, best_key[:, None], list_key)
    list_idx = tl.where(slot, (col_base + column)[:, None], list_idx)
    list_sim = tl.where(slot, chosen_sim[:, None], list_sim)
    packed = tl.where(hit & take[:, None], NO_CANDIDATE, packed)
    best = tl.max(packed, axis=1)
    worst = tl.min(list_key, axis=1)
    take = (best != NO_CANDIDATE) & ((best >> 32).to(tl.int32) > worst)
    return packed, list_key, list_idx, list_sim, best, worst, take


@triton.jit
def insert_tile(packed, sims, list_key, list_idx, list_sim, col_base, K: tl.constexpr, BLOCK_N: tl.constexpr,
                KEY_IS_SIM: tl.constexpr):
    """Moves the tile's candidates that beat each row's worst list entry into the list, best first.

    Tiles arrive in increasing column order, so a tile entry can only displace a list entry by a strictly larger
    key, and at most k entries per row move: at most k rounds, usually zero or one. For small k the rounds are
    unrolled, which keeps the tile loop free of nested loops: the compiler only software-pipelines innermost
    loops, and the tile loop is the one whose bank loads should run ahead.
    """
    best = tl.max(packed, axis=1)
    worst = tl.min(list_key, axis=1)
    take = (best != NO_CANDIDATE) & ((best >> 32).to(tl.int32) > worst)
    if K <= 4:
        for _ in tl.static_range(K):
            if tl.max(take.to(tl.int32), axis=0) > 0:
                packed, list_key, list_idx, list_sim, best, worst, take = _move_best(
                    packed, sims, list_key, list_idx, list_sim, best, worst, take, col_base, BLOCK_N, KEY_IS_SIM)
    else:
        while tl.max(take.to(tl.int32), axis=0) > 0:
            packed, list_key, list_idx, list_sim, best, worst, take = _move_best(
                packed, sims, list_key, list_idx, list_sim, best, worst, take, col_base, BLOCK_N, KEY_IS_SIM)
    return list_key, list_idx, list_sim


@triton.jit
def store_list(key_ptr, idx_ptr, sim_ptr, list_key, list_idx, list_sim, rows, row_ok, split, width,
               K: tl.constexpr, KP: tl.constexpr):
    slots = tl.arange(0, KP)
    offsets = rows[:, None] * width + split * K + slots[None, :]
    mask = row_ok[:, None] & (slots < K)[None, :]
    tl.store(key_ptr + offsets, list_key, mask=mask)
    tl.store(idx_ptr + offsets, list_idx, mask=mask)
    tl.store(sim_ptr + offsets, list_sim, mask=mask)


@triton.jit
def best_of(key, idx, sim):
    """Per row: the best (key, index, sim) of the merged partial lists, ties to the lower index."""
    best = tl.max(key, axis=1)
    best_idx = tl.min(tl.where(key == best[:, None], idx, 2**63 - 1), axis=1)
    hit = (key == best[:, None]) & (idx == best_idx[:, None])
    best_sim = tl.sum(tl.where(hit, sim, 0.0), axis=1)
    return best, best_idx, best_sim
