// combine: K linear combinations of task vectors in one pass over the inputs,
//   out[k][e] = base_weight * b[e] + sum_j weights[k][j] * (x_j[e] - b[e]),
// the subtraction fused (no task vector is stored), inputs widened on load to the accumulator
// type (float or double; never 16-bit arithmetic). Average, task arithmetic and R²M's
// theta_0 + tau_core + eta tau_res on untruncated tensors are each one call.
#pragma once

#include <cstdint>

#include "common/scalar.h"

namespace r2m {

struct CombineParams {
  const void* base;            // numel elements of `kind`
  const void* const* experts;  // n_experts pointers, numel elements each, same kind
  int64_t n_experts;
  int64_t numel;
  ScalarKind kind;
  const double* weights;  // n_outputs x n_experts, row-major
  int64_t n_outputs;
  double base_weight;  // 1 adds the base (theta_0 + ...), 0 leaves task-vector combinations
};

// Elements per block: each thread handles whole blocks, so any thread count gives the same bits.
constexpr int64_t kCombineBlock = 4096;

inline int64_t combine_num_blocks(int64_t numel) {
  return (numel + kCombineBlock - 1) / kCombineBlock;
}

// Writes block `block` of every output: out + k * numel is output k (Acc = float or double).
// `scratch` holds kCombineBlock accumulators owned by the calling thread.
template <typename Acc>
void combine_block_cpu(const CombineParams& params, int64_t block, Acc* out, Acc* scratch);

#if defined(R2M_WITH_CUDA)
// Writes every output in `out_kind` (n_outputs x numel, row-major, device memory), accumulating in
// double or float. Here params.experts is a device array of device pointers and params.weights a
// device array. Each element's sum runs in the CPU kernel's order with explicitly rounded
// products and sums (no fused multiply-add), so CPU and CUDA give the same bits. Returns the
// launch's cudaError_t (0: none).
int combine_cuda(const CombineParams& params, bool accumulate_in_double, ScalarKind out_kind,
                 void* out, void* stream);
#endif

}  // namespace r2m
