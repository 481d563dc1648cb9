#include "similarity_tiles.h"

#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <cstring>

namespace fne_fast {
namespace {

// Anchors per brgemm call (its N): the bank tile, in L2, meets the anchor rows of a tile in blocks of 32. oneDNN's
// kernel for N = 32 ran the (128, 65536, 256) product at 0.85x the CPU time of torch's bf16 mm (one thread, tiles
// of 512 bank rows), against 1.20x for N = 128, 1.5x for N = 48 and 3.5x for N = 16.
constexpr int64_t kAnchorBlock = 32;
// oneDNN generates a kernel per (M, N, K) shape (~0.1 ms, then cached per thread). A full tile is one call; a
// shorter (last) tile is cut into blocks of this many bank rows, its final partial block staged in a zero-padded
// buffer, so that the shapes of a call do not depend on N or on the bank's fill level.
constexpr int64_t kBlock = 32;

int64_t round_up(int64_t value, int64_t multiple) { return (value + multiple - 1) / multiple * multiple; }

}  // namespace

bool bf16_brgemm_supported() {
#if defined(__x86_64__) || defined(_M_X64)
  // The compiler's CPUID check (as for the epilogue's AVX-512), which also asks whether the OS saves AVX-512 state.
  static const bool cpu_has_bf16 = __builtin_cpu_supports("avx512bf16");
  // torch.backends.mkldnn.enabled may change between calls, and oneDNN's kernel refuses to run while it is off.
  return cpu_has_bf16 && at::globalContext().userEnabledMkldnn();
#else
  return false;
#endif
}

namespace {

// Whether a call with these inputs takes the bf16 brgemm path.
bool uses_bf16_brgemm(const at::Tensor& anchors, const at::Tensor& bank) {
  // The kernel's K is D rounded down to even (VNNI pairs); an odd last column is added apart, so D >= 2.
  return anchors.scalar_type() == at::kBFloat16 && bank.scalar_type() == at::kBFloat16 && anchors.size(1) >= 2 &&
         bf16_brgemm_supported();
}

}  // namespace

SimilarityTiles::SimilarityTiles(const at::Tensor& anchors, const at::Tensor& bank, int64_t max_rows,
                                 int64_t max_cols, int64_t full_cols)
    : brgemm_(uses_bf16_brgemm(anchors, bank)),
      dim_(anchors.size(1)),
      max_rows_(max_rows),
      max_cols_(max_cols),
      full_cols_(full_cols),
      bank_(bank) {
  TORCH_INTERNAL_ASSERT(anchors.is_contiguous() && bank.is_contiguous());
  const int64_t num_rows = anchors.size(0);
  if (!brgemm_) {
    anchors_float_ = anchors.to(at::kFloat).contiguous();
    return;
  }
  // VNNI-2: element (d, r) of the [D, B] right operand sits at [d / 2][r][d % 2]. The padding leaves room for
  // the last block's rows rounded up to a whole kAnchorBlock. A plain loop (B x D values): see has_non_finite in
  // sample_negatives_cpu.cpp for why small per-call work stays off the thread pool.
  padded_rows_ = round_up(num_rows, kAnchorBlock) + kAnchorBlock;
  const int64_t pairs = dim_ / 2;
  packed_anchors_ = at::empty({pairs, padded_rows_, 2}, anchors.options());
  at::BFloat16* packed = packed_anchors_.data_ptr<at::BFloat16>();
  std::fill(packed, packed + packed_anchors_.numel(), at::BFloat16(0.f));
  const at::BFloat16* rows = anchors.data_ptr<at::BFloat16>();
  for (int64_t r = 0; r < num_rows; ++r) {
    for (int64_t p = 0; p < pairs; ++p) {
      packed[(p * padded_rows_ + r) * 2] = rows[r * dim_ + 2 * p];
      packed[(p * padded_rows_ + r) * 2 + 1] = rows[r * dim_ + 2 * p + 1];
    }
  }
  if (dim_ % 2 == 1) {
    last_column_.assign(padded_rows_, 0.f);
    for (int64_t r = 0; r < num_rows; ++r) last_column_[r] = static_cast<float>(rows[r * dim_ + dim_ - 1]);
  }
}

SimilarityTiles::Worker::Worker(const SimilarityTiles& tiles) : tiles_(tiles) {
  out_ = at::empty({round_up(tiles.max_cols_, kBlock) * round_up(tiles.max_rows_, kAnchorBlock)},
                   tiles.bank_.options().dtype(at::kFloat));
  if (tiles.brgemm_) {
    staged_rows_ = at::empty({kBlock, tiles.dim_}, tiles.bank_.options());
    std::fill(staged_rows_.data_ptr<at::BFloat16>(), staged_rows_.data_ptr<at::BFloat16>() + staged_rows_.numel(),
              at::BFloat16(0.f));
  } else if (tiles.bank_.scalar_type() != at::kFloat) {
    bank_tile_float_ = at::empty({tiles.max_cols_, tiles.dim_}, tiles.bank_.options().dtype(at::kFloat));
  }
}

SimilarityTiles::Worker::~Worker() {
  if (tiles_.brgemm_) at::native::cpublas::brgemm_release();
}

const float* SimilarityTiles::Worker::compute(int64_t row_begin, int64_t rows, int64_t col_begin, int64_t cols,
                                              int64_t* ld) {
  return tiles_.brgemm_ ? compute_brgemm(row_begin, rows, col_begin, cols, ld)
                        : compute_float(row_begin, rows, col_begin, cols, ld);
}

const float* SimilarityTiles::Worker::compute_float(int64_t row_begin, int64_t rows, int64_t col_begin,
                                                    int64_t cols, int64_t* ld) {
  *ld = rows;
  at::Tensor tile = tiles_.bank_.narrow(0, col_begin, cols);
  // A low-precision tile is converted, so that its exact values meet float32 anchors: products stay exact.
  if (bank_tile_float_.defined()) tile = bank_tile_float_.narrow(0, 0, cols).copy_(tile);
  float* out = out_.data_ptr<float>();
  auto out_view = at::from_blob(out, {cols, rows}, out_.options());
  at::mm_out(out_view, tile, tiles_.anchors_float_.narrow(0, row_begin, rows).t());
  return out;
}

const float* SimilarityTiles::Worker::compute_brgemm(int64_t row_begin, int64_t rows, int64_t col_begin,
                                                     int64_t cols, int64_t* ld) {
  const int64_t dim = tiles_.dim_, n = round_up(rows, kAnchorBlock), k = dim & ~int64_t{1};
  const int64_t ldc = n;
  *ld = ldc;
  const at::BFloat16* bank = tiles_.bank_.data_ptr<at::BFloat16>() + col_begin * dim;
  const at::BFloat16* anchors = tiles_.packed_anchors_.data_ptr<at::BFloat16>() + row_begin * 2;
  float* out = out_.data_ptr<float>();
  // Bank rows as A (M x K, row stride D), kAnchorBlock packed anchors as B, out as C: out[j * ldc + r].
  const auto product = [&](int64_t first, int64_t count, const at::BFloat16* bank_rows) {
    for (int64_t r = 0; r < n; r += kAnchorBlock) {
      at::native::cpublas::brgemm(count, kAnchorBlock, k, dim, tiles_.padded_rows_, ldc, /*add_C=*/false,
                                  bank_rows, anchors + r * 2, out + first * ldc + r, /*is_vnni=*/true);
    }
  };
  if (cols == tiles_.full_cols_) {
    product(0, cols, bank);
  } else {
    int64_t first = 0;
    for (; first + kBlock <= cols; first += kBlock) product(first, kBlock, bank + first * dim);
    if (first < cols) {
      at::BFloat16* staged = staged_rows_.data_ptr<at::BFloat16>();
      std::memcpy(staged, bank + first * dim, (cols - first) * dim * sizeof(at::BFloat16));
      product(first, kBlock, staged);
    }
  }
  if (dim % 2 == 1) {
    // The odd last column: one exact product per pair, added in float32.
    const float* last = tiles_.last_column_.data() + row_begin;
    for (int64_t j = 0; j < cols; ++j) {
      const float b = static_cast<float>(bank[j * dim + dim - 1]);
      float* column = out + j * ldc;
      for (int64_t r = 0; r < n; ++r) column[r] += b * last[r];
    }
  }
  return out;
}

}  // namespace fne_fast
