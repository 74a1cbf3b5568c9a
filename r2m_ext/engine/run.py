"""Runs a merge plan: the method computes the body, heads are averaged, integer buffers copied;
every output tensor comes out in plan order, whole or in row blocks, cast to its dtype."""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial

import torch

from r2m_ext.classify import TensorClass
from r2m_ext.engine.inputs import MergeInputs, all_finite
from r2m_ext.engine.ranks import Ranks
from r2m_ext.errors import R2MError
from r2m_ext.methods.passes import LowRankUpdate, MergedBlock, MethodPasses, StatisticPass
from r2m_ext.methods.registry import get_method
from r2m_ext.options import MergeOptions
from r2m_ext.plan import MergePlan

OutputBlock = MergedBlock


def run_merge(
    plan: MergePlan,
    inputs: MergeInputs,
    options: MergeOptions,
    report: dict,
    done: set[str] | frozenset[str] = frozenset(),
    ranks: Ranks | None = None,
) -> Iterator[OutputBlock]:
    """Yields (name, rows, values) for every tensor of the plan not in `done` (and, on one of
    several `ranks`, that this rank owns), in plan order; rows is None for a whole tensor, else
    the slice of its first dimension the block covers. Values are the merged tensor in its output
    dtype, or where the output takes updates (`inputs.writes_updates`) a factored matrix's
    LowRankUpdate."""
    ranks = Ranks() if ranks is None else ranks
    work = get_method(options.method).merge(inputs, options.method_options, report)
    merged_body = _run_passes(work, inputs, ranks)
    for entry in plan.tensors:
        if entry.name in done or not ranks.owns(entry.name):
            continue
        if entry.tensor_class is TensorClass.NON_FLOAT:
            blocks = [(None, inputs.raw(0, entry.name).clone())]
        elif entry.tensor_class is TensorClass.EMPTY:
            blocks = [(None, torch.empty(entry.shape, dtype=entry.out_dtype))]
        elif entry.tensor_class is TensorClass.HEAD:
            blocks = [(None, inputs.head(entry))]
        else:
            blocks = _body_blocks(entry, merged_body)
        for rows, values in blocks:
            if isinstance(values, LowRankUpdate):
                # The output casts what it makes of the factors (an adapter's own factors).
                checked = values.tensors()
            else:
                values = values.to(entry.out_dtype)
                checked = (values,) if values.dtype.is_floating_point else ()
            if not options.allow_nonfinite and not all(all_finite(t) for t in checked):
                raise R2MError(
                    f"merged tensor {entry.name!r} is not finite in {entry.out_dtype}"
                    " (overflow? check out_dtype and the scale options)"
                )
            yield entry.name, rows, values
    # Let the method finish its last pass (its timing, its checks); it must have nothing left.
    for name, rows, _ in merged_body:
        raise AssertionError(f"method produced {name!r} rows {rows} beyond the plan")


def _run_passes(work: MethodPasses, inputs: MergeInputs, ranks: Ranks) -> Iterator[MergedBlock]:
    """The method's statistic passes, each folded in plan order and handed to the method, then
    its write pass: every tensor of `inputs.outputs`, as the method emits it.

    Each rank observes its own tensors of a pass. A float statistic's parts are gathered from
    every rank and folded one by one in the pass's order from its start value: the same fold, so
    the same bits, as one process observing them all. An exact one (integer counts) is folded
    per rank and the ranks' totals are combined: order-free, and one value per rank to send."""
    inputs.declare_kept(work.keeps)
    for statistic_pass in work.statistics:
        mine = [t for t in statistic_pass.tensors if ranks.owns(t.name)]
        if statistic_pass.exact:
            total = statistic_pass.start
            for part in ranks.exchange(partial(_fold, statistic_pass, mine, inputs)):
                total = statistic_pass.combine(total, part)
        else:
            order = {t.name: index for index, t in enumerate(statistic_pass.tensors)}
            parts = sorted(
                (
                    part
                    for share in ranks.exchange(partial(_observe, statistic_pass, mine, inputs))
                    for part in share
                ),
                key=lambda part: order[part[0]],
            )
            total = statistic_pass.start
            for _, value in parts:
                total = statistic_pass.combine(total, value)
        statistic_pass.finish(total)
    for entry in inputs.pass_over(inputs.outputs, work.write_label):
        yield from work.emit(entry)
    inputs.drop_kept()


def _observe(statistic_pass: StatisticPass, tensors, inputs: MergeInputs) -> list[tuple]:
    """(name, observed value) of each of `tensors`, in order."""
    return [
        (entry.name, statistic_pass.observe(entry))
        for entry in inputs.pass_over(tensors, statistic_pass.label, statistic_pass.read_ahead)
    ]


def _fold(statistic_pass: StatisticPass, tensors, inputs: MergeInputs):
    total = statistic_pass.start
    for entry in inputs.pass_over(tensors, statistic_pass.label, statistic_pass.read_ahead):
        if statistic_pass.observe_into is not None:
            total = statistic_pass.observe_into(total, entry)
        else:
            total = statistic_pass.combine(total, statistic_pass.observe(entry))
    return total


def _body_blocks(entry, merged_body) -> Iterator[tuple[slice | None, torch.Tensor]]:
    covered = 0
    while covered < entry.rows:
        name, rows, values = next(merged_body)
        if name != entry.name or (rows is not None and rows.start != covered):
            raise AssertionError(
                f"method produced {name!r} rows {rows}, expected {entry.name!r} from row {covered}"
            )
        covered = entry.rows if rows is None else rows.stop
        yield rows, values
