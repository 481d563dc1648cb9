// The per-row ranked lists of the CPU kernel: the Gumbel race and the hardest non-positive candidates, k entries
// each, for every anchor row of a call. Each thread fills its own RowLists; the kernel merges them exactly.
#pragma once

#include <cstdint>
#include <limits>
#include <vector>

#include "../fne_math.h"

namespace fne_fast {

// An ordered list (best first) of at most k candidates of one row.
struct RankedList {
  float* key;
  float* sim;
  int64_t* index;
  int64_t* count;
  int64_t k;

  // The list interface of write_output_row (fne_math.h).
  int64_t size() const { return *count; }
  int64_t index_at(int64_t i) const { return index[i]; }
  float sim_at(int64_t i) const { return sim[i]; }
  float key_at(int64_t i) const { return key[i]; }

  bool accepts(float candidate_key, int64_t candidate_index) const {
    return *count < k || ranks_before(candidate_key, candidate_index, key[k - 1], index[k - 1]);
  }
  // The key a candidate must reach (ties are settled by accepts): the k-th key, -inf while the list is not full.
  float threshold() const { return *count < k ? -std::numeric_limits<float>::infinity() : key[k - 1]; }

  void insert(float candidate_key, float candidate_sim, int64_t candidate_index) {
    int64_t pos = *count < k ? *count : k - 1;
    while (pos > 0 && ranks_before(candidate_key, candidate_index, key[pos - 1], index[pos - 1])) {
      key[pos] = key[pos - 1];
      sim[pos] = sim[pos - 1];
      index[pos] = index[pos - 1];
      --pos;
    }
    key[pos] = candidate_key;
    sim[pos] = candidate_sim;
    index[pos] = candidate_index;
    if (*count < k) ++*count;
  }
};

// Storage for the lists of all B rows, per row the largest Philox word whose noise can still enter the race
// (gumbel_bits_limit of the race's threshold, kept current by insert_race), and the rows' exceedance counts.
struct RowLists {
  int64_t k = 0;
  std::vector<float> race_key, race_sim, hard_key, hard_sim;
  std::vector<int64_t> race_index, hard_index, race_count, hard_count;
  std::vector<uint32_t> race_limit;
  std::vector<int64_t> above;  // per row, candidates above its threshold (when the call counts them)

  void resize(int64_t num_rows, int64_t k_, bool count_above = false) {
    k = k_;
    above.assign(count_above ? num_rows : 0, 0);
    for (auto* v : {&race_key, &race_sim, &hard_key, &hard_sim}) v->assign(num_rows * k, 0.f);
    for (auto* v : {&race_index, &hard_index}) v->assign(num_rows * k, -1);
    for (auto* v : {&race_count, &hard_count}) v->assign(num_rows, 0);
    race_limit.assign(num_rows, gumbel_bits_limit(-std::numeric_limits<float>::infinity()));
  }
  RankedList race(int64_t row) {
    return {&race_key[row * k], &race_sim[row * k], &race_index[row * k], &race_count[row], k};
  }
  RankedList hard(int64_t row) {
    return {&hard_key[row * k], &hard_sim[row * k], &hard_index[row * k], &hard_count[row], k};
  }
  // Offers a race candidate; returns the row's Philox word limit afterwards.
  uint32_t insert_race(int64_t row, float key, float sim, int64_t index) {
    RankedList list = race(row);
    if (list.accepts(key, index)) {
      list.insert(key, sim, index);
      race_limit[row] = gumbel_bits_limit(list.threshold());
    }
    return race_limit[row];
  }
  // Offers a hardest-list candidate; returns the row's threshold afterwards.
  float insert_hard(int64_t row, float sim, int64_t index) {
    RankedList list = hard(row);
    if (list.accepts(sim, index)) list.insert(sim, sim, index);
    return list.threshold();
  }
};

}  // namespace fne_fast
