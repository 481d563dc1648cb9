// CPU kernel of fne_fast::sample_negatives (DESIGN.md §2).
//
// Work items are (anchor block × bank tile) pairs split over at::parallel_for threads. For each item, one BLAS
// call computes the similarity tile into a per-thread buffer that stays in L2, and the fused epilogue consumes
// it row by row: identity / fill / cut-down masks, Philox, Gumbel keys and a streaming top-k. Every thread keeps
// its own top-k per anchor row; the lists are merged exactly at the end, so the result does not depend on the
// tiling or the thread count. Extra memory: O(threads · (tile + B·k)), independent of N.
//
// The epilogue is cheap because of two observations:
//  * only Philox has to run for every surviving pair; it is a branch-free integer loop over a compacted list of
//    columns, which the compiler vectorises (this file is built for AVX-512/AVX2 with a generic fallback);
//  * log-weights are <= 0, so a pair can only enter a full top-k list if its Gumbel noise alone beats the list's
//    current k-th key T. G is decreasing in the Philox word, so that is an integer comparison against a bound
//    recomputed only when the list changes; logs and the weight are evaluated for the few pairs that pass.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <vector>

#include "../fne_math.h"
#include "../sample_negatives.h"
#include "philox_avx512.h"

namespace fne_fast {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Anchor rows and bank rows per work item: 128 x 512 float32 similarities (256 KiB) plus, for low-precision
// banks, a 512-row float32 copy of the bank tile fit the 1 MiB L2 of one core here. FNE_FAST_CPU_TILE_ROWS and
// FNE_FAST_CPU_TILE_COLS override them (tests and tuning).
constexpr int64_t kTileRows = 128;
constexpr int64_t kTileCols = 512;

// An ordered list (best first) of at most k candidates of one row.
struct RankedList {
  float* key;
  float* sim;
  int64_t* index;
  int64_t* count;
  int64_t k;

  // The list interface of write_output_row (fne_math.h).
  int64_t size() const { return *count; }
  int64_t index_at(int64_t i) const { return index[i]; }
  float sim_at(int64_t i) const { return sim[i]; }
  float key_at(int64_t i) const { return key[i]; }

  bool accepts(float candidate_key, int64_t candidate_index) const {
    return *count < k || ranks_before(candidate_key, candidate_index, key[k - 1], index[k - 1]);
  }
  float threshold() const { return *count < k ? kNegInf : key[k - 1]; }

  void insert(float candidate_key, float candidate_sim, int64_t candidate_index) {
    int64_t pos = *count < k ? *count : k - 1;
    while (pos > 0 && ranks_before(candidate_key, candidate_index, key[pos - 1], index[pos - 1])) {
      key[pos] = key[pos - 1];
      sim[pos] = sim[pos - 1];
      index[pos] = index[pos - 1];
      --pos;
    }
    key[pos] = candidate_key;
    sim[pos] = candidate_sim;
    index[pos] = candidate_index;
    if (*count < k) ++*count;
  }
};

// Storage for the ranked lists of all B rows: the Gumbel race and the hardest non-positive candidates.
struct RowLists {
  int64_t k = 0;
  std::vector<float> race_key, race_sim, hard_key, hard_sim;
  std::vector<int64_t> race_index, hard_index, race_count, hard_count;

  void resize(int64_t num_rows, int64_t k_) {
    k = k_;
    for (auto* v : {&race_key, &race_sim, &hard_key, &hard_sim}) v->assign(num_rows * k, 0.f);
    for (auto* v : {&race_index, &hard_index}) v->assign(num_rows * k, -1);
    for (auto* v : {&race_count, &hard_count}) v->assign(num_rows, 0);
  }
  RankedList race(int64_t row) {
    return {&race_key[row * k], &race_sim[row * k], &race_index[row * k], &race_count[row], k};
  }
  RankedList hard(int64_t row) {
    return {&hard_key[row * k], &hard_sim[row * k], &hard_index[row * k], &hard_count[row], k};
  }
};

struct RowContext {
  const float* sims;          // similarities of this row to the tile's columns
  const int64_t* bank_ids;    // ids of the tile's columns
  int64_t tile_cols;
  int64_t global_col_begin;   // col_offset + first column of the tile
  int64_t anchor_id;
  float positive_sim;
  uint32_t global_row;
};

struct CallContext {
  SamplerConfig config;
  WeightParams weights;
  PhiloxKey philox_key;
  float cut_threshold;  // s <= cut_threshold is cut down (-inf when the cut-down is off)
};

// Philox first words for the compacted columns, portable: compilers vectorise it (AVX2 clone on x86).
__attribute__((target_clones("avx2", "default"))) void philox_words_portable(
    const int32_t* columns, int64_t count, int64_t global_col_begin, uint32_t row, uint32_t step, PhiloxKey key,
    uint32_t* words) {
  for (int64_t c = 0; c < count; ++c) {
    const uint64_t column = static_cast<uint64_t>(global_col_begin) + static_cast<uint64_t>(columns[c]);
    words[c] = philox_first_word(static_cast<uint32_t>(column), static_cast<uint32_t>(column >> 32), row, step, key);
  }
}

// The hot loop: AVX-512 in 32-bit lanes where the CPU has it (see philox_avx512.h), else the portable loop.
void philox_words_for_columns(const int32_t* columns, int64_t count, int64_t global_col_begin, uint32_t row,
                              uint32_t step, PhiloxKey key, uint32_t* words) {
#if defined(__x86_64__) || defined(_M_X64)
  // FNE_FAST_CPU_PORTABLE=1 forces the portable loop (read once per process), so tests cover both paths.
  static const bool has_avx512 = __builtin_cpu_supports("avx512f") && std::getenv("FNE_FAST_CPU_PORTABLE") == nullptr;
  if (has_avx512) return philox_words_avx512(columns, count, global_col_begin, row, step, key, words);
#endif
  philox_words_portable(columns, count, global_col_begin, row, step, key, words);
}

// Masks, hardest list and compaction of the survivors; returns the number of survivors written to `columns`.
int64_t scan_row(const RowContext& row, const CallContext& call, RankedList hard, int32_t* columns,
                 bool* saw_non_finite) {
  float hard_threshold = hard.threshold();
  const float cut = call.cut_threshold;
  bool non_finite = false;
  int64_t survivors = 0;
  for (int64_t j = 0; j < row.tile_cols; ++j) {
    const float s = row.sims[j];
    // A non-finite similarity (non-finite inputs, or float32 overflow) is never a candidate.
    const bool finite = std::fabs(s) <= std::numeric_limits<float>::max();
    non_finite |= !finite;
    const bool candidate = finite & (row.bank_ids[j] != row.anchor_id);
    if (candidate && s >= hard_threshold && hard.accepts(s, row.global_col_begin + j)) {
      hard.insert(s, s, row.global_col_begin + j);
      hard_threshold = hard.threshold();
    }
    columns[survivors] = static_cast<int32_t>(j);
    survivors += candidate & (s > cut);
  }
  *saw_non_finite |= non_finite;
  return survivors;
}

// Gumbel race over the survivors of one row of one tile.
void race_row(const RowContext& row, const CallContext& call, RankedList race, const int32_t* columns,
              int64_t survivors, uint32_t* words) {
  philox_words_for_columns(columns, survivors, row.global_col_begin, row.global_row, call.config.step,
                           call.philox_key, words);
  uint32_t limit = gumbel_bits_limit(race.threshold());
  const bool weighted = call.config.mode == SamplerMode::kFne;
  for (int64_t c = 0; c < survivors; ++c) {
    if (words[c] > limit) continue;  // its noise alone cannot beat the k-th key (log-weights are <= 0)
    const float s = row.sims[columns[c]];
    const float log_weight = weighted ? fne_log_weight(s, row.positive_sim, call.weights) : 0.f;
    const float key = log_weight + gumbel_from_bits(words[c]);
    if (!(key > kNegInf)) continue;  // weight 0 (fn_tau = inf): excluded like a cut-down candidate
    const int64_t global_index = row.global_col_begin + columns[c];
    if (race.accepts(key, global_index)) {
      race.insert(key, s, global_index);
      limit = gumbel_bits_limit(race.threshold());
    }
  }
}

// Per-thread buffers for one tile; nothing here grows with N.
struct TileScratch {
  std::vector<float> sims;
  std::vector<int32_t> columns;
  std::vector<uint32_t> words;
  at::Tensor bank_tile_float;  // float32 copy of a low-precision bank tile (products stay exact in float32)
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sample_negatives_cpu(
    const at::Tensor& anchors, const at::Tensor& bank, const at::Tensor& positive_sim, const at::Tensor& anchor_ids,
    const at::Tensor& bank_ids, const at::Tensor& stats, int64_t k, c10::string_view mode, double margin,
    double tau, double fn_tau, double prior_k, double fn_margin, int64_t min_count, bool cutdown, int64_t seed,
    int64_t step, int64_t row_offset, int64_t col_offset, int64_t filled, bool check_finite) {
  CallContext call;
  call.config = check_sample_negatives_args(anchors, bank, positive_sim, anchor_ids, bank_ids, stats, k, mode,
                                            margin, tau, fn_tau, prior_k, fn_margin, min_count, cutdown, seed,
                                            step, row_offset, col_offset, filled, check_finite);
  const int64_t num_rows = anchors.size(0);
  auto index = at::full({num_rows, k}, -1, anchors.options().dtype(at::kLong));
  auto sim = at::zeros({num_rows, k}, anchors.options().dtype(at::kFloat));
  auto valid = at::zeros({num_rows, k}, anchors.options().dtype(at::kBool));
  auto key = at::full({num_rows, k}, kNegInf, anchors.options().dtype(at::kFloat));
  if (num_rows == 0) return {index, sim, valid, key};

  const auto anchors_float = anchors.to(at::kFloat).contiguous();
  const auto bank_contig = bank.contiguous();
  const auto bank_ids_contig = bank_ids.contiguous();
  const auto anchor_ids_contig = anchor_ids.contiguous();
  const auto positive_contig = positive_sim.contiguous();
  const auto stats_contig = stats.contiguous();
  if (check_finite) {
    // The small inputs before the pass (a bad one would waste it); the bank from inside the pass, below.
    const auto input_flags = non_finite_input_flags(anchors_float, positive_contig, stats_contig);
    raise_if_not_finite(input_flags.data_ptr<bool>(), false);
  }
  const float* stats_ptr = stats_contig.data_ptr<float>();
  call.weights = make_weight_params(stats_ptr, call.config);
  call.philox_key = philox_key_from_seed(call.config.seed);
  call.cut_threshold = (call.config.mode != SamplerMode::kHardest && cutdown) ? stats_ptr[0] - call.config.margin
                                                                               : kNegInf;

  const int64_t live_cols = call.config.filled;  // rows >= filled are never read
  // Tiles no larger than the problem (small calls allocate little) nor than int32 column offsets allow.
  const int64_t tile_rows =
      std::min<int64_t>({positive_int_from_env("FNE_FAST_CPU_TILE_ROWS", kTileRows), num_rows, 4096});
  const int64_t tile_cols = std::min<int64_t>(
      {positive_int_from_env("FNE_FAST_CPU_TILE_COLS", kTileCols), std::max<int64_t>(live_cols, 1), 65536});
  const int64_t row_blocks = (num_rows + tile_rows - 1) / tile_rows;
  const int64_t col_tiles = (live_cols + tile_cols - 1) / tile_cols;
  const bool convert_bank = bank.scalar_type() != at::kFloat;
  const int64_t* bank_ids_ptr = bank_ids_contig.data_ptr<int64_t>();
  const int64_t* anchor_ids_ptr = anchor_ids_contig.data_ptr<int64_t>();
  const float* positive_ptr = positive_contig.data_ptr<float>();
  const int64_t global_col_base = call.config.col_offset;

  std::vector<RowLists> thread_lists(at::get_num_threads());
  std::vector<char> thread_saw_non_finite(thread_lists.size(), 0);
  at::parallel_for(0, row_blocks * col_tiles, 1, [&](int64_t begin, int64_t end) {
    const int thread = at::get_thread_num();
    TORCH_INTERNAL_ASSERT(thread >= 0 && thread < static_cast<int>(thread_lists.size()));
    RowLists& lists = thread_lists[thread];
    if (lists.k == 0) lists.resize(num_rows, k);
    TileScratch scratch;
    scratch.sims.resize(tile_rows * tile_cols);
    scratch.columns.resize(tile_cols);
    scratch.words.resize(tile_cols);
    if (convert_bank) scratch.bank_tile_float = at::empty({tile_cols, bank.size(1)}, anchors_float.options());
    bool saw_non_finite = false;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t row_begin = (item / col_tiles) * tile_rows;
      const int64_t col_begin = (item % col_tiles) * tile_cols;
      const int64_t rows = std::min(tile_rows, num_rows - row_begin);
      const int64_t cols = std::min(tile_cols, live_cols - col_begin);
      at::Tensor tile = bank_contig.narrow(0, col_begin, cols);
      if (convert_bank) tile = scratch.bank_tile_float.narrow(0, 0, cols).copy_(tile);
      auto sims = at::from_blob(scratch.sims.data(), {rows, cols}, anchors_float.options());
      at::mm_out(sims, anchors_float.narrow(0, row_begin, rows), tile.t());
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t global_row = row_begin + r;
        RowContext row{scratch.sims.data() + r * cols,
                       bank_ids_ptr + col_begin,
                       cols,
                       global_col_base + col_begin,
                       anchor_ids_ptr[global_row],
                       positive_ptr[global_row],
                       static_cast<uint32_t>(call.config.row_offset + global_row)};
        const int64_t survivors =
            scan_row(row, call, lists.hard(global_row), scratch.columns.data(), &saw_non_finite);
        if (call.config.mode != SamplerMode::kHardest) {
          race_row(row, call, lists.race(global_row), scratch.columns.data(), survivors, scratch.words.data());
        }
      }
    }
    thread_saw_non_finite[thread] |= saw_non_finite;
  });
  if (check_finite) {
    const bool inputs_checked_above[3] = {false, false, false};
    const bool bank_not_finite =
        std::any_of(thread_saw_non_finite.begin(), thread_saw_non_finite.end(), [](char flag) { return flag != 0; });
    raise_if_not_finite(inputs_checked_above, bank_not_finite);
  }

  // Exact merge of the per-thread lists; in mode "hardest" the hardest list is the answer.
  RowLists merged;
  merged.resize(num_rows, k);
  const bool hardest = call.config.mode == SamplerMode::kHardest;
  int64_t* index_ptr = index.data_ptr<int64_t>();
  float* sim_ptr = sim.data_ptr<float>();
  bool* valid_ptr = valid.data_ptr<bool>();
  float* key_ptr = key.data_ptr<float>();
  at::parallel_for(0, num_rows, 64, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      RankedList race = merged.race(row), hard = merged.hard(row);
      for (RowLists& lists : thread_lists) {
        if (lists.k == 0) continue;
        RankedList thread_race = lists.race(row), thread_hard = lists.hard(row);
        for (int64_t t = 0; t < *thread_race.count; ++t) {
          if (race.accepts(thread_race.key[t], thread_race.index[t])) {
            race.insert(thread_race.key[t], thread_race.sim[t], thread_race.index[t]);
          }
        }
        for (int64_t t = 0; t < *thread_hard.count; ++t) {
          if (hard.accepts(thread_hard.key[t], thread_hard.index[t])) {
            hard.insert(thread_hard.key[t], thread_hard.sim[t], thread_hard.index[t]);
          }
        }
      }
      write_output_row(hardest ? hard : race, hard, k, index_ptr + row * k, sim_ptr + row * k,
                       valid_ptr + row * k, key_ptr + row * k);
    }
  });
  return {index, sim, valid, key};
}

}  // namespace

TORCH_LIBRARY_IMPL(fne_fast, CPU, m) { m.impl("sample_negatives", &sample_negatives_cpu); }

}  // namespace fne_fast
