// Torch-facing entry of magnitude_histogram: checks, and a parallel loop over fixed-size blocks of
// the Python-free core (csrc/merge/magnitude_histogram_cpu.cpp), one histogram per thread, added
// at the end (integer counts: the same result for any thread count).
#include "merge/magnitude_histogram.h"

#include <ATen/Functions.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "ops/checks.h"
#include "ops/scalar_kind.h"

namespace r2m {

namespace {

constexpr int64_t kBlock = 1 << 16;

}  // namespace

at::Tensor magnitude_histogram_cpu_entry(const at::Tensor& base, at::TensorList experts,
                                         const at::Tensor& prefixes, int64_t shift, int64_t width,
                                         at::IntArrayRef dare_streams, int64_t first_index,
                                         double drop_rate) {
  const std::vector<at::Tensor> contiguous = checked_experts("magnitude_histogram", base, experts);
  TORCH_CHECK(base.device().is_cpu(), "magnitude_histogram (CPU): base is on ", base.device());
  const ScalarKind kind = scalar_kind_of(base, "magnitude_histogram", "base");
  const int64_t n = static_cast<int64_t>(experts.size());
  check_histogram_digit(prefixes, shift, width, n);
  const at::Tensor prefixes_cpu = prefixes.to(at::kCPU).contiguous();
  std::vector<uint64_t> stream_bits;
  const DareMask mask = checked_dare_mask("magnitude_histogram", dare_streams, first_index,
                                          drop_rate, n, stream_bits);
  std::vector<const void*> pointers;
  for (const at::Tensor& expert : contiguous) pointers.push_back(expert.const_data_ptr());
  const at::Tensor base_contiguous = base.contiguous();
  const int64_t bins = int64_t{1} << width;
  at::Tensor counts = at::zeros({n, bins}, base.options().dtype(at::kLong));
  const int64_t numel = base.numel();
  if (numel == 0) return counts;

  const MagnitudeHistogramParams params{base_contiguous.const_data_ptr(),
                                        pointers.data(),
                                        n,
                                        numel,
                                        kind,
                                        prefixes_cpu.const_data_ptr<int64_t>(),
                                        static_cast<int>(shift),
                                        static_cast<int>(width),
                                        mask};
  int64_t* out = counts.data_ptr<int64_t>();
  const int64_t blocks = (numel + kBlock - 1) / kBlock;
  if (blocks == 1) {  // a bias or a norm: no thread's histogram to clear (n x 2^width) and add
    magnitude_histogram_cpu(params, 0, numel, out);
    return counts;
  }
  const int threads = at::get_num_threads();
  std::vector<std::vector<int64_t>> partial(static_cast<size_t>(threads));
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t>& mine = partial[static_cast<size_t>(at::get_thread_num())];
    if (mine.empty()) mine.assign(static_cast<size_t>(n * bins), 0);
    magnitude_histogram_cpu(params, begin * kBlock, std::min(numel, end * kBlock), mine.data());
  });
  for (const std::vector<int64_t>& mine : partial) {
    for (size_t k = 0; k < mine.size(); ++k) out[k] += mine[k];
  }
  return counts;
}

at::Tensor nth_at_magnitude_cpu_entry(const at::Tensor& base, at::TensorList experts,
                                      const at::Tensor& thresholds, at::IntArrayRef needed) {
  const std::vector<at::Tensor> contiguous = checked_experts("nth_at_magnitude", base, experts);
  TORCH_CHECK(base.device().is_cpu(), "nth_at_magnitude (CPU): base is on ", base.device());
  const ScalarKind kind = scalar_kind_of(base, "nth_at_magnitude", "base");
  const int64_t n = static_cast<int64_t>(experts.size());
  check_thresholds(thresholds, n);
  TORCH_CHECK(static_cast<int64_t>(needed.size()) == n, "nth_at_magnitude: needs one count per ",
              "expert (", n, "), got ", needed.size());
  const at::Tensor thresholds_cpu = thresholds.to(at::kCPU).contiguous();
  std::vector<uint32_t> magnitudes(static_cast<size_t>(n));
  std::memcpy(magnitudes.data(), thresholds_cpu.const_data_ptr<float>(), n * sizeof(float));
  std::vector<const void*> pointers;
  for (const at::Tensor& expert : contiguous) pointers.push_back(expert.const_data_ptr());
  const at::Tensor base_contiguous = base.contiguous();
  const int64_t numel = base.numel();
  const MagnitudeMatchParams params{
      base_contiguous.const_data_ptr(), pointers.data(), n, numel, kind, magnitudes.data()};
  // Each block's matches, counted in parallel (a column per block); then per task the block
  // holding its n-th match, and the match within it: the same index for any thread count.
  const int64_t blocks = (numel + kBlock - 1) / kBlock;
  std::vector<int64_t> counts(static_cast<size_t>(blocks * n), 0);
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t block = begin; block < end; ++block) {
      count_at_magnitude_cpu(params, block * kBlock, std::min(numel, (block + 1) * kBlock),
                             counts.data() + block * n);
    }
  });
  at::Tensor found = at::full({n}, -1, base.options().dtype(at::kLong));
  int64_t* out = found.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) {
    int64_t left = needed[i];
    if (left <= 0) continue;
    for (int64_t block = 0; block < blocks; ++block) {
      const int64_t here = counts[static_cast<size_t>(block * n + i)];
      if (left > here) {
        left -= here;
        continue;
      }
      out[i] = find_at_magnitude_cpu(params, i, block * kBlock,
                                     std::min(numel, (block + 1) * kBlock), left);
      break;
    }
  }
  return found;
}

TORCH_LIBRARY_IMPL(r2m_ext, CPU, m) {
  m.impl("magnitude_histogram", &magnitude_histogram_cpu_entry);
  m.impl("nth_at_magnitude", &nth_at_magnitude_cpu_entry);
}

}  // namespace r2m
