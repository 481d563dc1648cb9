// The CPU kernel's diagnostic ops (schemas in fne_fast.cpp): which of its paths a call takes in this process, for
// tests and benchmarks. They have no tensor arguments, so no dispatch key selects their kernel: the dispatcher runs
// an op without tensors through its CompositeExplicitAutograd kernel (a CPU kernel would never be found).
#include <torch/library.h>

#include <string>

#include "similarity_tiles.h"
#include "tile_epilogue.h"

namespace fne_fast {
namespace {

std::string epilogue_name() { return avx512_epilogue() ? "avx512" : "portable"; }

}  // namespace

TORCH_LIBRARY_IMPL(fne_fast, CompositeExplicitAutograd, m) {
  m.impl("cpu_bf16_brgemm", &bf16_brgemm_supported);
  m.impl("cpu_float32_brgemm", &float32_brgemm_supported);
  m.impl("cpu_epilogue", &epilogue_name);
}

}  // namespace fne_fast
