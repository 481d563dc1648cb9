// Device-independent part of fne_fast::sample_negatives: argument checks and the per-call scalar parameters
// shared by the CPU and CUDA kernels.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>
#include <c10/util/string_view.h>

#include <cstdint>

#include "fne_math.h"

namespace fne_fast {


// Validates every argument (TORCH_CHECK messages name the argument) and returns the parsed configuration
// (SamplerConfig, in fne_math.h so that device code can take it by value).
SamplerConfig check_sample_negatives_args(const at::Tensor& anchors, const at::Tensor& bank,
                                          const at::Tensor& positive_sim, const at::Tensor& anchor_ids,
                                          const at::Tensor& bank_ids, const at::Tensor& stats,
                                          const c10::optional<at::Tensor>& fn_thresholds,
                                          const c10::optional<at::Tensor>& anchor_guides,
                                          const c10::optional<at::Tensor>& bank_guides, int64_t k,
                                          c10::string_view mode, double margin, double tau, double fn_tau,
                                          double prior_k, double fn_margin, int64_t min_count, bool cutdown,
                                          double center_offset, c10::optional<double> relative_cut,
                                          c10::optional<double> guide_threshold, int64_t seed,
                                          int64_t step, int64_t row_offset, int64_t col_offset, int64_t filled,
                                          bool check_finite, bool count_above);

// The op's outputs: index, sim, valid, key, and above, the per-anchor count of candidates (another identity, a
// filled row, a finite similarity) whose similarity is above the anchor's fn_thresholds entry: int64 [B] when
// count_above, else an empty [0] tensor.
using SampleOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// The per-anchor values every kernel reads beside positive_sim (docs/DESIGN.md §1), float32 [B], contiguous, on the
// anchors' device, formed here with tensor operations (one rounding each, no host synchronisation) exactly as
// fne_fast/ops/fne_math.py forms them for the Python kernels:
//   centres  = s⁺ + b, the centre of the base log-weight (positive_sim itself where b = 0);
//   ceilings = min(s⁺ - (1 - relative_cut) |s⁺|, fn_thresholds), NaN terms ignored, +inf where all are NaN; a
//              candidate with s > ceiling is excluded from the race and the fallback. Undefined when neither the
//              positive-relative cut nor thresholds are given, and the kernels then skip the comparison.
struct RowInputs {
  at::Tensor centres;
  at::Tensor ceilings;
};
RowInputs row_inputs(const at::Tensor& positive_sim, const c10::optional<at::Tensor>& fn_thresholds,
                     double center_offset, c10::optional<double> relative_cut);

// check_finite, shared by every kernel so that the errors read the same: a bool tensor [5] on the inputs' device
// (no host synchronisation) saying whether anchors, positive_sim and stats hold a NaN or Inf, whether
// fn_thresholds (when given) holds a NaN and whether anchor_guides (when given) hold a NaN or Inf ...
constexpr int kInputFlags = 5;
at::Tensor non_finite_input_flags(const at::Tensor& anchors, const at::Tensor& positive_sim, const at::Tensor& stats,
                                  const c10::optional<at::Tensor>& fn_thresholds,
                                  const c10::optional<at::Tensor>& anchor_guides);

// ... and the errors, in that order, then the bank's and the bank guides' (detected inside the pass, from a
// non-finite similarity or guide similarity of a live pair).
void raise_if_not_finite(const bool* input_flags, bool bank_similarity_not_finite,
                         bool guide_similarity_not_finite = false);

// A positive integer from the environment variable `name` (tile and chunk sizes, for tests and tuning), or
// `fallback` when it is unset or empty; anything else is an error naming the variable.
int64_t positive_int_from_env(const char* name, int64_t fallback);

}  // namespace fne_fast
