// CUDA kernel of fne_fast::sample_negatives (docs/DESIGN.md §2).
//
// Design: "bank chunks through cuBLAS, then a fused epilogue". The live bank rows [0, filled) are processed in
// column chunks, all on the current stream:
//   1. GEMM: cuBLAS writes the float32 similarities S = anchors · chunkᵀ into one reused [B, chunk] buffer
//      (float32 GEMM; bf16/fp16 inputs use the GEMM with a float32 output, i.e. fp32 accumulation and no
//      rounding of S; float32 anchors with a low-precision bank convert the chunk to float32 first, so every
//      product is exact in float32 as on the CPU). With language guidance a second GEMM, by the same rules,
//      writes the guide similarities G = anchor_guides · bank_guides_chunkᵀ into a second buffer of that shape.
//   2. Epilogue: one block per (anchor row, column split) reads its slice of S (and of G) once and applies the
//      masks (identity, ceiling, guide threshold, cut-down), Philox, the Gumbel key and the FNE log-weight, keeping
//      two ranked lists in shared memory: the Gumbel race and the hardest non-positive candidates (for the
//      fallback). Candidates that cannot beat the list's k-th entry, or the row's k-th entry from earlier chunks,
//      are dropped without any shared-memory write. As in the CPU kernel, log-weights are <= 0, so a Philox word
//      whose noise alone cannot reach that threshold skips the logarithms and the weight: after the first rounds
//      almost every pair costs its Philox word and a few comparisons.
//   3. Merge: one block per row folds the splits' lists into the row's running lists (exact: top-k of a union).
// After the last chunk one thread per row writes index/sim/valid/key in the CPU kernel's order (race winners by
// decreasing key, then the hardest non-positive candidates not chosen yet, then invalid slots). Extra memory is
// the S buffer (about 32 MiB, at least 1024 columns: max(32 MiB, 4 KiB · B)), an optional float32 copy of one
// bank chunk (counted in the same 32 MiB), and O(B · k · splits) list entries: independent of N, and the B×N
// matrix is never formed. Language guidance shares the 32 MiB between S and G (and an optional float32 copy of
// the chunk's guides), so its chunks have about half the columns (at least 1024: max(32 MiB, 8 KiB · B)); it adds
// one GEMM of inner dimension Dg per chunk and one float32 read per pair to the epilogue, and nothing without it.
//
// Why this design: cuBLAS reaches the GEMM's peak rate for every dtype, stride and architecture, so the
// hand-written part is only the epilogue, whose selection semantics must match the CPU kernel exactly, and it can
// be kept small enough to check by reading. The fully fused tensor-core design (no S round trip) is the Triton
// backend's. No measurement chooses between the two: wherever this kernel is built it serves the CUDA dispatch
// key (backend="auto" or "cuda"), the Triton kernel serves that key only in builds without it (fne_fast/ops.py),
// and backend="triton" calls the Triton kernel explicitly. The expected trade-off, a prediction not measured: for
// compute-bound shapes (large B) this design runs at the cuBLAS rate plus an epilogue of a few dozen integer
// operations per pair; for small B the S buffer adds 4·B bytes of traffic per bank row (sized to stay in an
// H100's 50 MB L2, but written back eventually), so the fused kernel should win the bandwidth-bound shapes.
//
// Selection: the shared-memory ranked lists of ranked_lists.cuh, exact for any split of the columns, which is what
// makes the result independent of the chunk and split sizes.
//
// Non-finite similarities (NaN/Inf anchors or bank rows, or float32 overflow) are never chosen, as by every
// backend. A key of -inf (weight 0 with fn_tau = inf) or NaN (non-finite positive_sim or stats) is not a race
// candidate; the candidate can still be a fallback. check_finite=True raises
// the same errors as the CPU kernel, which needs the host to see device-side flags (a non-finite similarity, and
// with guides a non-finite guide similarity, of a live pair): the op then ends with one device-to-host copy of the
// input flags and these (a single synchronisation, after all kernels are queued). With
// check_finite=False the op never synchronises with the host (and can be captured in a CUDA graph).
//
// Limits: k <= kMaxK (64) because the lists live in shared memory; larger k raises a ValueError. Column indices
// are int64 throughout (N, filled and col_offset may exceed 2³¹). A float32 GEMM (similarities or guides) follows
// torch's TF32 setting (torch.backends.cuda.matmul.allow_tf32, off by default).
//
// Only c10/cuda headers are used (not ATen/cuda/CUDAContext.h, which needs the cuBLAS headers), so this file
// also compiles against a CPU build of torch for the compile check in CMakeLists.txt.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <tuple>

#include "../fne_math.h"
#include "../philox.h"
#include "../sample_negatives.h"
#include "ranked_lists.cuh"

namespace fne_fast {
namespace {

constexpr int64_t kSimBufferBytes = int64_t{32} << 20;  // target size of the [B, chunk] float32 buffer
constexpr int kBlocksPerSm = 4;                         // epilogue blocks per SM the split count aims for
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
  int64_t splits;            // splits of this chunk; partial slot of (row, split) is row * splits + split
  int64_t global_col_begin;  // col_offset + first column of the chunk
  SamplerConfig config;
  PhiloxKey philox_key;
  ListSet running_race, running_hard;  // read only: the floors from earlier chunks
  ListSet partial_race, partial_hard;  // written: one list per (row, split)
  int* non_finite;                     // set to 1 when a similarity is not finite
  int* guide_non_finite;               // set to 1 when a guide similarity is not finite; nullptr without guides
};

// kHasGuides: language guidance, a template parameter so that calls without it pay nothing for it.
template <bool kHasGuides>
__global__ void __launch_bounds__(kThreads) epilogue_kernel(EpilogueArgs args) {
  __shared__ SharedList race, hard;
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

  const int64_t begin = split * args.split_cols;
  const int64_t end = min(begin + args.split_cols, args.chunk_cols);
  const float* row_sims = args.sims + row * args.chunk_cols;
  const float* row_guides = kHasGuides ? args.guide_sims + row * args.chunk_cols : nullptr;
  const int64_t anchor_id = args.anchor_ids[row];
  const float centre = args.centres[row];
  const float ceiling = args.ceilings != nullptr ? args.ceilings[row] : INFINITY;
  const float count_threshold = args.count_thresholds != nullptr ? args.count_thresholds[row] : INFINITY;
  unsigned long long above = 0;
  const uint32_t global_row = config.row_offset + static_cast<uint32_t>(row);
  bool non_finite = false, guide_non_finite = false;
  for (int64_t base = begin; base < end; base += kRoundCols) {
    bool offered = false;
#pragma unroll
    for (int item = 0; item < kItemsPerThread; ++item) {
      const int64_t j = base + item * kThreads + threadIdx.x;
      if (j >= end) continue;
      const float s = row_sims[j];
      // Read before any mask: a non-finite guide similarity of a live pair is reported whatever the pair.
      const float g = kHasGuides ? row_guides[j] : 0.f;
      if (kHasGuides && !isfinite(g)) guide_non_finite = true;
      if (!isfinite(s)) {
        non_finite = true;
        continue;
      }
      if (args.bank_ids[j] == anchor_id) continue;  // the anchor's own identity: a true positive
      above += s > count_threshold;
      if (s > ceiling) continue;                    // a likely false negative by its anchor's ceiling
      if (kHasGuides && g > config.guide_threshold) continue;       // excluded by its guide (a NaN g never is)
      const int64_t column = args.global_col_begin + j;
      offered |= offer(hard, k, Entry{s, s, column});
      if (sampling && s > cut) {
        const uint64_t counter = static_cast<uint64_t>(column);
        const uint32_t bits = philox_first_word(static_cast<uint32_t>(counter), static_cast<uint32_t>(counter >> 32),
                                                global_row, config.step, args.philox_key);
        // Once the list has a threshold, almost every word fails this test: the logarithms and the weight are
        // then skipped, for the whole warp as a rule.
        if (bits <= race.gumbel_limit) {
          const float log_weight = config.mode == SamplerMode::kFne ? fne_log_weight(s, centre, weights) : 0.f;
          const float key = log_weight + gumbel_from_bits(bits);
          // Weight 0 (fn_tau = inf), or NaN from non-finite inputs: not a race candidate.
          if (key > -INFINITY) offered |= offer(race, k, Entry{key, s, column});
        }
      }
    }
    // The round's trip count is the same for every thread, so every thread reaches this barrier.
    if (__syncthreads_or(offered)) {
      flush(hard, k);
      flush(race, k);
    }
  }

  const int64_t slot = row * args.splits + split;
  store_list(hard, k, args.partial_hard, slot);
  if (sampling) store_list(race, k, args.partial_race, slot);
  if (above != 0) atomicAdd(args.above + row, above);
  if (__syncthreads_or(non_finite) && threadIdx.x == 0) *args.non_finite = 1;
  if constexpr (kHasGuides) {
    if (__syncthreads_or(guide_non_finite) && threadIdx.x == 0) *args.guide_non_finite = 1;
  }
}

struct MergeArgs {
  int64_t splits;  // of the chunk just processed
  int k;
  bool sampling;   // mode != hardest: the race lists are in use
  ListSet running_race, running_hard;  // read and rewritten, one block per row
  ListSet partial_race, partial_hard;
};

__global__ void __launch_bounds__(kThreads) merge_kernel(MergeArgs args) {
  __shared__ SharedList race, hard;
  const int k = args.k;
  const int64_t row = blockIdx.x;
  if (threadIdx.x == 0) {
    init_list(race, nullptr);
    init_list(hard, nullptr);
  }
  __syncthreads();
  // Source 0 is the running list, sources 1..splits the chunk's partial lists; k positions each. The sources
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
      flush(hard, k);
      flush(race, k);
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

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Columns per chunk: the float32 buffers of one chunk (S, G, the converted bank and guide chunks), of
// floats_per_column floats per column, fill about kSimBufferBytes, in whole rounds of the epilogue;
// FNE_FAST_CUDA_CHUNK_COLS overrides.
int64_t chunk_columns(int64_t floats_per_column, int64_t live_cols) {
  const int64_t sized = kSimBufferBytes / (static_cast<int64_t>(sizeof(float)) * floats_per_column);
  const int64_t fallback = std::max<int64_t>(kRoundCols, sized / kRoundCols * kRoundCols);
  return std::min(positive_int_from_env("FNE_FAST_CUDA_CHUNK_COLS", fallback), std::max<int64_t>(live_cols, 1));
}

// float32 products out = left · tileᵀ [B, cols] of one chunk (the rules at the top of this file): a float32 GEMM
// when both are float32 or after converting a low-precision tile into tile_float_buffer (float32 left), else the
// low-precision GEMM with fp32 accumulation and output. tile may be any strided view (at::mm accepts one, so no
// copy of the whole bank is made); an empty inner dimension never reaches cuBLAS.
void float32_products(at::Tensor& out, const at::Tensor& left, const at::Tensor& tile,
                      const at::Tensor& tile_float_buffer) {
  if (left.size(1) == 0) {
    out.zero_();  // empty dot products
  } else if (tile.scalar_type() != left.scalar_type()) {
    auto tile_float = tile_float_buffer.narrow(0, 0, tile.size(0));
    tile_float.copy_(tile);
    at::mm_out(out, left, tile_float.t());
  } else if (left.scalar_type() == at::kFloat) {
    at::mm_out(out, left, tile.t());
  } else {
    at::mm_out(out, left, tile.t(), at::kFloat);
  }
}

// One device-to-host copy for all the checks (the op's only synchronisation, and only with check_finite):
// pass_flags holds the pass's flags, the bank's similarity flag and, with guides, the guide similarity flag.
void check_finite_flags(const at::Tensor& anchors, const at::Tensor& positive_sim, const at::Tensor& stats,
                        const c10::optional<at::Tensor>& fn_thresholds,
                        const c10::optional<at::Tensor>& anchor_guides, const at::Tensor& pass_flags) {
  const auto flags =
      at::cat({non_finite_input_flags(anchors, positive_sim, stats, fn_thresholds, anchor_guides), pass_flags.ne(0)})
          .cpu();
  const bool* bad = flags.data_ptr<bool>();
  raise_if_not_finite(bad, bad[kInputFlags], pass_flags.size(0) > 1 && bad[kInputFlags + 1]);
}

SampleOutputs sample_negatives_cuda(
    const at::Tensor& anchors, const at::Tensor& bank, const at::Tensor& positive_sim, const at::Tensor& anchor_ids,
    const at::Tensor& bank_ids, const at::Tensor& stats, const c10::optional<at::Tensor>& fn_thresholds,
    const c10::optional<at::Tensor>& anchor_guides, const c10::optional<at::Tensor>& bank_guides, int64_t k,
    c10::string_view mode, double margin, double tau, double fn_tau, double prior_k, double fn_margin,
    int64_t min_count, bool cutdown, double center_offset, c10::optional<double> relative_cut,
    c10::optional<double> guide_threshold, int64_t seed, int64_t step, int64_t row_offset, int64_t col_offset,
    int64_t filled, bool check_finite, bool count_above) {
  const SamplerConfig config = check_sample_negatives_args(
      anchors, bank, positive_sim, anchor_ids, bank_ids, stats, fn_thresholds, anchor_guides, bank_guides, k, mode,
      margin, tau, fn_tau, prior_k, fn_margin, min_count, cutdown, center_offset, relative_cut, guide_threshold, seed,
      step, row_offset, col_offset, filled, check_finite, count_above);
  TORCH_CHECK_VALUE(k <= kMaxK, "k must be <= ", kMaxK, " on CUDA (the per-row lists live in shared memory), got ",
                    k);
  const c10::cuda::CUDAGuard device_guard(anchors.device());
  const int64_t num_rows = anchors.size(0), dim = anchors.size(1);
  const auto long_options = anchors.options().dtype(at::kLong);
  auto index = at::empty({num_rows, k}, long_options);
  auto sim = at::empty({num_rows, k}, anchors.options().dtype(at::kFloat));
  auto valid = at::empty({num_rows, k}, anchors.options().dtype(at::kBool));
  auto key = at::empty({num_rows, k}, anchors.options().dtype(at::kFloat));
  auto above = at::zeros({count_above ? num_rows : 0}, long_options);
  if (num_rows == 0) return {index, sim, valid, key, above};

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const auto anchors_contig = anchors.contiguous();
  const auto bank_ids_contig = bank_ids.contiguous();
  const auto anchor_ids_contig = anchor_ids.contiguous();
  const auto positive_contig = positive_sim.contiguous();
  const auto stats_contig = stats.contiguous();
  const RowInputs rows = row_inputs(positive_contig, fn_thresholds, center_offset, relative_cut);
  const at::Tensor thresholds_contig = count_above ? fn_thresholds->contiguous() : at::Tensor();
  const bool has_guides = config.has_guides;
  const at::Tensor anchor_guides_contig = has_guides ? anchor_guides->contiguous() : at::Tensor();
  const int64_t guide_dim = has_guides ? anchor_guides->size(1) : 0;
  // float32 anchors with a low-precision bank: the chunk is converted, so products are formed in float32 from
  // the exact bank values (as on the CPU) rather than from anchors rounded to the bank's dtype. Likewise guides.
  const bool convert_bank = bank.scalar_type() != anchors.scalar_type();
  const bool convert_guides = has_guides && bank_guides->scalar_type() != anchor_guides->scalar_type();

  const int64_t live_cols = config.filled;  // rows >= filled are never read
  const int64_t floats_per_column =
      num_rows + (convert_bank ? dim : 0) + (has_guides ? num_rows + (convert_guides ? guide_dim : 0) : 0);
  const int64_t chunk_cols = chunk_columns(floats_per_column, live_cols);
  int sm_count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, anchors.device().index()));
  // Enough (row, split) blocks to fill the GPU when B is small, but at least one full round per split.
  const int64_t splits_wanted = ceil_div(int64_t{kBlocksPerSm} * sm_count, num_rows);
  const int64_t split_cols =
      ceil_div(chunk_cols, std::max<int64_t>(1, std::min(splits_wanted, ceil_div(chunk_cols, kRoundCols))));
  const int64_t max_splits = ceil_div(chunk_cols, split_cols);
  TORCH_CHECK_VALUE(num_rows * max_splits <= std::numeric_limits<int32_t>::max(),
                    "anchors has too many rows for one CUDA launch: ", num_rows);

  // Lists: running race/hard [B, k], partial race/hard [B, max_splits, k]. Only the running lengths need
  // initialising: every partial list a merge reads was written by the epilogue of the same chunk. The lengths
  // are followed by the pass's flags: the bank's non-finite similarity, then with guides the guide similarity's.
  const int64_t running_slots = num_rows, partial_slots = num_rows * max_splits;
  const int64_t entry_count = 2 * (running_slots + partial_slots) * k;
  const int64_t pass_flag_count = has_guides ? 2 : 1;
  auto entries = at::empty({entry_count * static_cast<int64_t>(sizeof(Entry))}, anchors.options().dtype(at::kByte));
  auto counts =
      at::zeros({2 * (running_slots + partial_slots) + pass_flag_count}, anchors.options().dtype(at::kInt));
  Entry* entry_ptr = reinterpret_cast<Entry*>(entries.data_ptr<uint8_t>());
  int* count_ptr = counts.data_ptr<int>();
  const ListSet running_race{entry_ptr, count_ptr};
  const ListSet running_hard{entry_ptr + running_slots * k, count_ptr + running_slots};
  const ListSet partial_race{entry_ptr + 2 * running_slots * k, count_ptr + 2 * running_slots};
  const ListSet partial_hard{entry_ptr + (2 * running_slots + partial_slots) * k,
                             count_ptr + 2 * running_slots + partial_slots};
  int* non_finite = count_ptr + 2 * (running_slots + partial_slots);
  int* guide_non_finite = has_guides ? non_finite + 1 : nullptr;
  const bool sampling = config.mode != SamplerMode::kHardest;

  if (live_cols > 0) {
    auto sims_buffer = at::empty({num_rows * chunk_cols}, anchors.options().dtype(at::kFloat));
    at::Tensor bank_float_buffer, guide_sims_buffer, bank_guides_float_buffer;
    if (convert_bank) bank_float_buffer = at::empty({chunk_cols, dim}, anchors.options().dtype(at::kFloat));
    if (has_guides) guide_sims_buffer = at::empty({num_rows * chunk_cols}, anchors.options().dtype(at::kFloat));
    if (convert_guides) {
      bank_guides_float_buffer = at::empty({chunk_cols, guide_dim}, anchors.options().dtype(at::kFloat));
    }

    EpilogueArgs epilogue{};
    epilogue.anchor_ids = anchor_ids_contig.data_ptr<int64_t>();
    epilogue.centres = rows.centres.data_ptr<float>();
    epilogue.ceilings = rows.ceilings.defined() ? rows.ceilings.data_ptr<float>() : nullptr;
    epilogue.count_thresholds = count_above ? thresholds_contig.data_ptr<float>() : nullptr;
    epilogue.above = count_above ? reinterpret_cast<unsigned long long*>(above.data_ptr<int64_t>()) : nullptr;
    epilogue.stats = stats_contig.data_ptr<float>();
    epilogue.split_cols = split_cols;
    epilogue.config = config;
    epilogue.philox_key = philox_key_from_seed(config.seed);
    epilogue.running_race = running_race;
    epilogue.running_hard = running_hard;
    epilogue.partial_race = partial_race;
    epilogue.partial_hard = partial_hard;
    epilogue.non_finite = non_finite;
    epilogue.guide_non_finite = guide_non_finite;
    MergeArgs merge{};
    merge.k = static_cast<int>(k);
    merge.sampling = sampling;
    merge.running_race = running_race;
    merge.running_hard = running_hard;
    merge.partial_race = partial_race;
    merge.partial_hard = partial_hard;

    for (int64_t chunk_begin = 0; chunk_begin < live_cols; chunk_begin += chunk_cols) {
      const int64_t cols = std::min(chunk_cols, live_cols - chunk_begin);
      auto sims = sims_buffer.narrow(0, 0, num_rows * cols).view({num_rows, cols});
      float32_products(sims, anchors_contig, bank.narrow(0, chunk_begin, cols), bank_float_buffer);
      if (has_guides) {
        auto guide_sims = guide_sims_buffer.narrow(0, 0, num_rows * cols).view({num_rows, cols});
        float32_products(guide_sims, anchor_guides_contig, bank_guides->narrow(0, chunk_begin, cols),
                         bank_guides_float_buffer);
        epilogue.guide_sims = guide_sims.data_ptr<float>();
      }

      const int64_t splits = ceil_div(cols, split_cols);
      epilogue.sims = sims.data_ptr<float>();
      epilogue.bank_ids = bank_ids_contig.data_ptr<int64_t>() + chunk_begin;
      epilogue.chunk_cols = cols;
      epilogue.splits = splits;
      epilogue.global_col_begin = config.col_offset + chunk_begin;
      const auto blocks = static_cast<unsigned>(num_rows * splits);
      if (has_guides) {
        epilogue_kernel<true><<<blocks, kThreads, 0, stream>>>(epilogue);
      } else {
        epilogue_kernel<false><<<blocks, kThreads, 0, stream>>>(epilogue);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      merge.splits = splits;
      merge_kernel<<<static_cast<unsigned>(num_rows), kThreads, 0, stream>>>(merge);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }

  OutputArgs output{num_rows, static_cast<int>(k), sampling, running_race, running_hard,
                    index.data_ptr<int64_t>(), sim.data_ptr<float>(), valid.data_ptr<bool>(), key.data_ptr<float>()};
  output_kernel<<<static_cast<unsigned>(ceil_div(num_rows, kOutputThreads)), kOutputThreads, 0, stream>>>(output);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  if (check_finite) {
    check_finite_flags(anchors_contig, positive_contig, stats_contig, fn_thresholds, anchor_guides,
                       counts.narrow(0, counts.size(0) - pass_flag_count, pass_flag_count));
  }
  return {index, sim, valid, key, above};
}

}  // namespace

TORCH_LIBRARY_IMPL(fne_fast, CUDA, m) { m.impl("sample_negatives", &sample_negatives_cuda); }

}  // namespace fne_fast
