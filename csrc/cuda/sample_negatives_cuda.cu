// CUDA kernel of fne_fast::sample_negatives (docs/DESIGN.md §2).
//
// Design: "bank chunks through cuBLAS, then a fused epilogue". The live bank rows [0, filled) are processed in
// column chunks:
//   1. GEMM: cuBLAS writes the float32 similarities S = anchors · chunkᵀ into a [B, chunk] buffer (float32 GEMM;
//      bf16/fp16 inputs use the GEMM with a float32 output, i.e. fp32 accumulation and no rounding of S; float32
//      anchors with a low-precision bank convert the chunk to float32 first, so every product is exact in float32
//      as on the CPU). With language guidance a second GEMM, by the same rules, writes the guide similarities
//      G = anchor_guides · bank_guides_chunkᵀ into a second buffer of that shape. With more than one chunk the
//      GEMMs run on a side stream into two buffer sets, one chunk ahead: chunk c + 1's products are formed while
//      chunk c's epilogue reads the other set (events order the two streams; the op joins the side stream before
//      it returns, so callers see one stream).
//   2. Epilogue: one block per (anchor row, column split) reads its slice of S (and of G) once and applies the
//      masks (identity, ceiling, guide threshold, cut-down), keeping two ranked lists in shared memory: the Gumbel
//      race and the hardest non-positive candidates (for the fallback). Only a pair that passes the masks and the
//      cut-down needs its Philox word: where such pairs are sparse (training cuts almost every pair), a warp
//      ballots them into a queue of their column offsets and draws 32 words at once when it holds a warp's worth,
//      so sparse pairs do not leave 31 lanes idle; a round whose first item has over half a warp of them draws
//      lane by lane. Candidates that cannot beat the list's k-th entry, or the row's k-th entry from the chunks
//      merged so far, are dropped without any shared-memory write. As in the CPU kernel, log-weights are <= 0, so a
//      Philox word whose noise alone cannot reach that threshold skips the logarithms and the weight. The order
//      in which a block offers its candidates changes no list (ranked_lists.cuh), so the queues change no draw.
//   3. Merge: after every second chunk (and the last), one block per row folds the lists of those chunks' splits
//      into the row's running lists (exact: top-k of a union).
// After the last chunk one thread per row writes index/sim/valid/key in the CPU kernel's order (race winners by
// decreasing key, then the hardest non-positive candidates not chosen yet, then invalid slots). Extra memory is
// the two S buffers (about 32 MiB together, at least 1024 columns each: max(32 MiB, 8 KiB · B)), an optional
// float32 copy of one bank chunk (counted in the same 32 MiB), and O(B · k · splits) list entries: independent of
// N, and the B×N matrix is never formed. Language guidance shares the 32 MiB between S and G (and an optional
// float32 copy of the chunk's guides), so its chunks have about half the columns (at least 1024); it adds one GEMM
// of inner dimension Dg per chunk and one float32 read per pair to the epilogue, and nothing without it.
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
#include <c10/core/Event.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>

#include "../fne_math.h"
#include "../sample_negatives.h"
#include "sample_negatives_kernels.cuh"

namespace fne_fast {
namespace {

constexpr int64_t kSimBufferBytes = int64_t{32} << 20;  // target size of all the chunk loop's float32 buffers
constexpr int kProductSets = 2;  // S (and G) buffers: one chunk's GEMM fills one, the previous epilogue reads one
// One merge per two chunks: the sets share the single buffer's budget, so the chunks are half as long as with
// one buffer, and merging every other chunk keeps the merge count (launch-bound, a few µs each) at that build's.
constexpr int kChunksPerMerge = 2;
constexpr int kBlocksPerSm = 4;                         // epilogue blocks per SM the split count aims for

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Columns per chunk: the float32 buffers of the chunk loop (kProductSets of S and of G, one converted bank chunk
// and one guide chunk), of floats_per_column floats per column, fill about kSimBufferBytes, in whole rounds of the
// epilogue; FNE_FAST_CUDA_CHUNK_COLS overrides.
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

// The side stream of a chunk loop that forms the products there (the top of this file), with the events that
// order it against the current stream (c10::Event: lazily created, no timing, destroyed with this object). The
// side stream starts after the work already queued on the current stream (the inputs), and join() makes the
// current stream wait for it; if an exception leaves the loop first, the destructor joins instead (best effort).
// Either way the buffers, declared before this object and so freed after it, are reused by the caching allocator
// on the current stream only after the side stream's last GEMM. Each event is waited on before it is recorded
// again (the loop's order), so a wait always sees the record it means.
struct ChunkPipeline {
  explicit ChunkPipeline(const c10::cuda::CUDAStream& current_stream)
      : current(current_stream),
        side(c10::cuda::getStreamFromPool(/*isHighPriority=*/false, current_stream.device_index())) {
    inputs_ready.record(current);
    inputs_ready.block(side);
  }
  ~ChunkPipeline() {
    if (joined) return;
    try {
      join();
    } catch (...) {  // already leaving by an exception: keep that one
    }
  }
  ChunkPipeline(const ChunkPipeline&) = delete;
  ChunkPipeline& operator=(const ChunkPipeline&) = delete;
  void join() {
    side_done.record(side);
    side_done.block(current);
    joined = true;
  }

  c10::cuda::CUDAStream current, side;
  c10::Event inputs_ready{c10::DeviceType::CUDA}, side_done{c10::DeviceType::CUDA};
  static_assert(kProductSets == 2, "one event of each kind per buffer set");
  c10::Event products_done[kProductSets]{c10::Event{c10::DeviceType::CUDA},
                                         c10::Event{c10::DeviceType::CUDA}};  // side stream: a set's GEMMs ended
  c10::Event epilogue_done[kProductSets]{c10::Event{c10::DeviceType::CUDA},
                                         c10::Event{c10::DeviceType::CUDA}};  // current stream: its reader ended
  bool joined = false;
};

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

  const c10::cuda::CUDAStream current_stream = c10::cuda::getCurrentCUDAStream();
  const cudaStream_t stream = current_stream.stream();
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
  const int64_t floats_per_column = kProductSets * num_rows + (convert_bank ? dim : 0) +
                                    (has_guides ? kProductSets * num_rows + (convert_guides ? guide_dim : 0) : 0);
  const int64_t chunk_cols = chunk_columns(floats_per_column, live_cols);
  int sm_count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, anchors.device().index()));
  // Enough (row, split) blocks to fill the GPU when B is small, but at least one full round per split, and no
  // split longer than the race queues' 32-bit offsets reach (only an overridden chunk of over 2³¹ columns).
  const int64_t splits_wanted = ceil_div(int64_t{kBlocksPerSm} * sm_count, num_rows);
  const int64_t split_count = std::max<int64_t>(
      {1, std::min(splits_wanted, ceil_div(chunk_cols, kRoundCols)), ceil_div(chunk_cols, kMaxSplitCols)});
  const int64_t split_cols = ceil_div(chunk_cols, split_count);
  const int64_t max_splits = ceil_div(chunk_cols, split_cols);
  TORCH_CHECK_VALUE(num_rows * max_splits <= std::numeric_limits<int32_t>::max(),
                    "anchors has too many rows for one CUDA launch: ", num_rows);

  // Lists: running race/hard [B, k], partial race/hard [B, kChunksPerMerge · max_splits, k]. Only the running
  // lengths need initialising: every partial list a merge reads was written by an epilogue since the last merge.
  // The lengths are followed by the pass's flags: the bank's non-finite similarity, then with guides the guide
  // similarity's.
  const int64_t running_slots = num_rows, partial_slots = num_rows * kChunksPerMerge * max_splits;
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
    // With one chunk there is nothing to overlap: one buffer set, and everything on the current stream.
    const int64_t chunks = ceil_div(live_cols, chunk_cols);
    const bool pipelined = chunks > 1;
    const int product_sets = pipelined ? kProductSets : 1;
    const auto float_options = anchors.options().dtype(at::kFloat);
    at::Tensor sims_buffers[kProductSets], guide_sims_buffers[kProductSets];
    for (int set = 0; set < product_sets; ++set) {
      sims_buffers[set] = at::empty({num_rows * chunk_cols}, float_options);
      if (has_guides) guide_sims_buffers[set] = at::empty({num_rows * chunk_cols}, float_options);
    }
    // The converted chunks are written and read by the GEMM stream alone, chunk after chunk: one of each.
    at::Tensor bank_float_buffer, bank_guides_float_buffer;
    if (convert_bank) bank_float_buffer = at::empty({chunk_cols, dim}, float_options);
    if (convert_guides) bank_guides_float_buffer = at::empty({chunk_cols, guide_dim}, float_options);
    // After the buffers, so that it is destroyed (and the side stream joined) before they are freed.
    std::optional<ChunkPipeline> pipeline;
    if (pipelined) pipeline.emplace(current_stream);
    // Columns of chunk `chunk`: all but the last have chunk_cols.
    const auto chunk_width = [&](int64_t chunk) { return std::min(chunk_cols, live_cols - chunk * chunk_cols); };
    const auto chunk_splits = [&](int64_t chunk) { return ceil_div(chunk_width(chunk), split_cols); };

    // Queues chunk `chunk`'s products into buffer set chunk % product_sets: on the side stream when pipelined
    // (the stream guard also gives at::mm_out's cuBLAS handle that stream), after the epilogue that last read
    // the set.
    const auto queue_products = [&](int64_t chunk) {
      const int set = static_cast<int>(chunk % product_sets);
      const int64_t chunk_begin = chunk * chunk_cols, cols = chunk_width(chunk);
      std::optional<c10::cuda::CUDAStreamGuard> on_side_stream;
      if (pipelined) {
        if (chunk >= kProductSets) pipeline->epilogue_done[set].block(pipeline->side);
        on_side_stream.emplace(pipeline->side);
      }
      auto sims = sims_buffers[set].narrow(0, 0, num_rows * cols).view({num_rows, cols});
      float32_products(sims, anchors_contig, bank.narrow(0, chunk_begin, cols), bank_float_buffer);
      if (has_guides) {
        auto guide_sims = guide_sims_buffers[set].narrow(0, 0, num_rows * cols).view({num_rows, cols});
        float32_products(guide_sims, anchor_guides_contig, bank_guides->narrow(0, chunk_begin, cols),
                         bank_guides_float_buffer);
      }
      if (pipelined) pipeline->products_done[set].record(pipeline->side);
    };

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

    queue_products(0);
    int64_t merge_slots = 0;  // partial lists per row of the chunks since the last merge, and their layout's stride
    for (int64_t chunk = 0; chunk < chunks; ++chunk) {
      // The next chunk's GEMM first, so that the side stream has it while this chunk's epilogue runs.
      if (chunk + 1 < chunks) queue_products(chunk + 1);
      const int set = static_cast<int>(chunk % product_sets);
      const int64_t chunk_begin = chunk * chunk_cols, cols = chunk_width(chunk);
      const int64_t splits = chunk_splits(chunk);
      const int64_t group_end = std::min((chunk / kChunksPerMerge + 1) * kChunksPerMerge, chunks);  // next merge
      if (chunk % kChunksPerMerge == 0) {
        merge_slots = 0;
        for (int64_t member = chunk; member < group_end; ++member) merge_slots += chunk_splits(member);
      }
      epilogue.sims = sims_buffers[set].data_ptr<float>();
      epilogue.guide_sims = has_guides ? guide_sims_buffers[set].data_ptr<float>() : nullptr;
      epilogue.bank_ids = bank_ids_contig.data_ptr<int64_t>() + chunk_begin;
      epilogue.chunk_cols = cols;
      epilogue.splits = splits;
      epilogue.slot_stride = merge_slots;
      epilogue.slot_base = (chunk % kChunksPerMerge) * max_splits;  // the group's earlier chunks are whole
      epilogue.global_col_begin = config.col_offset + chunk_begin;
      const auto blocks = static_cast<unsigned>(num_rows * splits);
      if (pipelined) pipeline->products_done[set].block(current_stream);
      if (has_guides) {
        epilogue_kernel<true><<<blocks, kThreads, 0, stream>>>(epilogue);
      } else {
        epilogue_kernel<false><<<blocks, kThreads, 0, stream>>>(epilogue);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (pipelined) pipeline->epilogue_done[set].record(current_stream);
      if (chunk + 1 == group_end) {
        merge.splits = merge_slots;
        merge_kernel<<<static_cast<unsigned>(num_rows), kThreads, 0, stream>>>(merge);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    }
    // The caller sees a single-stream op: what follows on its stream comes after the last GEMM too.
    if (pipelined) pipeline->join();
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
