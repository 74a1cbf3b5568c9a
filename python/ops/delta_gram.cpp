// Torch-facing entry of delta_gram: checks, dtype mapping, and a parallel loop over fixed-size
// blocks of the Python-free core (csrc/merge/delta_gram_cpu.cpp).
#include "merge/delta_gram.h"

#include <ATen/Functions.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "ops/checks.h"
#include "ops/scalar_kind.h"

namespace r2m {

at::Tensor delta_gram_cpu_entry(const at::Tensor& base, at::TensorList experts) {
  const std::vector<at::Tensor> contiguous = checked_experts("delta_gram", base, experts);
  TORCH_CHECK(base.device().is_cpu(), "delta_gram (CPU): base is on ", base.device());
  const ScalarKind kind = scalar_kind_of(base, "delta_gram", "base");
  std::vector<const void*> pointers;
  for (const at::Tensor& expert : contiguous) pointers.push_back(expert.const_data_ptr());
  const at::Tensor base_contiguous = base.contiguous();
  const int64_t n = static_cast<int64_t>(experts.size());
  at::Tensor gram = at::zeros({n, n}, base.options().dtype(at::kDouble));
  const int64_t numel = base.numel();
  if (numel == 0) return gram;

  const DeltaGramParams params{base_contiguous.const_data_ptr(), pointers.data(), n, numel, kind};
  const int64_t blocks = delta_gram_num_blocks(numel);
  // One partial Gram per block, summed below in block order: the same bits for any thread count.
  std::vector<double> partials(static_cast<size_t>(blocks * n * n));
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<double> scratch(static_cast<size_t>(delta_gram_scratch_doubles(n)));
    for (int64_t block = begin; block < end; ++block) {
      delta_gram_block_cpu(params, block, partials.data() + block * n * n, scratch.data());
    }
  });
  double* out = gram.data_ptr<double>();
  for (int64_t block = 0; block < blocks; ++block) {
    for (int64_t k = 0; k < n * n; ++k) out[k] += partials[block * n * n + k];
  }
  return gram;
}

TORCH_LIBRARY_IMPL(r2m_ext, CPU, m) { m.impl("delta_gram", &delta_gram_cpu_entry); }

}  // namespace r2m
