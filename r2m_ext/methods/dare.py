"""dare (spec §6, DARE): drop each task-vector entry with probability drop_rate, rescale the
kept ones by 1 / (1 - drop_rate), then combine by task arithmetic or by TIES. The mask is a
function of seed, tensor name, shape and task alone (determinism.py), so it does not depend
on block splits, budgets or devices."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from r2m_ext import ops
from r2m_ext.determinism import DareMask, dare_stream
from r2m_ext.methods.common import TaskTensors
from r2m_ext.methods.passes import Merged, MethodPasses
from r2m_ext.methods.registry import MergeMethod, OptionVariants, Range, option, register
from r2m_ext.methods.ties import MaskOf, TiesOptions, ties_passes
from r2m_ext.plan import TensorPlan
from r2m_ext.reference import dare_masked


@dataclass(frozen=True)
class DareOptions:
    drop_rate: float = option(
        0.9,
        "probability of dropping each task-vector entry",
        check=Range(0, 1, high_open=True),
    )
    seed: int = option(0, "seed of the drop mask", check=Range(0, 2**64, high_open=True))
    dare_combine: str = option(
        "task_arithmetic",
        "how the sparsified task vectors are combined",
        choices=("task_arithmetic", "ties"),
    )
    lam: float = option(0.3, "scale of the merged update")


@dataclass(frozen=True)
class DareTiesOptions(TiesOptions, DareOptions):
    """DARE's options with TIES's (and TIES's default lam) when dare_combine is "ties"."""


def _dare_mask_of(tensors: TaskTensors, options: DareOptions) -> MaskOf:
    """DARE's mask of each block, its streams computed once per tensor."""
    streams: dict[str, tuple[int, ...]] = {}

    def mask_of(entry: TensorPlan, rows: slice | None) -> DareMask:
        if entry.name not in streams:
            streams[entry.name] = tuple(
                dare_stream(options.seed, entry.name, entry.shape, i)
                for i in range(tensors.n_experts)
            )
        first = 0 if rows is None else rows.start * entry.row_numel
        return DareMask(streams[entry.name], first, options.drop_rate)

    return mask_of


def merge_dare(tensors: TaskTensors, options: DareOptions, report: dict) -> MethodPasses:
    mask_of = _dare_mask_of(tensors, options)
    if options.dare_combine == "ties":
        return ties_passes(tensors, options, "DARE-TIES", mask_of)
    native = tensors.compute_dtype == torch.float32 and ops.ties_kernels_native(tensors.device)

    def emit(entry: TensorPlan) -> Merged:
        if native:
            # One ops.dare_merge pass over the raw inputs; its probe checks every input for
            # NaN/Inf, dropped entries included.
            for rows, base, experts in tensors.raw_blocks(entry):
                merged, probe = ops.dare_merge(base, experts, mask_of(entry, rows), options.lam)
                tensors.check_finite(entry, rows, probe)
                yield entry.name, rows, merged
                del base, experts, merged
            return
        for rows, base, experts in tensors.blocks(entry, extra_stacks=3):
            tau = dare_masked(experts - base, mask_of(entry, rows))
            del experts
            yield entry.name, rows, base + options.lam * tau.sum(0)
            del base, tau  # one block at a time (MergeInputs.blocks)

    return MethodPasses(write_label="DARE", emit=emit)


register(
    MergeMethod(
        name="dare",
        summary="DARE: random drop and rescale, then task arithmetic or TIES",
        options=OptionVariants(
            "dare_combine", {"task_arithmetic": DareOptions, "ties": DareTiesOptions}
        ),
        merge=merge_dare,
        passes=("thresholds (with TIES)", "merge"),
    )
)
