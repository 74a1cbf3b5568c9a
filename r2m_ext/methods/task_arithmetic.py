"""task_arithmetic (spec §6): theta_0 + lam * sum_i tau_i, elementwise over row blocks."""

from __future__ import annotations

from dataclasses import dataclass

from r2m_ext.methods.common import TaskTensors, mean_update
from r2m_ext.methods.passes import MethodPasses
from r2m_ext.methods.registry import MergeMethod, option, register


@dataclass(frozen=True)
class TaskArithmeticOptions:
    lam: float = option(0.3, "scale of the merged update")


def merge_task_arithmetic(
    tensors: TaskTensors, options: TaskArithmeticOptions, report: dict
) -> MethodPasses:
    # lam * sum_i tau_i = (lam * N) * mean_i tau_i
    scale = options.lam * tensors.n_experts
    return MethodPasses(
        write_label="task arithmetic", emit=lambda entry: mean_update(tensors, entry, scale)
    )


register(
    MergeMethod(
        name="task_arithmetic",
        summary="theta_0 + lam * sum of the task vectors",
        options=TaskArithmeticOptions,
        merge=merge_task_arithmetic,
        passes=("merge",),
        update_in_expert_span=True,
        merges_factors=True,
    )
)
