// Torch-facing CUDA entries of delta_gram and combine (kernels in csrc/merge/*_cuda.cu): checks
// with values, device guard, allocation, early return on empty, current stream, dtype mapping,
// launch, launch check. Device pointer arrays are staged through pinned host memory and copied on
// the op's stream, so nothing here waits for the device.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <vector>

#include "merge/combine.h"
#include "merge/delta_gram.h"
#include "ops/checks.h"
#include "ops/scalar_kind.h"

namespace r2m {
namespace {

// A device array of the experts' data pointers, copied from pinned memory on the current stream.
at::Tensor device_pointer_array(const std::vector<at::Tensor>& experts, const at::Device& device) {
  at::Tensor host = at::empty({static_cast<int64_t>(experts.size())},
                              at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  int64_t* data = host.data_ptr<int64_t>();
  for (size_t i = 0; i < experts.size(); ++i) {
    data[i] = reinterpret_cast<int64_t>(experts[i].const_data_ptr());
  }
  return host.to(device, /*non_blocking=*/true);
}

void check_launch(const char* op, int error) {
  TORCH_CHECK(error == 0, op, " (CUDA): kernel launch failed: ",
              cudaGetErrorString(static_cast<cudaError_t>(error)));
}

at::Tensor delta_gram_cuda_entry(const at::Tensor& base, at::TensorList experts) {
  const std::vector<at::Tensor> contiguous = checked_experts("delta_gram", base, experts);
  TORCH_CHECK(base.is_cuda(), "delta_gram (CUDA): base is on ", base.device());
  const ScalarKind kind = scalar_kind_of(base, "delta_gram", "base");
  const c10::cuda::CUDAGuard guard(base.device());
  const int64_t n = static_cast<int64_t>(experts.size());
  at::Tensor gram = at::zeros({n, n}, base.options().dtype(at::kDouble));
  const int64_t numel = base.numel();
  if (numel == 0) return gram;
  const at::Tensor base_contiguous = base.contiguous();
  const at::Tensor pointers = device_pointer_array(contiguous, base.device());
  at::Tensor workspace =
      at::empty({delta_gram_cuda_workspace(numel)}, base.options().dtype(at::kDouble));
  const DeltaGramParams params{base_contiguous.const_data_ptr(),
                               reinterpret_cast<const void* const*>(pointers.const_data_ptr()), n,
                               numel, kind};
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream(base.device().index()).stream();
  check_launch("delta_gram", delta_gram_cuda(params, workspace.data_ptr<double>(),
                                             gram.data_ptr<double>(), stream));
  return gram;
}

// Writes the K combinations into `out`, contiguous [K, *base.shape] on base's device, in its
// dtype (the kernel casts on the way out).
void combine_cuda_into(const at::Tensor& base, at::TensorList experts, const at::Tensor& weights,
                       double base_weight, at::ScalarType compute_dtype, at::Tensor& out) {
  const std::vector<at::Tensor> contiguous = checked_experts("combine", base, experts);
  const int64_t n = static_cast<int64_t>(experts.size());
  TORCH_CHECK(base.is_cuda(), "combine (CUDA): base is on ", base.device());
  const ScalarKind kind = scalar_kind_of(base, "combine", "base");
  const c10::cuda::CUDAGuard guard(base.device());
  const int64_t outputs = weights.size(0);
  const ScalarKind out_kind = scalar_kind_of(out, "combine", "out_dtype");
  const int64_t numel = base.numel();
  if (numel == 0 || outputs == 0) return;
  const at::Tensor base_contiguous = base.contiguous();
  const at::Tensor pointers = device_pointer_array(contiguous, base.device());
  const at::Tensor weights64 =
      weights.to(base.device(), at::kDouble, /*non_blocking=*/true).contiguous();
  const CombineParams params{base_contiguous.const_data_ptr(),
                             reinterpret_cast<const void* const*>(pointers.const_data_ptr()),
                             n,
                             numel,
                             kind,
                             weights64.const_data_ptr<double>(),
                             outputs,
                             base_weight};
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream(base.device().index()).stream();
  check_launch("combine", combine_cuda(params, compute_dtype == at::kDouble, out_kind,
                                       out.data_ptr(), stream));
}

at::Tensor combine_cuda_entry(const at::Tensor& base, at::TensorList experts,
                              const at::Tensor& weights, double base_weight,
                              at::ScalarType compute_dtype, at::ScalarType out_dtype) {
  check_combine_arguments(weights, static_cast<int64_t>(experts.size()), compute_dtype, out_dtype);
  at::Tensor out = at::empty(combine_shape(base, weights), base.options().dtype(out_dtype));
  combine_cuda_into(base, experts, weights, base_weight, compute_dtype, out);
  return out;
}

void combine_into_cuda(const at::Tensor& base, at::TensorList experts, const at::Tensor& weights,
                       double base_weight, at::ScalarType compute_dtype, at::Tensor& out) {
  const at::ScalarType out_dtype = out.scalar_type();
  check_combine_arguments(weights, static_cast<int64_t>(experts.size()), compute_dtype, out_dtype);
  check_combine_out(out, base, weights);
  if (out.is_contiguous()) {
    combine_cuda_into(base, experts, weights, base_weight, compute_dtype, out);
  } else {
    out.copy_(combine_cuda_entry(base, experts, weights, base_weight, compute_dtype, out_dtype));
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(r2m_ext, CUDA, m) {
  m.impl("delta_gram", &delta_gram_cuda_entry);
  m.impl("combine", &combine_cuda_entry);
  m.impl("combine_into", &combine_into_cuda);
}

}  // namespace r2m
