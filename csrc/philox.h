// Counter-based Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11),
// shared by the CPU kernel, the CUDA kernel and the C++ unit tests so that every backend draws the same
// number for the same (seed, step, row, global column). docs/DESIGN.md §2 fixes the counter layout:
//   key     = (seed low 32 bits, seed high 32 bits)
//   counter = (global column low 32 bits, global column high 32 bits, global row, step)
#pragma once

#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define FNE_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FNE_HOST_DEVICE inline
#endif

namespace fne_fast {

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;  // golden ratio
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;  // sqrt(3) - 1
constexpr int kPhiloxRounds = 10;

struct PhiloxKey {
  uint32_t lo;
  uint32_t hi;
};

FNE_HOST_DEVICE PhiloxKey philox_key_from_seed(uint64_t seed) {
  return PhiloxKey{static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32)};
}

FNE_HOST_DEVICE uint32_t mul_hi_lo(uint32_t a, uint32_t b, uint32_t* hi) {
  const uint64_t product = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  *hi = static_cast<uint32_t>(product >> 32);
  return static_cast<uint32_t>(product);
}

// The full generator: four output words for one counter. Used by the known-answer tests.
FNE_HOST_DEVICE void philox4x32_10(const uint32_t counter[4], PhiloxKey key, uint32_t out[4]) {
  uint32_t c0 = counter[0], c1 = counter[1], c2 = counter[2], c3 = counter[3];
  uint32_t k0 = key.lo, k1 = key.hi;
  for (int round = 0; round < kPhiloxRounds; ++round) {
    uint32_t hi0, hi1;
    const uint32_t lo0 = mul_hi_lo(kPhiloxM0, c0, &hi0);
    const uint32_t lo1 = mul_hi_lo(kPhiloxM1, c2, &hi1);
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  out[0] = c0;
  out[1] = c1;
  out[2] = c2;
  out[3] = c3;
}

// Rounds first_round..9 of philox4x32_10 from the state (c0, c1, c2, c3) and the round key (k0, k1) of
// first_round, returning only the first output word, which is all the sampler uses: the last round needs just one
// of its two products (5% less work than philox4x32_10()[0] from round 0). Written branch-free over plain uint32
// so that compilers vectorise a loop of it over rows or columns (vpmuludq on x86).
FNE_HOST_DEVICE uint32_t philox_first_word_rounds(int first_round, uint32_t c0, uint32_t c1, uint32_t c2,
                                                  uint32_t c3, uint32_t k0, uint32_t k1) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = first_round; round < kPhiloxRounds - 1; ++round) {
    const uint64_t p0 = static_cast<uint64_t>(kPhiloxM0) * c0;
    const uint64_t p1 = static_cast<uint64_t>(kPhiloxM1) * c2;
    const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1 ^ k0;
    const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(p1);
    c3 = static_cast<uint32_t>(p0);
    c0 = n0;
    c2 = n2;
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  const uint64_t last = static_cast<uint64_t>(kPhiloxM1) * c2;
  return static_cast<uint32_t>(last >> 32) ^ c1 ^ k0;
}

FNE_HOST_DEVICE uint32_t philox_first_word(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, PhiloxKey key) {
  return philox_first_word_rounds(0, c0, c1, c2, c3, key.lo, key.hi);
}

// The same first word, split for kernels that draw a block of rows against one column at a time. With the
// counter (column low, column high, row, step), the first round multiplies the column's low word and the row
// separately, and the second round multiplies a word of the row (and the column's high word) and a word of the
// column: neither product mixes the two. So the state after two rounds is
//   (a ^ v1, b, c ^ v2, v3),  (a, b, c) from the column's low word and the step, (v1, v2, v3) from the row and
// the column's high word,
// and a block of rows sharing a column needs only the last eight rounds per pair (15 of the 19 products).
struct PhiloxRowTerms {
  uint32_t v1, v2, v3;
};
struct PhiloxColumnTerms {
  uint32_t a, b, c;
};

FNE_HOST_DEVICE PhiloxRowTerms philox_row_terms(uint32_t row, uint32_t column_high, PhiloxKey key) {
  uint32_t row_hi, round2_hi;
  const uint32_t row_lo = mul_hi_lo(kPhiloxM1, row, &row_hi);
  const uint32_t c0 = row_hi ^ column_high ^ key.lo;  // word 0 after round 1
  const uint32_t round2_lo = mul_hi_lo(kPhiloxM0, c0, &round2_hi);
  return PhiloxRowTerms{row_lo ^ (key.lo + kPhiloxW0), round2_hi ^ (key.hi + kPhiloxW1), round2_lo};
}

FNE_HOST_DEVICE PhiloxColumnTerms philox_column_terms(uint32_t column_low, uint32_t step, PhiloxKey key) {
  uint32_t col_hi, round2_hi;
  const uint32_t col_lo = mul_hi_lo(kPhiloxM0, column_low, &col_hi);
  const uint32_t c2 = col_hi ^ step ^ key.hi;  // word 2 after round 1
  const uint32_t round2_lo = mul_hi_lo(kPhiloxM1, c2, &round2_hi);
  return PhiloxColumnTerms{round2_hi, round2_lo, col_lo};
}

// philox_first_word(column low, column high, row, step, key) from the two parts above: rounds 3 to 10.
FNE_HOST_DEVICE uint32_t philox_first_word_from_terms(PhiloxRowTerms row, PhiloxColumnTerms column, PhiloxKey key) {
  return philox_first_word_rounds(2, column.a ^ row.v1, column.b, column.c ^ row.v2, row.v3, key.lo + 2 * kPhiloxW0,
                                  key.hi + 2 * kPhiloxW1);
}

}  // namespace fne_fast
