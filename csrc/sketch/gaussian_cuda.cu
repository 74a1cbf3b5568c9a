// CUDA twin of sketch_columns_cpu: the same counter-based Gaussian entries, computed where the
// sketch is used so the randomized SVD never copies a test matrix from the host.
#include <cuda_runtime.h>

#include <algorithm>

#include "sketch/gaussian.h"

namespace r2m {
namespace {

constexpr int kThreads = 256;

__global__ void sketch_kernel(uint64_t stream, int64_t rows, int64_t columns, float* out) {
  const int64_t total = rows * columns;
  const int64_t step = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < total;
       i += step) {
    out[i] = static_cast<float>(sketch_gaussian(stream, rows, i / columns, i % columns));
  }
}

}  // namespace

int sketch_matrix_cuda(uint64_t seed, uint64_t key, int64_t rows, int64_t columns, float* out,
                       void* stream) {
  const int64_t total = rows * columns;
  if (total == 0) return 0;
  const int64_t blocks = std::min<int64_t>(4096, (total + kThreads - 1) / kThreads);
  sketch_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      sketch_stream(seed, key), rows, columns, out);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace r2m
