#include <algorithm>
#include <cstdint>
#include <cstring>

#include "common/cpu_clones.h"
#include "merge/combine.h"

namespace r2m {
namespace {

// Three kernels, all with the same operations in the same order per element (so the same bits):
// out = base_weight * b, then for each expert j in order, unless its weight is zero,
// out += weight * (x_j - b). Which kernel runs is a matter of speed alone: combine_lanes keeps
// the sums in vector registers (8 experts of 3072 x 768 float32, 2 threads, AVX-512, one output:
// 2.0-2.5 ms; eight outputs 9.8 ms against 11.7-12.0 ms with combine_typed, where the memory
// traffic alone is 5.6 ms).

// Any number of experts: one pass per expert over the block, the difference formed once and
// added into every output's block-long row.
template <typename In, typename Acc>
R2M_ALWAYS_INLINE void combine_typed(const CombineParams& params, int64_t block, Acc* out,
                                     Acc* diff) {
  const int64_t begin = block * kCombineBlock;
  const int64_t count = std::min(kCombineBlock, params.numel - begin);
  const In* base = static_cast<const In*>(params.base) + begin;
  for (int64_t k = 0; k < params.n_outputs; ++k) {
    Acc* row = out + k * params.numel + begin;
    const Acc scale = static_cast<Acc>(params.base_weight);
    for (int64_t e = 0; e < count; ++e) row[e] = scale * static_cast<Acc>(widen(base[e]));
  }
  for (int64_t j = 0; j < params.n_experts; ++j) {
    const In* expert = static_cast<const In*>(params.experts[j]) + begin;
    for (int64_t e = 0; e < count; ++e) {
      diff[e] = static_cast<Acc>(widen(expert[e])) - static_cast<Acc>(widen(base[e]));
    }
    for (int64_t k = 0; k < params.n_outputs; ++k) {
      const Acc weight = static_cast<Acc>(params.weights[k * params.n_experts + j]);
      if (weight == Acc(0)) continue;
      Acc* row = out + k * params.numel + begin;
      for (int64_t e = 0; e < count; ++e) row[e] += weight * diff[e];
    }
  }
}

// Elements summed side by side in one vector: 16 floats fill an AVX-512 register.
constexpr int64_t kLanes = 16;

// kLanes accumulators as one GCC vector, its elementwise IEEE operations those of the scalar
// loop (as an array of 16 floats, the sums stayed in 16 scalar registers or went through the
// stack, one lane per instruction).
template <typename Acc>
struct LanesOf;
template <>
struct LanesOf<float> {
  typedef float type __attribute__((vector_size(kLanes * sizeof(float))));
};
template <>
struct LanesOf<double> {
  typedef double type __attribute__((vector_size(kLanes * sizeof(double))));
};
template <typename Acc>
using Lanes = typename LanesOf<Acc>::type;

template <typename Acc>
R2M_ALWAYS_INLINE void load_lanes(const Acc* from, Lanes<Acc>& lanes) {
  std::memcpy(&lanes, from, sizeof(lanes));
}

// `count` <= kLanes elements widened to Acc, zeros past them.
template <typename In, typename Acc>
R2M_ALWAYS_INLINE void widen_lanes(const In* from, int64_t count, Lanes<Acc>& lanes) {
  Acc widened[kLanes] = {};
  if (count == kLanes) {
    for (int64_t e = 0; e < kLanes; ++e) widened[e] = static_cast<Acc>(widen(from[e]));
  } else {
    for (int64_t e = 0; e < count; ++e) widened[e] = static_cast<Acc>(widen(from[e]));
  }
  load_lanes(widened, lanes);
}

template <typename Acc>
R2M_ALWAYS_INLINE void store_lanes(Acc* to, const Lanes<Acc>& lanes, int64_t count) {
  if (count == kLanes) {
    std::memcpy(to, &lanes, sizeof(lanes));
  } else {
    for (int64_t e = 0; e < count; ++e) to[e] = lanes[e];
  }
}

// One output (an average, task arithmetic, a merged tensor): kLanes elements at a time are summed
// in a register while every expert's difference is added in; nothing passes through a scratch row.
template <typename In, typename Acc>
R2M_ALWAYS_INLINE void combine_one_output(const CombineParams& params, int64_t block, Acc* out) {
  const int64_t begin = block * kCombineBlock;
  const int64_t count = std::min(kCombineBlock, params.numel - begin);
  const In* base = static_cast<const In*>(params.base) + begin;
  const Acc scale = static_cast<Acc>(params.base_weight);
  Acc* row = out + begin;
  for (int64_t first = 0; first < count; first += kLanes) {
    const int64_t lanes = std::min(kLanes, count - first);
    // Lanes past the block's end hold zeros: computed, never stored.
    Lanes<Acc> b, x;
    widen_lanes<In, Acc>(base + first, lanes, b);
    Lanes<Acc> sum = scale * b;
    for (int64_t j = 0; j < params.n_experts; ++j) {
      const Acc weight = static_cast<Acc>(params.weights[j]);
      if (weight == Acc(0)) continue;
      const In* expert = static_cast<const In*>(params.experts[j]) + begin + first;
      widen_lanes<In, Acc>(expert, lanes, x);
      sum += weight * (x - b);
    }
    store_lanes(row + first, sum, lanes);
  }
}

// Several outputs (R²M's residuals: N of them) of up to 255 experts: over a span of the block,
// the base and every expert's difference are formed once into `scratch` (span x (N + 1), in the
// L1 cache); then the outputs are summed kOutputsAtOnce side by side, kLanes elements at a time
// in registers, and each stored once. Per element: N + 1 reads and K writes, where combine_typed
// passes over a block-long row per (expert, output) pair.
constexpr int64_t kOutputsAtOnce = 8;

template <typename In, typename Acc>
R2M_ALWAYS_INLINE void combine_lanes(const CombineParams& params, int64_t block, Acc* out,
                                     Acc* scratch) {
  const int64_t begin = block * kCombineBlock;
  const int64_t count = std::min(kCombineBlock, params.numel - begin);
  const In* base = static_cast<const In*>(params.base) + begin;
  const Acc scale = static_cast<Acc>(params.base_weight);
  const int64_t n = params.n_experts;
  // At most 512 elements: the span's N + 1 rows (18 KB for 8 float32 experts) then stay in the
  // L1 cache while every output reads them.
  const int64_t span = std::min<int64_t>(512, kCombineBlock / (n + 1) / kLanes * kLanes);
  Acc* b = scratch;
  Acc* diff = scratch + span;  // expert j's differences at diff + j * span
  for (int64_t start = 0; start < count; start += span) {
    const int64_t length = std::min(span, count - start);
    // Lanes past the block's end hold zeros: computed, never stored.
    const int64_t padded = (length + kLanes - 1) / kLanes * kLanes;
    for (int64_t e = 0; e < length; ++e) b[e] = static_cast<Acc>(widen(base[start + e]));
    std::fill(b + length, b + padded, Acc(0));
    for (int64_t j = 0; j < n; ++j) {
      const In* expert = static_cast<const In*>(params.experts[j]) + begin + start;
      Acc* d = diff + j * span;
      for (int64_t e = 0; e < length; ++e) d[e] = static_cast<Acc>(widen(expert[e])) - b[e];
      std::fill(d + length, d + padded, Acc(0));
    }
    // Side by side, as each sum is a chain of dependent adds: one chain at a time waited on the
    // add latency (12.0 ms on the case above, against 9.8).
    for (int64_t group = 0; group < params.n_outputs; group += kOutputsAtOnce) {
      const int64_t outputs = std::min(kOutputsAtOnce, params.n_outputs - group);
      const double* weights = params.weights + group * n;
      for (int64_t first = 0; first < padded; first += kLanes) {
        Lanes<Acc> scaled, d;
        load_lanes(b + first, scaled);
        scaled = scale * scaled;
        Lanes<Acc> sums[kOutputsAtOnce];
        for (int64_t g = 0; g < kOutputsAtOnce; ++g) sums[g] = scaled;
        for (int64_t j = 0; j < n; ++j) {
          load_lanes(diff + j * span + first, d);
          for (int64_t g = 0; g < kOutputsAtOnce; ++g) {
            const Acc weight = g < outputs ? static_cast<Acc>(weights[g * n + j]) : Acc(0);
            if (weight != Acc(0)) sums[g] += weight * d;
          }
        }
        const int64_t lanes = std::min(kLanes, length - first);
        for (int64_t g = 0; g < outputs; ++g) {
          store_lanes(out + (group + g) * params.numel + begin + start + first, sums[g], lanes);
        }
      }
    }
  }
}

template <typename In, typename Acc>
R2M_ALWAYS_INLINE void combine_dispatch(const CombineParams& params, int64_t block, Acc* out,
                                        Acc* diff) {
  if (params.n_outputs == 1) return combine_one_output<In, Acc>(params, block, out);
  // `diff` holds kCombineBlock accumulators: a span of at least one lane for up to 255 experts.
  if ((params.n_experts + 1) * kLanes <= kCombineBlock) {
    return combine_lanes<In, Acc>(params, block, out, diff);
  }
  combine_typed<In, Acc>(params, block, out, diff);
}

template <typename Acc>
R2M_ALWAYS_INLINE void combine_block_of_kind(const CombineParams& params, int64_t block, Acc* out,
                                             Acc* scratch) {
  dispatch_kind(params.kind, [&](auto tag) R2M_INLINE_LAMBDA {
    combine_dispatch<decltype(tag), Acc>(params, block, out, scratch);
  });
}

// The compiled-per-vector-width entries (common/cpu_clones.h), one per accumulator type.
R2M_CPU_CLONES void combine_block_clones(const CombineParams& params, int64_t block, float* out,
                                         float* scratch) {
  combine_block_of_kind<float>(params, block, out, scratch);
}

R2M_CPU_CLONES void combine_block_clones(const CombineParams& params, int64_t block, double* out,
                                         double* scratch) {
  combine_block_of_kind<double>(params, block, out, scratch);
}

}  // namespace

template <typename Acc>
void combine_block_cpu(const CombineParams& params, int64_t block, Acc* out, Acc* scratch) {
  combine_block_clones(params, block, out, scratch);
}

template void combine_block_cpu<float>(const CombineParams&, int64_t, float*, float*);
template void combine_block_cpu<double>(const CombineParams&, int64_t, double*, double*);

}  // namespace r2m
