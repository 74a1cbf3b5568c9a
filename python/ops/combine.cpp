// Torch-facing entry of combine: checks, output allocation, a parallel loop over fixed blocks of
// the Python-free core (csrc/merge/combine_cpu.cpp), and the cast to a 16-bit output dtype.
#include "merge/combine.h"

#include <ATen/Dispatch.h>
#include <ATen/Functions.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "ops/checks.h"
#include "ops/host_memory.h"
#include "ops/scalar_kind.h"

namespace r2m {

at::Tensor combine_cpu_entry(const at::Tensor& base, at::TensorList experts,
                             const at::Tensor& weights, double base_weight,
                             at::ScalarType compute_dtype, at::ScalarType out_dtype) {
  const std::vector<at::Tensor> contiguous = checked_experts("combine", base, experts);
  const int64_t n = static_cast<int64_t>(experts.size());
  TORCH_CHECK(base.device().is_cpu(), "combine (CPU): base is on ", base.device());
  check_combine_arguments(weights, n, compute_dtype, out_dtype);
  const ScalarKind kind = scalar_kind_of(base, "combine", "base");
  std::vector<const void*> pointers;
  for (const at::Tensor& expert : contiguous) pointers.push_back(expert.const_data_ptr());
  const at::Tensor base_contiguous = base.contiguous();
  const at::Tensor weights64 = weights.to(at::kDouble).contiguous();
  const int64_t outputs = weights.size(0);
  std::vector<int64_t> out_shape{outputs};
  out_shape.insert(out_shape.end(), base.sizes().begin(), base.sizes().end());
  at::Tensor out = empty_host_output(out_shape, compute_dtype);
  const int64_t numel = base.numel();
  if (numel == 0 || outputs == 0) return out.to(out_dtype);

  const CombineParams params{
      base_contiguous.const_data_ptr(),   pointers.data(), n,          numel, kind,
      weights64.const_data_ptr<double>(), outputs,         base_weight};
  AT_DISPATCH_FLOATING_TYPES(compute_dtype, "combine", [&] {
    scalar_t* out_data = out.data_ptr<scalar_t>();
    at::parallel_for(0, combine_num_blocks(numel), 1, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> scratch(kCombineBlock);
      for (int64_t block = begin; block < end; ++block) {
        combine_block_cpu<scalar_t>(params, block, out_data, scratch.data());
      }
    });
  });
  return out_dtype == compute_dtype ? out : out.to(out_dtype);
}

TORCH_LIBRARY_IMPL(r2m_ext, CPU, m) { m.impl("combine", &combine_cpu_entry); }

}  // namespace r2m
