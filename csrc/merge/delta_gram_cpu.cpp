#include <algorithm>
#include <cstring>
#include <vector>

#include "common/cpu_clones.h"
#include "merge/delta_gram.h"

namespace r2m {

namespace {

// Task-vector entries of `count` elements in double, one row of `stride` per expert: the only
// place a difference is stored. Templated on the storage type so the loop has no per-element
// switch and vectorises.
template <typename In>
R2M_ALWAYS_INLINE void task_rows(const DeltaGramParams& params, int64_t begin, int64_t count,
                                 int64_t stride, double* rows) {
  const In* base = static_cast<const In*>(params.base) + begin;
  for (int64_t i = 0; i < params.n_experts; ++i) {
    const In* expert = static_cast<const In*>(params.experts[i]) + begin;
    double* row = rows + i * stride;
    for (int64_t e = 0; e < count; ++e) row[e] = widen(expert[e]) - widen(base[e]);
  }
}

R2M_ALWAYS_INLINE void task_rows_of(const DeltaGramParams& params, int64_t begin, int64_t count,
                                    int64_t stride, double* rows) {
  dispatch_kind(params.kind, [&](auto tag) R2M_INLINE_LAMBDA {
    task_rows<decltype(tag)>(params, begin, count, stride, rows);
  });
}

// One pair's kDeltaGramLanes partial sums as one GCC vector (one AVX-512 register): elementwise
// IEEE operations, those of a loop over the lanes.
typedef double PairLanes __attribute__((vector_size(kDeltaGramLanes * sizeof(double))));

// Pairs summed side by side: each pair's sum is a chain of dependent adds, so one pair at a time
// waits on the add latency; several interleave.
constexpr int64_t kPairsAtOnce = 8;

// Each pair's dot product runs in kDeltaGramLanes independent partial sums over the block's
// elements in order, the lanes added in a fixed order at the end and then the last count %
// kDeltaGramLanes products: the same bits for any thread count and any vector width. The block is
// walked in chunks whose differences for every expert stay in the L1 cache while all pairs use
// them, instead of streaming two block-long rows per pair; the order of every sum is unchanged by
// the chunking. Measured on 8 experts of 3072 x 768 float32 (2 threads): 10.0-11.0 ms with one
// pair at a time at the baseline width, 8.1-8.5 ms with these clones and pairs side by side.
R2M_CPU_CLONES void delta_gram_block_clones(const DeltaGramParams& params, int64_t block,
                                            double* partial, double* scratch) {
  const int64_t n = params.n_experts;
  const int64_t begin = block * kDeltaGramBlock;
  const int64_t count = std::min(kDeltaGramBlock, params.numel - begin);
  const int64_t laned = count - count % kDeltaGramLanes;
  double* rows = scratch;
  double* lanes = scratch + n * kDeltaGramChunk;
  std::fill(lanes, lanes + n * (n + 1) / 2 * kDeltaGramLanes, 0.0);
  for (int64_t chunk = 0; chunk < laned; chunk += kDeltaGramChunk) {
    const int64_t length = std::min(kDeltaGramChunk, laned - chunk);
    task_rows_of(params, begin + chunk, length, kDeltaGramChunk, rows);
    // Pairs (i, j <= i) in row-major order of the lower triangle: those of row i are contiguous.
    double* row_lanes = lanes;
    for (int64_t i = 0; i < n; ++i) {
      const double* a = rows + i * kDeltaGramChunk;
      for (int64_t first = 0; first <= i; first += kPairsAtOnce) {
        const int64_t pairs = std::min(kPairsAtOnce, i + 1 - first);
        double* group_lanes = row_lanes + first * kDeltaGramLanes;
        PairLanes sums[kPairsAtOnce] = {};
        std::memcpy(sums, group_lanes, pairs * sizeof(PairLanes));
        for (int64_t e = 0; e < length; e += kDeltaGramLanes) {
          PairLanes x;
          std::memcpy(&x, a + e, sizeof(x));
          for (int64_t g = 0; g < kPairsAtOnce; ++g) {
            if (g < pairs) {
              PairLanes y;
              std::memcpy(&y, rows + (first + g) * kDeltaGramChunk + e, sizeof(y));
              sums[g] += x * y;
            }
          }
        }
        std::memcpy(group_lanes, sums, pairs * sizeof(PairLanes));
      }
      row_lanes += (i + 1) * kDeltaGramLanes;
    }
  }
  const int64_t tail = count - laned;
  task_rows_of(params, begin + laned, tail, kDeltaGramChunk, rows);
  const double* pair_lanes = lanes;
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = 0; j <= i; ++j, pair_lanes += kDeltaGramLanes) {
      double sum = 0.0;
      for (int k = 0; k < kDeltaGramLanes; ++k) sum += pair_lanes[k];
      for (int64_t e = 0; e < tail; ++e) {
        sum += rows[i * kDeltaGramChunk + e] * rows[j * kDeltaGramChunk + e];
      }
      partial[i * n + j] = sum;
      partial[j * n + i] = sum;
    }
  }
}

}  // namespace

int64_t delta_gram_scratch_doubles(int64_t n_experts) {
  return n_experts * kDeltaGramChunk + n_experts * (n_experts + 1) / 2 * kDeltaGramLanes;
}

void delta_gram_block_cpu(const DeltaGramParams& params, int64_t block, double* partial,
                          double* scratch) {
  delta_gram_block_clones(params, block, partial, scratch);
}

void delta_gram_cpu(const DeltaGramParams& params, double* gram) {
  const int64_t n = params.n_experts;
  std::vector<double> scratch(static_cast<size_t>(delta_gram_scratch_doubles(n)));
  std::vector<double> partial(static_cast<size_t>(n * n));
  for (int64_t block = 0; block < delta_gram_num_blocks(params.numel); ++block) {
    delta_gram_block_cpu(params, block, partial.data(), scratch.data());
    for (int64_t k = 0; k < n * n; ++k) gram[k] += partial[k];
  }
}

}  // namespace r2m
