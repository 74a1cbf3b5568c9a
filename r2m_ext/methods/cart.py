"""cart (spec §6, CART): theta_avg plus lam times the rank-rho truncations of each expert's
difference from theta_avg, per matrix; theta_avg elsewhere. Truncated matrices that every
expert updates by LoRA factors are merged from the factors, exactly."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from r2m_ext import ops
from r2m_ext.methods.common import (
    FactorBasis,
    SvdOptions,
    TaskTensors,
    factored_output,
    factoring_work,
    finite_if_factored,
    low_rank_factors,
    svd_workspace_stacks,
    truncates,
    truncation_rank,
)
from r2m_ext.methods.passes import LowRankUpdate, Merged, MethodPasses
from r2m_ext.methods.registry import MergeMethod, Range, option, register
from r2m_ext.plan import TensorPlan


@dataclass(frozen=True)
class CartOptions(SvdOptions):
    rank_ratio: float = option(
        0.12,
        "kept rank = max(1, floor(rank_ratio * min(m, n))) per matrix",
        check=Range(0, 1, low_open=True),
    )
    lam: float = option(2.0, "scale of the merged update")


def cart_elementwise(base: torch.Tensor, tau: torch.Tensor, lam: float) -> torch.Tensor:
    """CART where no truncation applies: theta_avg + lam * sum_i (tau_i - mean), which is
    theta_avg up to rounding; elementwise, so any block of rows."""
    mean = tau.mean(0)
    return base + mean + lam * (tau - mean).sum(0)


def cart_truncated(
    base: torch.Tensor, tau: torch.Tensor, rank: int, options: CartOptions, key: str
) -> torch.Tensor:
    """CART of one matrix: theta_avg + lam * sum_i of the rank-`rank` truncations of
    tau_i - mean (tau [N, m, n]); `key` (the tensor name) keys the randomized sketch."""
    mean = tau.mean(0)
    u, s, v = low_rank_factors(tau - mean, rank, options, key)
    lam = torch.full((tau.shape[0],), options.lam, dtype=torch.float64)
    return ops.lowrank_accumulate(base + mean, u * s.unsqueeze(-2), v, lam)


def cart_factored(basis: FactorBasis, n: int, rank: int, lam: float) -> LowRankUpdate:
    """CART's merged update of a matrix every expert updates by LoRA factors, from their
    `basis`: tau_i - mean is Q_L C_i Q_R^T with C_i the core of weights e_i - 1/N, so its
    rank-`rank` truncation is Q_L trunc(C_i) Q_R^T (exact, nothing sketched), and the update
    mean + lam sum_i trunc(tau_i - mean) is Q_L M Q_R^T for a K x K core M."""
    mean_weights = torch.full((n,), 1.0 / n, dtype=torch.float64)
    differences = basis.core(torch.eye(n, dtype=torch.float64) - mean_weights)
    u, s, vh = torch.linalg.svd(differences, full_matrices=False)
    keep = min(rank, s.shape[-1])
    truncated = (u[..., :keep] * s[:, None, :keep]) @ vh[:, :keep]
    return LowRankUpdate(
        basis.q_left, basis.q_right, basis.core(mean_weights) + lam * truncated.sum(0)
    )


def merge_cart(tensors: TaskTensors, options: CartOptions, report: dict) -> MethodPasses:
    def emit(entry: TensorPlan) -> Merged:
        rank = truncation_rank(entry, options.rank_ratio)
        factors = tensors.low_rank_updates(entry) if truncates(entry, rank) else None
        if factors is not None:
            update = cart_factored(FactorBasis.of(factors), tensors.n_experts, rank, options.lam)
            merged = factored_output(tensors, entry, update)
            if merged is not None:
                yield entry.name, None, merged
                return
        if not truncates(entry, rank):
            for rows, base, experts in tensors.blocks(entry, extra_stacks=2):
                tau = experts - base
                del experts
                yield entry.name, rows, cart_elementwise(base, tau, options.lam)
                del base, tau  # one block at a time (MergeInputs.blocks)
            return
        base, tau = tensors.load(
            entry.name,
            1 + svd_workspace_stacks(options),
            purpose="run CART's SVDs",
            task_vectors=True,
        )
        yield entry.name, None, cart_truncated(base, tau, rank, options, entry.name)

    return MethodPasses(write_label="CART", emit=emit)


register(
    MergeMethod(
        name="cart",
        summary="CART: theta_avg plus the low-rank truncations of the experts' differences",
        options=CartOptions,
        merge=merge_cart,
        passes=("merge",),
        update_in_expert_span=True,
        merges_factors=True,
        why_finite_required=finite_if_factored,
        relative_work=factoring_work,
    )
)
