// CUDA twin of delta_gram_cpu: the fused subtract-and-reduce of the Gram pass, float64
// accumulation, deterministic (fixed grid and reduction order, no floating-point atomics).
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "common/cuda_math.cuh"
#include "merge/delta_gram.h"

namespace r2m {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kTilePairs = kDeltaGramGroup * kDeltaGramGroup;
// A fixed grid, so the order of the sum is fixed per numel: 4 waves of 2 blocks on each of the
// 132 SMs of an H100/H200 (the register count allows 2 blocks of 256 threads per SM).
constexpr int64_t kMaxBlocks = 1056;
// Bytes each thread loads from every input per step. One scalar 2-byte load per input reached 0.08
// of the copy bandwidth on an H200: too few bytes in flight to cover the memory latency. 8-byte
// loads of 9 inputs, with 2 blocks of 256 threads per SM, keep ~37 KB in flight per SM; 16-byte
// loads would too, but need ~190 registers for bf16 (1 block per SM) or spill at 128.
constexpr int kVectorBytes = 8;

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

// kVectorBytes of elements of type T, loaded as one 16-byte access.
template <typename T>
struct alignas(kVectorBytes) Pack {
  static constexpr int kSize = kVectorBytes / sizeof(T);
  T values[kSize];
};

template <typename T>
__device__ __forceinline__ Pack<T> load_pack(const void* data, int64_t index) {
  Pack<T> pack;
  if constexpr (kVectorBytes == 16) {
    const uint4 raw = __ldg(static_cast<const uint4*>(data) + index);
    memcpy(&pack, &raw, sizeof(pack));
  } else {
    const uint2 raw = __ldg(static_cast<const uint2*>(data) + index);
    memcpy(&pack, &raw, sizeof(pack));
  }
  return pack;
}

// The pair products of one element: da / db are the two groups' differences from the base.
template <bool kDiagonal>
__device__ __forceinline__ void accumulate_pairs(const double (&da)[kDeltaGramGroup],
                                                 const double (&db)[kDeltaGramGroup],
                                                 double (&acc)[tile_pairs<kDiagonal>()]) {
  int p = 0;
#pragma unroll
  for (int i = 0; i < kDeltaGramGroup; ++i) {
#pragma unroll
    for (int j = 0; j < (kDiagonal ? i + 1 : kDeltaGramGroup); ++j) acc[p++] += da[i] * db[j];
  }
}

// Each thread reads base and the tile's experts, 16 bytes of each at a time, forms the pair
// products in registers, then the block reduces every pair (warp shuffles, then warps in order).
// A diagonal tile (every tile when N <= 8) keeps only the lower triangle: 36 float64
// accumulators instead of 64, which roughly halves the registers per thread. Inputs whose
// pointers are not all 16-byte aligned (row-block views) take the element-wise loop.
template <typename T, bool kDiagonal>
__global__ void __launch_bounds__(kThreads, kDiagonal ? 2 : 1)
    delta_gram_tile_kernel(DeltaGramParams params, Tile tile, double* partials) {
  const void* a_ptrs[kDeltaGramGroup];
  const void* b_ptrs[kDeltaGramGroup];
  bool aligned = reinterpret_cast<uintptr_t>(params.base) % kVectorBytes == 0;
#pragma unroll
  for (int i = 0; i < kDeltaGramGroup; ++i) {
    a_ptrs[i] = i < tile.na ? params.experts[tile.a0 + i] : nullptr;
    b_ptrs[i] = !kDiagonal && i < tile.nb ? params.experts[tile.b0 + i] : nullptr;
    aligned &= reinterpret_cast<uintptr_t>(a_ptrs[i]) % kVectorBytes == 0;
    aligned &= reinterpret_cast<uintptr_t>(b_ptrs[i]) % kVectorBytes == 0;
  }
  double acc[tile_pairs<kDiagonal>()];
#pragma unroll
  for (int p = 0; p < tile_pairs<kDiagonal>(); ++p) acc[p] = 0.0;
  constexpr int kPack = Pack<T>::kSize;
  const int64_t packs = aligned ? params.numel / kPack : 0;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  for (int64_t v = first; v < packs; v += stride) {
    // Every load of the step is issued before the first use.
    const Pack<T> base = load_pack<T>(params.base, v);
    Pack<T> a[kDeltaGramGroup];
    Pack<T> b[kDiagonal ? 1 : kDeltaGramGroup];
#pragma unroll
    for (int i = 0; i < kDeltaGramGroup; ++i) {
      if (i < tile.na) a[i] = load_pack<T>(a_ptrs[i], v);
      if (!kDiagonal && i < tile.nb) b[kDiagonal ? 0 : i] = load_pack<T>(b_ptrs[i], v);
    }
#pragma unroll
    for (int k = 0; k < kPack; ++k) {
      const double origin = widen(base.values[k]);
      double da[kDeltaGramGroup];
      double db[kDeltaGramGroup];
#pragma unroll
      for (int i = 0; i < kDeltaGramGroup; ++i) {
        da[i] = i < tile.na ? widen(a[i].values[k]) - origin : 0.0;
      }
#pragma unroll
      for (int j = 0; j < kDeltaGramGroup; ++j) {
        db[j] = kDiagonal ? da[j]
                          : (j < tile.nb ? widen(b[kDiagonal ? 0 : j].values[k]) - origin : 0.0);
      }
      accumulate_pairs<kDiagonal>(da, db, acc);
    }
  }
  // The elements after the last whole pack, or all of them when unaligned.
  for (int64_t e = packs * kPack + first; e < params.numel; e += stride) {
    const double origin = widen(static_cast<const T*>(params.base)[e]);
    double da[kDeltaGramGroup];
    double db[kDeltaGramGroup];
#pragma unroll
    for (int i = 0; i < kDeltaGramGroup; ++i) {
      da[i] = i < tile.na ? widen(static_cast<const T*>(a_ptrs[i])[e]) - origin : 0.0;
    }
#pragma unroll
    for (int j = 0; j < kDeltaGramGroup; ++j) {
      db[j] = kDiagonal ? da[j]
                        : (j < tile.nb ? widen(static_cast<const T*>(b_ptrs[j])[e]) - origin : 0.0);
    }
    accumulate_pairs<kDiagonal>(da, db, acc);
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

// One block per pair: sums the blocks' partials in a fixed tree order and adds the pair into both
// halves of the Gram. (One thread per pair summing 1056 partials serially waited on each load.)
constexpr int kFinishThreads = 256;

__global__ void __launch_bounds__(kFinishThreads)
    delta_gram_finish_kernel(const double* partials, int64_t blocks, Tile tile, int64_t n,
                             double* gram) {
  const int pair = blockIdx.x;
  const int i = pair / kDeltaGramGroup;
  const int j = pair % kDeltaGramGroup;
  if (i >= tile.na || j >= tile.nb || (tile.diagonal && j > i)) return;
  double sum = 0.0;
  for (int64_t block = threadIdx.x; block < blocks; block += kFinishThreads) {
    sum += partials[block * kTilePairs + pair];
  }
  __shared__ double sums[kFinishThreads];
  sums[threadIdx.x] = sum;
  __syncthreads();
  for (int half = kFinishThreads / 2; half > 0; half /= 2) {
    if (threadIdx.x < half) sums[threadIdx.x] += sums[threadIdx.x + half];
    __syncthreads();
  }
  if (threadIdx.x != 0) return;
  const int64_t row = tile.a0 + i;
  const int64_t column = tile.b0 + j;
  gram[row * n + column] += sums[0];
  if (row != column) gram[column * n + row] += sums[0];
}

template <typename T>
void launch_tile(const DeltaGramParams& params, const Tile& tile, int64_t blocks, double* workspace,
                 cudaStream_t stream) {
  if (tile.diagonal) {
    delta_gram_tile_kernel<T, true>
        <<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(params, tile, workspace);
  } else {
    delta_gram_tile_kernel<T, false>
        <<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(params, tile, workspace);
  }
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
      dispatch_kind(params.kind, [&](auto tag) {
        launch_tile<decltype(tag)>(params, tile, blocks, workspace, cuda_stream);
      });
      delta_gram_finish_kernel<<<kTilePairs, kFinishThreads, 0, cuda_stream>>>(
          workspace, blocks, tile, params.n_experts, gram);
    }
  }
  return static_cast<int>(cudaGetLastError());
}

}  // namespace r2m
