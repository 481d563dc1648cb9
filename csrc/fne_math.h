// The per-pair epilogue of docs/DESIGN.md §1-2 in float32, shared by the CPU and CUDA kernels and the C++ unit
// tests: Gumbel noise from a Philox word, the FNE log-weight, and the order of (key, global index) pairs.
#pragma once

#include <cmath>
#include <cstdint>

#include "philox.h"

namespace fne_fast {

enum class SamplerMode : int { kFne = 0, kHardest = 1, kUniform = 2 };

// The per-call options of fne_fast::sample_negatives, parsed and checked on the host
// (check_sample_negatives_args in sample_negatives.h) and passed by value to every kernel, host or device.
struct SamplerConfig {
  int64_t k;
  SamplerMode mode;
  float margin;
  float tau;
  float fn_tau;  // the likely false negatives' temperature: -fn_tau P_fn; +inf excludes them
  double prior_k;
  double fn_margin;
  int64_t min_count;
  bool cutdown;
  uint64_t seed;
  uint32_t step;
  uint32_t row_offset;
  int64_t col_offset;
  int64_t filled;
  bool check_finite;
  // Language guidance: with guides, a pair whose guide similarity is above guide_threshold is excluded.
  bool has_guides;
  float guide_threshold;
};

// Parameters of the log-weight that are the same for every pair of one call, folded on the host so that the
// per-pair work is a few multiply-adds: with
//   log p±(s) = -(s - μ±)² / (2σ±²) - ½ log σ±²   (the ½ log 2π cancels),
//   z(s) = log p⁺(s) - log p⁻(s) - log(K - 1),   P_fn = sigmoid(z),
// the Bayesian branch applies where P_fn > 1 - fn_margin, i.e. z > logit(1 - fn_margin).
struct WeightParams {
  float tau;
  float fn_tau;
  bool fn_excludes;        // fn_tau = +inf: a likely false negative gets weight 0 (log-weight -inf)
  bool bayes;              // n⁺ > min_count and both variances positive and finite
  float mu_pos, mu_neg;
  float half_inv_var_pos;  // 1 / (2σ⁺²)
  float half_inv_var_neg;  // 1 / (2σ⁻²)
  float z_offset;          // ½ log σ⁻² - ½ log σ⁺² - log(K - 1)
  float z_threshold;       // logit(1 - fn_margin)
};

// stats = (μ⁺, σ⁺², μ⁻, σ⁻², n⁺) as stored on the device.
FNE_HOST_DEVICE WeightParams make_weight_params(const float* stats, const SamplerConfig& config) {
  WeightParams p;
  p.tau = config.tau;
  p.fn_tau = config.fn_tau;
  p.fn_excludes = std::isinf(config.fn_tau);
  const float var_pos = stats[1], var_neg = stats[3];
  p.bayes = stats[4] > static_cast<float>(config.min_count) && var_pos > 0.f && var_neg > 0.f &&
            std::isfinite(var_pos) && std::isfinite(var_neg) && std::isfinite(stats[0]) &&
            std::isfinite(stats[2]);
  p.mu_pos = stats[0];
  p.mu_neg = stats[2];
  p.half_inv_var_pos = p.bayes ? 0.5f / var_pos : 0.f;
  p.half_inv_var_neg = p.bayes ? 0.5f / var_neg : 0.f;
  p.z_offset = p.bayes ? static_cast<float>(0.5 * std::log(static_cast<double>(var_neg)) -
                                            0.5 * std::log(static_cast<double>(var_pos)) -
                                            std::log(config.prior_k - 1.0))
                       : 0.f;
  const double threshold = 1.0 - config.fn_margin;  // P_fn must exceed this
  p.z_threshold = threshold <= 0.0   ? -INFINITY
                  : threshold >= 1.0 ? INFINITY
                                     : static_cast<float>(std::log(threshold) - std::log1p(-threshold));
  return p;
}

// logit of the false-negative probability, z(s) above.
FNE_HOST_DEVICE float false_negative_logit(float s, const WeightParams& p) {
  const float dp = s - p.mu_pos, dn = s - p.mu_neg;
  return p.z_offset - dp * dp * p.half_inv_var_pos + dn * dn * p.half_inv_var_neg;
}

// ℓ_ij for mode fne: -fn_tau P_fn where the Bayesian branch applies (-inf when fn_tau is +inf: the kernels
// exclude such a candidate from the race, as a cut-down one), else -τ (s - s⁺)². Always <= 0, which the kernels'
// early rejection relies on.
FNE_HOST_DEVICE float fne_log_weight(float s, float positive_sim, const WeightParams& p) {
  if (p.bayes) {
    const float z = false_negative_logit(s, p);
    if (z > p.z_threshold) return p.fn_excludes ? -INFINITY : -p.fn_tau / (1.f + std::exp(-z));
  }
  const float d = s - positive_sim;
  return -p.tau * d * d;
}

// Standard Gumbel noise from one Philox word x: v = (x + ½) 2⁻³², E = -log(1 - v) ~ Exp(1), G = -log E.
// 1 - v is formed exactly from the complement of x, and log1p keeps small v accurate, so G reaches ~22.2
// (x = 0) instead of capping near 16.6 as a float32 -log(-log u) does.
FNE_HOST_DEVICE float gumbel_from_bits(uint32_t x) {
  constexpr float kTwoPowMinus32 = 2.3283064365386963e-10f;
  float exponential;
  if (x < 0x80000000u) {
    const float v = (static_cast<float>(x) + 0.5f) * kTwoPowMinus32;
    exponential = -std::log1p(-v);
  } else {
    const float one_minus_v = (static_cast<float>(~x) + 0.5f) * kTwoPowMinus32;
    exponential = -std::log(one_minus_v);
  }
  return -std::log(exponential);
}

// Largest Philox word whose Gumbel noise can still reach `threshold`, with slack for the float32 rounding of
// the noise and of the key: G(x) > T  <=>  E < e^-T  <=>  v < 1 - exp(-e^-T). Log-weights are <= 0, so a word
// above this bound cannot give a key that beats T: the kernels skip the logarithms and the weight for it.
FNE_HOST_DEVICE uint32_t gumbel_bits_limit(float threshold) {
  constexpr uint32_t kAllWords = 0xFFFFFFFFu;
  if (!(threshold > -INFINITY)) return kAllWords;
  const double v = -std::expm1(-std::exp(-static_cast<double>(threshold)));
  const double bound = v * 4294967296.0 * (1.0 + 1e-4) + 64.0;
  return bound >= 4294967295.0 ? kAllWords : static_cast<uint32_t>(bound);
}

// Total order of candidates: larger key first, ties to the lower global index (docs/DESIGN.md §2).
FNE_HOST_DEVICE bool ranks_before(float key_a, int64_t index_a, float key_b, int64_t index_b) {
  return key_a > key_b || (key_a == key_b && index_a < index_b);
}

// Writes the k output slots of one row (docs/DESIGN.md §2), shared by the CPU and CUDA kernels: the race winners in
// key order with their keys, then the hardest non-positive candidates not chosen yet (key -inf), then invalid
// slots (index -1, sim 0, key -inf). The lists are ranked best first and offer size(), index_at(i), sim_at(i) and
// key_at(i); in mode "hardest" the race list is the hardest list, whose key is the similarity. The top-k hardest
// list suffices: at most `winners` of its entries are winners, so it holds the k - winners hardest candidates
// that are not.
template <typename RaceList, typename HardList>
FNE_HOST_DEVICE void write_output_row(const RaceList& race, const HardList& hard, int64_t k, int64_t* index,
                                      float* sim, bool* valid, float* key) {
  int64_t slot = 0;
  for (; slot < race.size(); ++slot) {
    index[slot] = race.index_at(slot);
    sim[slot] = race.sim_at(slot);
    valid[slot] = true;
    key[slot] = race.key_at(slot);
  }
  const int64_t winners = slot;
  for (int64_t h = 0; h < hard.size() && slot < k; ++h) {
    bool chosen = false;
    for (int64_t w = 0; w < winners; ++w) chosen |= race.index_at(w) == hard.index_at(h);
    if (chosen) continue;
    index[slot] = hard.index_at(h);
    sim[slot] = hard.sim_at(h);
    valid[slot] = true;
    key[slot] = -INFINITY;
    ++slot;
  }
  for (; slot < k; ++slot) {
    index[slot] = -1;
    sim[slot] = 0.f;
    valid[slot] = false;
    key[slot] = -INFINITY;
  }
}

}  // namespace fne_fast
