// magnitude_histogram: one pass of an exact radix select of the k-th largest task-vector magnitude
// per task (the global TIES threshold). For every element e and task i it forms
// |x_i[e] - b[e]| in float32 (inputs widened or rounded to float32 on load, as the merge computes),
// reads its bit pattern as an integer (non-negative floats order like their bits), and counts the
// digit bits[shift, shift + width) of the entries whose bits above shift + width equal the task's
// prefix. Counts are integers: the result does not depend on threads or how the input is split.
#pragma once

#include <cstdint>
#include <vector>

#include "common/scalar.h"
#include "merge/dare_mask.h"

namespace r2m {

struct MagnitudeHistogramParams {
  const void* base;            // numel elements of `kind`
  const void* const* experts;  // n_experts pointers, numel elements each, same kind
  int64_t n_experts;
  int64_t numel;
  ScalarKind kind;
  const int64_t* prefixes;  // n_experts: the known high bits (bits >> (shift + width)) per task
  int shift;
  int width;      // bits per digit, 1..16: 2^width bins per task
  DareMask mask;  // DARE-TIES: the task vectors after DARE's mask (streams nullptr: none)
  // Optional window of digits per task, inclusive (nullptr: none): the nonzero entries counted
  // in a bin of task i within [collect_low[i], collect_high[i]] also have their magnitude's bit
  // pattern collected, so that a window known to hold the answer's digit resolves the remaining
  // bits without another pass over the inputs (exact zeros: the count less the collected).
  const int64_t* collect_low = nullptr;
  const int64_t* collect_high = nullptr;
};

// The float32 bit pattern of |difference|: the sign bit cleared.
R2M_HOST_DEVICE uint32_t magnitude_bits(float difference) {
  return float_bits(difference) & 0x7fffffffu;
}

// Adds elements [begin, end) into counts (n_experts rows of 2^width int64, row-major); with a
// collect window, appends the collected bit patterns of task i to collected[i] (in index order).
void magnitude_histogram_cpu(const MagnitudeHistogramParams& params, int64_t begin, int64_t end,
                             int64_t* counts, std::vector<uint32_t>* collected = nullptr);

// nth_at_magnitude's core: where a top-k cut splits the entries tied at the k-th largest
// magnitude, which of them are kept (the first ones in index order) is told by the index of the
// last one kept. Per task, entries "at" its magnitude are those whose |x_i[e] - b[e]| (float32)
// has exactly the bits magnitudes[i].
struct MagnitudeMatchParams {
  const void* base;            // numel elements of `kind`
  const void* const* experts;  // n_experts pointers, numel elements each, same kind
  int64_t n_experts;
  int64_t numel;
  ScalarKind kind;
  const uint32_t* magnitudes;  // n_experts float32 bit patterns
};

// Adds, per task, the number of entries of [begin, end) at its magnitude into counts[i].
void count_at_magnitude_cpu(const MagnitudeMatchParams& params, int64_t begin, int64_t end,
                            int64_t* counts);

// The index of task i's `n`-th (1-based) entry at its magnitude within [begin, end), or -1.
int64_t find_at_magnitude_cpu(const MagnitudeMatchParams& params, int64_t i, int64_t begin,
                              int64_t end, int64_t n);

#if defined(R2M_WITH_CUDA)
// Adds every element into counts (device memory, zeroed by the caller), on `stream`; params'
// pointers (experts, prefixes, mask streams) are device pointers. Returns a cudaError_t.
int magnitude_histogram_cuda(const MagnitudeHistogramParams& params, int64_t* counts, void* stream);
#endif

}  // namespace r2m
