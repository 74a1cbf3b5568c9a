// ties_merge: TIES-Merging's trim, elect and disjoint mean, plus the base, in one pass over the
// N + 1 inputs (../shared/r2m-spec.md §6), in float32:
//   t_i = x_i - b;  trimmed_i = t_i where |t_i| >= threshold_i, else 0;
//   elected = +1 where sum_i trimmed_i >= 0 (0 counts as +), else -1;
//   out = b + lam * (sum of the trimmed_i whose sign is the elected one) / max(1, their count).
// Every sum runs over the experts in order, so each element's bits depend on its inputs alone:
// the same for any thread count, block split or device.
#pragma once

#include <cstdint>

#include "common/scalar.h"
#include "merge/dare_mask.h"

namespace r2m {

struct TiesMergeParams {
  const void* base;            // numel elements of `kind`
  const void* const* experts;  // n_experts pointers, numel elements each, same kind
  int64_t n_experts;
  int64_t numel;
  ScalarKind kind;
  const float* thresholds;  // n_experts: entries below a task's threshold are trimmed
  float lam;
  DareMask mask;  // DARE-TIES: the task vectors after DARE's mask (streams nullptr: none)
};

// The per-entry decisions of both kernels, on float32 bit patterns with integer compares: a float
// compare may raise an exception flag, so without -fno-trapping-math the compiler keeps each one
// a branch and vectorises none of the CPU loops (35x slower than combine).
constexpr uint32_t kTiesInfBits = 0x7f800000u;
constexpr uint32_t kTiesSignBit = 0x80000000u;
constexpr uint32_t kTiesOneBits = 0x3f800000u;  // 1.0f

// All-ones where `condition`, else zero.
R2M_HOST_DEVICE uint32_t all_ones_if(bool condition) {
  return 0u - static_cast<uint32_t>(condition);
}

// A task entry's bits when |task| >= threshold (false for NaN: non-negative floats order like
// their bits), else +0.
R2M_HOST_DEVICE uint32_t trimmed_bits(uint32_t task, uint32_t threshold) {
  const uint32_t magnitude = task & ~kTiesSignBit;
  return task & all_ones_if(magnitude >= threshold && magnitude <= kTiesInfBits);
}

// The elected sign from the sum of the trimmed entries: + where sum >= 0 (true for -0, false
// for NaN).
R2M_HOST_DEVICE bool elects_positive(uint32_t sum) {
  return sum <= kTiesInfBits || sum == kTiesSignBit;
}

// All-ones where a trimmed entry agrees with the elected sign: nonzero with that sign (trimmed
// entries are never NaN).
R2M_HOST_DEVICE uint32_t agrees(uint32_t trimmed, bool positive) {
  const bool nonzero = (trimmed & ~kTiesSignBit) != 0;
  const bool negative = (trimmed & kTiesSignBit) != 0;
  return all_ones_if(nonzero && (positive != negative));
}

// Writes elements [begin, end) of the float32 result into out.
void ties_merge_cpu(const TiesMergeParams& params, int64_t begin, int64_t end, float* out);

// ties_merge_weighted: mergekit's TIES of one whole tensor (r2m_ext/methods/mergekit_semantics.py)
// in one pass over the N + 1 inputs, in float32, as mergekit computes it:
//   t_i = x_i - b;  kept_i = t_i where |t_i| > threshold_i, or |t_i| == threshold_i at element
//     index <= cutoff_i (the task's top k by magnitude, ties at the cut taken in index order),
//     else 0;  w_i = kept_i * weight_i;
//   elected = +1 where sum_i w_i >= 0, else -1;
//   out = b + lam * (sum of the w_i whose sign is the elected one) / d, where d is the sum of
//     those tasks' weights (1 where that is 0) with `normalize`, else 1.
// Sums over the experts in order, decisions on bit patterns, as ties_merge.
struct TiesWeightedParams {
  const void* base;            // numel elements of `kind`
  const void* const* experts;  // n_experts pointers, numel elements each, same kind
  int64_t n_experts;
  int64_t numel;
  ScalarKind kind;
  const float* thresholds;  // n_experts, >= 0
  const int64_t* cutoffs;   // n_experts: last element index kept at exactly the threshold
  const float* weights;     // n_experts
  bool normalize;
  float lam;
};

// An entry's bits when its task keeps it, else +0: magnitude above the threshold, or at it where
// `at_threshold_kept` (never NaN).
R2M_HOST_DEVICE uint32_t cut_bits(uint32_t task, uint32_t threshold, bool at_threshold_kept) {
  const uint32_t magnitude = task & ~kTiesSignBit;
  const bool kept = magnitude > threshold || (magnitude == threshold && at_threshold_kept);
  return task & all_ones_if(kept && magnitude <= kTiesInfBits);
}

// The divisor's bits, 1.0f where it is +-0 (mergekit: divisor[divisor == 0] = 1).
R2M_HOST_DEVICE uint32_t nonzero_divisor_bits(uint32_t divisor) {
  return (divisor & ~kTiesSignBit) == 0 ? kTiesOneBits : divisor;
}

// Writes elements [begin, end) of the float32 result into out (element indices from 0 at the
// tensor's first element: the cutoffs are indices of the whole tensor).
void ties_merge_weighted_cpu(const TiesWeightedParams& params, int64_t begin, int64_t end,
                             float* out);

#if defined(R2M_WITH_CUDA)
// Writes every element into out (device memory) on `stream`; params' pointers are device
// pointers. Returns a cudaError_t.
int ties_merge_cuda(const TiesMergeParams& params, float* out, void* stream);
int ties_merge_weighted_cuda(const TiesWeightedParams& params, float* out, void* stream);
#endif

}  // namespace r2m
