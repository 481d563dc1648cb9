// Philox4x32-10 first words for 16 anchor rows at once (one per 32-bit lane of an AVX-512 vector), one bank column
// at a time: the CPU kernel's epilogue reads its column-major similarity tiles 16 rows by 16 rows.
//
// Three savings over a plain vectorisation of philox_first_word() (which gcc does through 64-bit lanes, shuffling
// every product apart and back; 5.3 ns/word on this project's machine):
//  * 32-bit lanes: a widening multiply is two vpmuludq (even and odd lanes), and its high and low halves are put
//    back with one masked shuffle each; the three-way xors are one vpternlogd;
//  * the first two rounds split into row and column parts (philox_row_terms / philox_column_terms in philox.h):
//    the row part is computed once per block of rows, the column part once per column in scalar code, so a pair
//    costs eight rounds (15 products instead of 19);
//  * four columns are interleaved: each column is a chain of dependent multiplies, and four chains keep the
//    multipliers busy.
// Measured (AMD EPYC Zen 5, gcc 12, 512 columns x 16 rows, best of 3000): 0.41 ns/word, against 0.86 for the
// previous kernel's AVX-512 loop over columns (from-scratch rounds, vpmulld, no interleaving) and 0.66 for this
// loop without the interleaving. Same arithmetic as philox.h: ctest checks the scalar row/column split, and the op's
// tests compare every draw of this path with the oracle and with the portable one (FNE_FAST_CPU_PORTABLE=1).
#pragma once

#if defined(__x86_64__) || defined(_M_X64)
// gcc 12 warns that its own _mm512_undefined_epi32() (`__m512i __Y = __Y;`) is used uninitialised once the
// intrinsics are inlined (GCC bug 105593); the value is a don't-care operand, so the warning is silenced here.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include <cstdint>

#include "../philox.h"

#define FNE_FAST_AVX512 __attribute__((target("avx512f")))

namespace fne_fast {

// The round keys, broadcast.
struct PhiloxKeys16 {
  __m512i k0[kPhiloxRounds], k1[kPhiloxRounds];
};

// philox_row_terms() of 16 rows.
struct PhiloxRowTerms16 {
  __m512i v1, v2, v3;
};

FNE_FAST_AVX512 inline PhiloxKeys16 philox_keys16(PhiloxKey key) {
  PhiloxKeys16 keys;
  for (int round = 0; round < kPhiloxRounds; ++round) {
    keys.k0[round] = _mm512_set1_epi32(static_cast<int>(key.lo + static_cast<uint32_t>(round) * kPhiloxW0));
    keys.k1[round] = _mm512_set1_epi32(static_cast<int>(key.hi + static_cast<uint32_t>(round) * kPhiloxW1));
  }
  return keys;
}

// (high, low) 32-bit halves of multiplier * x in every lane.
FNE_FAST_AVX512 inline __m512i mul_hi_lo16(__m512i x, __m512i multiplier, __m512i* lo) {
  const __m512i even = _mm512_mul_epu32(x, multiplier);                                   // lanes 0, 2, ...: 64-bit
  const __m512i odd = _mm512_mul_epu32(_mm512_shuffle_epi32(x, _MM_PERM_DDBB), multiplier);  // lanes 1, 3, ...
  // Low halves sit in the even 32-bit word of each product, high halves in the odd one.
  *lo = _mm512_mask_shuffle_epi32(even, 0xAAAA, odd, _MM_PERM_CCAA);
  return _mm512_mask_shuffle_epi32(odd, 0x5555, even, _MM_PERM_DDBB);
}

FNE_FAST_AVX512 inline PhiloxRowTerms16 philox_row_terms16(__m512i rows, uint32_t column_high, PhiloxKey key) {
  const __m512i m0 = _mm512_set1_epi32(static_cast<int>(kPhiloxM0));
  const __m512i m1 = _mm512_set1_epi32(static_cast<int>(kPhiloxM1));
  __m512i row_lo, round2_lo;
  const __m512i row_hi = mul_hi_lo16(rows, m1, &row_lo);
  const __m512i c0 = _mm512_xor_si512(row_hi, _mm512_set1_epi32(static_cast<int>(column_high ^ key.lo)));
  const __m512i round2_hi = mul_hi_lo16(c0, m0, &round2_lo);
  return PhiloxRowTerms16{
      _mm512_xor_si512(row_lo, _mm512_set1_epi32(static_cast<int>(key.lo + kPhiloxW0))),
      _mm512_xor_si512(round2_hi, _mm512_set1_epi32(static_cast<int>(key.hi + kPhiloxW1))), round2_lo};
}

// Rounds 3 to 10 of four independent 16-lane Philox states (c0..c3 after round 2, as philox_first_word_from_terms
// starts them): the first output word of each lane.
FNE_FAST_AVX512 inline void philox_rounds16x4(__m512i c0[4], __m512i c1[4], __m512i c2[4], __m512i c3[4],
                                              const PhiloxKeys16& keys, __m512i words[4]) {
  constexpr int kXor3 = 0x96;  // vpternlogd truth table of a ^ b ^ c
  const __m512i m0 = _mm512_set1_epi32(static_cast<int>(kPhiloxM0));
  const __m512i m1 = _mm512_set1_epi32(static_cast<int>(kPhiloxM1));
  // Unrolled: a loop over the rounds kept the four states moving between registers (7% slower).
#pragma GCC unroll 8
  for (int round = 2; round < kPhiloxRounds - 1; ++round) {
#pragma GCC unroll 4
    for (int u = 0; u < 4; ++u) {
      __m512i lo0, lo1;
      const __m512i hi0 = mul_hi_lo16(c0[u], m0, &lo0);
      const __m512i hi1 = mul_hi_lo16(c2[u], m1, &lo1);
      c0[u] = _mm512_ternarylogic_epi32(hi1, c1[u], keys.k0[round], kXor3);
      c2[u] = _mm512_ternarylogic_epi32(hi0, c3[u], keys.k1[round], kXor3);
      c1[u] = lo1;
      c3[u] = lo0;
    }
  }
  for (int u = 0; u < 4; ++u) {
    __m512i unused_lo;
    const __m512i hi1 = mul_hi_lo16(c2[u], m1, &unused_lo);
    words[u] = _mm512_ternarylogic_epi32(hi1, c1[u], keys.k0[kPhiloxRounds - 1], kXor3);
  }
}

// words[u] = philox_first_word_from_terms(rows[u], columns[u]) for four columns (their rows' terms may differ
// only where the columns' high words do).
FNE_FAST_AVX512 inline void philox_words16x4(const PhiloxRowTerms16* const rows[4], const PhiloxColumnTerms columns[4],
                                             const PhiloxKeys16& keys, __m512i words[4]) {
  __m512i c0[4], c1[4], c2[4], c3[4];
  for (int u = 0; u < 4; ++u) {
    c0[u] = _mm512_xor_si512(rows[u]->v1, _mm512_set1_epi32(static_cast<int>(columns[u].a)));
    c1[u] = _mm512_set1_epi32(static_cast<int>(columns[u].b));
    c2[u] = _mm512_xor_si512(rows[u]->v2, _mm512_set1_epi32(static_cast<int>(columns[u].c)));
    c3[u] = rows[u]->v3;
  }
  philox_rounds16x4(c0, c1, c2, c3, keys, words);
}

// The starting states of 16 arbitrary (row, column) pairs, for the compacted survivors of a tile: lane e pairs the
// row whose terms sit at lane rows[e] of row_terms (next_terms where the column's low word wrapped past 2³²
// inside the tile) with the column whose low 32 bits are column_low[e]. philox_column_terms of 16 columns in
// vector form; then the xors of philox_first_word_from_terms.
FNE_FAST_AVX512 inline void philox_pair_states16(__m512i rows, __m512i column_low, __mmask16 next_high,
                                                 const PhiloxRowTerms16& row_terms,
                                                 const PhiloxRowTerms16& next_terms, uint32_t step, PhiloxKey key,
                                                 __m512i* c0, __m512i* c1, __m512i* c2, __m512i* c3) {
  const __m512i m0 = _mm512_set1_epi32(static_cast<int>(kPhiloxM0));
  const __m512i m1 = _mm512_set1_epi32(static_cast<int>(kPhiloxM1));
  __m512i column_lo, round2_lo;
  const __m512i column_hi = mul_hi_lo16(column_low, m0, &column_lo);
  const __m512i column_c2 = _mm512_xor_si512(column_hi, _mm512_set1_epi32(static_cast<int>(step ^ key.hi)));
  const __m512i round2_hi = mul_hi_lo16(column_c2, m1, &round2_lo);
  const __m512i v1 = _mm512_mask_permutexvar_epi32(_mm512_permutexvar_epi32(rows, row_terms.v1), next_high, rows,
                                                   next_terms.v1);
  const __m512i v2 = _mm512_mask_permutexvar_epi32(_mm512_permutexvar_epi32(rows, row_terms.v2), next_high, rows,
                                                   next_terms.v2);
  const __m512i v3 = _mm512_mask_permutexvar_epi32(_mm512_permutexvar_epi32(rows, row_terms.v3), next_high, rows,
                                                   next_terms.v3);
  *c0 = _mm512_xor_si512(round2_hi, v1);
  *c1 = round2_lo;
  *c2 = _mm512_xor_si512(column_lo, v2);
  *c3 = v3;
}

}  // namespace fne_fast

#pragma GCC diagnostic pop
#endif  // x86-64
