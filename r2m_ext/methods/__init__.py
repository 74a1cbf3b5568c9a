"""R²M and the baselines as per-tensor math over a TaskTensors source (no files, no passes over
disk: the source decides where tensors come from)."""

from r2m_ext.classify import TensorClass
from r2m_ext.methods.baselines import (
    merge_average,
    merge_cart,
    merge_dare,
    merge_task_arithmetic,
    merge_ties,
    merge_tsv,
)
from r2m_ext.methods.common import TaskTensors
from r2m_ext.methods.r2m import merge_r2m

METHOD_FUNCTIONS = {
    "r2m": merge_r2m,
    "average": merge_average,
    "task_arithmetic": merge_task_arithmetic,
    "ties": merge_ties,
    "dare": merge_dare,
    "tsv": merge_tsv,
    "cart": merge_cart,
}


def _is_matrix(entry) -> bool:
    return entry.tensor_class is TensorClass.MATRIX


def _is_body(entry) -> bool:
    return entry.tensor_class in (TensorClass.MATRIX, TensorClass.OTHER)


# Why a method cannot carry NaN/Inf through a tensor, where it cannot: allow_nonfinite lets
# elementwise arithmetic propagate them, but an SVD of a non-finite matrix has no meaning, and
# R²M mixes every tensor into statistics shared by all (its Real core's Gram, the norms of
# norm matching and eta), so one non-finite entry would spoil the whole model.
_FINITE_REASONS = {
    "r2m": (_is_body, "every tensor but the heads feeds its Real core and norm matching"),
    "tsv": (_is_matrix, "it factors this matrix"),
    "cart": (_is_matrix, "it factors this matrix"),
}


def why_finite_required(method: str, entry) -> str | None:
    """Why `method` needs `entry`'s inputs finite whatever allow_nonfinite says, or None."""
    applies, reason = _FINITE_REASONS.get(method, (lambda entry: False, ""))
    return reason if applies(entry) else None


__all__ = ["METHOD_FUNCTIONS", "TaskTensors", "why_finite_required"]
