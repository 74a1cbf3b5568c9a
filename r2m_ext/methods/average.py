"""average (spec §6): theta_0 + mean_i tau_i, elementwise over row blocks."""

from __future__ import annotations

from dataclasses import dataclass

from r2m_ext.methods.common import TaskTensors, mean_update
from r2m_ext.methods.passes import MethodPasses
from r2m_ext.methods.registry import MergeMethod, register


@dataclass(frozen=True)
class AverageOptions:
    """average takes no options of its own."""


def merge_average(tensors: TaskTensors, options: AverageOptions, report: dict) -> MethodPasses:
    return MethodPasses(write_label="average", emit=lambda entry: mean_update(tensors, entry))


register(
    MergeMethod(
        name="average",
        summary="theta_0 + mean of the task vectors",
        options=AverageOptions,
        merge=merge_average,
        passes=("merge",),
        update_in_expert_span=True,
        merges_factors=True,
    )
)
