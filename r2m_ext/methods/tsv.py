"""tsv (spec §6, TSV-M): per matrix, the top floor(min(m, n) / N) singular triplets of each task
vector, their concatenated singular vectors replaced by their orthogonal polar factors; the mean
elsewhere."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from r2m_ext.classify import TensorClass
from r2m_ext.methods.common import (
    SvdOptions,
    TaskTensors,
    factoring_work,
    finite_if_factored,
    low_rank_factors,
    mean_update,
    svd_workspace_stacks,
)
from r2m_ext.methods.passes import Merged, MethodPasses
from r2m_ext.methods.registry import MergeMethod, option, register
from r2m_ext.plan import TensorPlan


@dataclass(frozen=True)
class TsvOptions(SvdOptions):
    alpha: float = option(1.0, "scale of the merged update")


def polar_factor(matrix: torch.Tensor) -> torch.Tensor:
    """The orthogonal polar factor P Q^T of matrix = P Sigma Q^T."""
    p, _, qh = torch.linalg.svd(matrix, full_matrices=False)
    return p @ qh


def tsv_rank(shape: tuple[int, ...], n_tasks: int) -> int:
    """Spec §6: floor(min(m, n) / N) triplets per task (0 when N > min(m, n): none kept)."""
    return min(shape) // n_tasks


def tsv_update(tau: torch.Tensor, options: SvdOptions, key: str) -> torch.Tensor:
    """TSV-M's merged update of one matrix from its task vectors tau [N, m, n] (tsv_rank > 0);
    `key` (the tensor name) keys the randomized sketch."""
    n, m, cols = tau.shape
    rank = tsv_rank((m, cols), n)
    u, s, v = low_rank_factors(tau, rank, options, key)
    u_joint = polar_factor(u.permute(1, 0, 2).reshape(m, n * rank))
    v_joint = polar_factor(v.permute(1, 0, 2).reshape(cols, n * rank))
    return (u_joint * s.reshape(1, n * rank)) @ v_joint.T


def merge_tsv(tensors: TaskTensors, options: TsvOptions, report: dict) -> MethodPasses:
    def emit(entry: TensorPlan) -> Merged:
        if entry.tensor_class is not TensorClass.MATRIX:
            yield from mean_update(tensors, entry)
            return
        if tsv_rank(entry.shape, tensors.n_experts) == 0:
            for rows, base, _ in tensors.blocks(entry):
                yield entry.name, rows, base
            return
        base, tau = tensors.load(
            entry.name, svd_workspace_stacks(options), purpose="run TSV-M's SVDs", task_vectors=True
        )
        yield entry.name, None, base + options.alpha * tsv_update(tau, options, entry.name)

    return MethodPasses(write_label="TSV-M", emit=emit)


register(
    MergeMethod(
        name="tsv",
        summary="TSV-M: per-task singular vectors, decorrelated by polar factors",
        options=TsvOptions,
        merge=merge_tsv,
        passes=("merge",),
        why_finite_required=finite_if_factored,
        relative_work=factoring_work,
    )
)
