// Torch-facing entry of magnitude_histogram: checks, and a parallel loop over fixed-size blocks of
// the Python-free core (csrc/merge/magnitude_histogram_cpu.cpp), one histogram per thread, added
// at the end (integer counts: the same result for any thread count).
#include "merge/magnitude_histogram.h"

#include <ATen/Functions.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <optional>
#include <vector>

#include "ops/checks.h"
#include "ops/scalar_kind.h"

namespace r2m {

namespace {

constexpr int64_t kBlock = 1 << 16;

}  // namespace

namespace {

// params restricted to tasks [first, last): their experts, prefixes, windows and mask streams.
MagnitudeHistogramParams tasks_of(const MagnitudeHistogramParams& params, int64_t first,
                                  int64_t last) {
  MagnitudeHistogramParams sub = params;
  sub.experts += first;
  sub.n_experts = last - first;
  sub.prefixes += first;
  if (sub.collect_low != nullptr) {
    sub.collect_low += first;
    sub.collect_high += first;
  }
  if (sub.mask.streams != nullptr) sub.mask.streams += first;
  return sub;
}

// Adds the histogram of every element into counts [n, 2^width] (and, with a window, collects
// into collected[i]). In parallel over tasks where they split evenly over the threads: each
// task's counts and collection then belong to one thread, counted straight into `counts` and
// collected in index order (the base is read once per thread). Else over blocks of elements, one
// histogram and collection per thread, added at the end (a collection then in no fixed order).
void add_histogram(const MagnitudeHistogramParams& params, int64_t* counts,
                   std::vector<std::vector<uint32_t>>* collected) {
  const int64_t n = params.n_experts;
  const int64_t numel = params.numel;
  const int64_t bins = int64_t{1} << params.width;
  std::vector<uint32_t>* into = collected != nullptr ? collected->data() : nullptr;
  const int64_t blocks = (numel + kBlock - 1) / kBlock;
  const int threads = at::get_num_threads();
  if (blocks == 1 || threads == 1) {  // a bias or a norm, or one thread
    magnitude_histogram_cpu(params, 0, numel, counts, into);
    return;
  }
  if (n % threads == 0) {  // (3 tasks on 2 threads would leave one thread half the work)
    at::parallel_for(0, n, 1, [&](int64_t first, int64_t last) {
      magnitude_histogram_cpu(tasks_of(params, first, last), 0, numel, counts + first * bins,
                              into != nullptr ? into + first : nullptr);
    });
    return;
  }
  std::vector<std::vector<int64_t>> partial(static_cast<size_t>(threads));
  std::vector<std::vector<std::vector<uint32_t>>> partial_collected(static_cast<size_t>(threads));
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    const size_t thread = static_cast<size_t>(at::get_thread_num());
    std::vector<int64_t>& mine = partial[thread];
    if (mine.empty()) mine.assign(static_cast<size_t>(n * bins), 0);
    std::vector<std::vector<uint32_t>>& mine_collected = partial_collected[thread];
    if (into != nullptr && mine_collected.empty()) mine_collected.resize(static_cast<size_t>(n));
    magnitude_histogram_cpu(params, begin * kBlock, std::min(numel, end * kBlock), mine.data(),
                            into != nullptr ? mine_collected.data() : nullptr);
  });
  for (const std::vector<int64_t>& mine : partial) {
    for (size_t k = 0; k < mine.size(); ++k) counts[k] += mine[k];
  }
  for (std::vector<std::vector<uint32_t>>& mine : partial_collected) {
    for (size_t i = 0; i < mine.size(); ++i) {
      into[i].insert(into[i].end(), mine[i].begin(), mine[i].end());
    }
  }
}

// Checks the arguments and adds the histogram of base and experts into counts.
void histogram_into(at::Tensor& counts, const at::Tensor& base, at::TensorList experts,
                    const char* op, const at::Tensor& prefixes, int64_t shift, int64_t width,
                    at::IntArrayRef dare_streams, int64_t first_index, double drop_rate,
                    const int64_t* collect_low, const int64_t* collect_high,
                    std::vector<std::vector<uint32_t>>* collected) {
  const std::vector<at::Tensor> contiguous = checked_experts(op, base, experts);
  TORCH_CHECK(base.device().is_cpu(), op, " (CPU): base is on ", base.device());
  const ScalarKind kind = scalar_kind_of(base, op, "base");
  const int64_t n = static_cast<int64_t>(experts.size());
  check_histogram_digit(prefixes, shift, width, n);
  check_histogram_counts(op, counts, base, n, width);
  const at::Tensor prefixes_cpu = prefixes.to(at::kCPU).contiguous();
  std::vector<uint64_t> stream_bits;
  const DareMask mask = checked_dare_mask(op, dare_streams, first_index, drop_rate, n, stream_bits);
  std::vector<const void*> pointers;
  for (const at::Tensor& expert : contiguous) pointers.push_back(expert.const_data_ptr());
  const at::Tensor base_contiguous = base.contiguous();
  if (collected != nullptr) collected->assign(static_cast<size_t>(n), {});
  if (base.numel() == 0) return;
  MagnitudeHistogramParams params{base_contiguous.const_data_ptr(),
                                  pointers.data(),
                                  n,
                                  base.numel(),
                                  kind,
                                  prefixes_cpu.const_data_ptr<int64_t>(),
                                  static_cast<int>(shift),
                                  static_cast<int>(width),
                                  mask};
  params.collect_low = collect_low;
  params.collect_high = collect_high;
  add_histogram(params, counts.data_ptr<int64_t>(), collected);
}

}  // namespace

at::Tensor magnitude_histogram_cpu_entry(const at::Tensor& base, at::TensorList experts,
                                         const at::Tensor& prefixes, int64_t shift, int64_t width,
                                         at::IntArrayRef dare_streams, int64_t first_index,
                                         double drop_rate) {
  at::Tensor counts = zero_histogram(base, static_cast<int64_t>(experts.size()), width);
  histogram_into(counts, base, experts, "magnitude_histogram", prefixes, shift, width, dare_streams,
                 first_index, drop_rate, nullptr, nullptr, nullptr);
  return counts;
}

std::vector<at::Tensor> magnitude_histogram_into_cpu_entry(
    at::Tensor& counts, const at::Tensor& base, at::TensorList experts, const at::Tensor& prefixes,
    int64_t shift, int64_t width, const std::optional<at::Tensor>& low,
    const std::optional<at::Tensor>& high, at::IntArrayRef dare_streams, int64_t first_index,
    double drop_rate) {
  const char* op = "magnitude_histogram_into";
  const int64_t n = static_cast<int64_t>(experts.size());
  TORCH_CHECK(low.has_value() == high.has_value(), op, ": give both low and high, or neither");
  if (!low.has_value()) {
    histogram_into(counts, base, experts, op, prefixes, shift, width, dare_streams, first_index,
                   drop_rate, nullptr, nullptr, nullptr);
    return {};
  }
  const int64_t bins = histogram_bins(width);
  for (const at::Tensor* window : {&*low, &*high}) {
    TORCH_CHECK(window->dim() == 1 && window->size(0) == n && window->scalar_type() == at::kLong,
                op, ": low and high must be int64 [", n, "], got ", window->scalar_type(), " ",
                window->sizes());
  }
  const at::Tensor low_cpu = low->to(at::kCPU).contiguous();
  const at::Tensor high_cpu = high->to(at::kCPU).contiguous();
  for (int64_t i = 0; i < n; ++i) {
    const int64_t lo = low_cpu.const_data_ptr<int64_t>()[i];
    const int64_t hi = high_cpu.const_data_ptr<int64_t>()[i];
    // [2^width, 2^width] is an empty window (no digit reaches it): a task that collects nothing.
    TORCH_CHECK(0 <= lo && lo <= hi && hi <= bins, op, ": task ", i, "'s window [", lo, ", ", hi,
                "] is not a range of digits in [0, ", bins, "]");
  }
  std::vector<std::vector<uint32_t>> collected;
  histogram_into(counts, base, experts, op, prefixes, shift, width, dare_streams, first_index,
                 drop_rate, low_cpu.const_data_ptr<int64_t>(), high_cpu.const_data_ptr<int64_t>(),
                 &collected);
  std::vector<at::Tensor> patterns;
  for (const std::vector<uint32_t>& task : collected) {
    // Bit patterns of non-negative floats: below 2^31, so int32 holds them as they are.
    at::Tensor values =
        at::empty({static_cast<int64_t>(task.size())}, counts.options().dtype(at::kInt));
    std::memcpy(values.data_ptr<int32_t>(), task.data(), task.size() * sizeof(uint32_t));
    patterns.push_back(values);
  }
  return patterns;
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
  m.impl("magnitude_histogram_into", &magnitude_histogram_into_cpu_entry);
  m.impl("nth_at_magnitude", &nth_at_magnitude_cpu_entry);
}

}  // namespace r2m
