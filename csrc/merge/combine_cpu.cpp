#include <algorithm>
#include <cstdint>

#include "merge/combine.h"

namespace r2m {
namespace {

// One pass per expert over the block: the difference is formed once and added into every
// output, in expert order, so each element's sum has a fixed order.
template <typename In, typename Acc>
void combine_typed(const CombineParams& params, int64_t block, Acc* out, Acc* diff) {
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

}  // namespace

template <typename Acc>
void combine_block_cpu(const CombineParams& params, int64_t block, Acc* out, Acc* scratch) {
  switch (params.kind) {
    case ScalarKind::kFloat32:
      return combine_typed<float, Acc>(params, block, out, scratch);
    case ScalarKind::kFloat64:
      return combine_typed<double, Acc>(params, block, out, scratch);
    case ScalarKind::kBFloat16:
      return combine_typed<BFloat16Bits, Acc>(params, block, out, scratch);
    case ScalarKind::kFloat16:
      return combine_typed<Float16Bits, Acc>(params, block, out, scratch);
  }
}

template void combine_block_cpu<float>(const CombineParams&, int64_t, float*, float*);
template void combine_block_cpu<double>(const CombineParams&, int64_t, double*, double*);

}  // namespace r2m
