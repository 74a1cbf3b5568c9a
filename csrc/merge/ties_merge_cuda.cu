// CUDA twin of ties_merge_cpu: one thread per element, the same float operations in the same
// order (sums over the experts in order, explicit rounding: no fused multiply-add), and the same
// choices on bit patterns, so each element's bits equal the CPU kernel's.
#include <cuda_runtime.h>

#include <algorithm>

#include "common/cuda_math.cuh"
#include "merge/ties_merge.h"

namespace r2m {
namespace {

constexpr int kThreads = 256;
constexpr uint32_t kInfBits = 0x7f800000u;
constexpr uint32_t kSignBit = 0x80000000u;
constexpr uint32_t kOneBits = 0x3f800000u;  // 1.0f

template <typename In, bool Masked>
__device__ __forceinline__ float task_value(const TiesMergeParams& params, int64_t i, int64_t e,
                                            float base) {
  const float difference = sub_rn(to_float(static_cast<const In*>(params.experts[i])[e]), base);
  if constexpr (!Masked) return difference;
  return dare_masked(params.mask, i, static_cast<uint64_t>(params.mask.first_index + e),
                     difference);
}

// The entry when |task| >= threshold (false for NaN: non-negative floats order like their
// bits), else +0.
__device__ __forceinline__ uint32_t trimmed_bits(float task, uint32_t threshold) {
  const uint32_t bits = __float_as_uint(task);
  const uint32_t magnitude = bits & ~kSignBit;
  return magnitude >= threshold && magnitude <= kInfBits ? bits : 0u;
}

template <typename In, bool Masked>
__global__ void __launch_bounds__(kThreads) ties_merge_kernel(TiesMergeParams params, float* out) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; e < params.numel;
       e += stride) {
    const float base = to_float(static_cast<const In*>(params.base)[e]);
    float sum = 0.0f;
    for (int64_t i = 0; i < params.n_experts; ++i) {
      const uint32_t threshold = __float_as_uint(params.thresholds[i]);
      sum = add_rn(sum, __uint_as_float(
                            trimmed_bits(task_value<In, Masked>(params, i, e, base), threshold)));
    }
    // sum >= 0 (true for -0, false for NaN) elects +.
    const uint32_t total = __float_as_uint(sum);
    const bool positive = total <= kInfBits || total == kSignBit;
    float agreeing = 0.0f;
    float count = 0.0f;
    for (int64_t i = 0; i < params.n_experts; ++i) {
      const uint32_t threshold = __float_as_uint(params.thresholds[i]);
      const uint32_t trimmed = trimmed_bits(task_value<In, Masked>(params, i, e, base), threshold);
      // A trimmed entry agrees when it is nonzero with the elected sign (never NaN); the others
      // add +0, as on the CPU.
      const bool nonzero = (trimmed & ~kSignBit) != 0;
      const bool negative = (trimmed & kSignBit) != 0;
      const uint32_t agrees = nonzero && positive != negative ? 0xffffffffu : 0u;
      agreeing = add_rn(agreeing, __uint_as_float(trimmed & agrees));
      count = add_rn(count, __uint_as_float(kOneBits & agrees));
    }
    const float mean = __fdiv_rn(agreeing, fmaxf(count, 1.0f));
    out[e] = add_rn(base, mul_rn(params.lam, mean));
  }
}

}  // namespace

int ties_merge_cuda(const TiesMergeParams& params, float* out, void* stream) {
  if (params.numel == 0) return 0;
  cudaStream_t cuda_stream = static_cast<cudaStream_t>(stream);
  const unsigned blocks = static_cast<unsigned>(
      std::max<int64_t>(1, std::min<int64_t>(4096, (params.numel + kThreads - 1) / kThreads)));
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
