// The CPU kernel's fused epilogue (docs/DESIGN.md §1-2) over one column-major similarity tile: identity / fill /
// cut-down masks, the hardest non-positive candidates, Philox, Gumbel keys and the race, updating the rows' ranked
// lists.
#pragma once

#include <cstdint>
#include <vector>

#include "../fne_math.h"
#include "row_lists.h"

namespace fne_fast {

// What every pair of a call shares.
struct CallContext {
  SamplerConfig config;
  WeightParams weights;
  PhiloxKey philox_key;
  float cut_threshold;  // s <= cut_threshold is cut down (-inf when the cut-down is off)
  const int64_t* anchor_ids;
  const float* centres;   // [B] the log-weight's centre s⁺ + b (RowInputs in sample_negatives.h)
  const float* ceilings;  // [B] s > ceiling is excluded from the race and the fallback; nullptr: no ceilings
  const float* count_thresholds;  // [B] fn_thresholds, whose exceedances the call counts; nullptr: no count
  float guide_threshold;          // language guidance: a pair whose guide similarity is above it is excluded
};

// One tile: similarity of anchor row row_begin + r to the tile's bank column j at sims[j * ld + r].
struct SimilarityTile {
  const float* sims;
  int64_t ld;
  int64_t row_begin, rows;
  int64_t cols;
  int64_t global_col_begin;  // col_offset + the tile's first bank row
  const int64_t* bank_ids;   // ids of the tile's columns
  // Language guidance: the guide similarities of the same pairs at guides[j * guide_ld + r]; nullptr: no guides.
  const float* guides = nullptr;
  int64_t guide_ld = 0;
};

// Which similarities of live pairs were not finite (NaN or Inf), for check_finite's errors.
struct NonFinite {
  bool similarity = false;
  bool guide = false;
  NonFinite& operator|=(const NonFinite& other) {
    similarity |= other.similarity;
    guide |= other.guide;
    return *this;
  }
};

// Per-thread buffers: for one block of rows, the columns where some row has a race candidate, and which rows; and
// the same survivors compacted to one (row lane, column) pair each, where they are few (tile_epilogue.cpp).
struct EpilogueScratch {
  std::vector<int32_t> columns;
  std::vector<uint16_t> survivors;
  std::vector<uint32_t> pair_lanes, pair_columns;
};

// Whether tile_epilogue takes its AVX-512 loops, decided on the first call of the process: on an x86 CPU with
// AVX-512F unless FNE_FAST_CPU_PORTABLE is set (to any value); the portable loops otherwise. The op
// fne_fast::cpu_epilogue reports the same decision.
bool avx512_epilogue();

// Runs the epilogue over every row of the tile; returns which similarities of its pairs were not finite.
NonFinite tile_epilogue(const SimilarityTile& tile, const CallContext& call, RowLists& lists, EpilogueScratch& scratch);

}  // namespace fne_fast
