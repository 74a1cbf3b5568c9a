// dare_merge: DARE with task arithmetic in one pass over the N + 1 inputs (../shared/r2m-spec.md
// §6), in float32: entry e of task i is kept when the SplitMix64 uniform of (streams[i],
// first_index + e) is >= drop_rate, and rescaled by 1 / (1 - drop_rate);
//   out = b + lam * sum_i kept_i  (the sum over the experts in order).
// The mask is a pure function of (stream, element index), so any block of a tensor draws what
// the whole tensor would, on any thread count or device.
#pragma once

#include <cstdint>

#include "common/scalar.h"
#include "merge/dare_mask.h"

namespace r2m {

struct DareMergeParams {
  const void* base;            // numel elements of `kind`
  const void* const* experts;  // n_experts pointers, numel elements each, same kind
  int64_t n_experts;
  int64_t numel;
  ScalarKind kind;
  DareMask mask;  // its streams are required here
  float lam;
};

// Writes elements [begin, end) of the float32 result into out. Returns 0 when every input
// element there is finite, NaN otherwise (a non-finite task vector entry, kept or dropped, makes
// the sum of task * 0 NaN), so the caller can check the inputs without reading them again.
float dare_merge_cpu(const DareMergeParams& params, int64_t begin, int64_t end, float* out);

#if defined(R2M_WITH_CUDA)
// Writes every element into out (device memory) on `stream` and sets *nonfinite (device, zeroed
// by the caller) to 1 when a task-vector entry is not finite; params' pointers are device
// pointers. Returns a cudaError_t.
int dare_merge_cuda(const DareMergeParams& params, float* out, int* nonfinite, void* stream);
#endif

}  // namespace r2m
