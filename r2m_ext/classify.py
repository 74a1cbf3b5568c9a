"""The one place that decides what each tensor is (spec §0): head, matrix, other, or non-float."""

from __future__ import annotations

import enum
import fnmatch
from collections.abc import Sequence

import torch


class TensorClass(enum.StrEnum):
    HEAD = "head"  # averaged over experts, nothing else
    MATRIX = "matrix"  # 2-D, min(m, n) >= 2, not excluded: the only tensors truncated
    OTHER = "other"  # every other floating tensor
    NON_FLOAT = "non-float"  # integer/bool buffers, copied from the base
    # A floating tensor with no elements (a shape with a 0): it merges to an empty tensor under
    # every method, so no method sees it (a row planner would divide by its 0 rows).
    EMPTY = "empty"


def is_head(name: str, head_patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in head_patterns)


def classify(
    name: str,
    shape: Sequence[int],
    dtype: torch.dtype,
    head_patterns: Sequence[str],
    exclude_truncation: Sequence[str],
) -> TensorClass:
    if not dtype.is_floating_point:
        return TensorClass.NON_FLOAT
    if any(size == 0 for size in shape):
        return TensorClass.EMPTY
    if is_head(name, head_patterns):
        return TensorClass.HEAD
    lowered = name.lower()
    excluded = any(fnmatch.fnmatchcase(lowered, p.lower()) for p in exclude_truncation)
    if len(shape) == 2 and min(shape) >= 2 and not excluded:
        return TensorClass.MATRIX
    return TensorClass.OTHER


def in_core_set(tensor_class: TensorClass, shape: Sequence[int]) -> bool:
    """Spec §0 core_set S: head-free floating tensors with ndim >= 2 (no biases, no norms)."""
    return tensor_class in (TensorClass.MATRIX, TensorClass.OTHER) and len(shape) >= 2
