// CUDA twin of combine_block_cpu: K linear combinations of task vectors in one pass over the
// inputs, with the output cast fused into the store.
#include <cuda_runtime.h>

#include <algorithm>

#include "common/cuda_math.cuh"
#include "merge/combine.h"

namespace r2m {
namespace {

constexpr int kThreads = 256;
// Outputs held in registers per element; more outputs are done in further sweeps of the inputs.
constexpr int kOutputsPerSweep = 16;

template <typename Acc>
__global__ void __launch_bounds__(kThreads)
    combine_kernel(CombineParams params, int64_t first_output, int outputs, ScalarKind out_kind,
                   void* out) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  const Acc base_weight = static_cast<Acc>(params.base_weight);
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; e < params.numel;
       e += stride) {
    const Acc b = load_as<Acc>(params.base, params.kind, e);
    Acc sums[kOutputsPerSweep];
#pragma unroll
    for (int k = 0; k < kOutputsPerSweep; ++k) sums[k] = mul_rn(base_weight, b);
    // Expert order, then output order, as on the CPU: each element's sum has a fixed order.
    for (int64_t j = 0; j < params.n_experts; ++j) {
      const Acc diff = sub_rn(load_as<Acc>(params.experts[j], params.kind, e), b);
#pragma unroll
      for (int k = 0; k < kOutputsPerSweep; ++k) {
        if (k >= outputs) break;
        const Acc weight =
            static_cast<Acc>(__ldg(params.weights + (first_output + k) * params.n_experts + j));
        if (weight != Acc(0)) sums[k] = add_rn(sums[k], mul_rn(weight, diff));
      }
    }
#pragma unroll
    for (int k = 0; k < kOutputsPerSweep; ++k) {
      if (k >= outputs) break;
      store_as(out, out_kind, (first_output + k) * params.numel + e, sums[k]);
    }
  }
}

}  // namespace

int combine_cuda(const CombineParams& params, bool accumulate_in_double, ScalarKind out_kind,
                 void* out, void* stream) {
  if (params.numel == 0 || params.n_outputs == 0) return 0;
  cudaStream_t cuda_stream = static_cast<cudaStream_t>(stream);
  const unsigned blocks = elementwise_blocks(params.numel, kThreads);
  for (int64_t first = 0; first < params.n_outputs; first += kOutputsPerSweep) {
    const int outputs =
        static_cast<int>(std::min<int64_t>(kOutputsPerSweep, params.n_outputs - first));
    if (accumulate_in_double) {
      combine_kernel<double>
          <<<blocks, kThreads, 0, cuda_stream>>>(params, first, outputs, out_kind, out);
    } else {
      combine_kernel<float>
          <<<blocks, kThreads, 0, cuda_stream>>>(params, first, outputs, out_kind, out);
    }
  }
  return static_cast<int>(cudaGetLastError());
}

}  // namespace r2m
