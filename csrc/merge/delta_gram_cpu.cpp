#include <algorithm>
#include <vector>

#include "merge/delta_gram.h"

namespace r2m {

void delta_gram_block_cpu(const DeltaGramParams& params, int64_t block, double* partial,
                          double* scratch) {
  const int64_t n = params.n_experts;
  const int64_t begin = block * kDeltaGramBlock;
  const int64_t count = std::min(kDeltaGramBlock, params.numel - begin);
  // Task-vector entries of this block in double, one row per expert: the only place a
  // difference is stored, and only kDeltaGramBlock of it at a time.
  for (int64_t i = 0; i < n; ++i) {
    double* row = scratch + i * kDeltaGramBlock;
    for (int64_t e = 0; e < count; ++e) {
      row[e] = load_as_double(params.experts[i], params.kind, begin + e) -
               load_as_double(params.base, params.kind, begin + e);
    }
  }
  for (int64_t i = 0; i < n; ++i) {
    const double* row_i = scratch + i * kDeltaGramBlock;
    for (int64_t j = 0; j <= i; ++j) {
      const double* row_j = scratch + j * kDeltaGramBlock;
      double sum = 0.0;
      for (int64_t e = 0; e < count; ++e) sum += row_i[e] * row_j[e];
      partial[i * n + j] = sum;
      partial[j * n + i] = sum;
    }
  }
}

void delta_gram_cpu(const DeltaGramParams& params, double* gram) {
  const int64_t n = params.n_experts;
  std::vector<double> scratch(static_cast<size_t>(n * kDeltaGramBlock));
  std::vector<double> partial(static_cast<size_t>(n * n));
  for (int64_t block = 0; block < delta_gram_num_blocks(params.numel); ++block) {
    delta_gram_block_cpu(params, block, partial.data(), scratch.data());
    for (int64_t k = 0; k < n * n; ++k) gram[k] += partial[k];
  }
}

}  // namespace r2m
