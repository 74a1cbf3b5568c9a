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

    @torch.library.register_fake("r2m_ext::combine")
    def _combine_fake(base, experts, weights, base_weight, compute_dtype, out_dtype):
        return base.new_empty((weights.shape[0], *base.shape), dtype=out_dtype)


def _native_supports(base: torch.Tensor, experts: Sequence[torch.Tensor]) -> bool:
    return (
        native_module() is not None
        and base.device.type == "cpu"
        and base.dtype in _NATIVE_DTYPES
        and len(experts) > 0
    )


def delta_gram(base: torch.Tensor, experts: Sequence[torch.Tensor]) -> torch.Tensor:
    """Gram matrix of task vectors, G[i, j] = <experts[i] - base, experts[j] - base>.

    base: any shape; experts: N tensors of base's shape and dtype (float32, float64, bfloat16 or
    float16). Returns float64 [N, N]. The subtraction is fused into the reduction (no task vector
    is materialised) and accumulation is in float64 in fixed-size blocks summed in order, so the
    result is bitwise deterministic for any thread count. Results of row blocks of one tensor
    may be summed across calls.
    """
    if _native_supports(base, experts):
        return torch.ops.r2m_ext.delta_gram.default(base, list(experts))
    return reference.delta_gram(base, experts)


def combine(
    base: torch.Tensor,
    experts: Sequence[torch.Tensor],
    weights: torch.Tensor,
    base_weight: float = 1.0,
    compute_dtype: torch.dtype = torch.float32,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """K linear combinations of task vectors in one pass over the inputs:
    out[k] = base_weight * base + sum_j weights[k, j] * (experts[j] - base).

    base and the N experts: one shape and floating dtype (16-bit inputs are widened on load);
    weights: [K, N]. Computed in `compute_dtype` (float32 or float64) and returned as
    [K, *base.shape] in `out_dtype` (default: compute_dtype). No task vector is materialised;
    each element is computed independently in a fixed order, so the result is bitwise the same
    for any thread count and any split of the tensor into blocks.
    """
    out_dtype = compute_dtype if out_dtype is None else out_dtype
    if _native_supports(base, experts):
        return torch.ops.r2m_ext.combine.default(
            base, list(experts), weights, float(base_weight), compute_dtype, out_dtype
        )
    return reference.combine(base, experts, weights, base_weight, compute_dtype, out_dtype)


truncated_svd = reference.truncated_svd
randomized_svd = reference.randomized_svd
