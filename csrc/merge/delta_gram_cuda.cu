// CUDA twin of delta_gram_cpu. Compiled by nvcc in every native build (CMakeLists.txt) so that
// CI catches compile errors; it is not yet registered as a torch op (the CUDA issue does that and
// measures it), so it has not run on a GPU.
#include <cuda_runtime.h>

#include "merge/delta_gram.h"

namespace r2m {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxChunksPerPair = 1024;

// blockIdx.y picks the pair (i, j), j <= i; blockIdx.x a strided share of the elements. Each
// block writes one partial sum; a second kernel adds partials in a fixed order, so the result is
// deterministic (no floating-point atomics).
__global__ void delta_gram_partials_kernel(DeltaGramParams params, const void* const* experts,
                                           double* partials) {
  const int64_t pair = blockIdx.y;
  int64_t i = 0;
  while ((i + 1) * (i + 2) / 2 <= pair) ++i;
  const int64_t j = pair - i * (i + 1) / 2;
  double sum = 0.0;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < params.numel;
       e += stride) {
    const double b = load_as_double(params.base, params.kind, e);
    const double di = load_as_double(experts[i], params.kind, e) - b;
    const double dj = load_as_double(experts[j], params.kind, e) - b;
    sum += di * dj;
  }
  __shared__ double shared[kThreads];
  shared[threadIdx.x] = sum;
  __syncthreads();
  for (int width = kThreads / 2; width > 0; width /= 2) {
    if (threadIdx.x < width) shared[threadIdx.x] += shared[threadIdx.x + width];
    __syncthreads();
  }
  if (threadIdx.x == 0) partials[pair * gridDim.x + blockIdx.x] = shared[0];
}

__global__ void delta_gram_finish_kernel(const double* partials, int64_t chunks, int64_t n,
                                         double* gram) {
  const int64_t pair = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (pair >= n * (n + 1) / 2) return;
  int64_t i = 0;
  while ((i + 1) * (i + 2) / 2 <= pair) ++i;
  const int64_t j = pair - i * (i + 1) / 2;
  double sum = 0.0;
  for (int64_t c = 0; c < chunks; ++c) sum += partials[pair * chunks + c];
  gram[i * n + j] += sum;
  if (i != j) gram[j * n + i] += sum;
}

}  // namespace

void delta_gram_cuda(const DeltaGramParams& params, const void* const* experts_device, double* gram,
                     void* stream) {
  if (params.numel == 0 || params.n_experts == 0) return;
  cudaStream_t cuda_stream = static_cast<cudaStream_t>(stream);
  const int64_t pairs = params.n_experts * (params.n_experts + 1) / 2;
  int64_t chunks = (params.numel + kThreads - 1) / kThreads;
  if (chunks > kMaxChunksPerPair) chunks = kMaxChunksPerPair;
  double* partials = nullptr;
  cudaMallocAsync(&partials, sizeof(double) * pairs * chunks, cuda_stream);
  delta_gram_partials_kernel<<<dim3(static_cast<unsigned>(chunks), static_cast<unsigned>(pairs)),
                               kThreads, 0, cuda_stream>>>(params, experts_device, partials);
  const int64_t finish_blocks = (pairs + kThreads - 1) / kThreads;
  delta_gram_finish_kernel<<<static_cast<unsigned>(finish_blocks), kThreads, 0, cuda_stream>>>(
      partials, chunks, params.n_experts, gram);
  cudaFreeAsync(partials, cuda_stream);
}

}  // namespace r2m
