#include <algorithm>

#include "common/cpu_clones.h"
#include "merge/magnitude_histogram.h"

namespace r2m {

namespace {

// Elements whose float32 inputs are formed at once and reused by every task from the L1 cache.
constexpr int64_t kChunk = 1024;

// Each chunk's bins are computed first, in a loop of integer operations the compiler vectorises
// (`bins` marks an entry whose prefix does not match), and counted after. The count skips the
// marked entries with a branch, which is predictable in both passes (the first matches every
// entry, the second few): counting them in a spare bin made the second pass 50% slower, every
// increment waiting on the last one to the same counter.
// `Masked` (DARE's mask) and `Collect` (a collect window) are template arguments so that the
// plain loop stays free of a test per element.
template <typename In, bool Masked, bool Collect>
R2M_ALWAYS_INLINE void histogram(const MagnitudeHistogramParams& params, int64_t begin, int64_t end,
                                 int64_t* counts, std::vector<uint32_t>* collected) {
  const In* base = static_cast<const In*>(params.base);
  const uint32_t bins = uint32_t{1} << params.width;
  const uint32_t digit_mask = bins - 1;
  // 64-bit: a first pass asks for every bit above the digit (shift + width up to 32).
  const int above = params.shift + params.width;
  float base_chunk[kChunk];
  uint32_t bin[kChunk];
  uint32_t magnitude[Collect ? kChunk : 1];
  for (int64_t start = begin; start < end; start += kChunk) {
    const int64_t count = std::min(kChunk, end - start);
    for (int64_t e = 0; e < count; ++e) base_chunk[e] = to_float(base[start + e]);
    for (int64_t i = 0; i < params.n_experts; ++i) {
      const In* expert = static_cast<const In*>(params.experts[i]) + start;
      const uint64_t prefix = static_cast<uint64_t>(params.prefixes[i]);
      const uint64_t first = static_cast<uint64_t>(params.mask.first_index + start);
      for (int64_t e = 0; e < count; ++e) {
        float task = to_float(expert[e]) - base_chunk[e];
        if constexpr (Masked) {
          task = dare_masked(params.mask, i, first + static_cast<uint64_t>(e), task);
        }
        const uint64_t bits = magnitude_bits(task);
        const uint32_t digit = static_cast<uint32_t>(bits >> params.shift) & digit_mask;
        bin[e] = (bits >> above) == prefix ? digit : bins;
        if constexpr (Collect) magnitude[e] = static_cast<uint32_t>(bits);
      }
      int64_t* row = counts + i * bins;
      if constexpr (Collect) {
        // One unsigned comparison tells a bin inside [low, high] (the unmatched mark, 2^width,
        // is above any window of digits). Exact zeros are counted, never collected: after DARE's
        // mask most entries are zeros, and the count of them is all a select needs.
        const uint32_t low = static_cast<uint32_t>(params.collect_low[i]);
        const uint32_t span = static_cast<uint32_t>(params.collect_high[i]) - low;
        std::vector<uint32_t>& into = collected[i];
        for (int64_t e = 0; e < count; ++e) {
          if (bin[e] == bins) continue;
          ++row[bin[e]];
          if (bin[e] - low <= span && magnitude[e] != 0) into.push_back(magnitude[e]);
        }
        continue;
      }
      for (int64_t e = 0; e < count; ++e) {
        if (bin[e] != bins) ++row[bin[e]];
      }
    }
  }
}

template <bool Masked, bool Collect>
R2M_ALWAYS_INLINE void histogram_kind(const MagnitudeHistogramParams& params, int64_t begin,
                                      int64_t end, int64_t* counts,
                                      std::vector<uint32_t>* collected) {
  dispatch_kind(params.kind, [&](auto tag) R2M_INLINE_LAMBDA {
    histogram<decltype(tag), Masked, Collect>(params, begin, end, counts, collected);
  });
}

template <typename In>
R2M_ALWAYS_INLINE void count_at(const MagnitudeMatchParams& params, int64_t begin, int64_t end,
                                int64_t* counts) {
  const In* base = static_cast<const In*>(params.base);
  for (int64_t i = 0; i < params.n_experts; ++i) {
    const In* expert = static_cast<const In*>(params.experts[i]);
    const uint32_t magnitude = params.magnitudes[i];
    int64_t count = 0;
    for (int64_t e = begin; e < end; ++e) {
      count += magnitude_bits(to_float(expert[e]) - to_float(base[e])) == magnitude ? 1 : 0;
    }
    counts[i] += count;
  }
}

template <typename In>
int64_t find_at(const MagnitudeMatchParams& params, int64_t i, int64_t begin, int64_t end,
                int64_t n) {
  const In* base = static_cast<const In*>(params.base);
  const In* expert = static_cast<const In*>(params.experts[i]);
  for (int64_t e = begin; e < end; ++e) {
    if (magnitude_bits(to_float(expert[e]) - to_float(base[e])) == params.magnitudes[i] &&
        --n == 0) {
      return e;
    }
  }
  return -1;
}

}  // namespace

R2M_CPU_CLONES void count_at_magnitude_cpu(const MagnitudeMatchParams& params, int64_t begin,
                                           int64_t end, int64_t* counts) {
  dispatch_kind(params.kind, [&](auto tag) R2M_INLINE_LAMBDA {
    count_at<decltype(tag)>(params, begin, end, counts);
  });
}

int64_t find_at_magnitude_cpu(const MagnitudeMatchParams& params, int64_t i, int64_t begin,
                              int64_t end, int64_t n) {
  int64_t found = -1;
  dispatch_kind(params.kind,
                [&](auto tag) { found = find_at<decltype(tag)>(params, i, begin, end, n); });
  return found;
}

R2M_CPU_CLONES void magnitude_histogram_cpu(const MagnitudeHistogramParams& params, int64_t begin,
                                            int64_t end, int64_t* counts,
                                            std::vector<uint32_t>* collected) {
  const bool masked = params.mask.streams != nullptr;
  if (params.collect_low != nullptr) {
    if (masked) return histogram_kind<true, true>(params, begin, end, counts, collected);
    return histogram_kind<false, true>(params, begin, end, counts, collected);
  }
  if (masked) return histogram_kind<true, false>(params, begin, end, counts, collected);
  return histogram_kind<false, false>(params, begin, end, counts, collected);
}

}  // namespace r2m
