// CUDA twin of ties_merge_cpu: one thread per element, the same float operations in the same
// order (sums over the experts in order, explicit rounding: no fused multiply-add), and the same
// decisions on bit patterns (ties_merge.h), so each element's bits equal the CPU kernel's.
#include <cuda_runtime.h>

#include "common/cuda_math.cuh"
#include "merge/ties_merge.h"

namespace r2m {
namespace {

constexpr int kThreads = 256;

template <typename In, bool Masked>
__device__ __forceinline__ float task_value(const TiesMergeParams& params, int64_t i, int64_t e,
                                            float base) {
  const float difference = sub_rn(to_float(static_cast<const In*>(params.experts[i])[e]), base);
  if constexpr (!Masked) return difference;
  return dare_masked(params.mask, i, static_cast<uint64_t>(params.mask.first_index + e),
                     difference);
}

template <typename In, bool Masked>
__global__ void __launch_bounds__(kThreads) ties_merge_kernel(TiesMergeParams params, float* out) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; e < params.numel;
       e += stride) {
    const float base = to_float(static_cast<const In*>(params.base)[e]);
    float sum = 0.0f;
    for (int64_t i = 0; i < params.n_experts; ++i) {
      const uint32_t threshold = float_bits(params.thresholds[i]);
      const float task = task_value<In, Masked>(params, i, e, base);
      sum = add_rn(sum, bits_float(trimmed_bits(float_bits(task), threshold)));
    }
    const bool positive = elects_positive(float_bits(sum));
    float agreeing = 0.0f;
    float count = 0.0f;
    for (int64_t i = 0; i < params.n_experts; ++i) {
      const uint32_t threshold = float_bits(params.thresholds[i]);
      const float task = task_value<In, Masked>(params, i, e, base);
      const uint32_t trimmed = trimmed_bits(float_bits(task), threshold);
      const uint32_t agreeing_bits = agrees(trimmed, positive);
      agreeing = add_rn(agreeing, bits_float(trimmed & agreeing_bits));
      count = add_rn(count, bits_float(kTiesOneBits & agreeing_bits));
    }
    const float mean = __fdiv_rn(agreeing, fmaxf(count, 1.0f));
    out[e] = add_rn(base, mul_rn(params.lam, mean));
  }
}

template <typename In>
__device__ __forceinline__ float weighted_task(const TiesWeightedParams& params, int64_t i,
                                               int64_t e, float base) {
  const float task = sub_rn(to_float(static_cast<const In*>(params.experts[i])[e]), base);
  const uint32_t kept =
      cut_bits(float_bits(task), float_bits(params.thresholds[i]), e <= params.cutoffs[i]);
  return mul_rn(bits_float(kept), params.weights[i]);
}

template <typename In>
__global__ void __launch_bounds__(kThreads)
    ties_merge_weighted_kernel(TiesWeightedParams params, float* out) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; e < params.numel;
       e += stride) {
    const float base = to_float(static_cast<const In*>(params.base)[e]);
    float sum = 0.0f;
    for (int64_t i = 0; i < params.n_experts; ++i) {
      sum = add_rn(sum, weighted_task<In>(params, i, e, base));
    }
    const bool positive = elects_positive(float_bits(sum));
    float agreeing = 0.0f;
    float divisor = 0.0f;
    for (int64_t i = 0; i < params.n_experts; ++i) {
      const float weighted = weighted_task<In>(params, i, e, base);
      const uint32_t agreeing_bits = agrees(float_bits(weighted), positive);
      agreeing = add_rn(agreeing, bits_float(float_bits(weighted) & agreeing_bits));
      divisor = add_rn(divisor, bits_float(float_bits(params.weights[i]) & agreeing_bits));
    }
    const float mean =
        params.normalize
            ? __fdiv_rn(agreeing, bits_float(nonzero_divisor_bits(float_bits(divisor))))
            : agreeing;
    out[e] = add_rn(base, mul_rn(params.lam, mean));
  }
}

}  // namespace

int ties_merge_weighted_cuda(const TiesWeightedParams& params, float* out, void* stream) {
  if (params.numel == 0) return 0;
  cudaStream_t cuda_stream = static_cast<cudaStream_t>(stream);
  const unsigned blocks = elementwise_blocks(params.numel, kThreads);
  dispatch_kind(params.kind, [&](auto tag) {
    ties_merge_weighted_kernel<decltype(tag)><<<blocks, kThreads, 0, cuda_stream>>>(params, out);
  });
  return static_cast<int>(cudaGetLastError());
}

int ties_merge_cuda(const TiesMergeParams& params, float* out, void* stream) {
  if (params.numel == 0) return 0;
  cudaStream_t cuda_stream = static_cast<cudaStream_t>(stream);
  const unsigned blocks = elementwise_blocks(params.numel, kThreads);
  dispatch_kind(params.kind, [&](auto tag) {
    if (params.mask.streams != nullptr) {
      ties_merge_kernel<decltype(tag), true><<<blocks, kThreads, 0, cuda_stream>>>(params, out);
    } else {
      ties_merge_kernel<decltype(tag), false><<<blocks, kThreads, 0, cuda_stream>>>(params, out);
    }
  });
  return static_cast<int>(cudaGetLastError());
}

}  // namespace r2m
