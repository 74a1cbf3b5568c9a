// Maps a tensor's dtype onto the kernels' ScalarKind, with an error that names the op and argument.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "common/scalar.h"

namespace r2m {

inline ScalarKind scalar_kind_of(const at::Tensor& tensor, const char* op, const char* arg) {
  switch (tensor.scalar_type()) {
    case at::kFloat:
      return ScalarKind::kFloat32;
    case at::kDouble:
      return ScalarKind::kFloat64;
    case at::kBFloat16:
      return ScalarKind::kBFloat16;
    case at::kHalf:
      return ScalarKind::kFloat16;
    default:
      TORCH_CHECK(false, op, ": ", arg, " must be float32, float64, bfloat16 or float16, got ",
                  tensor.scalar_type());
  }
}

}  // namespace r2m
