#include <algorithm>

#include "common/cpu_clones.h"
#include "merge/dare_merge.h"

namespace r2m {

namespace {

// Elements handled together: their base and sums stay in the L1 cache while each expert's row
// streams through once.
constexpr int64_t kChunk = 256;

template <typename In>
R2M_ALWAYS_INLINE float dare_merge_typed(const DareMergeParams& params, int64_t begin, int64_t end,
                                         float* out) {
  float base[kChunk], total[kChunk];
  float probe = 0.0f;
  for (int64_t start = begin; start < end; start += kChunk) {
    const int64_t n = std::min(kChunk, end - start);
    const In* base_in = static_cast<const In*>(params.base) + start;
    for (int64_t e = 0; e < n; ++e) {
      base[e] = to_float(base_in[e]);
      total[e] = 0.0f;
    }
    for (int64_t i = 0; i < params.n_experts; ++i) {
      const In* expert = static_cast<const In*>(params.experts[i]) + start;
      const uint64_t first = static_cast<uint64_t>(params.mask.first_index + start);
      for (int64_t e = 0; e < n; ++e) {
        const float task = to_float(expert[e]) - base[e];
        probe += task * 0.0f;
        total[e] += dare_masked(params.mask, i, first + static_cast<uint64_t>(e), task);
      }
    }
    for (int64_t e = 0; e < n; ++e) {
      const float scaled = params.lam * total[e];
      out[start + e] = base[e] + scaled;
    }
  }
  return probe == 0.0f ? 0.0f : probe;
}

}  // namespace

R2M_CPU_CLONES float dare_merge_cpu(const DareMergeParams& params, int64_t begin, int64_t end,
                                    float* out) {
  return dispatch_kind(params.kind, [&](auto tag) R2M_INLINE_LAMBDA {
    return dare_merge_typed<decltype(tag)>(params, begin, end, out);
  });
}

}  // namespace r2m
