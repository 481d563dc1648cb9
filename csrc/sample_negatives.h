// Device-independent part of fne_fast::sample_negatives: argument checks and the per-call scalar parameters
// shared by the CPU and CUDA kernels.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <cstdint>

#include "fne_math.h"

namespace fne_fast {


// Validates every argument (TORCH_CHECK messages name the argument) and returns the parsed configuration
// (SamplerConfig, in fne_math.h so that device code can take it by value).
SamplerConfig check_sample_negatives_args(const at::Tensor& anchors, const at::Tensor& bank,
                                          const at::Tensor& positive_sim, const at::Tensor& anchor_ids,
                                          const at::Tensor& bank_ids, const at::Tensor& stats, int64_t k,
                                          c10::string_view mode, double margin, double tau, double fn_tau, double prior_k,
                                          double fn_margin, int64_t min_count, bool cutdown, int64_t seed,
                                          int64_t step, int64_t row_offset, int64_t col_offset, int64_t filled,
                                          bool check_finite);

// check_finite, shared by every kernel so that the errors read the same: a bool tensor [3] on the inputs' device
// (no host synchronisation) saying whether anchors, positive_sim and stats hold a NaN or Inf ...
at::Tensor non_finite_input_flags(const at::Tensor& anchors, const at::Tensor& positive_sim, const at::Tensor& stats);

// ... and the errors, in that order, then the bank's (detected inside the pass, from a non-finite similarity).
void raise_if_not_finite(const bool* input_flags, bool bank_similarity_not_finite);

// A positive integer from the environment variable `name` (tile and chunk sizes, for tests and tuning), or
// `fallback` when it is unset or empty; anything else is an error naming the variable.
int64_t positive_int_from_env(const char* name, int64_t fallback);

}  // namespace fne_fast
