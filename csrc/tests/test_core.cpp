// C++ unit tests of the header-only core: Philox known-answer vectors, the float32 epilogue math against
// double-precision formulas, and the output-slot writer shared by the CPU and CUDA kernels. Run by ctest.
#include <cmath>
#include <cstdint>
#include <cstdio>

#include "fne_math.h"
#include "philox.h"

namespace {

int failures = 0;

void expect(bool condition, const char* what) {
  if (!condition) {
    std::printf("FAILED: %s\n", what);
    ++failures;
  }
}

void test_philox_known_answers() {
  struct Vector {
    uint32_t key_lo, key_hi;
    uint32_t counter[4];
    uint32_t expected[4];
  };
  // Random123's known-answer vectors for Philox4x32-10 (docs/DESIGN.md §2).
  const Vector vectors[] = {
      {0, 0, {0, 0, 0, 0}, {0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8}},
      {0xffffffff, 0xffffffff, {0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff},
       {0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd}},
      {0xa4093822, 0x299f31d0, {0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344},
       {0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1}},
  };
  for (const Vector& v : vectors) {
    uint32_t out[4];
    const fne_fast::PhiloxKey key{v.key_lo, v.key_hi};
    fne_fast::philox4x32_10(v.counter, key, out);
    for (int w = 0; w < 4; ++w) expect(out[w] == v.expected[w], "philox4x32_10 known-answer vector");
    const uint32_t first =
        fne_fast::philox_first_word(v.counter[0], v.counter[1], v.counter[2], v.counter[3], key);
    expect(first == v.expected[0], "philox_first_word equals the first output word");
  }
  const fne_fast::PhiloxKey from_seed = fne_fast::philox_key_from_seed(0x299f31d0a4093822ull);
  expect(from_seed.lo == 0xa4093822u && from_seed.hi == 0x299f31d0u, "seed splits into (lo, hi)");
}

void test_philox_split_into_row_and_column_terms() {
  // The row/column split of the first two rounds (the CPU kernel draws 16 rows per column with it) gives the
  // same word as the plain generator, for random counters, including high column words and wrapping keys.
  uint64_t state = 0x9e3779b97f4a7c15ull;
  auto next = [&state]() {  // splitmix64
    state += 0x9e3779b97f4a7c15ull;
    uint64_t z = state;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return static_cast<uint32_t>(z ^ (z >> 31));
  };
  bool same = true;
  for (int trial = 0; trial < 20000; ++trial) {
    const uint32_t col_lo = next(), col_hi = trial % 3 == 0 ? 0u : next(), row = next(), step = next();
    const fne_fast::PhiloxKey key{next(), trial % 5 == 0 ? 0xffffffffu : next()};
    const uint32_t split = fne_fast::philox_first_word_from_terms(fne_fast::philox_row_terms(row, col_hi, key),
                                                                  fne_fast::philox_column_terms(col_lo, step, key), key);
    same &= split == fne_fast::philox_first_word(col_lo, col_hi, row, step, key);
  }
  expect(same, "philox_first_word_from_terms equals philox_first_word");
}

double gumbel_double(uint32_t x) {
  const double v = (static_cast<double>(x) + 0.5) * std::ldexp(1.0, -32);
  return -std::log(-std::log1p(-v));
}

void test_gumbel_accuracy() {
  const uint32_t words[] = {0u, 1u, 1000u, 1u << 20, 0x7fffffffu, 0x80000000u, 0xfffffff0u, 0xffffffffu};
  for (uint32_t x : words) {
    const double exact = gumbel_double(x);
    const double got = fne_fast::gumbel_from_bits(x);
    expect(std::fabs(got - exact) <= 4e-6 * std::fmax(1.0, std::fabs(exact)), "gumbel_from_bits accuracy");
  }
  expect(fne_fast::gumbel_from_bits(0u) > 22.8f, "the far tail (x = 0) is not capped");
  bool decreasing = true;
  for (uint32_t x = 0; x < 0xffff0000u; x += 0x00fff3u) {
    decreasing &= fne_fast::gumbel_from_bits(x) >= fne_fast::gumbel_from_bits(x + 0x00fff3u);
  }
  expect(decreasing, "G decreases with the Philox word (the CPU kernel's early rejection relies on it)");
}

void test_gumbel_bits_limit() {
  // Words above the limit must give noise below the threshold (the early rejection may never drop a winner),
  // and the limit must not be loose by more than its documented slack.
  const float thresholds[] = {-3.f, -1.f, 0.f, 0.5f, 2.f, 5.f, 10.f, 15.f, 20.f};
  for (float threshold : thresholds) {
    const uint32_t limit = fne_fast::gumbel_bits_limit(threshold);
    bool sound = true;
    for (uint64_t x = uint64_t{limit} + 1; x <= 0xffffffffull && x < uint64_t{limit} + 4096; ++x) {
      sound &= fne_fast::gumbel_from_bits(static_cast<uint32_t>(x)) < threshold;
    }
    expect(sound, "gumbel_bits_limit never rejects a word whose noise reaches the threshold");
    const double exact_limit = -std::expm1(-std::exp(-static_cast<double>(threshold))) * std::ldexp(1.0, 32);
    expect(limit == 0xffffffffu || limit <= exact_limit * 1.001 + 64.0,
           "gumbel_bits_limit admits at most 0.1% + 64 words more than needed");
  }
  expect(fne_fast::gumbel_bits_limit(-INFINITY) == 0xffffffffu, "no threshold admits every word");
}

void test_log_weight() {
  const float stats[5] = {0.3f, 0.04f, 0.0f, 0.05f, 500.0f};
  // fn_tau differs from tau, so that each branch of the weight is seen to use its own temperature.
  const double tau = 2.0, fn_tau = 3.0, prior_k = 10000.0, fn_margin = 0.999;
  fne_fast::SamplerConfig config{};
  config.tau = 2.0f;
  config.fn_tau = 3.0f;
  config.prior_k = prior_k;
  config.fn_margin = fn_margin;
  config.min_count = 200;
  const fne_fast::WeightParams params = fne_fast::make_weight_params(stats, config);
  expect(params.bayes, "the Bayesian branch is on above min_count");
  int bayes_pairs = 0, base_pairs = 0;
  for (double s = -0.5; s <= 1.2; s += 0.0137) {
    const double log_pos = -0.5 * (s - 0.3) * (s - 0.3) / 0.04 - 0.5 * std::log(0.04);
    const double log_neg = -0.5 * s * s / 0.05 - 0.5 * std::log(0.05);
    const double p_fn = 1.0 / (1.0 + std::exp(-(log_pos - log_neg - std::log(prior_k - 1.0))));
    const double positive_sim = 0.7;
    const bool bayes = p_fn > 1.0 - fn_margin;
    const double expected = bayes ? -fn_tau * p_fn : -tau * (s - positive_sim) * (s - positive_sim);
    (bayes ? bayes_pairs : base_pairs) += 1;
    const float got = fne_fast::fne_log_weight(static_cast<float>(s), static_cast<float>(positive_sim), params);
    expect(std::fabs(got - expected) <= 1e-5 * std::fmax(1.0, std::fabs(expected)), "fne_log_weight");
    expect(got <= 0.f, "log-weights are <= 0");
  }
  expect(bayes_pairs > 5 && base_pairs > 5, "both branches of the weight are exercised");

  const float few[5] = {0.3f, 0.04f, 0.0f, 0.05f, 200.0f};
  expect(!fne_fast::make_weight_params(few, config).bayes, "n+ must exceed min_count");
  const float degenerate[5] = {0.3f, 0.0f, 0.0f, 0.05f, 500.0f};
  expect(!fne_fast::make_weight_params(degenerate, config).bayes,
         "a zero variance turns the Bayesian branch off");
}

void test_order() {
  expect(fne_fast::ranks_before(2.f, 9, 1.f, 3), "larger key first");
  expect(fne_fast::ranks_before(1.f, 3, 1.f, 9), "ties go to the lower index");
  expect(!fne_fast::ranks_before(1.f, 9, 1.f, 3), "ties go to the lower index (converse)");
  expect(!fne_fast::ranks_before(1.f, 3, 1.f, 3), "strict order");
}

}  // namespace

// A ranked list over plain arrays, in the interface write_output_row reads.
struct ArrayList {
  const int64_t* indices;
  const float* sims;
  const float* keys;
  int64_t count;
  int64_t size() const { return count; }
  int64_t index_at(int64_t i) const { return indices[i]; }
  float sim_at(int64_t i) const { return sims[i]; }
  float key_at(int64_t i) const { return keys[i]; }
};

void test_write_output_row() {
  // Race winners 7 and 3; the hardest list holds 3 (a winner), 9 and 1; k = 5 leaves one invalid slot.
  const int64_t race_index[] = {7, 3};
  const float race_sim[] = {0.2f, 0.6f}, race_key[] = {5.0f, 4.0f};
  const int64_t hard_index[] = {3, 9, 1};
  const float hard_sim[] = {0.6f, 0.5f, 0.4f};
  const ArrayList race{race_index, race_sim, race_key, 2}, hard{hard_index, hard_sim, hard_sim, 3};
  int64_t index[5];
  float sim[5], key[5];
  bool valid[5];
  fne_fast::write_output_row(race, hard, 5, index, sim, valid, key);
  const int64_t expected_index[] = {7, 3, 9, 1, -1};
  const float expected_sim[] = {0.2f, 0.6f, 0.5f, 0.4f, 0.f};
  for (int slot = 0; slot < 5; ++slot) {
    expect(index[slot] == expected_index[slot] && sim[slot] == expected_sim[slot], "slots in order");
    expect(valid[slot] == (slot < 4), "the last slot is invalid");
    expect(slot < 2 ? key[slot] == race_key[slot] : std::isinf(key[slot]) && key[slot] < 0,
           "race keys, then -inf for fallback and invalid slots");
  }
}

void test_excluded_false_negative_weight() {
  const float stats[5] = {0.3f, 0.04f, 0.0f, 0.05f, 500.0f};
  fne_fast::SamplerConfig config{};
  config.tau = 2.0f;
  config.fn_tau = INFINITY;
  config.prior_k = 10000.0;
  config.fn_margin = 0.999;
  config.min_count = 200;
  const fne_fast::WeightParams params = fne_fast::make_weight_params(stats, config);
  const float likely_false = fne_fast::fne_log_weight(0.8f, 0.7f, params);  // P_fn(0.8) ≈ 0.003 > 0.001
  const float likely_negative = fne_fast::fne_log_weight(-0.3f, 0.7f, params);
  expect(std::isinf(likely_false) && likely_false < 0, "fn_tau = inf gives a likely false negative weight 0");
  expect(std::fabs(likely_negative + 2.0f * 1.0f * 1.0f) < 1e-5f, "other candidates keep -tau (s - s+)^2");
}

int main() {
  test_philox_known_answers();
  test_philox_split_into_row_and_column_terms();
  test_gumbel_accuracy();
  test_gumbel_bits_limit();
  test_log_weight();
  test_order();
  test_write_output_row();
  test_excluded_false_negative_weight();
  if (failures == 0) std::printf("all core tests passed\n");
  return failures == 0 ? 0 : 1;
}
