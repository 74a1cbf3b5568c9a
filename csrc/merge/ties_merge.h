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

// Writes elements [begin, end) of the float32 result into out.
void ties_merge_cpu(const TiesMergeParams& params, int64_t begin, int64_t end, float* out);

#if defined(R2M_WITH_CUDA)
// Writes every element into out (device memory) on `stream`; params' pointers are device
// pointers. Returns a cudaError_t.
int ties_merge_cuda(const TiesMergeParams& params, float* out, void* stream);
#endif

}  // namespace r2m
