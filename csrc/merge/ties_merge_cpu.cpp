#include <algorithm>
#include <vector>

#include "common/cpu_clones.h"
#include "merge/ties_merge.h"

namespace r2m {

namespace {

// Elements handled together: their base, sums and counts stay in the L1 cache while each
// expert's row streams through once per loop.
constexpr int64_t kChunk = 256;

// Task `i`'s value at element `e`: the difference, or under DARE's mask what the mask leaves. A
// template argument, not a test per element: the test kept the unmasked loops from vectorising
// (the merge pass of TIES on ViT-B/16 x 8 went from 1.0 to 1.9 s).
template <bool Masked>
R2M_ALWAYS_INLINE float task_value(const TiesMergeParams& params, int64_t i, int64_t e,
                                   float difference) {
  if constexpr (!Masked) return difference;
  return dare_masked(params.mask, i, static_cast<uint64_t>(params.mask.first_index + e),
                     difference);
}

// Every choice is made on bit patterns (ties_merge.h). The float arithmetic (the subtraction, the
// sums in expert order, the division, the product and the final sum) is that of the spec's
// formula, element by element.
template <typename In, bool Masked>
R2M_ALWAYS_INLINE void ties_merge_typed(const TiesMergeParams& params, int64_t begin, int64_t end,
                                        float* out) {
  float base[kChunk], sum[kChunk], agreeing[kChunk], count[kChunk];
  // Under DARE's mask, each task value of the chunk as the first loop formed it: the mask (a
  // SplitMix64 hash per element and task) is drawn once, not again in the second loop (DARE-TIES
  // merge pass on ViT-B/16 x 8: the hashes were two thirds of its time).
  std::vector<float> masked(Masked ? params.n_experts * kChunk : 0);
  for (int64_t start = begin; start < end; start += kChunk) {
    const int64_t n = std::min(kChunk, end - start);
    const In* base_in = static_cast<const In*>(params.base) + start;
    for (int64_t e = 0; e < n; ++e) {
      base[e] = to_float(base_in[e]);
      sum[e] = 0.0f;
      agreeing[e] = 0.0f;
      count[e] = 0.0f;
    }
    for (int64_t i = 0; i < params.n_experts; ++i) {
      const In* expert = static_cast<const In*>(params.experts[i]) + start;
      const uint32_t threshold = float_bits(params.thresholds[i]);  // >= 0
      float* kept = Masked ? masked.data() + i * kChunk : nullptr;
      for (int64_t e = 0; e < n; ++e) {
        const float task = task_value<Masked>(params, i, start + e, to_float(expert[e]) - base[e]);
        if constexpr (Masked) kept[e] = task;
        sum[e] += bits_float(trimmed_bits(float_bits(task), threshold));
      }
    }
    for (int64_t i = 0; i < params.n_experts; ++i) {
      const In* expert = static_cast<const In*>(params.experts[i]) + start;
      const uint32_t threshold = float_bits(params.thresholds[i]);
      const float* kept = Masked ? masked.data() + i * kChunk : nullptr;
      for (int64_t e = 0; e < n; ++e) {
        float task;
        if constexpr (Masked) {
          task = kept[e];
        } else {
          task = to_float(expert[e]) - base[e];
        }
        const uint32_t trimmed = trimmed_bits(float_bits(task), threshold);
        const uint32_t agreeing_bits = agrees(trimmed, elects_positive(float_bits(sum[e])));
        agreeing[e] += bits_float(trimmed & agreeing_bits);
        count[e] += bits_float(kTiesOneBits & agreeing_bits);
      }
    }
    for (int64_t e = 0; e < n; ++e) {
      const float mean = agreeing[e] / std::max(count[e], 1.0f);
      const float scaled = params.lam * mean;
      out[start + e] = base[e] + scaled;
    }
  }
}

template <bool Masked>
R2M_ALWAYS_INLINE void ties_merge_kind(const TiesMergeParams& params, int64_t begin, int64_t end,
                                       float* out) {
  dispatch_kind(params.kind, [&](auto tag) R2M_INLINE_LAMBDA {
    ties_merge_typed<decltype(tag), Masked>(params, begin, end, out);
  });
}

template <typename In>
R2M_ALWAYS_INLINE void ties_merge_weighted_typed(const TiesWeightedParams& params, int64_t begin,
                                                 int64_t end, float* out) {
  float base[kChunk], sum[kChunk], agreeing[kChunk], divisor[kChunk];
  for (int64_t start = begin; start < end; start += kChunk) {
    const int64_t n = std::min(kChunk, end - start);
    const In* base_in = static_cast<const In*>(params.base) + start;
    for (int64_t e = 0; e < n; ++e) {
      base[e] = to_float(base_in[e]);
      sum[e] = 0.0f;
      agreeing[e] = 0.0f;
      divisor[e] = 0.0f;
    }
    // Chunk elements up to `at_cut` keep an entry at exactly the threshold (index order).
    for (int64_t i = 0; i < params.n_experts; ++i) {
      const In* expert = static_cast<const In*>(params.experts[i]) + start;
      const uint32_t threshold = float_bits(params.thresholds[i]);
      const int64_t at_cut = params.cutoffs[i] - start;
      const float weight = params.weights[i];
      for (int64_t e = 0; e < n; ++e) {
        const float task = to_float(expert[e]) - base[e];
        sum[e] += bits_float(cut_bits(float_bits(task), threshold, e <= at_cut)) * weight;
      }
    }
    for (int64_t i = 0; i < params.n_experts; ++i) {
      const In* expert = static_cast<const In*>(params.experts[i]) + start;
      const uint32_t threshold = float_bits(params.thresholds[i]);
      const int64_t at_cut = params.cutoffs[i] - start;
      const float weight = params.weights[i];
      const uint32_t weight_bits = float_bits(weight);
      for (int64_t e = 0; e < n; ++e) {
        const float task = to_float(expert[e]) - base[e];
        const float weighted =
            bits_float(cut_bits(float_bits(task), threshold, e <= at_cut)) * weight;
        const uint32_t agreeing_bits =
            agrees(float_bits(weighted), elects_positive(float_bits(sum[e])));
        agreeing[e] += bits_float(float_bits(weighted) & agreeing_bits);
        divisor[e] += bits_float(weight_bits & agreeing_bits);
      }
    }
    for (int64_t e = 0; e < n; ++e) {
      const float mean =
          params.normalize ? agreeing[e] / bits_float(nonzero_divisor_bits(float_bits(divisor[e])))
                           : agreeing[e];
      out[start + e] = base[e] + params.lam * mean;
    }
  }
}

}  // namespace

R2M_CPU_CLONES void ties_merge_weighted_cpu(const TiesWeightedParams& params, int64_t begin,
                                            int64_t end, float* out) {
  dispatch_kind(params.kind, [&](auto tag) R2M_INLINE_LAMBDA {
    ties_merge_weighted_typed<decltype(tag)>(params, begin, end, out);
  });
}

R2M_CPU_CLONES void ties_merge_cpu(const TiesMergeParams& params, int64_t begin, int64_t end,
                                   float* out) {
  if (params.mask.streams != nullptr) return ties_merge_kind<true>(params, begin, end, out);
  return ties_merge_kind<false>(params, begin, end, out);
}

}  // namespace r2m
