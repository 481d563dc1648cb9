// The epilogue works on blocks of 16 anchor rows, the lanes of one AVX-512 vector: in a column-major tile, a
// block's similarities to one bank column are 16 contiguous floats. Two passes per block:
//  1. scan: per column, the masks (finite, not the anchor's identity, at most the row's ceiling, not excluded by
//     language guidance, above the cut-down), the exceedance counts when the call asks for them, the hardest lists (a
//     lane leaves the vector only when its similarity reaches its row's k-th: rare after the first columns), and
//     the list of columns where some row has a race candidate, with a 16-bit mask of those rows;
//  2. race: the Philox words of the candidates, and for a candidate whose word is within its row's limit, the key
//     ℓ + G and the race list. Log-weights are <= 0, so a word beyond the limit (noise too small to beat the
//     row's k-th key) is dropped with one compare per 16 pairs; after the first columns the logarithms and the
//     weight run for few pairs. Where most rows of a listed column are candidates (nothing cut down), the words
//     are drawn for whole columns (philox_avx512.h: 16 rows x 4 columns at a time); where they are few (training
//     cuts almost every pair down), the candidates are first compacted to (row, column) pairs and the words are
//     drawn for 64 pairs at a time, so an excluded pair costs no word. Either way a pair gets the word of its own
//     (row, column, step) counter, so the draws do not depend on the path.
// Mode "hardest" runs the scan only. The portable loops (non-x86, no AVX-512, or FNE_FAST_CPU_PORTABLE=1) do the
// same in scalar code, with a 16-row Philox loop that compilers vectorise for a column with several candidates and
// one word per candidate otherwise.
#include "tile_epilogue.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>

#include "philox_avx512.h"

namespace fne_fast {
namespace {

constexpr int kLanes = 16;
constexpr int kScalarWordsBelow = 4;
// The AVX-512 race compacts the candidates when they fill fewer than 1/kCompactBelow of the listed columns' lanes.
constexpr int64_t kCompactBelow = 2;
constexpr float kLargest = std::numeric_limits<float>::max();
constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kNegInf = -kInf;

// A race candidate (tile row r, column j) whose Philox word passed its row's limit: its key, then the list.
// Returns the row's limit afterwards.
uint32_t offer_race(const SimilarityTile& tile, const CallContext& call, RowLists& lists, int64_t r, int64_t j,
                    uint32_t word) {
  const int64_t row = tile.row_begin + r;
  const float s = tile.sims[j * tile.ld + r];
  const float log_weight =
      call.config.mode == SamplerMode::kFne ? fne_log_weight(s, call.centres[row], call.weights) : 0.f;
  const float key = log_weight + gumbel_from_bits(word);
  if (!(key > kNegInf)) return lists.race_limit[row];  // weight 0 (fn_tau = inf): excluded like a cut-down one
  return lists.insert_race(row, key, s, tile.global_col_begin + j);
}

uint32_t counter_row(const SimilarityTile& tile, const CallContext& call, int64_t r) {
  return call.config.row_offset + static_cast<uint32_t>(tile.row_begin + r);
}

uint32_t column_high(const SimilarityTile& tile, int64_t j) {
  return static_cast<uint32_t>(static_cast<uint64_t>(tile.global_col_begin + j) >> 32);
}

PhiloxColumnTerms column_terms(const SimilarityTile& tile, const CallContext& call, int64_t j) {
  return philox_column_terms(static_cast<uint32_t>(tile.global_col_begin + j), call.config.step, call.philox_key);
}

// The words of 16 rows for one column: compilers vectorise this loop over the rows (AVX2 clone on x86).
__attribute__((target_clones("avx2", "default"))) void philox_words16_portable(
    const uint32_t* v1, const uint32_t* v2, const uint32_t* v3, PhiloxColumnTerms column, PhiloxKey key,
    uint32_t* words) {
  for (int l = 0; l < kLanes; ++l) {
    words[l] = philox_first_word_from_terms(PhiloxRowTerms{v1[l], v2[l], v3[l]}, column, key);
  }
}

NonFinite block_portable(const SimilarityTile& tile, int64_t r0, int lanes, const CallContext& call,
                         RowLists& lists, EpilogueScratch& scratch) {
  float hard_threshold[kLanes], ceiling[kLanes], count_threshold[kLanes];
  uint32_t limit[kLanes];
  int64_t anchor_id[kLanes], above[kLanes] = {};
  const bool counting = call.count_thresholds != nullptr;
  for (int l = 0; l < lanes; ++l) {
    const int64_t row = tile.row_begin + r0 + l;
    hard_threshold[l] = lists.hard(row).threshold();
    limit[l] = lists.race_limit[row];
    anchor_id[l] = call.anchor_ids[row];
    ceiling[l] = call.ceilings != nullptr ? call.ceilings[row] : kInf;
    count_threshold[l] = counting ? call.count_thresholds[row] : kInf;
  }
  NonFinite non_finite;
  int64_t listed = 0;
  for (int64_t j = 0; j < tile.cols; ++j) {
    const float* sims = tile.sims + j * tile.ld + r0;
    const float* guides = tile.guides != nullptr ? tile.guides + j * tile.guide_ld + r0 : nullptr;
    const int64_t bank_id = tile.bank_ids[j];
    uint32_t survivors = 0;
    for (int l = 0; l < lanes; ++l) {
      const float s = sims[l];
      // A non-finite similarity (non-finite inputs, or float32 overflow) is never a candidate.
      const bool finite = std::fabs(s) <= kLargest;
      non_finite.similarity |= !finite;
      const bool other = finite && bank_id != anchor_id[l];
      above[l] += other && s > count_threshold[l];
      bool candidate = other && s <= ceiling[l];
      if (guides != nullptr) {
        non_finite.guide |= !(std::fabs(guides[l]) <= kLargest);
        candidate &= !(guides[l] > call.guide_threshold);  // a NaN guide similarity excludes nothing
      }
      if (candidate && s >= hard_threshold[l]) {
        hard_threshold[l] = lists.insert_hard(tile.row_begin + r0 + l, s, tile.global_col_begin + j);
      }
      survivors |= static_cast<uint32_t>(candidate && s > call.cut_threshold) << l;
    }
    scratch.columns[listed] = static_cast<int32_t>(j);
    scratch.survivors[listed] = static_cast<uint16_t>(survivors);
    listed += survivors != 0;
  }
  if (counting) {
    for (int l = 0; l < lanes; ++l) lists.above[tile.row_begin + r0 + l] += above[l];
  }
  if (call.config.mode == SamplerMode::kHardest) return non_finite;

  uint32_t v1[kLanes], v2[kLanes], v3[kLanes], words[kLanes];
  uint32_t terms_high = 0;
  for (int64_t i = 0; i < listed; ++i) {
    const int64_t j = scratch.columns[i];
    const uint32_t high = column_high(tile, j);
    if (i == 0 || high != terms_high) {
      for (int l = 0; l < kLanes; ++l) {
        const PhiloxRowTerms terms = philox_row_terms(counter_row(tile, call, r0 + l), high, call.philox_key);
        v1[l] = terms.v1;
        v2[l] = terms.v2;
        v3[l] = terms.v3;
      }
      terms_high = high;
    }
    const PhiloxColumnTerms column = column_terms(tile, call, j);
    const uint32_t candidates = scratch.survivors[i];
    // One word per candidate where they are few; a vectorised column of 16 costs about as much as 4 scalar words.
    const bool few = __builtin_popcount(candidates) <= kScalarWordsBelow;
    if (!few) philox_words16_portable(v1, v2, v3, column, call.philox_key, words);
    for (uint32_t rows = candidates; rows != 0; rows &= rows - 1) {
      const int l = __builtin_ctz(rows);
      if (few) words[l] = philox_first_word_from_terms(PhiloxRowTerms{v1[l], v2[l], v3[l]}, column, call.philox_key);
      if (words[l] <= limit[l]) limit[l] = offer_race(tile, call, lists, r0 + l, j, words[l]);
    }
  }
  return non_finite;
}

#if defined(__x86_64__) || defined(_M_X64)
// The lanes whose similarity reached their row's hardest-list threshold (rare after the first columns): the lists,
// then the thresholds. Kept out of line, so that the scan loop keeps its registers.
FNE_FAST_AVX512 __attribute__((noinline)) __m512 insert_hard_lanes(const SimilarityTile& tile, RowLists& lists,
                                                                   int64_t r0, int64_t j, __mmask16 lanes, __m512 s,
                                                                   float* hard_threshold) {
  alignas(64) float values[kLanes];
  _mm512_store_ps(values, s);
  for (; lanes != 0; lanes &= lanes - 1) {
    const int l = __builtin_ctz(lanes);
    hard_threshold[l] = lists.insert_hard(tile.row_begin + r0 + l, values[l], tile.global_col_begin + j);
  }
  return _mm512_load_ps(hard_threshold);
}

// The race over whole listed columns: the words of all 16 rows of 4 columns at a time (the dense case).
FNE_FAST_AVX512 void race_by_column(const SimilarityTile& tile, const CallContext& call, RowLists& lists,
                                    const EpilogueScratch& scratch, int64_t r0, int64_t listed, uint32_t high,
                                    const PhiloxRowTerms16& terms, const PhiloxRowTerms16& next_terms,
                                    const PhiloxKeys16& keys, uint32_t* limit) {
  const int32_t* columns = scratch.columns.data();
  const uint16_t* survivors = scratch.survivors.data();
  __m512i limits = _mm512_load_si512(limit);
  for (int64_t group = 0; group < listed; group += 4) {
    const int count = static_cast<int>(std::min<int64_t>(4, listed - group));
    PhiloxColumnTerms column[4];
    const PhiloxRowTerms16* row_terms[4];
    for (int u = 0; u < 4; ++u) {
      const int64_t j = columns[group + std::min(u, count - 1)];  // a short last group repeats its last column
      column[u] = column_terms(tile, call, j);
      row_terms[u] = column_high(tile, j) == high ? &terms : &next_terms;
    }
    __m512i words[4];
    philox_words16x4(row_terms, column, keys, words);
    for (int u = 0; u < count; ++u) {
      __mmask16 pass = _mm512_mask_cmple_epu32_mask(survivors[group + u], words[u], limits);
      if (pass == 0) continue;
      alignas(64) uint32_t word[kLanes];
      _mm512_store_si512(word, words[u]);
      for (; pass != 0; pass &= pass - 1) {
        const int l = __builtin_ctz(pass);
        limit[l] = offer_race(tile, call, lists, r0 + l, columns[group + u], word[l]);
      }
      limits = _mm512_load_si512(limit);
    }
  }
}

// The race over the candidates compacted to (row lane, column) pairs: 64 pairs' words at a time, none for a pair
// that is not a candidate. A row's pairs keep their column order, and a limit read at the start of a group can
// only be above the row's current one (limits fall as lists fill), so each word is checked again before its offer.
FNE_FAST_AVX512 void race_compacted(const SimilarityTile& tile, const CallContext& call, RowLists& lists,
                                    EpilogueScratch& scratch, int64_t r0, int64_t listed,
                                    const PhiloxRowTerms16& terms, const PhiloxRowTerms16& next_terms,
                                    const PhiloxKeys16& keys, uint32_t* limit) {
  uint32_t* lanes = scratch.pair_lanes.data();
  uint32_t* pair_columns = scratch.pair_columns.data();
  const __m512i iota = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  int64_t pairs = 0;
  for (int64_t i = 0; i < listed; ++i) {  // the buffers hold kLanes spare slots past the last column's pairs
    const __mmask16 candidates = scratch.survivors[i];
    _mm512_storeu_si512(lanes + pairs, _mm512_maskz_compress_epi32(candidates, iota));
    _mm512_storeu_si512(pair_columns + pairs, _mm512_set1_epi32(scratch.columns[i]));
    pairs += _mm_popcnt_u32(candidates);
  }
  // Global column = global_col_begin + j; its low word wraps past 2³² at most once inside a tile, and there the
  // next high word's row terms apply.
  const uint32_t begin_low = static_cast<uint32_t>(tile.global_col_begin);
  const __m512i begin = _mm512_set1_epi32(static_cast<int>(begin_low));
  constexpr int64_t kGroup = 4 * kLanes;
  for (int64_t group = 0; group < pairs; group += kGroup) {
    __m512i c0[4], c1[4], c2[4], c3[4], words[4];
    for (int u = 0; u < 4; ++u) {
      // Past the last pair, lanes repeat pair 0 of the group: valid inputs whose words are never read.
      const int64_t offset = group + u * kLanes < pairs ? group + u * kLanes : group;
      const __m512i row_lanes = _mm512_loadu_si512(lanes + offset);  // 0..15: vpermd reads the low 4 bits only
      const __m512i low = _mm512_add_epi32(begin, _mm512_loadu_si512(pair_columns + offset));
      const __mmask16 wrapped = _mm512_cmplt_epu32_mask(low, begin);
      philox_pair_states16(row_lanes, low, wrapped, terms, next_terms, call.config.step, call.philox_key, &c0[u],
                           &c1[u], &c2[u], &c3[u]);
    }
    philox_rounds16x4(c0, c1, c2, c3, keys, words);
    const __m512i limits = _mm512_load_si512(limit);
    for (int u = 0; u < 4 && group + u * kLanes < pairs; ++u) {
      const int64_t offset = group + u * kLanes;
      const int valid = static_cast<int>(std::min<int64_t>(kLanes, pairs - offset));
      const __m512i row_lanes = _mm512_loadu_si512(lanes + offset);
      const __mmask16 live = static_cast<__mmask16>((1u << valid) - 1);
      __mmask16 pass =
          _mm512_mask_cmple_epu32_mask(live, words[u], _mm512_permutexvar_epi32(row_lanes, limits));
      if (pass == 0) continue;
      alignas(64) uint32_t word[kLanes];
      _mm512_store_si512(word, words[u]);
      for (; pass != 0; pass &= pass - 1) {
        const int e = __builtin_ctz(pass);
        const uint32_t l = lanes[offset + e];
        if (word[e] <= limit[l]) limit[l] = offer_race(tile, call, lists, r0 + l, pair_columns[offset + e], word[e]);
      }
    }
  }
}

// kGuided: the tile carries guide similarities (language guidance); a template parameter, so that the scan of a call
// without guides has no extra load or branch.
template <bool kGuided>
FNE_FAST_AVX512 NonFinite block_avx512(const SimilarityTile& tile, int64_t r0, int lanes, const CallContext& call,
                                       RowLists& lists, EpilogueScratch& scratch) {
  const __mmask16 live = static_cast<__mmask16>((1u << lanes) - 1);
  alignas(64) float hard_threshold[kLanes], ceiling[kLanes], count_threshold[kLanes];
  alignas(64) uint32_t limit[kLanes], rows[kLanes];
  alignas(64) int64_t anchor_id[kLanes];
  const bool counting = call.count_thresholds != nullptr;
  for (int l = 0; l < kLanes; ++l) {
    const int64_t row = tile.row_begin + r0 + std::min(l, lanes - 1);  // lanes past the block: masked off
    hard_threshold[l] = lists.hard(row).threshold();
    limit[l] = lists.race_limit[row];
    anchor_id[l] = call.anchor_ids[row];
    rows[l] = counter_row(tile, call, r0 + l);
    ceiling[l] = call.ceilings != nullptr ? call.ceilings[row] : kInf;
    count_threshold[l] = counting ? call.count_thresholds[row] : kInf;
  }
  __m512 threshold = _mm512_load_ps(hard_threshold);
  const __m512 ceilings = _mm512_load_ps(ceiling), count_thresholds = _mm512_load_ps(count_threshold);
  const __m512i one = _mm512_set1_epi32(1);
  __m512i above = _mm512_setzero_si512();
  const __m512i ids_low = _mm512_load_si512(anchor_id), ids_high = _mm512_load_si512(anchor_id + 8);
  const __m512 cut = _mm512_set1_ps(call.cut_threshold), largest = _mm512_set1_ps(kLargest);
  int32_t* columns = scratch.columns.data();
  uint16_t* survivors = scratch.survivors.data();
  // Locals, so that the loop keeps them in registers across the stores to the lists.
  const int64_t ld = tile.ld, cols = tile.cols;
  const int64_t* bank_ids = tile.bank_ids;
  const float* column = tile.sims + r0;
  const float* guide_column = kGuided ? tile.guides + r0 : nullptr;
  const int64_t guide_ld = tile.guide_ld;
  const __m512 guide_threshold = _mm512_set1_ps(call.guide_threshold);
  __mmask16 non_finite = 0, guide_non_finite = 0;
  int64_t listed = 0;
  for (int64_t j = 0; j < cols; ++j, column += ld) {
    const __m512 s = _mm512_maskz_loadu_ps(live, column);
    // abs(NaN) <= max is false: NaN and Inf are not finite, and never candidates.
    const __mmask16 finite = _mm512_mask_cmp_ps_mask(live, _mm512_abs_ps(s), largest, _CMP_LE_OQ);
    non_finite |= live & ~finite;
    const __m512i bank_id = _mm512_set1_epi64(bank_ids[j]);
    const __mmask16 same = _mm512_kunpackb(_mm512_cmpeq_epi64_mask(ids_high, bank_id),
                                           _mm512_cmpeq_epi64_mask(ids_low, bank_id));
    if (counting) {  // a tile holds fewer than 2³¹ columns: 32-bit lanes cannot overflow
      above = _mm512_mask_add_epi32(above, _mm512_mask_cmp_ps_mask(finite & ~same, s, count_thresholds, _CMP_GT_OQ),
                                    above, one);
    }
    __mmask16 candidate = _mm512_mask_cmp_ps_mask(finite & ~same, s, ceilings, _CMP_LE_OQ);
    if (kGuided) {
      const __m512 g = _mm512_maskz_loadu_ps(live, guide_column);
      guide_column += guide_ld;
      guide_non_finite |= live & ~_mm512_mask_cmp_ps_mask(live, _mm512_abs_ps(g), largest, _CMP_LE_OQ);
      // Not greater than the threshold, unordered true: a NaN guide similarity excludes nothing.
      candidate = _mm512_mask_cmp_ps_mask(candidate, g, guide_threshold, _CMP_NGT_UQ);
    }
    const __mmask16 hard = _mm512_mask_cmp_ps_mask(candidate, s, threshold, _CMP_GE_OQ);
    if (hard != 0) threshold = insert_hard_lanes(tile, lists, r0, j, hard, s, hard_threshold);
    const __mmask16 survive = _mm512_mask_cmp_ps_mask(candidate, s, cut, _CMP_GT_OQ);
    columns[listed] = static_cast<int32_t>(j);
    survivors[listed] = survive;
    listed += survive != 0;
  }
  if (counting) {
    alignas(64) uint32_t counts[kLanes];
    _mm512_store_si512(counts, above);
    for (int l = 0; l < lanes; ++l) lists.above[tile.row_begin + r0 + l] += counts[l];
  }
  const NonFinite found{non_finite != 0, guide_non_finite != 0};
  if (call.config.mode == SamplerMode::kHardest || listed == 0) return found;

  const PhiloxKeys16 keys = philox_keys16(call.philox_key);
  const __m512i row_words = _mm512_load_si512(rows);
  // A tile spans fewer than 2³² columns, so its listed columns have the first one's high word or the next.
  const uint32_t high = column_high(tile, columns[0]);
  const PhiloxRowTerms16 terms = philox_row_terms16(row_words, high, call.philox_key);
  // Listed columns ascend, so the last one says whether the high word changes inside the tile.
  const PhiloxRowTerms16 next_terms = column_high(tile, columns[listed - 1]) != high
                                          ? philox_row_terms16(row_words, high + 1, call.philox_key)
                                          : terms;
  int64_t kept = 0;  // counted here rather than in the scan, which training's cut-down leaves with the most work
  for (int64_t i = 0; i < listed; ++i) kept += _mm_popcnt_u32(survivors[i]);
  if (kept * kCompactBelow < listed * kLanes) {
    race_compacted(tile, call, lists, scratch, r0, listed, terms, next_terms, keys, limit);
  } else {
    race_by_column(tile, call, lists, scratch, r0, listed, high, terms, next_terms, keys, limit);
  }
  return found;
}
#endif

}  // namespace

bool avx512_epilogue() {
#if defined(__x86_64__) || defined(_M_X64)
  static const bool avx512 = __builtin_cpu_supports("avx512f") && std::getenv("FNE_FAST_CPU_PORTABLE") == nullptr;
  return avx512;
#else
  return false;
#endif
}

NonFinite tile_epilogue(const SimilarityTile& tile, const CallContext& call, RowLists& lists,
                        EpilogueScratch& scratch) {
  if (static_cast<int64_t>(scratch.columns.size()) < tile.cols) {
    scratch.columns.resize(tile.cols);
    scratch.survivors.resize(tile.cols);
    scratch.pair_lanes.resize(tile.cols * kLanes + kLanes);
    scratch.pair_columns.resize(tile.cols * kLanes + kLanes);
  }
#if defined(__x86_64__) || defined(_M_X64)
  const bool avx512 = avx512_epilogue();
#endif
  NonFinite non_finite;
  for (int64_t r0 = 0; r0 < tile.rows; r0 += kLanes) {
    const int lanes = static_cast<int>(std::min<int64_t>(kLanes, tile.rows - r0));
#if defined(__x86_64__) || defined(_M_X64)
    if (avx512) {
      non_finite |= tile.guides != nullptr ? block_avx512<true>(tile, r0, lanes, call, lists, scratch)
                                           : block_avx512<false>(tile, r0, lanes, call, lists, scratch);
      continue;
    }
#endif
    non_finite |= block_portable(tile, r0, lanes, call, lists, scratch);
  }
  return non_finite;
}

}  // namespace fne_fast
