"""tsv (spec §6, TSV-M): per matrix, the top floor(min(m, n) / N) singular triplets of each task
vector, their concatenated singular vectors replaced by their orthogonal polar factors; the mean
elsewhere. Matrices every expert updates by LoRA factors are merged from the factors, exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from r2m_ext.classify import TensorClass
from r2m_ext.methods.common import (
    FactorBasis,
    SvdOptions,
    TaskTensors,
    factored_output,
    factoring_work,
    finite_if_factored,
    low_rank_factors,
    mean_update,
    svd_workspace_stacks,
)
from r2m_ext.methods.passes import LowRankUpdate, Merged, MethodPasses
from r2m_ext.methods.registry import MergeMethod, option, register
from r2m_ext.plan import TensorPlan


@dataclass(frozen=True)
class TsvOptions(SvdOptions):
    alpha: float = option(1.0, "scale of the merged update")


# The Gram route to a polar factor rounds like an SVD where cond(G) = cond(matrix)^2 stays below
# this: its error grows as cond(G) times the dtype's epsilon (float32: under 1e-5 here).
POLAR_GRAM_CONDITION = 100.0


def polar_parts(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B [m, k], C [k, k]) whose product B C is the orthogonal polar factor P Q^T of matrix =
    P Sigma Q^T, [m, k] with m >= k: kept apart, so that a caller can multiply the small C
    into other k-sized factors before touching the m rows.

    A tall matrix (m >= 2k: TSV-M's concatenated left vectors of a 3072 x 768 matrix) usually
    has nearly orthonormal columns, as its tasks' subspaces overlap little: there the factor is
    matrix G^-1/2 for its Gram G = matrix^T matrix, by a k x k eigendecomposition (72 ms against
    the SVD's 173 ms for [3072, 768] float32 on 2 cores, measured). Where G is not that well
    conditioned (a square matrix of N full bases usually is not), the SVD decides: (P, Q^T)."""
    rows, cols = matrix.shape[-2:]
    if rows >= 2 * cols:
        gram = matrix.mT @ matrix
        eigenvalues, vectors = torch.linalg.eigh(gram)
        smallest, largest = eigenvalues[0], eigenvalues[-1]
        if smallest > 0 and largest <= POLAR_GRAM_CONDITION * smallest:
            return matrix, (vectors * eigenvalues.rsqrt()) @ vectors.mT
    p, _, qh = torch.linalg.svd(matrix, full_matrices=False)
    return p, qh


def polar_factor(matrix: torch.Tensor) -> torch.Tensor:
    """The orthogonal polar factor P Q^T of matrix = P Sigma Q^T, [m, k] with m >= k."""
    rows, small = polar_parts(matrix)
    return rows @ small


def tsv_rank(shape: tuple[int, ...], n_tasks: int) -> int:
    """Spec §6: floor(min(m, n) / N) triplets per task (0 when N > min(m, n): none kept)."""
    return min(shape) // n_tasks


def tsv_update(tau: torch.Tensor, options: SvdOptions, key: str) -> torch.Tensor:
    """TSV-M's merged update of one matrix from its task vectors tau [N, m, n] (tsv_rank > 0);
    `key` (the tensor name) keys the randomized sketch."""
    n, m, cols = tau.shape
    rank = tsv_rank((m, cols), n)
    u, s, v = low_rank_factors(tau, rank, options, key)
    u_rows, u_small = polar_parts(u.permute(1, 0, 2).reshape(m, n * rank))
    v_rows, v_small = polar_parts(v.permute(1, 0, 2).reshape(cols, n * rank))
    # U_joint diag(s) V_joint^T with the k x k parts multiplied together first, then into the
    # shorter side's rows: 2 min(m, n) k^2 flops where forming both joint factors takes
    # 2 (m + n) k^2 (fc1 of ViT-B/16: 2.7 GFLOP less).
    core = (u_small * s.reshape(1, n * rank)) @ v_small.mT
    if m >= cols:
        return u_rows @ (core @ v_rows.mT)
    return (u_rows @ core) @ v_rows.mT


def tsv_factored(basis: FactorBasis, ranks: list[int], rank: int, alpha: float) -> LowRankUpdate:
    """alpha times TSV-M's merged update of a matrix every expert updates by LoRA factors
    (expert i of rank `ranks[i]`), from their `basis`: tau_i = Q_L C_i Q_R^T, so its top
    triplets are Q_L U_i, S_i, Q_R V_i from the SVD of the small core C_i, and the polar factor
    of [Q_L U_1 .. Q_L U_N] is Q_L times that of [U_1 .. U_N]: the update is Q_L M Q_R^T for a
    K x K core M, exact. Each expert keeps min(`rank`, r_i) triplets: the others have zero
    singular values, and their arbitrary singular vectors would only rotate the polar factors
    (a dense SVD keeps them; see the README)."""
    n = len(ranks)
    cores = basis.core(torch.eye(n, dtype=torch.float64))
    u, s, vh = torch.linalg.svd(cores, full_matrices=False)
    kept = [min(rank, r_i, s.shape[-1]) for r_i in ranks]
    if sum(kept) == 0:  # no expert updates it
        return LowRankUpdate(basis.q_left, basis.q_right, torch.zeros_like(cores[0]))
    u_joint = polar_factor(torch.cat([u[i, :, :k] for i, k in enumerate(kept)], dim=1))
    v_joint = polar_factor(torch.cat([vh[i, :k].T for i, k in enumerate(kept)], dim=1))
    singular = torch.cat([s[i, :k] for i, k in enumerate(kept)])
    core = alpha * (u_joint * singular) @ v_joint.T
    return LowRankUpdate(basis.q_left, basis.q_right, core)


def merge_tsv(tensors: TaskTensors, options: TsvOptions, report: dict) -> MethodPasses:
    def emit(entry: TensorPlan) -> Merged:
        if entry.tensor_class is not TensorClass.MATRIX:
            yield from mean_update(tensors, entry)
            return
        rank = tsv_rank(entry.shape, tensors.n_experts)
        if rank == 0:
            for rows, base, _ in tensors.blocks(entry):
                yield entry.name, rows, base
            return
        factors = tensors.low_rank_updates(entry)
        if factors is not None:
            ranks = [left.shape[1] for left, _ in factors]
            update = tsv_factored(FactorBasis.of(factors), ranks, rank, options.alpha)
            merged = factored_output(tensors, entry, update)
            if merged is not None:
                yield entry.name, None, merged
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
        update_in_expert_span=True,
        merges_factors=True,
        why_finite_required=finite_if_factored,
        relative_work=factoring_work,
    )
)
