// delta_gram: the N x N Gram matrix of task vectors, G[i][j] = sum_e (x_i[e] - b[e]) (x_j[e] -
// b[e]), with the subtraction fused into the reduction so task vectors are never materialised
// (../shared/PERFORMANCE.md, Gram pass).
#pragma once

#include <cstdint>

#include "common/scalar.h"

namespace r2m {

// Plain parameter struct: the kernels never see a torch tensor, so this header and its kernels
// build without torch (native C++ tests, nvcc compile checks).
struct DeltaGramParams {
  const void* base;            // numel elements of `kind`
  const void* const* experts;  // n_experts pointers, numel elements each, same kind
  int64_t n_experts;
  int64_t numel;
  ScalarKind kind;
};

// Elements per block of the reduction. Blocks are fixed in size and summed in block order, so the
// result does not depend on how many threads process them.
constexpr int64_t kDeltaGramBlock = 1 << 15;

inline int64_t delta_gram_num_blocks(int64_t numel) {
  return (numel + kDeltaGramBlock - 1) / kDeltaGramBlock;
}

// Partial sums per pair of experts in the CPU reduction, and elements per chunk of a block whose
// differences are formed at once and stay in the L1 cache while every pair uses them (measured on
// 8 experts of 3072 x 768: 19.1 ms at 128, 20.4 at 64, 25.4 at 512; 23.1 for whole-block rows).
constexpr int kDeltaGramLanes = 8;
constexpr int64_t kDeltaGramChunk = 128;
static_assert(kDeltaGramChunk % kDeltaGramLanes == 0 && kDeltaGramBlock % kDeltaGramChunk == 0,
              "chunks must hold whole lane groups, blocks whole chunks");

// Doubles of scratch delta_gram_block_cpu needs per calling thread.
int64_t delta_gram_scratch_doubles(int64_t n_experts);

// Accumulates block `block` into `partial` (n_experts^2 doubles, row-major, overwritten).
// `scratch` holds delta_gram_scratch_doubles(n_experts) doubles owned by the calling thread.
void delta_gram_block_cpu(const DeltaGramParams& params, int64_t block, double* partial,
                          double* scratch);

// Single-threaded driver used by the native tests: adds the Gram of all blocks into `gram`.
void delta_gram_cpu(const DeltaGramParams& params, double* gram);

#if defined(R2M_WITH_CUDA)
// Experts per tile of the CUDA reduction: a tile reads its two groups of experts once per element
// and forms all their pair products in registers, so N <= kDeltaGramGroup experts cost one read of
// every input (the traffic floor of ../shared/PERFORMANCE.md's Gram pass).
constexpr int kDeltaGramGroup = 8;

// Doubles of device workspace delta_gram_cuda needs (partial sums per thread block and pair).
int64_t delta_gram_cuda_workspace(int64_t numel);

// Adds the Gram of all elements into `gram` (device memory, n_experts^2 doubles, row-major).
// Here params.experts is a device array of n_experts device pointers. Deterministic: fixed grid,
// fixed reduction order, no floating-point atomics. Returns the launch's cudaError_t (0: none).
int delta_gram_cuda(const DeltaGramParams& params, double* workspace, double* gram, void* stream);
#endif

}  // namespace r2m
