// Torch-facing entry of dare_merge: checks, and a parallel loop over the Python-free core
// (csrc/merge/dare_merge_cpu.cpp). Elementwise, so any split over threads gives the same bits;
// the finiteness probe is 0 or NaN whatever the order its parts are added in.
#include "merge/dare_merge.h"

#include <ATen/Functions.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>
#include <vector>

#include "ops/checks.h"
#include "ops/scalar_kind.h"

namespace r2m {

namespace {

constexpr int64_t kGrain = 1 << 14;

}  // namespace

std::tuple<at::Tensor, at::Tensor> dare_merge_cpu_entry(const at::Tensor& base,
                                                        at::TensorList experts,
                                                        at::IntArrayRef streams,
                                                        int64_t first_index, double drop_rate,
                                                        double lam) {
  const std::vector<at::Tensor> contiguous = checked_experts("dare_merge", base, experts);
  TORCH_CHECK(base.device().is_cpu(), "dare_merge (CPU): base is on ", base.device());
  const ScalarKind kind = scalar_kind_of(base, "dare_merge", "base");
  const int64_t n = static_cast<int64_t>(experts.size());
  TORCH_CHECK(!streams.empty(), "dare_merge: needs one stream per expert, got none");
  std::vector<uint64_t> stream_bits;
  const DareMask mask =
      checked_dare_mask("dare_merge", streams, first_index, drop_rate, n, stream_bits);
  std::vector<const void*> pointers;
  for (const at::Tensor& expert : contiguous) pointers.push_back(expert.const_data_ptr());
  const at::Tensor base_contiguous = base.contiguous();
  at::Tensor out = at::empty(base.sizes(), base.options().dtype(at::kFloat));
  const int64_t numel = base.numel();
  const DareMergeParams params{
      base_contiguous.const_data_ptr(), pointers.data(), n, numel, kind, mask,
      static_cast<float>(lam)};
  float* result = out.data_ptr<float>();
  std::vector<float> probes(static_cast<size_t>(at::get_num_threads()), 0.0f);
  if (numel > 0) {
    at::parallel_for(0, numel, kGrain, [&](int64_t begin, int64_t end) {
      probes[static_cast<size_t>(at::get_thread_num())] +=
          dare_merge_cpu(params, begin, end, result);
    });
  }
  float probe = 0.0f;
  for (float part : probes) probe += part;
  return {out, at::scalar_tensor(std::isnan(probe) ? NAN : 0.0, base.options().dtype(at::kFloat))};
}

TORCH_LIBRARY_IMPL(r2m_ext, CPU, m) { m.impl("dare_merge", &dare_merge_cpu_entry); }

}  // namespace r2m
