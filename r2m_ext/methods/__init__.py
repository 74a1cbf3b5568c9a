"""R²M and the baselines as per-tensor math over a TaskTensors source (no files, no passes over
disk: the source decides where tensors come from)."""

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

__all__ = ["METHOD_FUNCTIONS", "TaskTensors"]
