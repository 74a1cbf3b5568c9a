"""The baselines of spec §6, on the same tensor classes as R²M (heads are handled by the caller)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from r2m_ext.classify import TensorClass
from r2m_ext.methods.common import (
    TaskTensors,
    exact_ceil,
    kept_rank,
    low_rank_factors,
    task_vectors,
)
from r2m_ext.options import MergeOptions
from r2m_ext.reference import sketch_seed

Merged = Iterator[tuple[str, torch.Tensor]]
TaskVectorFn = Callable[[str], tuple[torch.Tensor, torch.Tensor]]


def merge_average(tensors: TaskTensors, options: MergeOptions, report: dict) -> Merged:
    for entry in tensors.progress(tensors.body, "average"):
        base, tau = task_vectors(tensors, entry.name)
        yield entry.name, base + tau.mean(0)


def merge_task_arithmetic(tensors: TaskTensors, options: MergeOptions, report: dict) -> Merged:
    for entry in tensors.progress(tensors.body, "task arithmetic"):
        base, tau = task_vectors(tensors, entry.name)
        yield entry.name, base + options.lam * tau.sum(0)


def _kth_largest_magnitudes(magnitudes: torch.Tensor, density: float) -> torch.Tensor:
    """Per row of [N, count]: the ceil(density * count)-th largest value."""
    count = magnitudes.shape[1]
    keep = max(1, exact_ceil(density, count))
    return magnitudes.kthvalue(count - keep + 1, dim=1).values


def ties_combine(tau: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """TIES trim / elect / disjoint mean of tau [N, ...] with per-task thresholds [N]."""
    view = (-1,) + (1,) * (tau.dim() - 1)
    trimmed = torch.where(tau.abs() >= thresholds.view(view), tau, torch.zeros_like(tau))
    elected = torch.where(trimmed.sum(0) >= 0, 1.0, -1.0).to(tau)
    agrees = torch.sign(trimmed) == elected  # zeros (trimmed entries) never agree
    count = agrees.sum(0).clamp_min(1)
    return (trimmed * agrees).sum(0) / count


def _ties(tensors: TaskTensors, options: MergeOptions, vectors: TaskVectorFn, label: str) -> Merged:
    body = tensors.body
    if options.ties_scope == "global":
        magnitudes = [
            vectors(entry.name)[1].abs().reshape(tensors.n_experts, -1)
            for entry in tensors.progress(body, f"{label} threshold pass")
        ]
        global_thresholds = _kth_largest_magnitudes(torch.cat(magnitudes, dim=1), options.density)
        del magnitudes
    for entry in tensors.progress(body, label):
        base, tau = vectors(entry.name)
        if options.ties_scope == "global":
            thresholds = global_thresholds
        else:
            thresholds = _kth_largest_magnitudes(
                tau.abs().reshape(tensors.n_experts, -1), options.density
            )
        yield entry.name, base + options.lam * ties_combine(tau, thresholds)


def merge_ties(tensors: TaskTensors, options: MergeOptions, report: dict) -> Merged:
    return _ties(tensors, options, lambda name: task_vectors(tensors, name), "TIES")


def dare_keep_mask(seed: int, name: str, task: int, shape, drop_rate: float) -> torch.Tensor:
    """Entries of task `task`'s vector that DARE keeps: a function of (seed, name, task, shape)
    alone, so it does not depend on the order tensors are processed in."""
    generator = torch.Generator(device="cpu").manual_seed(
        sketch_seed(seed, f"dare/{task}/{name}", shape)
    )
    return torch.rand(tuple(shape), generator=generator) >= drop_rate


def merge_dare(tensors: TaskTensors, options: MergeOptions, report: dict) -> Merged:
    def sparsified(name):
        base, tau = task_vectors(tensors, name)
        masks = torch.stack(
            [
                dare_keep_mask(options.seed, name, i, tau.shape[1:], options.drop_rate)
                for i in range(tensors.n_experts)
            ]
        ).to(tau.device)
        return base, torch.where(masks, tau / (1.0 - options.drop_rate), torch.zeros_like(tau))

    if options.dare_combine == "ties":
        yield from _ties(tensors, options, sparsified, "DARE-TIES")
        return
    for entry in tensors.progress(tensors.body, "DARE"):
        base, tau = sparsified(entry.name)
        yield entry.name, base + options.lam * tau.sum(0)


def polar_factor(matrix: torch.Tensor) -> torch.Tensor:
    """The orthogonal polar factor P Q^T of matrix = P Sigma Q^T."""
    p, _, qh = torch.linalg.svd(matrix, full_matrices=False)
    return p @ qh


def merge_tsv(tensors: TaskTensors, options: MergeOptions, report: dict) -> Merged:
    n = tensors.n_experts
    for entry in tensors.progress(tensors.body, "TSV-M"):
        base, tau = task_vectors(tensors, entry.name)
        if entry.tensor_class is not TensorClass.MATRIX:
            yield entry.name, base + tau.mean(0)
            continue
        m, cols = entry.shape
        rank = min(m, cols) // n
        if rank == 0:
            # Spec §6 keeps floor(min(m, n) / N) triplets per task: none when N > min(m, n).
            yield entry.name, base.clone()
            continue
        u, s, v = low_rank_factors(tau, rank, options, entry.name)
        u_joint = polar_factor(u.permute(1, 0, 2).reshape(m, n * rank))
        v_joint = polar_factor(v.permute(1, 0, 2).reshape(cols, n * rank))
        update = (u_joint * s.reshape(1, n * rank)) @ v_joint.T
        yield entry.name, base + options.alpha * update


def merge_cart(tensors: TaskTensors, options: MergeOptions, report: dict) -> Merged:
    for entry in tensors.progress(tensors.body, "CART"):
        base, tau = task_vectors(tensors, entry.name)
        mean = tau.mean(0)
        averaged = base + mean
        if entry.tensor_class is not TensorClass.MATRIX:
            yield entry.name, averaged
            continue
        centered = tau - mean
        rank = kept_rank(entry.shape, options.rank_ratio)
        if rank >= min(entry.shape):
            low_rank_sum = centered.sum(0)
        else:
            u, s, v = low_rank_factors(centered, rank, options, entry.name)
            low_rank_sum = torch.einsum("imr,inr->mn", u * s.unsqueeze(-2), v)
        yield entry.name, averaged + options.lam * low_rank_sum
