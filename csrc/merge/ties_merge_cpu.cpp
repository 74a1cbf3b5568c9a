#include "merge/ties_merge.h"

namespace r2m {

namespace {

template <typename In>
void ties_merge_typed(const TiesMergeParams& params, int64_t begin, int64_t end, float* out) {
  for (int64_t e = begin; e < end; ++e) out[e] = ties_merge_element<In>(params, e);
}

}  // namespace

void ties_merge_cpu(const TiesMergeParams& params, int64_t begin, int64_t end, float* out) {
  switch (params.kind) {
    case ScalarKind::kFloat32:
      return ties_merge_typed<float>(params, begin, end, out);
    case ScalarKind::kFloat64:
      return ties_merge_typed<double>(params, begin, end, out);
    case ScalarKind::kBFloat16:
      return ties_merge_typed<BFloat16Bits>(params, begin, end, out);
    case ScalarKind::kFloat16:
      return ties_merge_typed<Float16Bits>(params, begin, end, out);
  }
}

}  // namespace r2m
