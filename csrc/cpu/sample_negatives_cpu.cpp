// CPU kernel of fne_fast::sample_negatives (docs/DESIGN.md §2).
//
// Work items are (anchor block × bank tile) pairs split over at::parallel_for threads. For each item, one GEMM
// computes the float32 similarity tile into a per-thread buffer that stays in L2 (similarity_tiles.h: oneDNN's
// bf16 kernel for bf16 inputs, the float32 GEMM otherwise), and the fused epilogue consumes it (tile_epilogue.h):
// identity / fill / cut-down masks, the hardest candidates, Philox, Gumbel keys and a streaming top-k. Every
// thread keeps its own top-k per anchor row; the lists are merged exactly at the end, so the result does not
// depend on the tiling, the GEMM or the thread count. Extra memory: O(threads · tile + B · (k · threads + D)),
// independent of N.
//
// The epilogue is cheap because only Philox runs for every surviving pair (vectorised over 16 anchor rows per
// bank column), and log-weights are <= 0: a pair can only enter a full top-k list if its Gumbel noise alone
// beats the list's k-th key, which is one integer comparison of its Philox word; logarithms and the weight are
// evaluated for the few pairs that pass.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <vector>

#include "../fne_math.h"
#include "../sample_negatives.h"
#include "row_lists.h"
#include "similarity_tiles.h"
#include "tile_epilogue.h"

namespace fne_fast {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Anchor rows and bank rows per work item; FNE_FAST_CPU_TILE_ROWS and FNE_FAST_CPU_TILE_COLS override them
// (tests and tuning). Each keeps the tile (4 · rows · cols bytes) and the bank tile it reads in a core's 1 MiB L2.
//  * float32 GEMM: 128 x 512 (256 KiB of similarities, plus the 512-row bank tile; a float32 copy of it for a
//    low-precision bank). 128 rows read the bank once per call at B = 128; 64 rows measured slower (124 vs 112 ms,
//    one thread, (128, 65536, 256)); 128 to 2048 columns changed nothing measurable.
//  * bf16 brgemm: the same 128 x 512 (a 256 KiB bank tile at D = 256). The GEMM alone in such tiles took 0.85x
//    (128, 65536, 256) and 0.58x (256, 262144, 256) the CPU time of torch's bf16 mm, one thread; 256 x 256 tiles,
//    which read the bank once at B = 256, 0.56x: no difference worth a second shape.
constexpr int64_t kTileRows = 128, kTileCols = 512;

// Small per-call work runs on the calling thread: a parallel region wakes the pool, and on a machine shared with
// other work a woken thread may wait for a time slice. With the anchors' check, the packing of the anchors and
// the merge in parallel regions of their own, a (128, 65536, 256) bf16 call took 2x longer on two threads than on
// one (medians of 21, load ~5 on 2 cores); one region (the tiles) is what such a call needs.
bool has_non_finite(const at::Tensor& contiguous) {
  bool found = false;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, contiguous.scalar_type(), "has_non_finite", [&] {
    const scalar_t* values = contiguous.data_ptr<scalar_t>();
    for (int64_t i = 0; i < contiguous.numel(); ++i) found |= !std::isfinite(static_cast<float>(values[i]));
  });
  return found;
}

// Rows per chunk of the final merge: it is O(B · k · threads), parallel only for very large batches.
constexpr int64_t kMergeRowsPerChunk = 4096;

SampleOutputs sample_negatives_cpu(
    const at::Tensor& anchors, const at::Tensor& bank, const at::Tensor& positive_sim, const at::Tensor& anchor_ids,
    const at::Tensor& bank_ids, const at::Tensor& stats, const c10::optional<at::Tensor>& fn_thresholds,
    const c10::optional<at::Tensor>& anchor_guides, const c10::optional<at::Tensor>& bank_guides, int64_t k,
    c10::string_view mode, double margin, double tau, double fn_tau, double prior_k, double fn_margin,
    int64_t min_count, bool cutdown, double center_offset, c10::optional<double> relative_cut,
    c10::optional<double> guide_threshold, int64_t seed, int64_t step, int64_t row_offset, int64_t col_offset,
    int64_t filled, bool check_finite, bool count_above) {
  CallContext call;
  call.config = check_sample_negatives_args(anchors, bank, positive_sim, anchor_ids, bank_ids, stats, fn_thresholds,
                                            anchor_guides, bank_guides, k, mode, margin, tau, fn_tau, prior_k,
                                            fn_margin, min_count, cutdown, center_offset, relative_cut,
                                            guide_threshold, seed, step, row_offset, col_offset, filled,
                                            check_finite, count_above);
  const int64_t num_rows = anchors.size(0);
  auto index = at::full({num_rows, k}, -1, anchors.options().dtype(at::kLong));
  auto sim = at::zeros({num_rows, k}, anchors.options().dtype(at::kFloat));
  auto valid = at::zeros({num_rows, k}, anchors.options().dtype(at::kBool));
  auto key = at::full({num_rows, k}, kNegInf, anchors.options().dtype(at::kFloat));
  auto above = at::zeros({count_above ? num_rows : 0}, anchors.options().dtype(at::kLong));
  if (num_rows == 0) return {index, sim, valid, key, above};

  const auto anchors_contig = anchors.contiguous();
  const auto bank_contig = bank.contiguous();
  const auto bank_ids_contig = bank_ids.contiguous();
  const auto anchor_ids_contig = anchor_ids.contiguous();
  const auto positive_contig = positive_sim.contiguous();
  const auto stats_contig = stats.contiguous();
  const bool guided = call.config.has_guides;
  const at::Tensor anchor_guides_contig = guided ? anchor_guides->contiguous() : at::Tensor();
  const at::Tensor bank_guides_contig = guided ? bank_guides->contiguous() : at::Tensor();
  if (check_finite) {
    // The small inputs before the pass (a bad one would waste it); the bank and its guides from inside the pass.
    const bool thresholds_nan = fn_thresholds.has_value() && at::isnan(*fn_thresholds).any().item<bool>();
    const bool input_flags[kInputFlags] = {has_non_finite(anchors_contig), has_non_finite(positive_contig),
                                           has_non_finite(stats_contig), thresholds_nan,
                                           guided && has_non_finite(anchor_guides_contig)};
    raise_if_not_finite(input_flags, false);
  }
  const RowInputs rows = row_inputs(positive_contig, fn_thresholds, center_offset, relative_cut);
  const float* stats_ptr = stats_contig.data_ptr<float>();
  call.weights = make_weight_params(stats_ptr, call.config);
  call.philox_key = philox_key_from_seed(call.config.seed);
  call.cut_threshold = (call.config.mode != SamplerMode::kHardest && cutdown) ? stats_ptr[0] - call.config.margin
                                                                               : kNegInf;
  call.anchor_ids = anchor_ids_contig.data_ptr<int64_t>();
  call.centres = rows.centres.data_ptr<float>();
  call.ceilings = rows.ceilings.defined() ? rows.ceilings.data_ptr<float>() : nullptr;
  const at::Tensor thresholds_contig = count_above ? fn_thresholds->contiguous() : at::Tensor();
  call.count_thresholds = count_above ? thresholds_contig.data_ptr<float>() : nullptr;
  call.guide_threshold = call.config.guide_threshold;

  const int64_t live_cols = call.config.filled;  // rows >= filled are never read
  // Tiles no larger than the problem (small calls allocate little) nor than int32 column offsets allow.
  const int64_t tile_rows = std::min<int64_t>(
      {positive_int_from_env("FNE_FAST_CPU_TILE_ROWS", kTileRows), num_rows, 4096});
  const int64_t full_cols = std::min<int64_t>(
      positive_int_from_env("FNE_FAST_CPU_TILE_COLS", kTileCols), 65536);
  const int64_t tile_cols = std::min<int64_t>(full_cols, std::max<int64_t>(live_cols, 1));
  const int64_t row_blocks = (num_rows + tile_rows - 1) / tile_rows;
  const int64_t col_tiles = (live_cols + tile_cols - 1) / tile_cols;
  const SimilarityTiles tiles(anchors_contig, bank_contig, tile_rows, tile_cols, full_cols);
  // Language guidance: the guide similarities of each tile's pairs, one more GEMM of the same tile shape.
  c10::optional<SimilarityTiles> guide_tiles;
  if (guided) guide_tiles.emplace(anchor_guides_contig, bank_guides_contig, tile_rows, tile_cols, full_cols);
  const int64_t* bank_ids_ptr = bank_ids_contig.data_ptr<int64_t>();
  const int64_t global_col_base = call.config.col_offset;

  std::vector<RowLists> thread_lists(at::get_num_threads());
  std::vector<NonFinite> thread_saw_non_finite(thread_lists.size());
  // Threads take items one at a time from a shared counter rather than a fixed share each: on a machine shared
  // with other work (or with cores of unequal speed) a delayed thread then delays the call by one item, not by
  // its whole share. The result does not depend on which thread takes which item.
  const int64_t items = row_blocks * col_tiles;
  std::atomic<int64_t> next_item{0};
  at::parallel_for(0, static_cast<int64_t>(thread_lists.size()), 1, [&](int64_t, int64_t) {
    const int thread = at::get_thread_num();
    TORCH_INTERNAL_ASSERT(thread >= 0 && thread < static_cast<int>(thread_lists.size()));
    RowLists& lists = thread_lists[thread];
    if (lists.k == 0) lists.resize(num_rows, k, count_above);
    SimilarityTiles::Worker worker(tiles);
    c10::optional<SimilarityTiles::Worker> guide_worker;
    if (guided) guide_worker.emplace(*guide_tiles);
    EpilogueScratch scratch;
    NonFinite saw_non_finite;
    for (int64_t item = next_item++; item < items; item = next_item++) {
      const int64_t row_begin = (item / col_tiles) * tile_rows;
      const int64_t col_begin = (item % col_tiles) * tile_cols;
      SimilarityTile tile;
      tile.row_begin = row_begin;
      tile.rows = std::min(tile_rows, num_rows - row_begin);
      tile.cols = std::min(tile_cols, live_cols - col_begin);
      tile.global_col_begin = global_col_base + col_begin;
      tile.bank_ids = bank_ids_ptr + col_begin;
      tile.sims = worker.compute(row_begin, tile.rows, col_begin, tile.cols, &tile.ld);
      if (guided) tile.guides = guide_worker->compute(row_begin, tile.rows, col_begin, tile.cols, &tile.guide_ld);
      saw_non_finite |= tile_epilogue(tile, call, lists, scratch);
    }
    thread_saw_non_finite[thread] |= saw_non_finite;
  });
  if (check_finite) {
    const bool inputs_checked_above[kInputFlags] = {false, false, false, false, false};
    NonFinite found;
    for (const NonFinite& flags : thread_saw_non_finite) found |= flags;
    raise_if_not_finite(inputs_checked_above, found.similarity, found.guide);
  }

  // Exact merge of the per-thread lists; in mode "hardest" the hardest list is the answer.
  RowLists merged;
  merged.resize(num_rows, k);
  const bool hardest = call.config.mode == SamplerMode::kHardest;
  int64_t* index_ptr = index.data_ptr<int64_t>();
  float* sim_ptr = sim.data_ptr<float>();
  bool* valid_ptr = valid.data_ptr<bool>();
  float* key_ptr = key.data_ptr<float>();
  at::parallel_for(0, num_rows, kMergeRowsPerChunk, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      for (RowLists& lists : thread_lists) {
        if (lists.k == 0) continue;
        RankedList thread_race = lists.race(row), thread_hard = lists.hard(row);
        for (int64_t t = 0; t < *thread_race.count; ++t) {
          merged.insert_race(row, thread_race.key[t], thread_race.sim[t], thread_race.index[t]);
        }
        for (int64_t t = 0; t < *thread_hard.count; ++t) {
          merged.insert_hard(row, thread_hard.sim[t], thread_hard.index[t]);  // a hard entry's key is its sim
        }
      }
      if (count_above) {
        int64_t total = 0;
        for (const RowLists& lists : thread_lists) total += lists.k == 0 ? 0 : lists.above[row];
        above.data_ptr<int64_t>()[row] = total;
      }
      RankedList race = merged.race(row), hard = merged.hard(row);
      write_output_row(hardest ? hard : race, hard, k, index_ptr + row * k, sim_ptr + row * k,
                       valid_ptr + row * k, key_ptr + row * k);
    }
  });
  return {index, sim, valid, key, above};
}

}  // namespace

TORCH_LIBRARY_IMPL(fne_fast, CPU, m) { m.impl("sample_negatives", &sample_negatives_cpu); }

}  // namespace fne_fast
