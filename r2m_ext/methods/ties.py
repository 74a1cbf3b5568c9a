"""ties (spec §6, TIES-Merging): per task keep the entries at or above the ceil(density *
count)-th largest magnitude (over all body tensors, or per tensor), elect a sign per entry, and
take the mean of the kept entries that agree with it.

In float32 with the native kernels the thresholds come from magnitude histograms of the raw
inputs, no task vector formed: a sample of 1/64 of the entries, then one pass that counts and
collects the entries near each answer (a second only where the sample misled it: select.py); the
merge is one fused kernel. Otherwise, in pure torch, from a radix select over task-vector
blocks."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch

from r2m_ext import ops
from r2m_ext.determinism import DareMask
from r2m_ext.methods.common import TaskTensors, exact_ceil
from r2m_ext.methods.passes import Merged, MethodPasses, StatisticPass
from r2m_ext.methods.registry import MergeMethod, Range, option, register
from r2m_ext.methods.select import (
    COLLECT_LIMIT,
    SAMPLE_FRACTION,
    SAMPLE_WHOLE,
    KthLargestMagnitude,
    SelectPartial,
    combine_partials,
    counts_nonfinite,
    sample_rows,
)
from r2m_ext.plan import TensorPlan
from r2m_ext.reference import dare_masked

# DARE's mask of a block of a tensor (DARE-TIES), or None (TIES).
MaskOf = Callable[[TensorPlan, "slice | None"], "DareMask | None"]
# Raw inputs of a tensor's blocks: (rows, base, [experts]).
RawBlocks = Iterable[tuple["slice | None", torch.Tensor, list[torch.Tensor]]]


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


# A sample pass's observations: counts [N, 2^16] of the first digit (counted into in place) and
# the entries per task they count.
Sample = tuple[torch.Tensor, int] | None


def _add_samples(total: Sample, more: Sample) -> Sample:
    if total is None or more is None:
        return more if total is None else total
    return total[0] + more[0], total[1] + more[1]


# [N, ...] stacks TIES holds per block: tau, |tau| or trimmed, signs, agreement.
_TIES_STACKS = 4


def _no_mask(entry: TensorPlan, rows: slice | None) -> None:
    return None


class _Thresholds:
    """The exact keep-th largest |tau| per task over a set of tensors of `total` entries per
    task, one radix-select pass over them at a time. With `native`, each pass is
    ops.magnitude_histogram over the raw inputs (subtraction, mask, absolute value and counting
    fused, no task vector formed), the first of which also checks every input for NaN/Inf; a
    sample of the entries first lets the first pass collect the entries near the answer, which
    usually spares the second (select.py). Otherwise the task vectors' row blocks are formed and
    observed in pure torch (any compute dtype)."""

    def __init__(self, tensors: TaskTensors, keep: int, total: int, native: bool, mask_of: MaskOf):
        self._tensors = tensors
        self._native = native
        self._mask_of = mask_of
        self._total = total
        self._keep = keep
        dtype = torch.float32 if native else tensors.compute_dtype
        limit = -1 if native else COLLECT_LIMIT  # the kernel counts; it cannot collect
        # Every task's window collection (int32 bit patterns) within the engine's allowance.
        window_limit = tensors.statistic_allowance() // (4 * tensors.n_experts)
        self._selector = KthLargestMagnitude([keep] * tensors.n_experts, dtype, limit, window_limit)
        self.number = 1  # the pass under way

    @property
    def done(self) -> bool:
        return self._selector.done

    def values(self) -> torch.Tensor:
        return self._selector.values()

    def observe(self, entry: TensorPlan, held: RawBlocks | None = None) -> SelectPartial:
        """One tensor's part of this pass, from its inputs `held` or read block by block."""
        return self.observe_into(None, entry, held)

    def observe_into(
        self, total: SelectPartial | None, entry: TensorPlan, held: RawBlocks | None = None
    ) -> SelectPartial:
        """`total` with one tensor's part of this pass added (natively: counted into it)."""
        tensors, selector = self._tensors, self._selector
        if not self._native:
            for rows, base, experts in tensors.blocks(entry, extra_stacks=2):
                tau = experts - base
                del base, experts  # one block at a time (MergeInputs.blocks)
                mask = self._mask_of(entry, rows)
                tau = tau if mask is None else dare_masked(tau, mask)
                total = combine_partials(total, selector.observe(tau.abs()))
            return total
        prefixes, shift, width = selector.histogram_digit()
        window = selector.histogram_window()
        total = selector.new_histograms() if total is None else total
        for rows, base, experts in held if held is not None else tensors.raw_blocks(entry):
            mask = self._mask_of(entry, rows)
            nonfinite = counts_nonfinite(total.counts, shift, width) if self.number == 1 else 0
            total.collect(
                ops.magnitude_histogram_into(
                    total.counts, base, experts, prefixes, shift, width, window, mask
                )
            )
            if self.number == 1:
                # Every block before this one was checked: new non-finite counts are this one's.
                # Under a DARE mask, which may drop a NaN, the inputs themselves are read.
                grew = counts_nonfinite(total.counts, shift, width) > nonfinite
                suspects = range(tensors.n_experts + 1) if mask is not None else ()
                proof = torch.full((), math.inf if grew else 0)
                tensors.check_finite(entry, rows, proof, suspects, held=[base, *experts])
            del base, experts  # one block at a time (MergeInputs.raw_blocks)
        return total

    def observe_sample(self, entry: TensorPlan, held: RawBlocks | None = None) -> Sample:
        """First-digit counts over a sample of one tensor's entries (select.sample_rows)."""
        return self.sample_into(None, entry, held)

    def sample_into(
        self, total: Sample, entry: TensorPlan, held: RawBlocks | None = None
    ) -> Sample:
        """`total` with the first-digit counts of a sample of one tensor's entries
        (select.sample_rows) added, from its whole inputs `held` or read; not checked for
        NaN/Inf (the first pass checks every entry)."""
        prefixes, shift, width = self._selector.histogram_digit()
        if total is None:
            total = torch.zeros(self._tensors.n_experts, 1 << width, dtype=torch.int64), 0
        counts, sampled = total
        mask = self._mask_of(entry, None)
        if held is not None and mask is None and entry.numel > SAMPLE_WHOLE:
            # In memory and unmasked: every 64th row (a copy) in one call, not chunk by chunk.
            ((_, base, experts),) = held
            step = round(1 / SAMPLE_FRACTION)
            base, experts = base[::step], [expert[::step] for expert in experts]
            ops.magnitude_histogram_into(counts, base, experts, prefixes, shift, width)
            return counts, sampled + base.numel()
        for rows in sample_rows(entry):
            if held is not None:
                ((_, base, experts),) = held
                if rows is not None:
                    base, experts = base[rows], [expert[rows] for expert in experts]
            else:
                read = self._tensors.raw_rows(entry, rows)
                if read is None:  # a chunk larger than a step: the sample goes without it
                    continue
                base, experts = read
            mask = self._mask_of(entry, rows)
            ops.magnitude_histogram_into(counts, base, experts, prefixes, shift, width, None, mask)
            sampled += base.numel()
            del base, experts
        return counts, sampled

    def finish_sample(self, total: Sample) -> None:
        if total is not None and total[1] > 0:
            self._selector.plan_window(total[0], total[1], self._total)

    def finish(self, total: SelectPartial) -> None:
        self._selector.finish_pass(total)
        self.number += 1

    def passes(self, entries, label: str) -> Iterator[StatisticPass]:
        """Passes over `entries` for the engine to run, until the thresholds are known."""
        if self._native:
            yield StatisticPass(
                label=f"{label} threshold sample",
                tensors=entries,
                observe=self.observe_sample,
                combine=_add_samples,
                start=None,
                finish=self.finish_sample,
                exact=True,
                read_ahead=False,
                observe_into=self.sample_into,
            )
        while not self.done:
            yield StatisticPass(
                label=f"{label} threshold pass {self.number}",
                tensors=entries,
                observe=self.observe,
                combine=combine_partials,
                start=None,
                finish=self.finish,
                exact=True,
                observe_into=self.observe_into,
            )

    def _of_small_tensor(self, entry: TensorPlan, held: list) -> torch.Tensor:
        """A small whole tensor's thresholds by torch.kthvalue over its float32 magnitudes
        (formed as the kernels form them): the radix select's exact values without its 2^16
        bins per task to clear and sum, which cost a bias far more than its entries do."""
        ((_, base, experts),) = held
        mask = self._mask_of(entry, None)
        tau = torch.stack([expert.float() - base.float() for expert in experts])
        magnitudes = (tau if mask is None else dare_masked(tau, mask)).abs().flatten(1)
        # Under a DARE mask, which may drop a NaN, the inputs themselves are read.
        suspects = range(self._tensors.n_experts + 1) if mask is not None else ()
        proof = magnitudes.sum()
        self._tensors.check_finite(entry, None, proof, suspects, held=[base, *experts])
        return magnitudes.kthvalue(magnitudes.shape[1] - self._keep + 1, dim=1).values

    def of_tensor(self, entry: TensorPlan, held: list | None = None) -> torch.Tensor:
        """The thresholds over one tensor, passing over its blocks here (per-tensor scope)."""
        if self._native and held is not None and entry.numel <= SAMPLE_WHOLE:
            return self._of_small_tensor(entry, held)
        if self._native:
            self.finish_sample(self.observe_sample(entry, held))
        while not self.done:
            self.finish(self.observe(entry, held))
        return self.values()


def ties_passes(
    tensors: TaskTensors, options, label: str, mask_of: MaskOf = _no_mask
) -> MethodPasses:
    """TIES over the task vectors, after DARE's mask where `mask_of` gives one (DARE-TIES).

    In float32 on native kernels: thresholds by histogram passes over the raw inputs, then one
    ops.ties_merge pass; the kernels hold no [N, ...] temporaries, so blocks are sized for the
    raw inputs alone (the ops' pure-torch references would overrun that budget). Otherwise the
    pure-torch select and ties_combine over task-vector blocks."""
    native = tensors.compute_dtype == torch.float32 and ops.ties_kernels_native(tensors.device)
    n = tensors.n_experts

    def sparsified(entry: TensorPlan, rows, base: torch.Tensor, experts: torch.Tensor):
        mask = mask_of(entry, rows)
        tau = experts - base
        return tau if mask is None else dare_masked(tau, mask)

    def merged_blocks(entry: TensorPlan, thresholds: torch.Tensor) -> Merged:
        if native:
            # The threshold passes checked every input for NaN/Inf (and TIES may trim a NaN
            # away, so a finite result would prove nothing).
            for rows, base, experts in tensors.raw_blocks(entry):
                mask = mask_of(entry, rows)
                yield entry.name, rows, ops.ties_merge(base, experts, thresholds, options.lam, mask)
                del base, experts
            return
        for rows, base, experts in tensors.blocks(entry, extra_stacks=_TIES_STACKS):
            tau = sparsified(entry, rows, base, experts)
            del experts
            yield entry.name, rows, base + options.lam * ties_combine(tau, thresholds)
            del base, tau  # one block at a time (MergeInputs.blocks)

    if options.ties_scope == "global":
        total = sum(entry.numel for entry in tensors.body)
        keep = max(1, exact_ceil(options.density, total))
        thresholds = _Thresholds(tensors, keep, total, native, mask_of)
        return MethodPasses(
            write_label=label,
            emit=lambda entry: merged_blocks(entry, thresholds.values()),
            statistics=thresholds.passes(tensors.body, label),
        )

    def emit_per_tensor(entry: TensorPlan) -> Merged:
        keep = max(1, exact_ceil(options.density, entry.numel))
        if native:
            blocks = tensors.raw_blocks(entry)
            rows, base, experts = next(blocks)
            if rows is None:  # whole: every pass over the same inputs, read once
                held = [(None, base, experts)]
                values = _Thresholds(tensors, keep, entry.numel, native, mask_of).of_tensor(
                    entry, held
                )
                mask = mask_of(entry, None)
                yield entry.name, None, ops.ties_merge(base, experts, values, options.lam, mask)
                return
            blocks.close()
            del rows, base, experts
        elif tensors.fits_whole(entry, _TIES_STACKS):
            base, experts = tensors.load(entry.name, _TIES_STACKS)
            tau = sparsified(entry, None, base, experts)
            values = _per_task_kth_largest(tau.abs().reshape(n, -1), options.density)
            yield entry.name, None, base + options.lam * ties_combine(tau, values)
            return
        # Too large to hold whole: select its thresholds over row blocks, then merge them.
        yield from merged_blocks(
            entry, _Thresholds(tensors, keep, entry.numel, native, mask_of).of_tensor(entry)
        )

    return MethodPasses(write_label=label, emit=emit_per_tensor)


def merge_ties(tensors: TaskTensors, options: TiesOptions, report: dict) -> MethodPasses:
    return ties_passes(tensors, options, "TIES")


register(
    MergeMethod(
        name="ties",
        summary="TIES-Merging: trim to the largest magnitudes, elect signs, disjoint mean",
        options=TiesOptions,
        merge=merge_ties,
        passes=("thresholds", "merge"),
    )
)
