// Torch-facing entry of ties_merge: checks, and a parallel loop over the Python-free core
// (csrc/merge/ties_merge_cpu.cpp). Elementwise, so any split over threads gives the same bits.
#include "merge/ties_merge.h"

#include <ATen/Functions.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "ops/checks.h"
#include "ops/scalar_kind.h"

namespace r2m {

namespace {

constexpr int64_t kGrain = 1 << 14;

}  // namespace

at::Tensor ties_merge_cpu_entry(const at::Tensor& base, at::TensorList experts,
                                const at::Tensor& thresholds, double lam,
                                at::IntArrayRef dare_streams, int64_t first_index,
                                double drop_rate) {
  const std::vector<at::Tensor> contiguous = checked_experts("ties_merge", base, experts);
  TORCH_CHECK(base.device().is_cpu(), "ties_merge (CPU): base is on ", base.device());
  const ScalarKind kind = scalar_kind_of(base, "ties_merge", "base");
  const int64_t n = static_cast<int64_t>(experts.size());
  check_thresholds(thresholds, n);
  const at::Tensor thresholds_cpu = thresholds.to(at::kCPU).contiguous();
  std::vector<uint64_t> stream_bits;
  const DareMask mask =
      checked_dare_mask("ties_merge", dare_streams, first_index, drop_rate, n, stream_bits);
  std::vector<const void*> pointers;
  for (const at::Tensor& expert : contiguous) pointers.push_back(expert.const_data_ptr());
  const at::Tensor base_contiguous = base.contiguous();
  at::Tensor out = at::empty(base.sizes(), base.options().dtype(at::kFloat));
  const int64_t numel = base.numel();
  if (numel == 0) return out;
  const TiesMergeParams params{
      base_contiguous.const_data_ptr(),       pointers.data(),         n,   numel, kind,
      thresholds_cpu.const_data_ptr<float>(), static_cast<float>(lam), mask};
  float* result = out.data_ptr<float>();
  at::parallel_for(0, numel, kGrain,
                   [&](int64_t begin, int64_t end) { ties_merge_cpu(params, begin, end, result); });
  return out;
}

at::Tensor ties_merge_weighted_cpu_entry(const at::Tensor& base, at::TensorList experts,
                                         const at::Tensor& thresholds, at::IntArrayRef cutoffs,
                                         at::ArrayRef<double> weights, bool normalize, double lam) {
  const std::vector<at::Tensor> contiguous = checked_experts("ties_merge_weighted", base, experts);
  TORCH_CHECK(base.device().is_cpu(), "ties_merge_weighted (CPU): base is on ", base.device());
  const ScalarKind kind = scalar_kind_of(base, "ties_merge_weighted", "base");
  const int64_t n = static_cast<int64_t>(experts.size());
  check_thresholds(thresholds, n);
  const std::vector<float> task_weights = checked_task_weights(cutoffs, weights, n);
  const at::Tensor thresholds_cpu = thresholds.to(at::kCPU).contiguous();
  std::vector<const void*> pointers;
  for (const at::Tensor& expert : contiguous) pointers.push_back(expert.const_data_ptr());
  const at::Tensor base_contiguous = base.contiguous();
  at::Tensor out = at::empty(base.sizes(), base.options().dtype(at::kFloat));
  const int64_t numel = base.numel();
  if (numel == 0) return out;
  const TiesWeightedParams params{base_contiguous.const_data_ptr(),
                                  pointers.data(),
                                  n,
                                  numel,
                                  kind,
                                  thresholds_cpu.const_data_ptr<float>(),
                                  cutoffs.data(),
                                  task_weights.data(),
                                  normalize,
                                  static_cast<float>(lam)};
  float* result = out.data_ptr<float>();
  at::parallel_for(0, numel, kGrain, [&](int64_t begin, int64_t end) {
    ties_merge_weighted_cpu(params, begin, end, result);
  });
  return out;
}

TORCH_LIBRARY_IMPL(r2m_ext, CPU, m) {
  m.impl("ties_merge", &ties_merge_cpu_entry);
  m.impl("ties_merge_weighted", &ties_merge_weighted_cpu_entry);
}

}  // namespace r2m
