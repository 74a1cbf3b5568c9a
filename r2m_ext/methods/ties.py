"""ties (spec §6, TIES-Merging): per task keep the entries at or above the ceil(density *
count)-th largest magnitude (over all body tensors, or per tensor), elect a sign per entry, and
take the mean of the kept entries that agree with it.

In float32 with the native kernels the thresholds come from magnitude histograms of the raw
inputs (two passes, no task vector formed) and the merge is one fused kernel; otherwise, in pure
torch, from a radix select over task-vector blocks."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch

from r2m_ext import ops
from r2m_ext.methods.common import Merged, TaskTensors, exact_ceil
from r2m_ext.methods.registry import MergeMethod, Range, option, register
from r2m_ext.methods.select import KthLargestMagnitude, counts_nonfinite
from r2m_ext.plan import TensorPlan
from r2m_ext.reference import DareMask

# tau [N, rows...] of a block -> the task vectors a method combines (DARE drops entries).
Sparsify = Callable[[TensorPlan, "slice | None", torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class TiesOptions:
    density: float = option(
        0.2,
        "fraction of entries kept per task (largest magnitudes)",
        check=Range(0, 1, low_open=True),
    )
    ties_scope: str = option(
        "global",
        "magnitude threshold over all tensors ('global', paper) or per tensor ('tensor')",
        choices=("global", "tensor"),
    )
    lam: float = option(1.0, "scale of the merged update")


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
    tensors: TaskTensors, options: TiesOptions, label: str, mask_of: MaskOf = _no_mask
) -> Merged:
    """TIES in float32 on native kernels: thresholds by histogram passes over the raw inputs,
    then one ops.ties_merge pass. Global scope: two threshold passes over the model; per-tensor
    scope: a tensor that fits whole is read once for its thresholds and its merge. With
    `mask_of`, on the task vectors after DARE's mask (DARE-TIES)."""
    if options.ties_scope == "global":
        keep = max(1, exact_ceil(options.density, sum(entry.numel for entry in tensors.body)))
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
        keep = max(1, exact_ceil(options.density, entry.numel))
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


def _exact_thresholds(
    tensors: TaskTensors,
    keep: int,
    passes: Callable[[int], Iterable[TensorPlan]],
    sparsify: Sparsify,
) -> torch.Tensor:
    """The exact keep-th largest |tau| per task over the tensors `passes(number)` yields in
    pass `number`, by radix select over their row blocks (any compute dtype)."""
    selector = KthLargestMagnitude([keep] * tensors.n_experts, tensors.compute_dtype)
    number = 1
    while not selector.done:
        for entry in passes(number):
            for rows, base, experts in tensors.blocks(entry, extra_stacks=2):
                selector.observe(sparsify(entry, rows, experts - base).abs())
                del base, experts  # one block at a time (MergeInputs.blocks)
        selector.finish_pass()
        number += 1
    return selector.values()


def _ties(tensors: TaskTensors, options: TiesOptions, sparsify: Sparsify, label: str) -> Merged:
    if options.ties_scope == "global":
        keep = max(1, exact_ceil(options.density, sum(entry.numel for entry in tensors.body)))
        thresholds = _exact_thresholds(
            tensors,
            keep,
            lambda number: tensors.pass_over(tensors.body, f"{label} threshold pass {number}"),
            sparsify,
        )
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
        keep = max(1, exact_ceil(options.density, entry.numel))
        thresholds = _exact_thresholds(
            tensors, keep, lambda number, entry=entry: (entry,), sparsify
        )
        for rows, base, experts in tensors.blocks(entry, extra_stacks=_TIES_STACKS):
            tau = sparsify(entry, rows, experts - base)
            del experts
            yield entry.name, rows, base + options.lam * ties_combine(tau, thresholds)
            del base, tau


def _keep_all(entry: TensorPlan, rows: slice | None, tau: torch.Tensor) -> torch.Tensor:
    return tau


def merge_ties(tensors: TaskTensors, options: TiesOptions, report: dict) -> Merged:
    # The fused path sizes its blocks for kernels that hold no [N, ...] temporaries: only native
    # ones do (the ops' pure-torch references would overrun the budget).
    if tensors.compute_dtype == torch.float32 and ops.ties_kernels_native(tensors.device):
        return _fused_ties(tensors, options, "TIES")
    return _ties(tensors, options, _keep_all, "TIES")


register(
    MergeMethod(
        name="ties",
        summary="TIES-Merging: trim to the largest magnitudes, elect signs, disjoint mean",
        options=TiesOptions,
        merge=merge_ties,
        passes=("thresholds", "merge"),
    )
)
