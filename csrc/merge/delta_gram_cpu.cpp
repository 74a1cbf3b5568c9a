#include <algorithm>
#include <vector>

#include "merge/delta_gram.h"

namespace r2m {

namespace {

// Task-vector entries of one block in double, one row per expert: the only place a difference is
// stored, and only kDeltaGramBlock of it at a time. Templated on the storage type so the loop
// has no per-element switch and vectorises.
template <typename In>
void task_rows(const DeltaGramParams& params, int64_t begin, int64_t count, double* scratch) {
  const In* base = static_cast<const In*>(params.base) + begin;
  for (int64_t i = 0; i < params.n_experts; ++i) {
    const In* expert = static_cast<const In*>(params.experts[i]) + begin;
    double* row = scratch + i * kDeltaGramBlock;
    for (int64_t e = 0; e < count; ++e) row[e] = widen(expert[e]) - widen(base[e]);
  }
}

// Independent partial sums of a dot product. One running sum serialises every add on the
// previous one; kLanes of them, added in a fixed order at the end, keep the result the same
// for any thread count and let the compiler use vector registers.
constexpr int kLanes = 8;

double dot(const double* a, const double* b, int64_t count) {
  double lanes[kLanes] = {};
  int64_t e = 0;
  for (; e + kLanes <= count; e += kLanes) {
    for (int k = 0; k < kLanes; ++k) lanes[k] += a[e + k] * b[e + k];
  }
  double sum = 0.0;
  for (int k = 0; k < kLanes; ++k) sum += lanes[k];
  for (; e < count; ++e) sum += a[e] * b[e];
  return sum;
}

}  // namespace

void delta_gram_block_cpu(const DeltaGramParams& params, int64_t block, double* partial,
                          double* scratch) {
  const int64_t n = params.n_experts;
  const int64_t begin = block * kDeltaGramBlock;
  const int64_t count = std::min(kDeltaGramBlock, params.numel - begin);
  switch (params.kind) {
    case ScalarKind::kFloat32:
      task_rows<float>(params, begin, count, scratch);
      break;
    case ScalarKind::kFloat64:
      task_rows<double>(params, begin, count, scratch);
      break;
    case ScalarKind::kBFloat16:
      task_rows<BFloat16Bits>(params, begin, count, scratch);
      break;
    case ScalarKind::kFloat16:
      task_rows<Float16Bits>(params, begin, count, scratch);
      break;
  }
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = 0; j <= i; ++j) {
      const double sum = dot(scratch + i * kDeltaGramBlock, scratch + j * kDeltaGramBlock, count);
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
