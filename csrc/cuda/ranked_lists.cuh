// The ranked lists of the CUDA kernel, the GPU twin of cpu/row_lists.h: per block, the Gumbel race and the
// hardest non-positive candidates, k entries each, built in shared memory and stored in global memory, where the
// merge kernel folds the lists of a row's column splits into its running lists and the output kernel reads them.
//
// Each shared-memory list is updated in rounds of kThreads · kItemsPerThread columns. Threads append the
// candidates that beat the list's current k-th entry to a pool; after a barrier the pool and the list are ranked
// together (rank = number of entries ordered before, a strict total order on (key, global index) since indices
// are distinct), and the entries with rank < k form the new list. This is exact for any split of the columns, and
// for any order of the offers: a flush ranks by that total order, never by pool position, and an offer is refused
// only by the floor, which is fixed, or when k listed entries, themselves candidates, already rank before it, so
// the refused candidate is in no final top-k. The list after the last flush is therefore the top-k of every
// candidate offered that ranks before the floor, whichever round offered it.
#pragma once

#include <cstdint>

#include "../fne_math.h"

namespace fne_fast {

constexpr int kMaxK = 64;
constexpr int kThreads = 256;
constexpr int kItemsPerThread = 4;
constexpr int kRoundCols = kThreads * kItemsPerThread;  // columns one block scans between two list updates

// One candidate: its key (the Gumbel key, or the similarity in the hardest list), its similarity and its global
// column. 16 bytes.
struct Entry {
  float key;
  float sim;
  int64_t index;
};

__device__ __forceinline__ bool entry_before(const Entry& a, const Entry& b) {
  return ranks_before(a.key, a.index, b.key, b.index);
}

// Lists of capacity k in global memory: entries [slots, k] best first, and their lengths [slots].
struct ListSet {
  Entry* entries;
  int* counts;
};

// A ranked list under construction in shared memory. Each round may append up to kRoundCols candidates.
struct SharedList {
  Entry pool[kMaxK + kRoundCols];  // [0, count): the list, best first; [k, k + pending): this round's candidates
  Entry floor;    // with has_floor: candidates must rank before it (the row's k-th entry from earlier chunks)
  int has_floor;
  int count;
  int pending;
  uint32_t gumbel_limit;  // Philox words above it give noise too small to enter (race list; the epilogue skips them)
};

// The key a candidate must exceed to be admitted: the larger of the floor and, once full, the list's k-th key.
__device__ inline float admission_key(const SharedList& list, const Entry* kth) {
  const float floor_key = list.has_floor ? list.floor.key : -INFINITY;
  return kth != nullptr ? fmaxf(floor_key, kth->key) : floor_key;
}

// Thread 0 only; the caller synchronises before the list is used.
__device__ inline void init_list(SharedList& list, const Entry* floor) {
  list.count = 0;
  list.pending = 0;
  list.has_floor = floor != nullptr;
  if (floor != nullptr) list.floor = *floor;
  list.gumbel_limit = gumbel_bits_limit(admission_key(list, nullptr));
}

// Offers one candidate during a round; returns whether it was appended to the pool. The list itself does not
// change during a round, so the threshold tests read stable shared memory.
__device__ __forceinline__ bool offer(SharedList& list, int k, const Entry& candidate) {
  if (list.has_floor && !entry_before(candidate, list.floor)) return false;
  if (list.count == k && !entry_before(candidate, list.pool[k - 1])) return false;
  list.pool[k + atomicAdd(&list.pending, 1)] = candidate;
  return true;
}

// Collective (every thread of the block, after the barrier that ends a round): folds the pool into the list.
// Every thread reads the same count/pending here, so the early return is uniform. scratch: kMaxK entries of
// shared memory, free between flushes; a block's lists flush one after the other (each flush ends with a
// barrier), so they share one scratch, which leaves room in the epilogue's shared memory for its race queues.
__device__ inline void flush(SharedList& list, Entry* scratch, int k) {
  const int listed = list.count, pending = list.pending;
  if (pending == 0) return;
  const int total = listed + pending;
  for (int e = threadIdx.x; e < total; e += blockDim.x) {
    const Entry mine = list.pool[e < listed ? e : k + (e - listed)];
    int rank = 0;
    for (int f = 0; f < listed && rank < k; ++f) rank += entry_before(list.pool[f], mine);
    for (int f = 0; f < pending && rank < k; ++f) rank += entry_before(list.pool[k + f], mine);
    if (rank < k) scratch[rank] = mine;
  }
  __syncthreads();
  const int kept = min(total, k);
  for (int e = threadIdx.x; e < kept; e += blockDim.x) list.pool[e] = scratch[e];
  if (threadIdx.x == 0) {
    list.count = kept;
    list.pending = 0;
    list.gumbel_limit = gumbel_bits_limit(admission_key(list, kept == k ? &scratch[k - 1] : nullptr));
  }
  __syncthreads();
}

// Collective: writes a finished list to slot `slot` of a ListSet. The caller's last barrier precedes it.
__device__ inline void store_list(const SharedList& list, int k, ListSet out, int64_t slot) {
  const int count = list.count;
  for (int e = threadIdx.x; e < count; e += blockDim.x) out.entries[slot * k + e] = list.pool[e];
  if (threadIdx.x == 0) out.counts[slot] = count;
}

// Offers entry `position` of list `slot` if the list has one.
__device__ __forceinline__ bool offer_listed(SharedList& list, int k, const ListSet& from, int64_t slot,
                                             int position) {
  return position < from.counts[slot] && offer(list, k, from.entries[slot * k + position]);
}

// A finished list of global memory in the list interface of write_output_row (fne_math.h).
struct EntryList {
  const Entry* entries;
  int count;
  __device__ int64_t size() const { return count; }
  __device__ int64_t index_at(int64_t i) const { return entries[i].index; }
  __device__ float sim_at(int64_t i) const { return entries[i].sim; }
  __device__ float key_at(int64_t i) const { return entries[i].key; }
};

}  // namespace fne_fast
