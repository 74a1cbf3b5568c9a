// The one extension module, r2m_ext._C: op schemas (declared once here, implemented per device
// under python/ops/) and build facts for r2m_ext.backend_info().
#include <torch/extension.h>
#include <torch/library.h>

TORCH_LIBRARY(r2m_ext, m) {
  // Gram matrix of task vectors (experts[i] - base), accumulated in float64, shape [N, N].
  m.def("delta_gram(Tensor base, Tensor[] experts) -> Tensor");
  // out[k] = base_weight * base + sum_j weights[k, j] (experts[j] - base), shape [K, *base.shape],
  // computed in compute_dtype (float32/float64), returned in out_dtype.
  m.def(
      "combine(Tensor base, Tensor[] experts, Tensor weights, float base_weight, "
      "ScalarType compute_dtype, ScalarType out_dtype) -> Tensor");
}

PYBIND11_MODULE(_C, module) {
  module.doc() = "r2m_ext native ops (registered under torch.ops.r2m_ext)";
#if defined(R2M_WITH_CUDA)
  module.attr("with_cuda") = true;
#else
  module.attr("with_cuda") = false;
#endif
  module.attr("torch_version") = R2M_TORCH_VERSION;
}
