// The one extension module, r2m_ext._C: op schemas (declared once here, implemented per device
// under python/ops/) and build facts for r2m_ext.backend_info().
#include <torch/extension.h>
#include <torch/library.h>

#include "ops/host_memory.h"

TORCH_LIBRARY(r2m_ext, m) {
  // Gram matrix of task vectors (experts[i] - base), accumulated in float64, shape [N, N].
  m.def("delta_gram(Tensor base, Tensor[] experts) -> Tensor");
  // out[k] = base_weight * base + sum_j weights[k, j] (experts[j] - base), shape [K, *base.shape],
  // computed in compute_dtype (float32/float64), returned in out_dtype.
  m.def(
      "combine(Tensor base, Tensor[] experts, Tensor weights, float base_weight, "
      "ScalarType compute_dtype, ScalarType out_dtype) -> Tensor");
  // The same written into `out`, a [K, *base.shape] tensor whose dtype is the output dtype (a
  // reused workspace: fresh memory costs a page fault per page on its first write).
  m.def(
      "combine_into(Tensor base, Tensor[] experts, Tensor weights, float base_weight, "
      "ScalarType compute_dtype, Tensor(a!) out) -> ()");
  // Rank-`rank` SVD of a [..., m, n] by a Gaussian sketch of rank + oversample columns drawn from
  // (seed, key), n_iter power iterations: U [..., m, r], S [..., r], V [..., n, r].
  m.def(
      "randomized_svd(Tensor a, int rank, int oversample, int n_iter, int seed, int key) -> "
      "(Tensor, Tensor, Tensor)");
  // base + sum_i weights[i] left[i] right[i]^T (left [N, m, r], right [N, n, r]) as one product.
  m.def(
      "lowrank_accumulate(Tensor base, Tensor left, Tensor right, Tensor weights, "
      "ScalarType out_dtype) -> Tensor");
  // Per task, counts [N, 2^width] of the digit bits[shift, shift + width) of the float32 bit
  // patterns of |experts[i] - base| among the entries whose higher bits equal prefixes[i]: one
  // pass of an exact radix select of the k-th largest magnitude.
  m.def(
      "magnitude_histogram(Tensor base, Tensor[] experts, Tensor prefixes, int shift, int width, "
      "int[] dare_streams=[], int first_index=0, float drop_rate=0.) -> Tensor");
  // magnitude_histogram counted into `counts` (int64 [N, 2^width]); with a window [low[i],
  // high[i]] of digits per task ([2^width, 2^width]: none), also returns per task the float32
  // magnitude bit patterns (int32) of the nonzero entries it counted in the window. CPU only.
  m.def(
      "magnitude_histogram_into(Tensor(a!) counts, Tensor base, Tensor[] experts, "
      "Tensor prefixes, int shift, int width, Tensor? low=None, Tensor? high=None, "
      "int[] dare_streams=[], int first_index=0, float drop_rate=0.) -> Tensor[]");
  // Per task, the element index of the needed[i]-th entry (1-based, index order) whose float32
  // |experts[i] - base| equals thresholds[i] exactly, -1 where there are fewer (or needed[i] <
  // 1): the last of the entries tied at a top-k cut that the cut keeps. CPU only.
  m.def(
      "nth_at_magnitude(Tensor base, Tensor[] experts, Tensor thresholds, int[] needed) -> "
      "Tensor");
  // TIES-Merging in one pass, in float32: base + lam * the disjoint mean of the task vectors
  // trimmed below thresholds[i] that agree with the elected sign (sums over experts in order).
  // With dare_streams (one per expert), on the task vectors after DARE's mask (DARE-TIES); so
  // does magnitude_histogram.
  m.def(
      "ties_merge(Tensor base, Tensor[] experts, Tensor thresholds, float lam, "
      "int[] dare_streams=[], int first_index=0, float drop_rate=0.) -> Tensor");
  // mergekit's TIES of one whole tensor in one pass, in float32 (csrc/merge/ties_merge.h): each
  // task's entries above thresholds[i], or at it up to element index cutoffs[i], times
  // weights[i]; the sign elected by their sum; the agreeing ones summed, divided by the agreeing
  // tasks' weights where `normalize`, times lam, plus the base.
  m.def(
      "ties_merge_weighted(Tensor base, Tensor[] experts, Tensor thresholds, int[] cutoffs, "
      "float[] weights, bool normalize, float lam) -> Tensor");
  // DARE with task arithmetic in one pass, in float32: base + lam * sum_i of experts[i] - base
  // kept where the SplitMix64 uniform of (streams[i], first_index + e) >= drop_rate, rescaled by
  // 1 / (1 - drop_rate). Also returns 0 when every input is finite, else NaN.
  m.def(
      "dare_merge(Tensor base, Tensor[] experts, int[] streams, int first_index, float drop_rate, "
      "float lam) -> (Tensor, Tensor)");
  // The sketch's Gaussian test matrix, rows x columns float32, a function of (seed, key) alone.
  m.def("sketch_matrix(int seed, int key, int rows, int columns) -> Tensor");
  // Orthonormal basis of the columns of y [..., m, l] with no host synchronisation (the CUDA
  // path of randomized_svd), in float32 (float64 for float64 y).
  m.def("shifted_cholesky_qr3(Tensor y) -> Tensor");
}

PYBIND11_MODULE(_C, module) {
  module.doc() = "r2m_ext native ops (registered under torch.ops.r2m_ext)";
#if defined(R2M_WITH_CUDA)
  module.attr("with_cuda") = true;
#else
  module.attr("with_cuda") = false;
#endif
  module.attr("torch_version") = R2M_TORCH_VERSION;
  module.def(
      "set_large_allocations_fresh", [](bool fresh) { r2m::large_allocations_fresh() = fresh; },
      "Tells the CPU ops that glibc maps every large allocation on its own (the engine lowered "
      "its mmap threshold), so that their large outputs ask for huge pages instead.");
  module.def(
      "large_allocations_fresh", []() { return r2m::large_allocations_fresh().load(); },
      "Whether set_large_allocations_fresh(True) was called.");
}
