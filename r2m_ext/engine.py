"""Runs a merge plan: serves the body tensors to the method (as a TaskTensors source), averages the
heads, copies integer buffers, and yields every output tensor in plan order, cast to its dtype.
The source of raw tensors is a function, so state dicts in memory and files on disk share it."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import torch

from r2m_ext.classify import TensorClass
from r2m_ext.errors import R2MError
from r2m_ext.methods import METHOD_FUNCTIONS
from r2m_ext.options import COMPUTE_DTYPES, MergeOptions
from r2m_ext.plan import MergePlan, TensorPlan

# read(source, name): source 0 is the base, source i >= 1 is expert i - 1.
ReadFn = Callable[[int, str], torch.Tensor]
WhereFn = Callable[[int, str], str]


class MergeInputs:
    """The TaskTensors source over a reader. Checks each raw tensor for NaN/Inf once."""

    def __init__(
        self,
        plan: MergePlan,
        read: ReadFn,
        where: WhereFn,
        options: MergeOptions,
        show_progress: bool = False,
    ):
        self.body = plan.body
        self.n_experts = plan.n_experts
        self._read = read
        self._where = where
        self._compute_dtype = COMPUTE_DTYPES[options.compute_dtype]
        self._allow_nonfinite = options.allow_nonfinite
        self._show_progress = show_progress
        self._checked: set[tuple[int, str]] = set()

    def raw(self, source: int, name: str) -> torch.Tensor:
        tensor = self._read(source, name)
        if (
            not self._allow_nonfinite
            and (source, name) not in self._checked
            and tensor.dtype.is_floating_point
        ):
            if not bool(torch.isfinite(tensor).all()):
                raise R2MError(
                    f"tensor {name!r} in {self._where(source, name)} contains NaN or Inf"
                    " (pass --allow-nonfinite / allow_nonfinite=True to merge anyway)"
                )
            self._checked.add((source, name))
        return tensor

    def load(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        base = self.raw(0, name).to(self._compute_dtype)
        experts = torch.stack(
            [self.raw(i + 1, name).to(self._compute_dtype) for i in range(self.n_experts)]
        )
        return base, experts

    def head(self, entry: TensorPlan) -> torch.Tensor:
        if entry.head_only_in_base:
            # Spec §4: a head tensor no expert has counts as 0.
            return torch.zeros(entry.shape, dtype=self._compute_dtype)
        total = self.raw(1, entry.name).to(self._compute_dtype).clone()
        for i in range(2, self.n_experts + 1):
            total += self.raw(i, entry.name).to(self._compute_dtype)
        return total / self.n_experts

    def progress(self, items: Iterable[TensorPlan], description: str) -> Iterator[TensorPlan]:
        items = list(items)
        if not self._show_progress:
            return iter(items)
        try:
            from tqdm.auto import tqdm
        except ImportError:
            return iter(items)
        return iter(tqdm(items, desc=description, unit="tensor", leave=False))


def run_merge(
    plan: MergePlan, inputs: MergeInputs, options: MergeOptions, report: dict
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yields (name, merged tensor) for every tensor of the plan, in plan order."""
    merged_body = METHOD_FUNCTIONS[options.method](inputs, options, report)
    for entry in plan.tensors:
        if entry.tensor_class is TensorClass.NON_FLOAT:
            tensor = inputs.raw(0, entry.name).clone()
        elif entry.tensor_class is TensorClass.HEAD:
            tensor = inputs.head(entry)
        else:
            name, tensor = next(merged_body)
            if name != entry.name:
                raise R2MError(f"internal error: method produced {name!r}, expected {entry.name!r}")
        tensor = tensor.to(entry.out_dtype)
        if not options.allow_nonfinite and tensor.dtype.is_floating_point:
            if not bool(torch.isfinite(tensor).all()):
                raise R2MError(
                    f"merged tensor {entry.name!r} is not finite in {entry.out_dtype}"
                    " (overflow? check out_dtype and the scale options)"
                )
        yield entry.name, tensor
