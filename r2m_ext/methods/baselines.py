"""The baselines of spec §6, on the same tensor classes as R²M (heads are handled by the caller).
Elementwise math runs on row blocks; only truncations and per-tensor thresholds need a whole
tensor."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator

import torch

from r2m_ext import ops
from r2m_ext.classify import TensorClass
from r2m_ext.methods.common import (
    Merged,
    TaskTensors,
    exact_ceil,
    kept_rank,
    low_rank_factors,
    mean_update,
    svd_workspace_stacks,
    truncates,
)
from r2m_ext.methods.select import KthLargestMagnitude, counts_nonfinite
from r2m_ext.options import MergeOptions
from r2m_ext.plan import TensorPlan
from r2m_ext.reference import DareMask, dare_masked, name_key, sketch_stream

# tau [N, rows...] of a block -> the task vectors a method combines (DARE drops entries).
Sparsify = Callable[[TensorPlan, "slice | None", torch.Tensor], torch.Tensor]


def merge_average(tensors: TaskTensors, options: MergeOptions, report: dict) -> Merged:
    for entry in tensors.pass_over(tensors.outputs, "average"):
        yield from mean_update(tensors, entry)


def merge_task_arithmetic(tensors: TaskTensors, options: MergeOptions, report: dict) -> Merged:
    # lam * sum_i tau_i = (lam * N) * mean_i tau_i
    for entry in tensors.pass_over(tensors.outputs, "task arithmetic"):
        yield from mean_update(tensors, entry, options.lam * tensors.n_experts)


def ties_combine(tau: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """TIES trim / elect / disjoint mean of tau [N, ...] with per-task thresholds [N]."""
    view = (-1,) + (1,) * (tau.dim() - 1)
    thresholds = thresholds.to(tau.device).view(view)
    trimmed = torch.where(tau.abs() >= thresholds, tau, torch.zeros_like(tau))
    elected = torch.where(trimmed.sum(0) >= 0, 1.0, -1.0).to(tau)
    agrees = torch.sign(trimmed) == elected  # zeros (trimmed entries) never agree
    count = agrees.sum(0).clamp_min(1)
    return (trimmed * agrees).sum(0) / count


def _per_task_kth_largest(magnitudes: torch.Tensor, density: float) -> torch.Tensor:
    """Per row of [N, count]: the ceil(density * count)-th largest value."""
    count = magnitudes.shape[1]
    keep = max(1, exact_ceil(density, count))
    return magnitudes.kthvalue(count - keep + 1, dim=1).values


# [N, ...] stacks TIES holds per block: tau, |tau| or trimmed, signs, agreement.
_TIES_STACKS = 4


# One block of a tensor's raw inputs: (entry, rows, base, [experts]).
RawBlock = tuple[TensorPlan, "slice | None", torch.Tensor, list[torch.Tensor]]


# DARE's mask of a block of a tensor (DARE-TIES), or None (TIES).
MaskOf = Callable[[TensorPlan, "slice | None"], "DareMask | None"]


def _no_mask(entry: TensorPlan, rows: slice | None) -> None:
    return None


def _histogram_thresholds(
    tensors: TaskTensors,
    keep: int,
    passes: Callable[[int], Iterable[RawBlock]],
    mask_of: MaskOf = _no_mask,
) -> torch.Tensor:
    """The exact keep-th largest float32 |tau| per task, from two passes of
    ops.magnitude_histogram (subtraction, absolute value and counting fused; no task vector is
    formed). `passes(number)` yields the raw blocks of pass `number`. The first pass sees every
    entry, so it also does the NaN/Inf check of the inputs (under a DARE mask, which may drop a
    NaN, by reading the inputs)."""
    selector = KthLargestMagnitude([keep] * tensors.n_experts, torch.float32, collect_limit=-1)
    number = 1
    while not selector.done:
        prefixes, shift, width = selector.histogram_digit()
        for entry, rows, base, experts in passes(number):
            mask = mask_of(entry, rows)
            counts = ops.magnitude_histogram(base, experts, prefixes, shift, width, mask)
            if number == 1:
                nonfinite = counts_nonfinite(counts, shift, width)
                suspects = range(tensors.n_experts + 1) if mask is not None else ()
                proof = torch.full((), math.inf if nonfinite else 0)
                tensors.check_finite(entry, rows, proof, suspects)
            selector.add_counts(counts.cpu())
            del base, experts  # one block at a time (MergeInputs.raw_blocks)
        selector.finish_pass()
        number += 1
    return selector.values()


def _raw_blocks_of(tensors: TaskTensors, entries, description: str) -> Iterator[RawBlock]:
    for entry in tensors.pass_over(entries, description):
        for rows, base, experts in tensors.raw_blocks(entry):
            yield entry, rows, base, experts


def _fused_ties(
    tensors: TaskTensors, options: MergeOptions, label: str, mask_of: MaskOf = _no_mask
) -> Merged:
    """TIES in float32 on native kernels: thresholds by histogram passes over the raw inputs,
    then one ops.ties_merge pass. Global scope: two threshold passes over the model; per-tensor
    scope: a tensor that fits whole is read once for its thresholds and its merge. With
    `mask_of`, on the task vectors after DARE's mask (DARE-TIES)."""
    if options.ties_scope == "global":
        total = sum(_numel(entry) for entry in tensors.body)
        keep = max(1, exact_ceil(options.density, total))
        thresholds = _histogram_thresholds(
            tensors,
            keep,
            lambda number: _raw_blocks_of(
                tensors, tensors.body, f"{label} threshold pass {number}"
            ),
            mask_of,
        )
        # The threshold passes checked every input for NaN/Inf (and TIES may trim a NaN away,
        # so a finite result would prove nothing).
        for entry, rows, base, experts in _raw_blocks_of(tensors, tensors.outputs, label):
            mask = mask_of(entry, rows)
            yield entry.name, rows, ops.ties_merge(base, experts, thresholds, options.lam, mask)
            del base, experts
        return
    for entry in tensors.pass_over(tensors.outputs, label):
        keep = max(1, exact_ceil(options.density, _numel(entry)))
        blocks = tensors.raw_blocks(entry)
        rows, base, experts = next(blocks)
        if rows is None:  # whole: every pass over the same inputs
            held = [(entry, None, base, experts)]
            thresholds = _histogram_thresholds(
                tensors, keep, lambda number, held=held: held, mask_of
            )
            mask = mask_of(entry, None)
            yield entry.name, None, ops.ties_merge(base, experts, thresholds, options.lam, mask)
            del held, base, experts
            continue
        blocks.close()
        del rows, base, experts

        def tensor_blocks(number: int, entry: TensorPlan = entry) -> Iterator[RawBlock]:
            for rows, base, experts in tensors.raw_blocks(entry):
                yield entry, rows, base, experts

        thresholds = _histogram_thresholds(tensors, keep, tensor_blocks, mask_of)
        for _, rows, base, experts in tensor_blocks(0):
            mask = mask_of(entry, rows)
            yield entry.name, rows, ops.ties_merge(base, experts, thresholds, options.lam, mask)
            del base, experts


def _global_thresholds(tensors: TaskTensors, options: MergeOptions, sparsify: Sparsify, label):
    total = sum(_numel(entry) for entry in tensors.body)
    keep = max(1, exact_ceil(options.density, total))
    selector = KthLargestMagnitude([keep] * tensors.n_experts, tensors.compute_dtype)
    number = 1
    while not selector.done:
        for entry in tensors.pass_over(tensors.body, f"{label} threshold pass {number}"):
            for rows, base, experts in tensors.blocks(entry, extra_stacks=2):
                selector.observe(sparsify(entry, rows, experts - base).abs())
                del base, experts  # one block at a time (MergeInputs.blocks)
        selector.finish_pass()
        number += 1
    return selector.values()


def _numel(entry: TensorPlan) -> int:
    count = 1
    for size in entry.shape:
        count *= size
    return count


def _ties(tensors: TaskTensors, options: MergeOptions, sparsify: Sparsify, label: str) -> Merged:
    if options.ties_scope == "global":
        thresholds = _global_thresholds(tensors, options, sparsify, label)
        for entry in tensors.pass_over(tensors.outputs, label):
            for rows, base, experts in tensors.blocks(entry, extra_stacks=_TIES_STACKS):
                tau = sparsify(entry, rows, experts - base)
                del experts
                yield entry.name, rows, base + options.lam * ties_combine(tau, thresholds)
                del base, tau  # one block at a time (MergeInputs.blocks)
        return
    for entry in tensors.pass_over(tensors.outputs, label):
        if tensors.fits_whole(entry, _TIES_STACKS):
            base, experts = tensors.load(entry.name, _TIES_STACKS)
            tau = sparsify(entry, None, experts - base)
            magnitudes = tau.abs().reshape(tensors.n_experts, -1)
            thresholds = _per_task_kth_largest(magnitudes, options.density)
            yield entry.name, None, base + options.lam * ties_combine(tau, thresholds)
            continue
        # Too large to hold whole: select its threshold over row blocks, then merge them.
        keep = max(1, exact_ceil(options.density, _numel(entry)))
        selector = KthLargestMagnitude([keep] * tensors.n_experts, tensors.compute_dtype)
        while not selector.done:
            for rows, base, experts in tensors.blocks(entry, extra_stacks=2):
                selector.observe(sparsify(entry, rows, experts - base).abs())
                del base, experts  # one block at a time (MergeInputs.blocks)
            selector.finish_pass()
        thresholds = selector.values()
        for rows, base, experts in tensors.blocks(entry, extra_stacks=_TIES_STACKS):
            tau = sparsify(entry, rows, experts - base)
            del experts
            yield entry.name, rows, base + options.lam * ties_combine(tau, thresholds)
            del base, tau


def _keep_all(entry: TensorPlan, rows: slice | None, tau: torch.Tensor) -> torch.Tensor:
    return tau


def merge_ties(tensors: TaskTensors, options: MergeOptions, report: dict) -> Merged:
    # The fused path sizes its blocks for kernels that hold no [N, ...] temporaries: only native
    # ones do (the ops' pure-torch references would overrun the budget).
    if tensors.compute_dtype == torch.float32 and ops.ties_kernels_native(tensors.device):
        return _fused_ties(tensors, options, "TIES")
    return _ties(tensors, options, _keep_all, "TIES")


def _dare_stream(seed: int, entry: TensorPlan, task: int) -> int:
    """The SplitMix64 stream of task `task`'s DARE mask on `entry`."""
    return sketch_stream(seed, name_key(f"dare/{task}/{entry.name}", entry.shape))


def _dare_mask_of(tensors: TaskTensors, options: MergeOptions) -> MaskOf:
    """DARE's mask of each block, its streams computed once per tensor."""
    streams: dict[str, tuple[int, ...]] = {}

    def mask_of(entry: TensorPlan, rows: slice | None) -> DareMask:
        if entry.name not in streams:
            streams[entry.name] = tuple(
                _dare_stream(options.seed, entry, i) for i in range(tensors.n_experts)
            )
        row_numel = _numel(entry) // entry.shape[0] if entry.shape else 1
        first = 0 if rows is None else rows.start * row_numel
        return DareMask(streams[entry.name], first, options.drop_rate)

    return mask_of


def _fused_dare(tensors: TaskTensors, options: MergeOptions) -> Merged:
    """DARE with task arithmetic as one ops.dare_merge pass over the raw inputs; the op's probe
    checks every input for NaN/Inf, dropped entries included."""
    mask_of = _dare_mask_of(tensors, options)
    for entry, rows, base, experts in _raw_blocks_of(tensors, tensors.outputs, "DARE"):
        merged, probe = ops.dare_merge(base, experts, mask_of(entry, rows), options.lam)
        tensors.check_finite(entry, rows, probe)
        yield entry.name, rows, merged
        del base, experts, merged


def merge_dare(tensors: TaskTensors, options: MergeOptions, report: dict) -> Merged:
    mask_of = _dare_mask_of(tensors, options)

    def sparsify(entry: TensorPlan, rows: slice | None, tau: torch.Tensor) -> torch.Tensor:
        return dare_masked(tau, mask_of(entry, rows))

    if tensors.compute_dtype == torch.float32 and ops.ties_kernels_native(tensors.device):
        if options.dare_combine == "ties":
            yield from _fused_ties(tensors, options, "DARE-TIES", mask_of)
        else:
            yield from _fused_dare(tensors, options)
        return
    if options.dare_combine == "ties":
        yield from _ties(tensors, options, sparsify, "DARE-TIES")
        return
    for entry in tensors.pass_over(tensors.outputs, "DARE"):
        for rows, base, experts in tensors.blocks(entry, extra_stacks=3):
            tau = sparsify(entry, rows, experts - base)
            del experts
            yield entry.name, rows, base + options.lam * tau.sum(0)
            del base, tau  # one block at a time (MergeInputs.blocks)


def polar_factor(matrix: torch.Tensor) -> torch.Tensor:
    """The orthogonal polar factor P Q^T of matrix = P Sigma Q^T."""
    p, _, qh = torch.linalg.svd(matrix, full_matrices=False)
    return p @ qh


def merge_tsv(tensors: TaskTensors, options: MergeOptions, report: dict) -> Merged:
    n = tensors.n_experts
    for entry in tensors.pass_over(tensors.outputs, "TSV-M"):
        if entry.tensor_class is not TensorClass.MATRIX:
            yield from mean_update(tensors, entry)
            continue
        m, cols = entry.shape
        rank = min(m, cols) // n
        if rank == 0:
            # Spec §6 keeps floor(min(m, n) / N) triplets per task: none when N > min(m, n).
            for rows, base, _ in tensors.blocks(entry):
                yield entry.name, rows, base
            continue
        base, tau = tensors.load(
            entry.name, svd_workspace_stacks(options), purpose="run TSV-M's SVDs", task_vectors=True
        )
        u, s, v = low_rank_factors(tau, rank, options, entry.name)
        u_joint = polar_factor(u.permute(1, 0, 2).reshape(m, n * rank))
        v_joint = polar_factor(v.permute(1, 0, 2).reshape(cols, n * rank))
        update = (u_joint * s.reshape(1, n * rank)) @ v_joint.T
        yield entry.name, None, base + options.alpha * update


def merge_cart(tensors: TaskTensors, options: MergeOptions, report: dict) -> Merged:
    for entry in tensors.pass_over(tensors.outputs, "CART"):
        rank = kept_rank(entry.shape, options.rank_ratio) if len(entry.shape) == 2 else 0
        if not truncates(entry, rank):
            # Untruncated, sum_i (tau_i - mean) = 0 up to rounding: theta_avg, elementwise.
            for rows, base, experts in tensors.blocks(entry, extra_stacks=2):
                tau = experts - base
                del experts
                mean = tau.mean(0)
                yield entry.name, rows, base + mean + options.lam * (tau - mean).sum(0)
                del base, tau  # one block at a time (MergeInputs.blocks)
            continue
        base, tau = tensors.load(
            entry.name,
            1 + svd_workspace_stacks(options),
            purpose="run CART's SVDs",
            task_vectors=True,
        )
        mean = tau.mean(0)
        u, s, v = low_rank_factors(tau - mean, rank, options, entry.name)
        lam = torch.full((tensors.n_experts,), options.lam, dtype=torch.float64)
        yield entry.name, None, ops.lowrank_accumulate(base + mean, u * s.unsqueeze(-2), v, lam)
