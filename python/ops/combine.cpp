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

namespace {

// Writes the K combinations into `out`, contiguous [K, *base.shape] in compute_dtype.
void combine_cpu_into(const at::Tensor& base, at::TensorList experts, const at::Tensor& weights,
                      double base_weight, at::ScalarType compute_dtype, at::Tensor& out) {
  const std::vector<at::Tensor> contiguous = checked_experts("combine", base, experts);
  const int64_t n = static_cast<int64_t>(experts.size());
  TORCH_CHECK(base.device().is_cpu(), "combine (CPU): base is on ", base.device());
  const ScalarKind kind = scalar_kind_of(base, "combine", "base");
  std::vector<const void*> pointers;
  for (const at::Tensor& expert : contiguous) pointers.push_back(expert.const_data_ptr());
  const at::Tensor base_contiguous = base.contiguous();
  const at::Tensor weights64 = weights.to(at::kDouble).contiguous();
  const int64_t outputs = weights.size(0);
  const int64_t numel = base.numel();
  if (numel == 0 || outputs == 0) return;

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
}

}  // namespace

at::Tensor combine_cpu_entry(const at::Tensor& base, at::TensorList experts,
                             const at::Tensor& weights, double base_weight,
                             at::ScalarType compute_dtype, at::ScalarType out_dtype) {
  check_combine_arguments(weights, static_cast<int64_t>(experts.size()), compute_dtype, out_dtype);
  at::Tensor out = empty_host_output(combine_shape(base, weights), compute_dtype);
  combine_cpu_into(base, experts, weights, base_weight, compute_dtype, out);
  return out_dtype == compute_dtype ? out : out.to(out_dtype);
}

// Into `out`: directly when it is contiguous in the compute dtype, else through the functional
// result cast into it (the functional form's bits either way).
void combine_into_cpu(const at::Tensor& base, at::TensorList experts, const at::Tensor& weights,
                      double base_weight, at::ScalarType compute_dtype, at::Tensor& out) {
  const at::ScalarType out_dtype = out.scalar_type();
  check_combine_arguments(weights, static_cast<int64_t>(experts.size()), compute_dtype, out_dtype);
  check_combine_out(out, base, weights);
  if (out_dtype == compute_dtype && out.is_contiguous()) {
    combine_cpu_into(base, experts, weights, base_weight, compute_dtype, out);
  } else {
    out.copy_(combine_cpu_entry(base, experts, weights, base_weight, compute_dtype, out_dtype));
  }
}

TORCH_LIBRARY_IMPL(r2m_ext, CPU, m) {
  m.impl("combine", &combine_cpu_entry);
  m.impl("combine_into", &combine_into_cpu);
}

}  // namespace r2m
