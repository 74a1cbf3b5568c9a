// CUDA twin of magnitude_histogram_cpu: one thread per element and task-row sweep, counting into
// global int64 bins. Lanes of a warp that count the same bin are combined first (one atomic per
// distinct bin per warp), since the first pass's bins cluster by exponent. Integer counts: the
// same result as the CPU for any launch shape.
#include <cuda_runtime.h>

#include "common/cuda_math.cuh"
#include "merge/magnitude_histogram.h"

namespace r2m {
namespace {

constexpr int kThreads = 256;

template <typename In, bool Masked>
__global__ void __launch_bounds__(kThreads)
    histogram_kernel(MagnitudeHistogramParams params, unsigned long long* counts) {
  const uint32_t bins = uint32_t{1} << params.width;
  const uint32_t digit_mask = bins - 1;
  const int above = params.shift + params.width;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  const In* base = static_cast<const In*>(params.base);
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; e < params.numel;
       e += stride) {
    const float b = to_float(base[e]);
    for (int64_t i = 0; i < params.n_experts; ++i) {
      float task = sub_rn(to_float(static_cast<const In*>(params.experts[i])[e]), b);
      if constexpr (Masked) {
        task =
            dare_masked(params.mask, i, static_cast<uint64_t>(params.mask.first_index + e), task);
      }
      const uint64_t bits = magnitude_bits(task);
      const bool counted = (bits >> above) == static_cast<uint64_t>(params.prefixes[i]);
      const uint32_t bin =
          counted ? static_cast<uint32_t>(bits >> params.shift) & digit_mask : bins;
      // The lanes still in the loop, grouped by bin; each group's lowest lane adds its size.
      const unsigned active = __activemask();
      const unsigned peers = __match_any_sync(active, bin);
      if (counted && (threadIdx.x % 32) == static_cast<unsigned>(__ffs(peers) - 1)) {
        atomicAdd(counts + i * bins + bin, static_cast<unsigned long long>(__popc(peers)));
      }
    }
  }
}

}  // namespace

int magnitude_histogram_cuda(const MagnitudeHistogramParams& params, int64_t* counts,
                             void* stream) {
  if (params.numel == 0 || params.n_experts == 0) return 0;
  cudaStream_t cuda_stream = static_cast<cudaStream_t>(stream);
  const unsigned blocks = elementwise_blocks(params.numel, kThreads);
  auto* out = reinterpret_cast<unsigned long long*>(counts);
  dispatch_kind(params.kind, [&](auto tag) {
    if (params.mask.streams != nullptr) {
      histogram_kernel<decltype(tag), true><<<blocks, kThreads, 0, cuda_stream>>>(params, out);
    } else {
      histogram_kernel<decltype(tag), false><<<blocks, kThreads, 0, cuda_stream>>>(params, out);
    }
  });
  return static_cast<int>(cudaGetLastError());
}

}  // namespace r2m
