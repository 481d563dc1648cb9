#include "similarity_tiles.h"

#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <cstring>
#include <type_traits>

namespace fne_fast {
namespace {

// Anchors per brgemm call (its N): the bank tile, in L2, meets the anchor rows of a tile in blocks of 32. oneDNN's
// kernel for N = 32 ran the (128, 65536, 256) product at 0.85x the CPU time of torch's bf16 mm (one thread, tiles
// of 512 bank rows), against 1.20x for N = 128, 1.5x for N = 48 and 3.5x for N = 16. N = 64 was no faster for either
// kernel (the (128, 65536, 256) call on 2 threads, mode "hardest": bf16 4.8 -> 5.0 ms, float32 10.5 -> 10.5 ms).
constexpr int64_t kAnchorBlock = 32;
// oneDNN generates a kernel per (M, N, K) shape (~0.1 ms, then cached per thread). A full tile is one call; a
// shorter (last) tile is cut into blocks of this many bank rows, its final partial block staged in a zero-padded
// buffer, so that the shapes of a call do not depend on N or on the bank's fill level.
constexpr int64_t kBlock = 32;

int64_t round_up(int64_t value, int64_t multiple) { return (value + multiple - 1) / multiple * multiple; }

// Whether oneDNN may run now: torch.backends.mkldnn.enabled may change between calls, and oneDNN's kernels refuse
// to run while it is off.
bool mkldnn_enabled() { return at::globalContext().userEnabledMkldnn(); }

}  // namespace

bool bf16_brgemm_supported() {
#if defined(__x86_64__) || defined(_M_X64)
  // The compiler's CPUID check (as for the epilogue's AVX-512), which also asks whether the OS saves AVX-512 state.
  static const bool cpu_has_bf16 = __builtin_cpu_supports("avx512bf16");
  return cpu_has_bf16 && mkldnn_enabled();
#else
  return false;
#endif
}

bool float32_brgemm_supported() {
#if defined(__x86_64__) || defined(_M_X64)
  // oneDNN's float32 brgemm needs its avx512_core ISA; elsewhere torch's fallback would be a plain loop.
  static const bool cpu_has_avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                                     __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  return cpu_has_avx512 && mkldnn_enabled();
#else
  return false;
#endif
}

SimilarityTiles::SimilarityTiles(const at::Tensor& anchors, const at::Tensor& bank, int64_t max_rows,
                                 int64_t max_cols, int64_t full_cols)
    : dim_(anchors.size(1)), max_rows_(max_rows), max_cols_(max_cols), full_cols_(full_cols), bank_(bank) {
  TORCH_INTERNAL_ASSERT(anchors.is_contiguous() && bank.is_contiguous());
  // The bf16 kernel's K is D rounded down to even (VNNI pairs); an odd last column is added apart, so D >= 2.
  const bool bf16 = anchors.scalar_type() == at::kBFloat16 && bank.scalar_type() == at::kBFloat16 && dim_ >= 2;
  // oneDNN refuses K = 0, which at::mm_out takes (every similarity is 0).
  path_ = bf16 && bf16_brgemm_supported()           ? Path::kBf16Brgemm
          : dim_ > 0 && float32_brgemm_supported() ? Path::kFloat32Brgemm
                                                    : Path::kMatmul;
  const int64_t num_rows = anchors.size(0);
  if (path_ == Path::kMatmul) {
    anchors_float_ = anchors.to(at::kFloat).contiguous();
    return;
  }
  // The brgemm paths' right operand, packed once per call; the padding leaves room for the last block's rows
  // rounded up to a whole kAnchorBlock. Plain loops (B x D values): see has_non_finite in sample_negatives_cpu.cpp
  // for why small per-call work stays off the thread pool.
  padded_rows_ = round_up(num_rows, kAnchorBlock) + kAnchorBlock;
  if (path_ == Path::kFloat32Brgemm) {
    // [D][B'] float32: element (d, r) at [d][r].
    const at::Tensor rows_float = anchors.to(at::kFloat).contiguous();
    packed_anchors_ = at::zeros({dim_, padded_rows_}, anchors.options().dtype(at::kFloat));
    packed_anchors_.narrow(1, 0, num_rows).copy_(rows_float.t());
    return;
  }
  // VNNI-2: element (d, r) of the [D, B] right operand sits at [d / 2][r][d % 2].
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
  const bool float32_bank = tiles.bank_.scalar_type() == at::kFloat;
  if (tiles.path_ == Path::kBf16Brgemm || (tiles.path_ == Path::kFloat32Brgemm && float32_bank)) {
    staged_rows_ = at::zeros({kBlock, tiles.dim_}, tiles.bank_.options());
  } else if (!float32_bank) {
    bank_tile_float_ = at::zeros({round_up(tiles.max_cols_, kBlock), tiles.dim_},
                                 tiles.bank_.options().dtype(at::kFloat));
  }
}

SimilarityTiles::Worker::~Worker() {
  if (tiles_.path_ != Path::kMatmul) at::native::cpublas::brgemm_release();
}

const float* SimilarityTiles::Worker::compute(int64_t row_begin, int64_t rows, int64_t col_begin, int64_t cols,
                                              int64_t* ld) {
  switch (tiles_.path_) {
    case Path::kBf16Brgemm:
      return compute_bf16(row_begin, rows, col_begin, cols, ld);
    case Path::kFloat32Brgemm:
      return compute_float32(row_begin, rows, col_begin, cols, ld);
    case Path::kMatmul:
      break;
  }
  return compute_mm(row_begin, rows, col_begin, cols, ld);
}

const float* SimilarityTiles::Worker::bank_tile_in_float32(int64_t col_begin, int64_t cols) {
  // Rows past `cols` hold zeros or an earlier tile's rows: the last block of 32 rows reads them, and the products
  // of those rows are never read.
  bank_tile_float_.narrow(0, 0, cols).copy_(tiles_.bank_.narrow(0, col_begin, cols));
  return bank_tile_float_.data_ptr<float>();
}

const float* SimilarityTiles::Worker::compute_mm(int64_t row_begin, int64_t rows, int64_t col_begin, int64_t cols,
                                                 int64_t* ld) {
  *ld = rows;
  at::Tensor tile = tiles_.bank_.narrow(0, col_begin, cols);
  // A low-precision tile is converted, so that its exact values meet float32 anchors: products stay exact.
  if (bank_tile_float_.defined()) {
    tile = bank_tile_float_.narrow(0, 0, cols);
    bank_tile_in_float32(col_begin, cols);
  }
  float* out = out_.data_ptr<float>();
  auto out_view = at::from_blob(out, {cols, rows}, out_.options());
  at::mm_out(out_view, tile, tiles_.anchors_float_.narrow(0, row_begin, rows).t());
  return out;
}

// Bank rows as A (M x K, row stride D), kAnchorBlock anchors of the packed right operand as B, out as C:
// out[j * ldc + r]. A whole tile is one call per anchor block; a shorter one is cut into blocks of kBlock rows, the
// last partial block read from staged_rows_ (zero-padded) unless they lie in the converted tile, whose buffer
// holds whole blocks.
template <typename T>
void SimilarityTiles::Worker::brgemm_tile(int64_t row_begin, int64_t rows, int64_t cols, const T* bank_rows,
                                          const T* anchors, int64_t k, float* out) {
  const int64_t dim = tiles_.dim_, n = round_up(rows, kAnchorBlock), ldc = n;
  const bool vnni = std::is_same<T, at::BFloat16>::value;
  const int64_t column_step = vnni ? 2 : 1;  // elements of B per anchor column within one of its rows
  const auto product = [&](int64_t first, int64_t count, const T* block) {
    for (int64_t r = 0; r < n; r += kAnchorBlock) {
      at::native::cpublas::brgemm(count, kAnchorBlock, k, dim, tiles_.padded_rows_, ldc, /*add_C=*/false, block,
                                  anchors + (row_begin + r) * column_step, out + first * ldc + r, vnni);
    }
  };
  if (cols == tiles_.full_cols_) {
    product(0, cols, bank_rows);
    return;
  }
  int64_t first = 0;
  for (; first + kBlock <= cols; first += kBlock) product(first, kBlock, bank_rows + first * dim);
  if (first == cols) return;
  const T* last = bank_rows + first * dim;
  if (staged_rows_.defined()) {
    T* staged = staged_rows_.data_ptr<T>();
    std::memcpy(staged, last, (cols - first) * dim * sizeof(T));
    last = staged;
  }
  product(first, kBlock, last);
}

const float* SimilarityTiles::Worker::compute_float32(int64_t row_begin, int64_t rows, int64_t col_begin,
                                                      int64_t cols, int64_t* ld) {
  *ld = round_up(rows, kAnchorBlock);
  const float* bank = bank_tile_float_.defined() ? bank_tile_in_float32(col_begin, cols)
                                                 : tiles_.bank_.data_ptr<float>() + col_begin * tiles_.dim_;
  float* out = out_.data_ptr<float>();
  brgemm_tile(row_begin, rows, cols, bank, tiles_.packed_anchors_.data_ptr<float>(), tiles_.dim_, out);
  return out;
}

const float* SimilarityTiles::Worker::compute_bf16(int64_t row_begin, int64_t rows, int64_t col_begin, int64_t cols,
                                                   int64_t* ld) {
  const int64_t dim = tiles_.dim_, n = round_up(rows, kAnchorBlock);
  *ld = n;
  const at::BFloat16* bank = tiles_.bank_.data_ptr<at::BFloat16>() + col_begin * dim;
  float* out = out_.data_ptr<float>();
  brgemm_tile(row_begin, rows, cols, bank, tiles_.packed_anchors_.data_ptr<at::BFloat16>(), dim & ~int64_t{1}, out);
  if (dim % 2 == 1) {
    // The odd last column: one exact product per pair, added in float32.
    const float* last = tiles_.last_column_.data() + row_begin;
    for (int64_t j = 0; j < cols; ++j) {
      const float b = static_cast<float>(bank[j * dim + dim - 1]);
      float* column = out + j * n;
      for (int64_t r = 0; r < n; ++r) column[r] += b * last[r];
    }
  }
  return out;
}

}  // namespace fne_fast
