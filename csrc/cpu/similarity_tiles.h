// Similarity tiles of the CPU kernel, column-major: tile[j * ld + r] = <anchors[row_begin + r], bank[col_begin + j]>
// in float32 (docs/DESIGN.md §2: products and sums in float32 whatever the storage dtype). The bank tile is the left
// operand of the product, so each tile is one GEMM with the bank rows as its M dimension.
//
// Two paths, the same values up to the order of the float32 sums:
//  * bf16 anchors and bank: oneDNN's bf16 small-GEMM kernel through at::native::cpublas::brgemm (bf16 products are
//    exact in float32, sums in float32), with the anchors packed once per call in the VNNI-2 layout it reads,
//    [D/2][B'][2]. Taken where oneDNN is enabled (torch.backends.mkldnn, checked per call) and the CPU has
//    avx512_bf16 (without it oneDNN emulates bf16 dot products, no faster than the float32 path);
//  * everything else: at::mm_out in float32, converting a low-precision bank tile to float32 first, and bf16 or
//    fp16 anchors once per call. float32 anchors with a bf16 bank stay on this path: rounding the anchors to bf16
//    would change the similarities (by up to 2⁻⁹ relative) and so the draws.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

namespace fne_fast {

// Whether this CPU and torch's settings allow oneDNN's bf16 brgemm kernel (also the op fne_fast::cpu_bf16_brgemm,
// for tests); calls with bf16 anchors and bank and D >= 2 take it where it is allowed.
bool bf16_brgemm_supported();

class SimilarityTiles {
 public:
  // `anchors` and `bank` must be contiguous. Tiles are at most max_rows x max_cols; a tile of full_cols columns is one GEMM
  // (on the brgemm path shorter ones are cut into fixed blocks).
  SimilarityTiles(const at::Tensor& anchors, const at::Tensor& bank, int64_t max_rows, int64_t max_cols,
                  int64_t full_cols);

  // Per-thread working memory (at most (max_cols + 32) x (max_rows + 32) floats and one bank tile), and on the
  // brgemm path the kernel's hardware context, released when the worker ends.
  class Worker {
   public:
    explicit Worker(const SimilarityTiles& tiles);
    ~Worker();
    Worker(const Worker&) = delete;
    Worker& operator=(const Worker&) = delete;
    // The tile of anchor rows [row_begin, row_begin + rows) and bank rows [col_begin, col_begin + cols); sets `ld`.
    const float* compute(int64_t row_begin, int64_t rows, int64_t col_begin, int64_t cols, int64_t* ld);

   private:
    const float* compute_brgemm(int64_t row_begin, int64_t rows, int64_t col_begin, int64_t cols, int64_t* ld);
    const float* compute_float(int64_t row_begin, int64_t rows, int64_t col_begin, int64_t cols, int64_t* ld);

    const SimilarityTiles& tiles_;
    at::Tensor out_;              // the tile, 64-byte aligned
    at::Tensor bank_tile_float_;  // float path, low-precision bank: the converted tile
    at::Tensor staged_rows_;      // brgemm path: the last < kBlock bank rows of a tile, zero-padded
  };

 private:
  bool brgemm_;
  int64_t dim_, max_rows_, max_cols_, full_cols_;
  at::Tensor bank_;
  at::Tensor anchors_float_;   // float path
  at::Tensor packed_anchors_;  // brgemm path: [D/2][padded_rows_][2] bf16, zero-padded rows
  int64_t padded_rows_ = 0;
  std::vector<float> last_column_;  // brgemm path, odd D: anchors[:, D - 1] in float32
};

}  // namespace fne_fast
