// Device helpers shared by the CUDA kernels: loads widened to the accumulator type, stores
// narrowed to any output kind, and arithmetic with explicit rounding. nvcc contracts a * b + c into
// one fused multiply-add by default, which rounds once where the CPU kernels round twice; the
// _rn intrinsics keep the two devices' results bit-identical.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common/scalar.h"

namespace r2m {

__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ float sub_rn(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ double sub_rn(double a, double b) { return __dsub_rn(a, b); }

// Blocks for a grid-stride elementwise kernel over `numel` elements: one per `threads` elements,
// at least 1 and at most 4096 (the grid-stride loop covers the rest).
inline unsigned elementwise_blocks(int64_t numel, int threads) {
  const int64_t wanted = (numel + threads - 1) / threads;
  return static_cast<unsigned>(wanted < 1 ? 1 : (wanted > 4096 ? 4096 : wanted));
}

// Element i of a buffer of `kind`, widened exactly (every input kind is exact in double, and
// float32/16-bit inputs are exact in float).
template <typename Acc>
__device__ __forceinline__ Acc load_as(const void* data, ScalarKind kind, int64_t i) {
  return static_cast<Acc>(load_as_double(data, kind, i));
}

// Narrowing as torch's .to(dtype) does it: double -> float -> 16-bit, round to nearest even.
template <typename Acc>
__device__ __forceinline__ void store_as(void* data, ScalarKind kind, int64_t i, Acc value) {
  switch (kind) {
    case ScalarKind::kFloat32:
      static_cast<float*>(data)[i] = static_cast<float>(value);
      return;
    case ScalarKind::kFloat64:
      static_cast<double*>(data)[i] = static_cast<double>(value);
      return;
    case ScalarKind::kBFloat16:
      static_cast<__nv_bfloat16*>(data)[i] = __float2bfloat16_rn(static_cast<float>(value));
      return;
    case ScalarKind::kFloat16:
      static_cast<__half*>(data)[i] = __float2half_rn(static_cast<float>(value));
      return;
  }
}

}  // namespace r2m
