// Argument checks shared by the CPU and CUDA entries of the merge ops, so that both devices refuse
// the same inputs with the same messages.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "merge/dare_mask.h"

namespace r2m {

// Every expert against the base (shape, dtype, device). Returns them contiguous; the caller keeps
// the vector alive while kernels use their pointers.
inline std::vector<at::Tensor> checked_experts(const char* op, const at::Tensor& base,
                                               at::TensorList experts) {
  TORCH_CHECK(!experts.empty(), op, ": needs at least one expert, got none");
  std::vector<at::Tensor> contiguous;
  contiguous.reserve(experts.size());
  for (size_t i = 0; i < experts.size(); ++i) {
    const at::Tensor& expert = experts[i];
    TORCH_CHECK(expert.sizes() == base.sizes(), op, ": expert ", i, " has shape ", expert.sizes(),
                " but base has shape ", base.sizes());
    TORCH_CHECK(expert.scalar_type() == base.scalar_type(), op, ": expert ", i, " has dtype ",
                expert.scalar_type(), " but base has dtype ", base.scalar_type());
    TORCH_CHECK(expert.device() == base.device(), op, ": expert ", i, " is on ", expert.device(),
                " but base is on ", base.device());
    contiguous.push_back(expert.contiguous());
  }
  return contiguous;
}

// combine's result shape: [K, *base.shape] for weights [K, N].
inline std::vector<int64_t> combine_shape(const at::Tensor& base, const at::Tensor& weights) {
  std::vector<int64_t> shape{weights.size(0)};
  shape.insert(shape.end(), base.sizes().begin(), base.sizes().end());
  return shape;
}

// combine_into's destination: on base's device, of combine's result shape.
inline void check_combine_out(const at::Tensor& out, const at::Tensor& base,
                              const at::Tensor& weights) {
  TORCH_CHECK(out.device() == base.device(), "combine: out is on ", out.device(), ", base on ",
              base.device());
  const std::vector<int64_t> shape = combine_shape(base, weights);
  TORCH_CHECK(out.sizes() == at::IntArrayRef(shape), "combine: out must be ",
              at::IntArrayRef(shape), ", got ", out.sizes());
}

inline void check_combine_arguments(const at::Tensor& weights, int64_t n_experts,
                                    at::ScalarType compute_dtype, at::ScalarType out_dtype) {
  TORCH_CHECK(weights.dim() == 2 && weights.size(1) == n_experts, "combine: weights must be [K, ",
              n_experts, "] for ", n_experts, " experts, got ", weights.sizes());
  TORCH_CHECK(compute_dtype == at::kFloat || compute_dtype == at::kDouble,
              "combine: compute_dtype must be float32 or float64, got ", compute_dtype);
  TORCH_CHECK(at::isFloatingType(out_dtype), "combine: out_dtype must be floating, got ",
              out_dtype);
}

// DARE's mask from an op's optional arguments: no streams, no mask; else one stream per expert.
// `bits` keeps the streams alive while kernels use the mask.
// The digit and prefixes of one magnitude_histogram pass over n experts.
inline void check_histogram_digit(const at::Tensor& prefixes, int64_t shift, int64_t width,
                                  int64_t n) {
  TORCH_CHECK(width >= 1 && width <= 16 && shift >= 0 && shift + width <= 32,
              "magnitude_histogram: the digit bits [shift, shift + width) must lie in 32 bits, "
              "width 1-16; got shift ",
              shift, ", width ", width);
  TORCH_CHECK(prefixes.dim() == 1 && prefixes.size(0) == n && prefixes.scalar_type() == at::kLong,
              "magnitude_histogram: prefixes must be int64 [", n, "], got ", prefixes.scalar_type(),
              " ", prefixes.sizes());
}

// Counts of a histogram over n experts with a digit of `width` bits: int64 [n, 2^width].
inline int64_t histogram_bins(int64_t width) {
  return int64_t{1} << std::clamp<int64_t>(width, 0, 16);
}

inline at::Tensor zero_histogram(const at::Tensor& base, int64_t n, int64_t width) {
  return at::zeros({n, histogram_bins(width)}, base.options().dtype(at::kLong));
}

// Counts a histogram op adds into: those of zero_histogram, contiguous, on base's device.
inline void check_histogram_counts(const char* op, const at::Tensor& counts, const at::Tensor& base,
                                   int64_t n, int64_t width) {
  const int64_t bins = histogram_bins(width);
  TORCH_CHECK(counts.device() == base.device() && counts.scalar_type() == at::kLong &&
                  counts.is_contiguous() && counts.dim() == 2 && counts.size(0) == n &&
                  counts.size(1) == bins,
              op, ": counts must be contiguous int64 [", n, ", ", bins, "] on ", base.device(),
              ", got ", counts.scalar_type(), " ", counts.sizes(), " on ", counts.device());
}

// TIES's per-task thresholds for n experts.
inline void check_thresholds(const at::Tensor& thresholds, int64_t n) {
  TORCH_CHECK(
      thresholds.dim() == 1 && thresholds.size(0) == n && thresholds.scalar_type() == at::kFloat,
      "ties_merge: thresholds must be float32 [", n, "], got ", thresholds.scalar_type(), " ",
      thresholds.sizes());
}

// ties_merge_weighted's per-task cutoffs and weights (one each per expert), the weights as the
// float32 values the kernel multiplies by.
inline std::vector<float> checked_task_weights(at::IntArrayRef cutoffs,
                                               at::ArrayRef<double> weights, int64_t n) {
  TORCH_CHECK(
      static_cast<int64_t>(cutoffs.size()) == n && static_cast<int64_t>(weights.size()) == n,
      "ties_merge_weighted: needs one cutoff and one weight per expert (", n, "), got ",
      cutoffs.size(), " and ", weights.size());
  return std::vector<float>(weights.begin(), weights.end());
}

inline DareMask checked_dare_mask(const char* op, at::IntArrayRef streams, int64_t first_index,
                                  double drop_rate, int64_t n_experts,
                                  std::vector<uint64_t>& bits) {
  if (streams.empty()) return DareMask{nullptr, 0, 0, 1.0f};
  TORCH_CHECK(static_cast<int64_t>(streams.size()) == n_experts, op,
              ": needs one DARE stream per expert (", n_experts, "), got ", streams.size());
  TORCH_CHECK(drop_rate >= 0.0 && drop_rate < 1.0, op, ": drop_rate must be in [0, 1), got ",
              drop_rate);
  TORCH_CHECK(first_index >= 0, op, ": first_index must be >= 0, got ", first_index);
  bits.clear();
  for (int64_t stream : streams) bits.push_back(static_cast<uint64_t>(stream));
  return DareMask{bits.data(), first_index, dare_keep_from(drop_rate),
                  static_cast<float>(1.0 - drop_rate)};
}

}  // namespace r2m
