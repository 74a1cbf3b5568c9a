// The one extension module, r2m_ext._C: op schemas (declared once here, implemented per device
// under python/ops/) and build facts for r2m_ext.backend_info().
#include <torch/extension.h>
#include <torch/library.h>

TORCH_LIBRARY(r2m_ext, m) {
  // Gram matrix of task vectors (experts[i] - base), accumulated in float64, shape [N, N].
  m.def("delta_gram(Tensor base, Tensor[] experts) -> Tensor");
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
