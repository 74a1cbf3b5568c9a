// CUDA twin of delta_gram_cpu: the fused subtract-and-reduce of the Gram pass, float64
// accumulation, deterministic (fixed grid and reduction order, no floating-point atomics).
#include <cuda_runtime.h>

#include <algorithm>

#include "common/cuda_math.cuh"
#include "merge/delta_gram.h"

namespace r2m {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kTilePairs = kDeltaGramGroup * kDeltaGramGroup;
// Enough blocks to fill an H200 several times over; fixed per numel so the sum order is too.
constexpr int64_t kMaxBlocks = 1024;

int64_t grid_blocks(int64_t numel) {
  return std::max<int64_t>(1, std::min<int64_t>(kMaxBlocks, (numel + kThreads - 1) / kThreads));
}

struct Tile {
  int64_t a0, b0;  // first expert of each group
  int na, nb;      // experts in each group (<= kDeltaGramGroup)
  bool diagonal;   // a0 == b0: only pairs (i, j) with j <= i are needed
};

// Pairs a tile accumulates: all kDeltaGramGroup^2 of two different groups, or the lower triangle
// (j <= i) of one group with itself. Held in registers as a flat array in (i, j) order.
template <bool kDiagonal>
__host__ __device__ constexpr int tile_pairs() {
  return kDiagonal ? kDeltaGramGroup * (kDeltaGramGroup + 1) / 2 : kTilePairs;
}

// Each thread reads base and the tile's experts once per element, forms the pair products in
// registers, then the block reduces every pair (warp shuffles, then warps in order). A diagonal
// tile (every tile when N <= 8) keeps only the lower triangle: 36 float64 accumulators instead of
// 64, which roughly halves the registers per thread and doubles the warps an SM can hold.
template <bool kDiagonal>
__global__ void __launch_bounds__(kThreads)
    delta_gram_tile_kernel(DeltaGramParams params, Tile tile, double* partials) {
  const void* a_ptrs[kDeltaGramGroup];
  const void* b_ptrs[kDeltaGramGroup];
#pragma unroll
  for (int i = 0; i < kDeltaGramGroup; ++i) {
    a_ptrs[i] = i < tile.na ? params.experts[tile.a0 + i] : nullptr;
    b_ptrs[i] = !kDiagonal && i < tile.nb ? params.experts[tile.b0 + i] : nullptr;
  }
  double acc[tile_pairs<kDiagonal>()];
#pragma unroll
  for (int p = 0; p < tile_pairs<kDiagonal>(); ++p) acc[p] = 0.0;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; e < params.numel;
       e += stride) {
    const double b = load_as_double(params.base, params.kind, e);
    double da[kDeltaGramGroup];
    double db[kDeltaGramGroup];
#pragma unroll
    for (int i = 0; i < kDeltaGramGroup; ++i) {
      da[i] = i < tile.na ? load_as_double(a_ptrs[i], params.kind, e) - b : 0.0;
    }
#pragma unroll
    for (int j = 0; j < kDeltaGramGroup; ++j) {
      db[j] =
          kDiagonal ? da[j] : (j < tile.nb ? load_as_double(b_ptrs[j], params.kind, e) - b : 0.0);
    }
    int p = 0;
#pragma unroll
    for (int i = 0; i < kDeltaGramGroup; ++i) {
#pragma unroll
      for (int j = 0; j < (kDiagonal ? i + 1 : kDeltaGramGroup); ++j) acc[p++] += da[i] * db[j];
    }
  }
  __shared__ double warp_sums[kWarps][kTilePairs];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  int p = 0;
#pragma unroll
  for (int i = 0; i < kDeltaGramGroup; ++i) {
#pragma unroll
    for (int j = 0; j < (kDiagonal ? i + 1 : kDeltaGramGroup); ++j) {
      double value = acc[p++];
      for (int offset = 16; offset > 0; offset >>= 1) {
        value += __shfl_down_sync(0xffffffffu, value, offset);
      }
      if (lane == 0) warp_sums[warp][i * kDeltaGramGroup + j] = value;
    }
  }
  __syncthreads();
  // Slots of pairs a diagonal tile does not hold are never read (the finish kernel skips them).
  if (threadIdx.x < kTilePairs) {
    double sum = 0.0;
    for (int w = 0; w < kWarps; ++w) sum += warp_sums[w][threadIdx.x];
    partials[static_cast<int64_t>(blockIdx.x) * kTilePairs + threadIdx.x] = sum;
  }
}

// Sums the blocks' partials in block order and adds each pair into both halves of the Gram.
__global__ void delta_gram_finish_kernel(const double* partials, int64_t blocks, Tile tile,
                                         int64_t n, double* gram) {
  const int pair = threadIdx.x;
  const int i = pair / kDeltaGramGroup;
  const int j = pair % kDeltaGramGroup;
  if (pair >= kTilePairs || i >= tile.na || j >= tile.nb || (tile.diagonal && j > i)) return;
  double sum = 0.0;
  for (int64_t block = 0; block < blocks; ++block) sum += partials[block * kTilePairs + pair];
  const int64_t row = tile.a0 + i;
  const int64_t column = tile.b0 + j;
  gram[row * n + column] += sum;
  if (row != column) gram[column * n + row] += sum;
}

}  // namespace

int64_t delta_gram_cuda_workspace(int64_t numel) { return grid_blocks(numel) * kTilePairs; }

int delta_gram_cuda(const DeltaGramParams& params, double* workspace, double* gram, void* stream) {
  if (params.numel == 0 || params.n_experts == 0) return 0;
  cudaStream_t cuda_stream = static_cast<cudaStream_t>(stream);
  const int64_t blocks = grid_blocks(params.numel);
  // Tiles run one after another on the stream and so can share the workspace.
  for (int64_t a0 = 0; a0 < params.n_experts; a0 += kDeltaGramGroup) {
    for (int64_t b0 = 0; b0 <= a0; b0 += kDeltaGramGroup) {
      const Tile tile{
          a0, b0, static_cast<int>(std::min<int64_t>(kDeltaGramGroup, params.n_experts - a0)),
          static_cast<int>(std::min<int64_t>(kDeltaGramGroup, params.n_experts - b0)), a0 == b0};
      if (tile.diagonal) {
        delta_gram_tile_kernel<true>
            <<<static_cast<unsigned>(blocks), kThreads, 0, cuda_stream>>>(params, tile, workspace);
      } else {
        delta_gram_tile_kernel<false>
            <<<static_cast<unsigned>(blocks), kThreads, 0, cuda_stream>>>(params, tile, workspace);
      }
      delta_gram_finish_kernel<<<1, kTilePairs, 0, cuda_stream>>>(workspace, blocks, tile,
                                                                  params.n_experts, gram);
    }
  }
  return static_cast<int>(cudaGetLastError());
}

}  // namespace r2m
