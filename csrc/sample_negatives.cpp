#include "sample_negatives.h"

#include <ATen/ATen.h>

#include <c10/util/Exception.h>

#include <cmath>
#include <cstdlib>
#include <limits>

namespace fne_fast {
namespace {

bool is_supported_embedding_dtype(at::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf;
}

SamplerMode parse_mode(c10::string_view mode) {
  if (mode == "fne") return SamplerMode::kFne;
  if (mode == "hardest") return SamplerMode::kHardest;
  if (mode == "uniform") return SamplerMode::kUniform;
  TORCH_CHECK_VALUE(false, "mode must be one of 'fne', 'hardest', 'uniform', got '", std::string(mode), "'");
}

// The guide inputs of language guidance: both or neither, and exactly when guide_threshold is given.
void check_guides(const c10::optional<at::Tensor>& anchor_guides, const c10::optional<at::Tensor>& bank_guides,
                  c10::optional<double> guide_threshold, int64_t num_rows, int64_t num_cols,
                  const c10::Device& device) {
  TORCH_CHECK_VALUE(anchor_guides.has_value() == bank_guides.has_value(),
                    "anchor_guides and bank_guides must be given together, got only ",
                    anchor_guides.has_value() ? "anchor_guides" : "bank_guides");
  TORCH_CHECK_VALUE(!guide_threshold.has_value() || anchor_guides.has_value(),
                    "guide_threshold needs anchor_guides and bank_guides, which were not given");
  TORCH_CHECK_VALUE(guide_threshold.has_value() || !anchor_guides.has_value(),
                    "anchor_guides and bank_guides are read only with guide_threshold, which is None");
  if (!guide_threshold.has_value()) return;
  TORCH_CHECK_VALUE(std::isfinite(*guide_threshold), "guide_threshold must be None (off) or finite, got ",
                    *guide_threshold);
  const at::Tensor& anchor = *anchor_guides;
  const at::Tensor& bank = *bank_guides;
  TORCH_CHECK_VALUE(anchor.dim() == 2 && anchor.size(0) == num_rows, "anchor_guides must have shape [B, Dg] with B = ",
                    num_rows, ", got ", anchor.sizes());
  TORCH_CHECK_VALUE(bank.dim() == 2 && bank.size(0) == num_cols, "bank_guides must have shape [N, Dg] with N = ",
                    num_cols, ", got ", bank.sizes());
  TORCH_CHECK_VALUE(anchor.size(1) == bank.size(1),
                    "anchor_guides and bank_guides must have the same guide dimension, got ", anchor.size(1),
                    " and ", bank.size(1));
  TORCH_CHECK_TYPE(is_supported_embedding_dtype(anchor.scalar_type()),
                   "anchor_guides must be float32, bfloat16 or float16, got ", anchor.scalar_type());
  TORCH_CHECK_TYPE(is_supported_embedding_dtype(bank.scalar_type()),
                   "bank_guides must be float32, bfloat16 or float16, got ", bank.scalar_type());
  TORCH_CHECK_TYPE(anchor.scalar_type() == bank.scalar_type() || anchor.scalar_type() == at::kFloat,
                   "anchor_guides must have bank_guides' dtype or be float32, got anchor_guides ",
                   anchor.scalar_type(), " and bank_guides ", bank.scalar_type());
  TORCH_CHECK_VALUE(anchor.device() == device, "anchor_guides must be on the anchors' device ", device, ", got ",
                    anchor.device());
  TORCH_CHECK_VALUE(bank.device() == device, "bank_guides must be on the anchors' device ", device, ", got ",
                    bank.device());
}

}  // namespace

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
                                          bool check_finite, bool count_above) {
  TORCH_CHECK_VALUE(anchors.dim() == 2, "anchors must be 2-D [B, D], got shape ", anchors.sizes());
  TORCH_CHECK_VALUE(bank.dim() == 2, "bank must be 2-D [N, D], got shape ", bank.sizes());
  TORCH_CHECK_VALUE(anchors.size(1) == bank.size(1), "anchors and bank must have the same embedding dimension, got ",
                    anchors.size(1), " and ", bank.size(1));
  TORCH_CHECK_TYPE(is_supported_embedding_dtype(anchors.scalar_type()),
                   "anchors must be float32, bfloat16 or float16, got ", anchors.scalar_type());
  TORCH_CHECK_TYPE(is_supported_embedding_dtype(bank.scalar_type()),
                   "bank must be float32, bfloat16 or float16, got ", bank.scalar_type());
  TORCH_CHECK_TYPE(anchors.scalar_type() == bank.scalar_type() || anchors.scalar_type() == at::kFloat,
                   "anchors must have the bank's dtype or be float32, got anchors ", anchors.scalar_type(),
                   " and bank ", bank.scalar_type());
  const int64_t num_rows = anchors.size(0), num_cols = bank.size(0);
  TORCH_CHECK_VALUE(positive_sim.dim() == 1 && positive_sim.size(0) == num_rows,
                    "positive_sim must have shape [B] = [", num_rows, "], got ", positive_sim.sizes());
  TORCH_CHECK_TYPE(positive_sim.scalar_type() == at::kFloat, "positive_sim must be float32, got ",
                   positive_sim.scalar_type());
  TORCH_CHECK_VALUE(anchor_ids.dim() == 1 && anchor_ids.size(0) == num_rows,
                    "anchor_ids must have shape [B] = [", num_rows, "], got ", anchor_ids.sizes());
  TORCH_CHECK_TYPE(anchor_ids.scalar_type() == at::kLong, "anchor_ids must be int64, got ",
                   anchor_ids.scalar_type());
  TORCH_CHECK_VALUE(bank_ids.dim() == 1 && bank_ids.size(0) == num_cols,
                    "bank_ids must have shape [N] = [", num_cols, "], got ", bank_ids.sizes());
  TORCH_CHECK_TYPE(bank_ids.scalar_type() == at::kLong, "bank_ids must be int64, got ", bank_ids.scalar_type());
  TORCH_CHECK_VALUE(stats.dim() == 1 && stats.numel() == 5,
                    "stats must be a float32 tensor of 5 values (mu_pos, var_pos, mu_neg, var_neg, n_pos), got shape ",
                    stats.sizes());
  TORCH_CHECK_TYPE(stats.scalar_type() == at::kFloat, "stats must be float32, got ", stats.scalar_type());
  const auto device = anchors.device();
  const std::pair<const char*, const at::Tensor*> same_device[] = {
      {"bank", &bank}, {"positive_sim", &positive_sim}, {"anchor_ids", &anchor_ids},
      {"bank_ids", &bank_ids}, {"stats", &stats}};
  for (const auto& [name, tensor] : same_device) {
    TORCH_CHECK_VALUE(tensor->device() == device, name, " must be on the anchors' device ", device, ", got ",
                      tensor->device());
  }
  if (fn_thresholds.has_value()) {
    const at::Tensor& thresholds = *fn_thresholds;
    TORCH_CHECK_VALUE(thresholds.dim() == 1 && thresholds.size(0) == num_rows,
                      "fn_thresholds must have shape [B] = [", num_rows, "], got ", thresholds.sizes());
    TORCH_CHECK_TYPE(thresholds.scalar_type() == at::kFloat, "fn_thresholds must be float32, got ",
                     thresholds.scalar_type());
    TORCH_CHECK_VALUE(thresholds.device() == device, "fn_thresholds must be on the anchors' device ", device,
                      ", got ", thresholds.device());
  }
  check_guides(anchor_guides, bank_guides, guide_threshold, num_rows, num_cols, device);
  TORCH_CHECK_VALUE(!count_above || fn_thresholds.has_value(),
                    "count_above counts the candidates above fn_thresholds, which were not given");
  TORCH_CHECK_VALUE(k >= 1, "k must be >= 1, got ", k);
  TORCH_CHECK_VALUE(std::isfinite(margin), "margin must be finite, got ", margin);
  TORCH_CHECK_VALUE(std::isfinite(tau) && tau >= 0.0, "tau must be finite and >= 0, got ", tau);
  TORCH_CHECK_VALUE(fn_tau >= 0.0, "fn_tau must be >= 0 (inf removes likely false negatives), got ", fn_tau);
  TORCH_CHECK_VALUE(std::isfinite(prior_k) && prior_k > 1.0, "prior_k must be finite and > 1, got ", prior_k);
  TORCH_CHECK_VALUE(fn_margin >= 0.0 && fn_margin <= 1.0, "fn_margin must be in [0, 1], got ", fn_margin);
  TORCH_CHECK_VALUE(min_count >= 0, "min_count must be >= 0, got ", min_count);
  TORCH_CHECK_VALUE(std::isfinite(center_offset), "center_offset must be finite, got ", center_offset);
  TORCH_CHECK_VALUE(!relative_cut.has_value() || (std::isfinite(*relative_cut) && *relative_cut >= 0.0),
                    "relative_cut must be None (off) or finite and >= 0, got ", relative_cut.value_or(0.0));
  TORCH_CHECK_VALUE(step >= 0 && step <= std::numeric_limits<uint32_t>::max(), "step must be in [0, 2^32), got ",
                    step);
  TORCH_CHECK_VALUE(row_offset >= 0 && row_offset + num_rows - 1 <= std::numeric_limits<uint32_t>::max(),
                    "row_offset + B must be in [0, 2^32], got row_offset ", row_offset, " with B ", num_rows);
  TORCH_CHECK_VALUE(col_offset >= 0 && col_offset <= std::numeric_limits<int64_t>::max() - num_cols,
                    "col_offset must be >= 0 and col_offset + N must fit in int64, got ", col_offset);
  TORCH_CHECK_VALUE(filled >= 0 && filled <= num_cols, "filled must be in [0, N] = [0, ", num_cols, "], got ",
                    filled);

  SamplerConfig config;
  config.k = k;
  config.mode = parse_mode(mode);
  config.margin = static_cast<float>(margin);
  config.tau = static_cast<float>(tau);
  config.fn_tau = static_cast<float>(fn_tau);
  config.prior_k = prior_k;
  config.fn_margin = fn_margin;
  config.min_count = min_count;
  config.cutdown = cutdown;
  config.seed = static_cast<uint64_t>(seed);  // the schema's int is signed: the same 64 bits
  config.step = static_cast<uint32_t>(step);
  config.row_offset = static_cast<uint32_t>(row_offset);
  config.col_offset = col_offset;
  config.filled = filled;
  config.check_finite = check_finite;
  config.has_guides = guide_threshold.has_value();
  config.guide_threshold = static_cast<float>(guide_threshold.value_or(0.0));
  return config;
}

RowInputs row_inputs(const at::Tensor& positive_sim, const c10::optional<at::Tensor>& fn_thresholds,
                     double center_offset, c10::optional<double> relative_cut) {
  RowInputs rows;
  // The offset and the gap are rounded to float32 first, as the Python kernels round them.
  rows.centres = center_offset == 0.0 ? positive_sim.contiguous()
                                      : at::add(positive_sim, static_cast<float>(center_offset)).contiguous();
  at::Tensor ceilings;
  if (relative_cut.has_value()) {
    const float gap = static_cast<float>(1.0 - *relative_cut);
    ceilings = at::sub(positive_sim, at::mul(at::abs(positive_sim), gap));
  }
  if (fn_thresholds.has_value()) ceilings = ceilings.defined() ? at::fmin(ceilings, *fn_thresholds) : *fn_thresholds;
  if (ceilings.defined()) {
    const double inf = std::numeric_limits<double>::infinity();
    rows.ceilings = at::nan_to_num(ceilings, inf, inf, -inf).contiguous();
  }
  return rows;
}

at::Tensor non_finite_input_flags(const at::Tensor& anchors, const at::Tensor& positive_sim, const at::Tensor& stats,
                                  const c10::optional<at::Tensor>& fn_thresholds,
                                  const c10::optional<at::Tensor>& anchor_guides) {
  const at::Tensor no = at::zeros({}, stats.options().dtype(at::kBool));
  const at::Tensor thresholds_nan = fn_thresholds.has_value() ? at::isnan(*fn_thresholds).any() : no;
  const at::Tensor guides_not_finite =
      anchor_guides.has_value() ? at::logical_not(at::isfinite(*anchor_guides).all()) : no;
  return at::stack({at::logical_not(at::isfinite(anchors).all()), at::logical_not(at::isfinite(positive_sim).all()),
                    at::logical_not(at::isfinite(stats).all()), thresholds_nan, guides_not_finite});
}

void raise_if_not_finite(const bool* input_flags, bool bank_similarity_not_finite, bool guide_similarity_not_finite) {
  const char* suffix = " contains NaN or Inf (pass check_finite=False to skip this check)";
  TORCH_CHECK_VALUE(!input_flags[0], "anchors", suffix);
  TORCH_CHECK_VALUE(!input_flags[1], "positive_sim", suffix);
  TORCH_CHECK_VALUE(!input_flags[2], "stats", suffix);
  TORCH_CHECK_VALUE(!input_flags[3], "fn_thresholds contains NaN (pass check_finite=False to skip this check)");
  TORCH_CHECK_VALUE(!input_flags[4], "anchor_guides", suffix);
  TORCH_CHECK_VALUE(!bank_similarity_not_finite,
                    "bank contains NaN or Inf (a similarity was not finite; pass check_finite=False to skip this "
                    "check)");
  TORCH_CHECK_VALUE(!guide_similarity_not_finite,
                    "bank_guides contains NaN or Inf (a guide similarity was not finite; pass check_finite=False to "
                    "skip this check)");
}

int64_t positive_int_from_env(const char* name, int64_t fallback) {
  const char* text = std::getenv(name);
  if (text == nullptr || *text == '\0') return fallback;
  char* end = nullptr;
  const long long value = std::strtoll(text, &end, 10);
  TORCH_CHECK_VALUE(end != text && *end == '\0' && value >= 1, name, " must be a positive integer, got '", text, "'");
  return value;
}

}  // namespace fne_fast
