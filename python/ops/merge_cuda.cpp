// Torch-facing CUDA entries of delta_gram, combine, magnitude_histogram, ties_merge and dare_merge
// (kernels in csrc/merge/*_cuda.cu): checks
// with values, device guard, allocation, early return on empty, current stream, dtype mapping,
// launch, launch check. Device pointer arrays are staged through pinned host memory and copied on
// the op's stream, so nothing here waits for the device.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <optional>
#include <tuple>
#include <vector>

#include "merge/combine.h"
#include "merge/dare_merge.h"
#include "merge/delta_gram.h"
#include "merge/magnitude_histogram.h"
#include "merge/ties_merge.h"
#include "ops/checks.h"
#include "ops/scalar_kind.h"

namespace r2m {
namespace {

// A device array of 64-bit values, copied from pinned memory on the current stream.
template <typename Value>
at::Tensor device_array(const std::vector<Value>& values, const at::Device& device) {
  static_assert(sizeof(Value) == sizeof(int64_t), "64-bit values");
  at::Tensor host = at::empty({static_cast<int64_t>(values.size())},
                              at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  std::memcpy(host.data_ptr<int64_t>(), values.data(), values.size() * sizeof(int64_t));
  return host.to(device, /*non_blocking=*/true);
}

// A device array of the experts' data pointers.
at::Tensor device_pointer_array(const std::vector<at::Tensor>& experts, const at::Device& device) {
  std::vector<const void*> pointers;
  for (const at::Tensor& expert : experts) pointers.push_back(expert.const_data_ptr());
  return device_array(pointers, device);
}

// DARE's mask with its streams in device memory (`streams` keeps them alive), or no mask.
DareMask device_dare_mask(const char* op, at::IntArrayRef dare_streams, int64_t first_index,
                          double drop_rate, int64_t n, const at::Device& device,
                          at::Tensor& streams) {
  std::vector<uint64_t> bits;
  DareMask mask = checked_dare_mask(op, dare_streams, first_index, drop_rate, n, bits);
  if (mask.streams == nullptr) return mask;
  streams = device_array(bits, device);
  mask.streams = reinterpret_cast<const uint64_t*>(streams.const_data_ptr());
  return mask;
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

namespace {

// Adds the histogram of base and experts into counts (device memory), after the checks.
void histogram_into_cuda(at::Tensor& counts, const at::Tensor& base, at::TensorList experts,
                         const char* op, const at::Tensor& prefixes, int64_t shift, int64_t width,
                         at::IntArrayRef dare_streams, int64_t first_index, double drop_rate) {
  const std::vector<at::Tensor> contiguous = checked_experts(op, base, experts);
  TORCH_CHECK(base.is_cuda(), op, " (CUDA): base is on ", base.device());
  const ScalarKind kind = scalar_kind_of(base, op, "base");
  const int64_t n = static_cast<int64_t>(experts.size());
  check_histogram_digit(prefixes, shift, width, n);
  check_histogram_counts(op, counts, base, n, width);
  const c10::cuda::CUDAGuard guard(base.device());
  at::Tensor streams;
  const DareMask mask =
      device_dare_mask(op, dare_streams, first_index, drop_rate, n, base.device(), streams);
  const int64_t numel = base.numel();
  if (numel == 0) return;
  const at::Tensor base_contiguous = base.contiguous();
  const at::Tensor pointers = device_pointer_array(contiguous, base.device());
  const at::Tensor prefixes_device =
      prefixes.to(base.device(), at::kLong, /*non_blocking=*/true).contiguous();
  const MagnitudeHistogramParams params{
      base_contiguous.const_data_ptr(),
      reinterpret_cast<const void* const*>(pointers.const_data_ptr()),
      n,
      numel,
      kind,
      prefixes_device.const_data_ptr<int64_t>(),
      static_cast<int>(shift),
      static_cast<int>(width),
      mask};
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream(base.device().index()).stream();
  // The kernel adds into the counts it is given.
  check_launch(op, magnitude_histogram_cuda(params, counts.data_ptr<int64_t>(), stream));
}

}  // namespace

at::Tensor magnitude_histogram_cuda_entry(const at::Tensor& base, at::TensorList experts,
                                          const at::Tensor& prefixes, int64_t shift, int64_t width,
                                          at::IntArrayRef dare_streams, int64_t first_index,
                                          double drop_rate) {
  at::Tensor counts = zero_histogram(base, static_cast<int64_t>(experts.size()), width);
  histogram_into_cuda(counts, base, experts, "magnitude_histogram", prefixes, shift, width,
                      dare_streams, first_index, drop_rate);
  return counts;
}

// Counting only: a window's collection is CPU-only so far (TIES runs its pure-torch select on a
// GPU until tests/test_cuda.py has passed on one).
std::vector<at::Tensor> magnitude_histogram_into_cuda_entry(
    at::Tensor& counts, const at::Tensor& base, at::TensorList experts, const at::Tensor& prefixes,
    int64_t shift, int64_t width, const std::optional<at::Tensor>& low,
    const std::optional<at::Tensor>& high, at::IntArrayRef dare_streams, int64_t first_index,
    double drop_rate) {
  TORCH_CHECK(!low.has_value() && !high.has_value(),
              "magnitude_histogram_into (CUDA): collect windows are CPU-only");
  histogram_into_cuda(counts, base, experts, "magnitude_histogram_into", prefixes, shift, width,
                      dare_streams, first_index, drop_rate);
  return {};
}

at::Tensor ties_merge_cuda_entry(const at::Tensor& base, at::TensorList experts,
                                 const at::Tensor& thresholds, double lam,
                                 at::IntArrayRef dare_streams, int64_t first_index,
                                 double drop_rate) {
  const std::vector<at::Tensor> contiguous = checked_experts("ties_merge", base, experts);
  TORCH_CHECK(base.is_cuda(), "ties_merge (CUDA): base is on ", base.device());
  const ScalarKind kind = scalar_kind_of(base, "ties_merge", "base");
  const int64_t n = static_cast<int64_t>(experts.size());
  check_thresholds(thresholds, n);
  const c10::cuda::CUDAGuard guard(base.device());
  at::Tensor streams;
  const DareMask mask = device_dare_mask("ties_merge", dare_streams, first_index, drop_rate, n,
                                         base.device(), streams);
  at::Tensor out = at::empty(base.sizes(), base.options().dtype(at::kFloat));
  const int64_t numel = base.numel();
  if (numel == 0) return out;
  const at::Tensor base_contiguous = base.contiguous();
  const at::Tensor pointers = device_pointer_array(contiguous, base.device());
  const at::Tensor thresholds_device =
      thresholds.to(base.device(), at::kFloat, /*non_blocking=*/true).contiguous();
  const TiesMergeParams params{base_contiguous.const_data_ptr(),
                               reinterpret_cast<const void* const*>(pointers.const_data_ptr()),
                               n,
                               numel,
                               kind,
                               thresholds_device.const_data_ptr<float>(),
                               static_cast<float>(lam),
                               mask};
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream(base.device().index()).stream();
  check_launch("ties_merge", ties_merge_cuda(params, out.data_ptr<float>(), stream));
  return out;
}

at::Tensor ties_merge_weighted_cuda_entry(const at::Tensor& base, at::TensorList experts,
                                          const at::Tensor& thresholds, at::IntArrayRef cutoffs,
                                          at::ArrayRef<double> weights, bool normalize,
                                          double lam) {
  const std::vector<at::Tensor> contiguous = checked_experts("ties_merge_weighted", base, experts);
  TORCH_CHECK(base.is_cuda(), "ties_merge_weighted (CUDA): base is on ", base.device());
  const ScalarKind kind = scalar_kind_of(base, "ties_merge_weighted", "base");
  const int64_t n = static_cast<int64_t>(experts.size());
  check_thresholds(thresholds, n);
  const std::vector<float> task_weights = checked_task_weights(cutoffs, weights, n);
  const c10::cuda::CUDAGuard guard(base.device());
  at::Tensor out = at::empty(base.sizes(), base.options().dtype(at::kFloat));
  const int64_t numel = base.numel();
  if (numel == 0) return out;
  const at::Tensor base_contiguous = base.contiguous();
  const at::Tensor pointers = device_pointer_array(contiguous, base.device());
  const at::Tensor thresholds_device =
      thresholds.to(base.device(), at::kFloat, /*non_blocking=*/true).contiguous();
  const at::Tensor cutoffs_device =
      device_array(std::vector<int64_t>(cutoffs.begin(), cutoffs.end()), base.device());
  at::Tensor weights_host =
      at::empty({n}, at::TensorOptions().dtype(at::kFloat).pinned_memory(true));
  std::memcpy(weights_host.data_ptr<float>(), task_weights.data(), n * sizeof(float));
  const at::Tensor weights_device = weights_host.to(base.device(), /*non_blocking=*/true);
  const TiesWeightedParams params{base_contiguous.const_data_ptr(),
                                  reinterpret_cast<const void* const*>(pointers.const_data_ptr()),
                                  n,
                                  numel,
                                  kind,
                                  thresholds_device.const_data_ptr<float>(),
                                  cutoffs_device.const_data_ptr<int64_t>(),
                                  weights_device.const_data_ptr<float>(),
                                  normalize,
                                  static_cast<float>(lam)};
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream(base.device().index()).stream();
  check_launch("ties_merge_weighted",
               ties_merge_weighted_cuda(params, out.data_ptr<float>(), stream));
  return out;
}

std::tuple<at::Tensor, at::Tensor> dare_merge_cuda_entry(const at::Tensor& base,
                                                         at::TensorList experts,
                                                         at::IntArrayRef dare_streams,
                                                         int64_t first_index, double drop_rate,
                                                         double lam) {
  const std::vector<at::Tensor> contiguous = checked_experts("dare_merge", base, experts);
  TORCH_CHECK(base.is_cuda(), "dare_merge (CUDA): base is on ", base.device());
  const ScalarKind kind = scalar_kind_of(base, "dare_merge", "base");
  const int64_t n = static_cast<int64_t>(experts.size());
  TORCH_CHECK(!dare_streams.empty(), "dare_merge: needs one stream per expert, got none");
  const c10::cuda::CUDAGuard guard(base.device());
  at::Tensor streams;
  const DareMask mask = device_dare_mask("dare_merge", dare_streams, first_index, drop_rate, n,
                                         base.device(), streams);
  at::Tensor out = at::empty(base.sizes(), base.options().dtype(at::kFloat));
  at::Tensor nonfinite = at::zeros({}, base.options().dtype(at::kInt));
  const int64_t numel = base.numel();
  if (numel > 0) {
    const at::Tensor base_contiguous = base.contiguous();
    const at::Tensor pointers = device_pointer_array(contiguous, base.device());
    const DareMergeParams params{base_contiguous.const_data_ptr(),
                                 reinterpret_cast<const void* const*>(pointers.const_data_ptr()),
                                 n,
                                 numel,
                                 kind,
                                 mask,
                                 static_cast<float>(lam)};
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream(base.device().index()).stream();
    check_launch("dare_merge",
                 dare_merge_cuda(params, out.data_ptr<float>(), nonfinite.data_ptr<int>(), stream));
  }
  // 0 when every input is finite, NaN otherwise, computed on the device (no synchronisation).
  const at::Tensor probe = at::where(nonfinite.to(at::kBool), NAN, 0.0).to(at::kFloat);
  return {out, probe};
}

}  // namespace

TORCH_LIBRARY_IMPL(r2m_ext, CUDA, m) {
  m.impl("delta_gram", &delta_gram_cuda_entry);
  m.impl("combine", &combine_cuda_entry);
  m.impl("combine_into", &combine_into_cuda);
  m.impl("magnitude_histogram", &magnitude_histogram_cuda_entry);
  m.impl("magnitude_histogram_into", &magnitude_histogram_into_cuda_entry);
  m.impl("ties_merge", &ties_merge_cuda_entry);
  m.impl("ties_merge_weighted", &ties_merge_weighted_cuda_entry);
  m.impl("dare_merge", &dare_merge_cuda_entry);
}

}  // namespace r2m
