// CUDA twin of dare_merge_cpu: one thread per element, the masked task vectors summed over the
// experts in order with explicit rounding (no fused multiply-add), so each element's bits equal
// the CPU kernel's. A non-finite task-vector entry, kept or dropped, sets `nonfinite`.
#include <cuda_runtime.h>

#include "common/cuda_math.cuh"
#include "merge/dare_merge.h"

namespace r2m {
namespace {

constexpr int kThreads = 256;

template <typename In>
__global__ void __launch_bounds__(kThreads)
    dare_merge_kernel(DareMergeParams params, float* out, int* nonfinite) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  bool seen = false;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; e < params.numel;
       e += stride) {
    const float base = to_float(static_cast<const In*>(params.base)[e]);
    float total = 0.0f;
    for (int64_t i = 0; i < params.n_experts; ++i) {
      const float task = sub_rn(to_float(static_cast<const In*>(params.experts[i])[e]), base);
      seen |= !isfinite(task);
      total = add_rn(total, dare_masked(params.mask, i,
                                        static_cast<uint64_t>(params.mask.first_index + e), task));
    }
    out[e] = add_rn(base, mul_rn(params.lam, total));
  }
  if (seen) atomicExch(nonfinite, 1);
}

}  // namespace

int dare_merge_cuda(const DareMergeParams& params, float* out, int* nonfinite, void* stream) {
  if (params.numel == 0) return 0;
  cudaStream_t cuda_stream = static_cast<cudaStream_t>(stream);
  const unsigned blocks = elementwise_blocks(params.numel, kThreads);
  dispatch_kind(params.kind, [&](auto tag) {
    dare_merge_kernel<decltype(tag)><<<blocks, kThreads, 0, cuda_stream>>>(params, out, nonfinite);
  });
  return static_cast<int>(cudaGetLastError());
}

}  // namespace r2m
