// The CUDA kernels of fne_fast::sample_negatives, launched by sample_negatives_cuda.cu (whose top comment gives
// the design): the epilogue over one (row, column split) of a chunk's similarities, the merge of a row's splits
// into its running lists, and the output rows.
#pragma once

#include <cstdint>

#include "../fne_math.h"
#include "../philox.h"
#include "../sample_negatives.h"
#include "ranked_lists.cuh"

namespace fne_fast {

constexpr int kOutputThreads = 128;
static_assert(sizeof(unsigned long long) == sizeof(int64_t), "the exceedance counts are int64, added atomically");

struct EpilogueArgs {
  const float* sims;        // [B, chunk_cols] of this chunk
  const float* guide_sims;  // [B, chunk_cols] guide similarities of this chunk; nullptr without guides
  const int64_t* bank_ids;  // ids of this chunk's columns
  const int64_t* anchor_ids;
  const float* centres;   // [B] the log-weight's centre s⁺ + b (RowInputs in sample_negatives.h)
  const float* ceilings;  // [B] s > ceiling is excluded from the race and the fallback; nullptr: no ceilings
  const float* count_thresholds;  // [B] fn_thresholds whose exceedances are counted into `above`; nullptr: none
  unsigned long long* above;      // [B] int64 counts, added to atomically (integers: the order does not matter)
  const float* stats;
  int64_t chunk_cols;
  int64_t split_cols;
  int64_t splits;            // splits of this chunk: block b is (row b / splits, split b % splits)
  int64_t slot_stride;       // partial lists per row until the next merge (the splits of its chunks)
  int64_t slot_base;         // this chunk's first: (row, split) writes slot row * slot_stride + slot_base + split
  int64_t global_col_begin;  // col_offset + first column of the chunk
  SamplerConfig config;
  PhiloxKey philox_key;
  ListSet running_race, running_hard;  // read only: the floors from earlier chunks
  ListSet partial_race, partial_hard;  // written: one list per (row, split)
  int* non_finite;                     // set to 1 when a similarity is not finite
  int* guide_non_finite;               // set to 1 when a guide similarity is not finite; nullptr without guides
};

// Race queues: a warp whose race pairs of one item fill at most kDirectLanes of its lanes appends their split
// offsets to its queue and draws 32 Philox words at once when the queue
// holds a warp's worth; more than that and the lanes draw their own words, as a dense item loses nothing to it.
constexpr int kWarpLanes = 32;
constexpr int kWarps = kThreads / kWarpLanes;
constexpr int kDirectLanes = kWarpLanes / 2;
constexpr unsigned kAllLanes = 0xFFFFFFFFu;
constexpr int64_t kMaxSplitCols = int64_t{1} << 30;  // column offsets within a split, and their sums, fit an int
static_assert(kThreads % kWarpLanes == 0, "whole warps: every lane of a warp takes part in its ballots");

// Epilogue blocks per SM that its 36,968 B of shared memory allow: 6 in the 228 KiB of sm_90 and sm_100, 4 in the
// 164 KiB of sm_80 and sm_87. The register cap this implies (40 and 64 a thread; ptxas -v: no spill) keeps the
// queues' few registers from lowering that count; elsewhere the shared memory alone limits it more.
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ == 900 || (__CUDA_ARCH__ >= 1000 && __CUDA_ARCH__ < 1100))
constexpr int kEpilogueMinBlocks = 6;
#elif defined(__CUDA_ARCH__) && (__CUDA_ARCH__ == 800 || __CUDA_ARCH__ == 870)
constexpr int kEpilogueMinBlocks = 4;
#else
constexpr int kEpilogueMinBlocks = 1;
#endif

// kHasGuides: language guidance, a template parameter so that calls without it pay nothing for it.
template <bool kHasGuides>
__global__ void __launch_bounds__(kThreads, kEpilogueMinBlocks) epilogue_kernel(EpilogueArgs args) {
  __shared__ SharedList race, hard;
  __shared__ Entry flush_scratch[kMaxK];
  __shared__ int race_queues[kWarps][kWarpLanes];  // per warp: split offsets of race pairs awaiting a word
  __shared__ WeightParams weights;
  __shared__ float cut;
  const SamplerConfig& config = args.config;
  const int k = static_cast<int>(config.k);
  const int64_t row = blockIdx.x / args.splits;
  const int64_t split = blockIdx.x % args.splits;
  const bool sampling = config.mode != SamplerMode::kHardest;
  if (threadIdx.x == 0) {
    weights = make_weight_params(args.stats, config);
    cut = sampling && config.cutdown ? args.stats[0] - config.margin : -INFINITY;
    const bool race_full = args.running_race.counts[row] == k;
    const bool hard_full = args.running_hard.counts[row] == k;
    init_list(race, race_full ? &args.running_race.entries[row * k + k - 1] : nullptr);
    init_list(hard, hard_full ? &args.running_hard.entries[row * k + k - 1] : nullptr);
  }
  __syncthreads();

  // The split's columns by offset (an int: a split has at most kMaxSplitCols columns).
  const int64_t begin = split * args.split_cols;
  const int length = static_cast<int>(min(begin + args.split_cols, args.chunk_cols) - begin);
  const float* split_sims = args.sims + row * args.chunk_cols + begin;
  const float* split_guides = kHasGuides ? args.guide_sims + row * args.chunk_cols + begin : nullptr;
  const int64_t* split_ids = args.bank_ids + begin;
  const int64_t split_column = args.global_col_begin + begin;  // the global column of offset 0
  const int64_t anchor_id = args.anchor_ids[row];
  const float centre = args.centres[row];
  const float ceiling = args.ceilings != nullptr ? args.ceilings[row] : INFINITY;
  const float count_threshold = args.count_thresholds != nullptr ? args.count_thresholds[row] : INFINITY;
  unsigned long long above = 0;
  const uint32_t global_row = config.row_offset + static_cast<uint32_t>(row);
  bool non_finite = false, guide_non_finite = false;
  const int lane = static_cast<int>(threadIdx.x % kWarpLanes);
  int* const queue = race_queues[threadIdx.x / kWarpLanes];
  int queued = 0;  // entries in this warp's queue: the same in every lane, as it only changes by ballot counts

  // The race step of a pair that passed the masks and the cut: its Philox word (of its global column, so the
  // lane that draws it does not matter), the Gumbel limit test, then the weight, the key and the offer.
  const auto race_step = [&](int64_t column, float s) {
    const uint64_t counter = static_cast<uint64_t>(column);
    const uint32_t bits = philox_first_word(static_cast<uint32_t>(counter), static_cast<uint32_t>(counter >> 32),
                                            global_row, config.step, args.philox_key);
    // Once the list has a threshold, almost every word fails this test: the logarithms and the weight are then
    // skipped, for the whole warp as a rule.
    if (bits > race.gumbel_limit) return false;
    const float log_weight = config.mode == SamplerMode::kFne ? fne_log_weight(s, centre, weights) : 0.f;
    const float key = log_weight + gumbel_from_bits(bits);
    // Weight 0 (fn_tau = inf), or NaN from non-finite inputs: not a race candidate.
    return key > -INFINITY && offer(race, k, Entry{key, s, column});
  };

  for (int base = 0; base < length; base += kRoundCols) {
    bool offered = false;
    // The masks and the hardest list, item by item; a pair that passes them and the cut is marked for the race.
    unsigned racing = 0;  // bit `item`: this lane's pair of that item goes on to the race
#pragma unroll
    for (int item = 0; item < kItemsPerThread; ++item) {
      const int offset = base + item * kThreads + static_cast<int>(threadIdx.x);
      if (offset >= length) continue;
      const float s = split_sims[offset];
      // Read before any mask: a non-finite guide similarity of a live pair is reported whatever the pair.
      const float g = kHasGuides ? split_guides[offset] : 0.f;
      if (kHasGuides && !isfinite(g)) guide_non_finite = true;
      if (!isfinite(s)) {
        non_finite = true;
        continue;
      }
      if (split_ids[offset] == anchor_id) continue;  // the anchor's own identity: a true positive
      above += s > count_threshold;
      if (s > ceiling) continue;                               // a likely false negative by its anchor's ceiling
      if (kHasGuides && g > config.guide_threshold) continue;  // excluded by its guide (a NaN g never is)
      offered |= offer(hard, k, Entry{s, s, split_column + offset});
      if (sampling && s > cut) racing |= 1u << item;
    }
    // The race, for warps with a race pair in this round (in training, almost none); every lane of such a warp
    // takes part in its ballots. A round whose first item has more than kDirectLanes race pairs is taken as
    // dense: its lanes draw their own words, with no ballot after the first item.
    if (sampling && __any_sync(kAllLanes, racing != 0)) {
      bool direct = false;  // the same in every lane
#pragma unroll
      for (int item = 0; item < kItemsPerThread; ++item) {
        const bool race_pair = (racing >> item) & 1u;
        const int offset = base + item * kThreads + static_cast<int>(threadIdx.x);
        bool drawing = race_pair;
        int64_t draw_column = split_column + offset;
        int draw_offset = offset;
        if (item == 0 || !direct) {
          const unsigned wanting = __ballot_sync(kAllLanes, race_pair);
          const int wanted = __popc(wanting);
          if (item == 0) direct = wanted > kDirectLanes;
          if (!direct) {
            if (wanted == 0) continue;  // uniform over the warp, like every branch down to the race step
            // Queue the pairs at the next free positions. At most one warp's worth is drawn per item (queued
            // stays below kWarpLanes between items), so a round still offers at most kRoundCols race candidates.
            const int position = queued + __popc(wanting & ((1u << lane) - 1u));
            if (race_pair && position < kWarpLanes) queue[position] = offset;
            queued += wanted;
            drawing = queued >= kWarpLanes;
            if (drawing) {
              __syncwarp();  // the queue's writes before its reads
              const int drawn = queue[lane];
              __syncwarp();  // its reads before the overflow's writes
              if (race_pair && position >= kWarpLanes) queue[position - kWarpLanes] = offset;
              queued -= kWarpLanes;
              draw_column = split_column + drawn;
              draw_offset = drawn;
            }
          }
        }
        if (drawing) offered |= race_step(draw_column, split_sims[draw_offset]);
      }
    }
    // The round's trip count is the same for every thread, so every thread reaches this barrier.
    if (__syncthreads_or(offered)) {
      flush(hard, flush_scratch, k);
      flush(race, flush_scratch, k);
    }
  }
  if (sampling) {
    // The queues' last pairs, fewer than a warp's worth each, in one more round (after the hardest list's last
    // flush, so only the race list has pending candidates).
    __syncwarp();
    bool offered = false;
    if (lane < queued) {
      const int offset = queue[lane];
      offered = race_step(split_column + offset, split_sims[offset]);
    }
    if (__syncthreads_or(offered)) flush(race, flush_scratch, k);
  }

  const int64_t slot = row * args.slot_stride + args.slot_base + split;
  store_list(hard, k, args.partial_hard, slot);
  if (sampling) store_list(race, k, args.partial_race, slot);
  if (above != 0) atomicAdd(args.above + row, above);
  if (__syncthreads_or(non_finite) && threadIdx.x == 0) *args.non_finite = 1;
  if constexpr (kHasGuides) {
    if (__syncthreads_or(guide_non_finite) && threadIdx.x == 0) *args.guide_non_finite = 1;
  }
}

struct MergeArgs {
  int64_t splits;  // partial lists per row: the splits of the chunks since the last merge
  int k;
  bool sampling;   // mode != hardest: the race lists are in use
  ListSet running_race, running_hard;  // read and rewritten, one block per row
  ListSet partial_race, partial_hard;
};

__global__ void __launch_bounds__(kThreads) merge_kernel(MergeArgs args) {
  __shared__ SharedList race, hard;
  __shared__ Entry flush_scratch[kMaxK];
  const int k = args.k;
  const int64_t row = blockIdx.x;
  if (threadIdx.x == 0) {
    init_list(race, nullptr);
    init_list(hard, nullptr);
  }
  __syncthreads();
  // Source 0 is the running list, sources 1..splits the chunks' partial lists; k positions each. The sources
  // cover disjoint column ranges, so all indices are distinct.
  const int64_t total = (args.splits + 1) * k;
  for (int64_t base = 0; base < total; base += kRoundCols) {
    bool offered = false;
#pragma unroll
    for (int item = 0; item < kItemsPerThread; ++item) {
      const int64_t t = base + item * kThreads + threadIdx.x;
      if (t >= total) continue;
      const int64_t source = t / k;
      const int position = static_cast<int>(t % k);
      const int64_t partial_slot = row * args.splits + source - 1;
      if (source == 0) {
        offered |= offer_listed(hard, k, args.running_hard, row, position);
        if (args.sampling) offered |= offer_listed(race, k, args.running_race, row, position);
      } else {
        offered |= offer_listed(hard, k, args.partial_hard, partial_slot, position);
        if (args.sampling) offered |= offer_listed(race, k, args.partial_race, partial_slot, position);
      }
    }
    if (__syncthreads_or(offered)) {
      flush(hard, flush_scratch, k);
      flush(race, flush_scratch, k);
    }
  }
  // Every read of the running lists happened before the last barrier above.
  store_list(hard, k, args.running_hard, row);
  if (args.sampling) store_list(race, k, args.running_race, row);
}

struct OutputArgs {
  int64_t num_rows;
  int k;
  bool sampling;
  ListSet race, hard;
  int64_t* index;
  float* sim;
  bool* valid;
  float* key;
};

// One thread per row writes its k output slots (in mode "hardest" the race list is the hardest list).
__global__ void __launch_bounds__(kOutputThreads) output_kernel(OutputArgs args) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row >= args.num_rows) return;
  const int k = args.k;
  const EntryList hard{args.hard.entries + row * k, args.hard.counts[row]};
  const EntryList race = args.sampling ? EntryList{args.race.entries + row * k, args.race.counts[row]} : hard;
  write_output_row(race, hard, k, args.index + row * k, args.sim + row * k, args.valid + row * k,
                   args.key + row * k);
}

}  // namespace fne_fast
