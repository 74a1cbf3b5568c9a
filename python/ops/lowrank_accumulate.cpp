// lowrank_accumulate: base + sum_i w_i L_i R_i^T as one matrix product of inner dimension N * r
// (the weighted left factors side by side times the right factors stacked), with the base added
// in the product's epilogue (addmm) and the result cast to the dtype asked for.
#include <ATen/ATen.h>
#include <torch/library.h>

namespace r2m {
namespace {

at::Tensor lowrank_accumulate(const at::Tensor& base, const at::Tensor& left,
                              const at::Tensor& right, const at::Tensor& weights,
                              at::ScalarType out_dtype) {
  TORCH_CHECK(base.dim() == 2, "lowrank_accumulate: base must be [m, n], got ", base.sizes());
  TORCH_CHECK(left.dim() == 3 && right.dim() == 3 && left.size(0) == right.size(0) &&
                  left.size(2) == right.size(2),
              "lowrank_accumulate: left must be [N, m, r] and right [N, n, r], got ", left.sizes(),
              " and ", right.sizes());
  TORCH_CHECK(left.size(1) == base.size(0) && right.size(1) == base.size(1),
              "lowrank_accumulate: factors ", left.sizes(), " and ", right.sizes(),
              " do not fit base ", base.sizes());
  TORCH_CHECK(weights.dim() == 1 && weights.size(0) == left.size(0),
              "lowrank_accumulate: weights must be [", left.size(0), "], got ", weights.sizes());
  TORCH_CHECK(at::isFloatingType(out_dtype), "lowrank_accumulate: out_dtype must be floating");
  const at::ScalarType work = left.scalar_type();
  TORCH_CHECK(work == at::kFloat || work == at::kDouble,
              "lowrank_accumulate: factors must be float32 or float64, got ", work);
  const int64_t tasks = left.size(0);
  const int64_t rank = left.size(2);
  const at::Tensor scaled = left * weights.to(left.options()).view({tasks, 1, 1});
  const at::Tensor side_by_side = scaled.permute({1, 0, 2}).reshape({base.size(0), tasks * rank});
  const at::Tensor stacked =
      right.to(work).permute({1, 0, 2}).reshape({base.size(1), tasks * rank});
  const at::Tensor sum = at::addmm(base.to(work), side_by_side, stacked.t());
  return sum.scalar_type() == out_dtype ? sum : sum.to(out_dtype);
}

}  // namespace

TORCH_LIBRARY_IMPL(r2m_ext, CPU, m) { m.impl("lowrank_accumulate", &lowrank_accumulate); }

// Composed of ATen calls only (cuBLAS on the GPU), so the same body serves CUDA tensors.
#if defined(R2M_WITH_CUDA)
TORCH_LIBRARY_IMPL(r2m_ext, CUDA, m) { m.impl("lowrank_accumulate", &lowrank_accumulate); }
#endif

}  // namespace r2m
