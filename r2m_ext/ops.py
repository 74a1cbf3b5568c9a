"""Public ops. Each runs the native kernel when r2m_ext._C is built and supports the inputs, and
the pure-torch reference (r2m_ext/reference.py) otherwise, with the same result to rounding."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from r2m_ext import reference
from r2m_ext._backend import native_module

_NATIVE_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

if native_module() is not None:

    @torch.library.register_fake("r2m_ext::delta_gram")
    def _delta_gram_fake(base, experts):
        return base.new_empty((len(experts), len(experts)), dtype=torch.float64)


def delta_gram(base: torch.Tensor, experts: Sequence[torch.Tensor]) -> torch.Tensor:
    """Gram matrix of task vectors, G[i, j] = <experts[i] - base, experts[j] - base>.

    base: any shape; experts: N tensors of base's shape and dtype (float32, float64, bfloat16 or
    float16). Returns float64 [N, N]. The subtraction is fused into the reduction (no task vector
    is materialised) and accumulation is in float64 in fixed-size blocks summed in order, so the
    result is bitwise deterministic for any thread count. Results of row blocks of one tensor
    may be summed across calls.
    """
    if (
        native_module() is not None
        and base.device.type == "cpu"
        and base.dtype in _NATIVE_DTYPES
        and len(experts) > 0
    ):
        return torch.ops.r2m_ext.delta_gram.default(base, list(experts))
    return reference.delta_gram(base, experts)


truncated_svd = reference.truncated_svd
randomized_svd = reference.randomized_svd
