"""Checks that the base and experts fit together and classifies every output tensor, from names,
shapes and dtypes alone, so file inputs are validated before any tensor is read."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from r2m_ext.classify import TensorClass, classify, in_core_set, is_head
from r2m_ext.errors import R2MError
from r2m_ext.io.source import TensorSource
from r2m_ext.methods.registry import get_method
from r2m_ext.options import OUT_DTYPES, MergeOptions


@dataclass(frozen=True)
class TensorPlan:
    name: str
    tensor_class: TensorClass
    shape: tuple[int, ...]
    in_dtype: torch.dtype
    out_dtype: torch.dtype
    in_core_set: bool
    # Head tensors in the base that no expert has: output as zeros (spec §4).
    head_only_in_base: bool = False

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def rows(self) -> int:
        """Its first dimension, over which it is split into row blocks (1 for a scalar)."""
        return self.shape[0] if self.shape else 1

    @property
    def row_numel(self) -> int:
        """Elements per row: those of one row block of one row."""
        return math.prod(self.shape[1:])


@dataclass(frozen=True)
class MergePlan:
    tensors: tuple[TensorPlan, ...]  # output order: base order, then heads only experts have
    n_experts: int

    @property
    def body(self) -> tuple[TensorPlan, ...]:
        """The tensors the merge method computes: head-free floating tensors with elements."""
        return tuple(
            t for t in self.tensors if t.tensor_class in (TensorClass.MATRIX, TensorClass.OTHER)
        )


def _fmt_shape(shape: Sequence[int]) -> str:
    return "[" + ", ".join(str(s) for s in shape) + "]"


def _listing(names: Sequence[str]) -> str:
    shown = ", ".join(repr(n) for n in names[:3])
    return shown + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def plan_merge(sources: Sequence[TensorSource], options: MergeOptions) -> MergePlan:
    """The plan of merging sources[1:] (the experts) into sources[0] (the base)."""
    base, base_label = sources[0].metadata(), sources[0].label
    experts = [source.metadata() for source in sources[1:]]
    if len(experts) == 0:
        raise R2MError("at least one expert is required")
    get_method(options.method).check_experts(options.method_options, len(experts))
    labels = [source.label for source in sources[1:]]
    heads = options.head_patterns

    for expert, label in zip(experts, labels, strict=True):
        missing = [n for n in base if n not in expert and not is_head(n, heads)]
        if missing:
            raise R2MError(
                f"tensor {_listing(missing)} in base {base_label} missing from expert {label}"
            )
        extra = [n for n in expert if n not in base and not is_head(n, heads)]
        if extra:
            raise R2MError(
                f"tensor {_listing(extra)} in expert {label} is not in base {base_label}"
            )
        for name, (shape, dtype) in base.items():
            if is_head(name, heads):
                continue
            other_shape, other_dtype = expert[name]
            if tuple(other_shape) != tuple(shape):
                raise R2MError(
                    f"tensor {name!r} has shape {_fmt_shape(other_shape)} in expert {label}"
                    f" but {_fmt_shape(shape)} in base {base_label}"
                )
            if other_dtype != dtype:
                raise R2MError(
                    f"tensor {name!r} has dtype {other_dtype} in expert {label}"
                    f" but {dtype} in base {base_label}"
                )

    head_names = [n for n in experts[0] if is_head(n, heads)]
    head_names += [n for e in experts[1:] for n in e if is_head(n, heads) and n not in head_names]
    for name in head_names:
        holders = [label for e, label in zip(experts, labels, strict=True) if name in e]
        if len(holders) != len(experts):
            lacking = next(label for e, label in zip(experts, labels, strict=True) if name not in e)
            raise R2MError(
                f"head tensor {name!r} is in expert {holders[0]} but missing from expert {lacking}"
            )
        first_shape, first_dtype = experts[0][name]
        for expert, label in zip(experts[1:], labels[1:], strict=True):
            shape, dtype = expert[name]
            if tuple(shape) != tuple(first_shape) or dtype != first_dtype:
                raise R2MError(
                    f"head tensor {name!r} is {_fmt_shape(shape)} {dtype} in expert {label}"
                    f" but {_fmt_shape(first_shape)} {first_dtype} in expert {labels[0]}"
                )

    out_dtype = OUT_DTYPES[options.out_dtype] if options.out_dtype else None
    plans = []
    for name in list(base) + [n for n in head_names if n not in base]:
        from_base = name not in head_names
        shape, dtype = base[name] if from_base else experts[0][name]
        shape = tuple(int(s) for s in shape)
        tensor_class = classify(name, shape, dtype, heads, options.exclude_truncation)
        plans.append(
            TensorPlan(
                name=name,
                tensor_class=tensor_class,
                shape=shape,
                in_dtype=dtype,
                out_dtype=dtype if out_dtype is None or not dtype.is_floating_point else out_dtype,
                in_core_set=in_core_set(tensor_class, shape),
                head_only_in_base=tensor_class is TensorClass.HEAD and from_base,
            )
        )
    return MergePlan(tensors=tuple(plans), n_experts=len(experts))
