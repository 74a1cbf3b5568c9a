"""Runs a merge plan: the method computes the body, heads are averaged, integer buffers copied;
every output tensor comes out in plan order, whole or in row blocks, cast to its dtype."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from r2m_ext.classify import TensorClass
from r2m_ext.engine.inputs import MergeInputs, all_finite
from r2m_ext.errors import R2MError
from r2m_ext.methods.passes import MergedBlock, MethodPasses
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
) -> Iterator[OutputBlock]:
    """Yields (name, rows, values) for every tensor of the plan not in `done`, in plan order;
    rows is None for a whole tensor, else the slice of its first dimension the block covers."""
    work = get_method(options.method).merge(inputs, options.method_options, report)
    merged_body = _run_passes(work, inputs)
    for entry in plan.tensors:
        if entry.name in done:
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
            values = values.to(entry.out_dtype)
            if not options.allow_nonfinite and values.dtype.is_floating_point:
                if not all_finite(values):
                    raise R2MError(
                        f"merged tensor {entry.name!r} is not finite in {entry.out_dtype}"
                        " (overflow? check out_dtype and the scale options)"
                    )
            yield entry.name, rows, values
    # Let the method finish its last pass (its timing, its checks); it must have nothing left.
    for name, rows, _ in merged_body:
        raise AssertionError(f"method produced {name!r} rows {rows} beyond the plan")


def _run_passes(work: MethodPasses, inputs: MergeInputs) -> Iterator[MergedBlock]:
    """The method's statistic passes, each folded in plan order and handed to the method, then
    its write pass: every tensor of `inputs.outputs`, as the method emits it."""
    inputs.declare_kept(work.keeps)
    for statistic_pass in work.statistics:
        total = statistic_pass.start
        for entry in inputs.pass_over(statistic_pass.tensors, statistic_pass.label):
            total = statistic_pass.combine(total, statistic_pass.observe(entry))
        statistic_pass.finish(total)
    for entry in inputs.pass_over(inputs.outputs, work.write_label):
        yield from work.emit(entry)
    inputs.drop_kept()


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
