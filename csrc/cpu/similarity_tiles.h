// Similarity tiles of the CPU kernel, column-major: tile[j * ld + r] = <anchors[row_begin + r], bank[col_begin + j]>
// in float32 (docs/DESIGN.md §2: products and sums in float32 whatever the storage dtype). The bank tile is the left
// operand of the product, so each tile is one GEMM with the bank rows as its M dimension.
//
// Three paths, the same values up to the order of the float32 sums, all through oneDNN's small-GEMM kernel
// (at::native::cpublas::brgemm) where it is allowed (torch.backends.mkldnn enabled, checked per call):
//  * bf16 anchors and bank, on a CPU with avx512_bf16: the bf16 kernel (bf16 products are exact in float32, sums
//    in float32), with the anchors packed once per call in the VNNI-2 layout it reads, [D/2][B'][2] (without
//    avx512_bf16 oneDNN emulates bf16 dot products, no faster than the float32 kernel);
//  * everything else, on a CPU with AVX-512: the float32 kernel, with the anchors converted to float32 and
//    transposed once per call ([D][B']) and a low-precision bank tile converted to float32 first. float32 anchors
//    with a bf16 bank take it: rounding the anchors to bf16 would change the similarities (by up to 2⁻⁹
//    relative) and so the draws;
//  * no AVX-512 or oneDNN off: at::mm_out in float32, with the same conversions.
// Each brgemm call has a fixed shape (whole tiles, else blocks of 32 bank rows with a zero-padded remainder), so
// that the shapes of a call do not depend on N or on the bank's fill level.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

namespace fne_fast {

// Whether this CPU and torch's settings allow oneDNN's bf16 brgemm kernel (also the op fne_fast::cpu_bf16_brgemm,
// for tests); calls with bf16 anchors and bank and D >= 2 take it where it is allowed.
bool bf16_brgemm_supported();
// The same for its float32 kernel (the op fne_fast::cpu_float32_brgemm), which every other call takes.
bool float32_brgemm_supported();

class SimilarityTiles {
 public:
  // `anchors` and `bank` must be contiguous. Tiles are at most max_rows x max_cols; a tile of full_cols columns is one GEMM
  // (on the brgemm path shorter ones are cut into fixed blocks).
  SimilarityTiles(const at::Tensor& anchors, const at::Tensor& bank, int64_t max_rows, int64_t max_cols,
                  int64_t full_cols);

  // Per-thread working memory (at most (max_cols + 32) x (max_rows + 32) floats and one bank tile), and on the
  // brgemm paths the kernel's hardware context, released when the worker ends.
  class Worker {
   public:
    explicit Worker(const SimilarityTiles& tiles);
    ~Worker();
    Worker(const Worker&) = delete;
    Worker& operator=(const Worker&) = delete;
    // The tile of anchor rows [row_begin, row_begin + rows) and bank rows [col_begin, col_begin + cols); sets `ld`.
    const float* compute(int64_t row_begin, int64_t rows, int64_t col_begin, int64_t cols, int64_t* ld);

   private:
    template <typename T>
    void brgemm_tile(int64_t row_begin, int64_t rows, int64_t cols, const T* bank_rows, const T* anchors,
                     int64_t k, float* out);
    const float* compute_bf16(int64_t row_begin, int64_t rows, int64_t col_begin, int64_t cols, int64_t* ld);
    const float* compute_float32(int64_t row_begin, int64_t rows, int64_t col_begin, int64_t cols, int64_t* ld);
    const float* compute_mm(int64_t row_begin, int64_t rows, int64_t col_begin, int64_t cols, int64_t* ld);
    // A low-precision bank tile converted to float32 (float32 paths).
    const float* bank_tile_in_float32(int64_t col_begin, int64_t cols);

    const SimilarityTiles& tiles_;
    at::Tensor out_;              // the tile, 64-byte aligned
    at::Tensor bank_tile_float_;  // float32 paths, low-precision bank: the converted tile
    at::Tensor staged_rows_;      // brgemm paths: the last < 32 bank rows of a tile, zero-padded
  };

 private:
  enum class Path { kBf16Brgemm, kFloat32Brgemm, kMatmul };
  Path path_;
  int64_t dim_, max_rows_, max_cols_, full_cols_;
  at::Tensor bank_;
  at::Tensor anchors_float_;   // matmul path: [B][D] float32
  at::Tensor packed_anchors_;  // bf16: [D/2][padded_rows_][2] bf16; float32 brgemm: [D][padded_rows_] float32
  int64_t padded_rows_ = 0;
  std::vector<float> last_column_;  // bf16 path, odd D: anchors[:, D - 1] in float32
};

}  // namespace fne_fast
