"""What the methods share: the source of task tensors they read from, and truncation."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from fractions import Fraction
from typing import Protocol

import torch

from r2m_ext import ops, reference
from r2m_ext.classify import TensorClass
from r2m_ext.options import MergeOptions
from r2m_ext.plan import TensorPlan

# What a method yields: (tensor name, rows or None for the whole tensor, merged values).
MergedBlock = tuple[str, "slice | None", torch.Tensor]
Merged = Iterator[MergedBlock]


class TaskTensors(Protocol):
    """The head-free floating tensors of one merge, in the compute dtype, within a memory budget.

    A method makes as many passes as it needs with `pass_over`; inside a pass it reads a tensor
    whole with `load` (when its math needs all of it: an SVD, a per-tensor threshold) or in row
    blocks with `blocks` (elementwise math), declaring the workspace it will add. Its last pass
    covers `outputs` (the body less what a resumed run already wrote)."""

    body: tuple[TensorPlan, ...]
    outputs: tuple[TensorPlan, ...]
    n_experts: int
    compute_dtype: torch.dtype
    timings: dict[str, float]

    def pass_over(self, items: Iterable[TensorPlan], description: str) -> Iterator[TensorPlan]: ...

    def load(
        self, name: str, extra_stacks: float = 0, purpose: str = "merge"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(base [*shape], experts [N, *shape])."""

    def blocks(
        self, entry: TensorPlan, extra_stacks: float = 0
    ) -> Iterator[tuple[slice | None, torch.Tensor, torch.Tensor]]:
        """(rows, base rows, experts rows), rows None when the tensor comes whole."""

    def raw_blocks(
        self, entry: TensorPlan, outputs: int = 1
    ) -> Iterator[tuple[slice | None, torch.Tensor, list[torch.Tensor]]]:
        """(rows, base rows, [expert rows]) in the inputs' own dtype, for ops.combine and
        ops.delta_gram. Not yet checked for NaN/Inf: the caller passes what it computed from
        each block to `check_finite`."""

    def check_finite(
        self,
        entry: TensorPlan,
        rows: slice | None,
        result: torch.Tensor,
        zero_weight_sources: Iterable[int] = (),
    ) -> None:
        """Raises, naming the file, if an input of this raw block holds NaN or Inf. `result` is
        what the caller computed from the block with every input (source 0 the base, i the
        expert i - 1) entering with a nonzero weight except `zero_weight_sources`."""

    def whole_need(self, entry: TensorPlan, extra_stacks: float = 0) -> int:
        """Bytes a whole-tensor step with that workspace needs."""

    def fits_whole(self, entry: TensorPlan, extra_stacks: float = 0) -> bool:
        """Whether `load` of this tensor with that workspace fits the budget."""

    def try_keep(self, nbytes: int, keep_free: int) -> bool:
        """Reserves `nbytes` for a cache held across passes, if `keep_free` bytes still remain
        for steps afterwards."""

    def release_kept(self, nbytes: int) -> None:
        """Returns bytes reserved by try_keep once the cache entry is used."""


def exact_floor(ratio: float, count: int) -> int:
    """floor(ratio * count) with `ratio` read as the decimal the user wrote: 0.29 * 100 is 29,
    not float's 28.999999999999996."""
    return math.floor(Fraction(repr(ratio)) * count)


def exact_ceil(ratio: float, count: int) -> int:
    return math.ceil(Fraction(repr(ratio)) * count)


def kept_rank(shape: tuple[int, ...], rank_ratio: float) -> int:
    """Spec §2: rho = max(1, floor(rank_ratio * min(m, n)))."""
    return max(1, exact_floor(rank_ratio, min(shape)))


def svd_workspace_stacks(options: MergeOptions) -> float:
    """[N, m, n] stacks an SVD adds beyond the matrices it factors: an exact SVD (one matrix at
    a time) its input copy and one matrix's factors and workspace; a randomized one works in
    rank + oversample columns, plus products."""
    return 1.5 if options.svd == "exact" else 0.5


def low_rank_factors(
    matrices: torch.Tensor, rank: int, options: MergeOptions, key: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank-`rank` factors U [N, m, r], S [N, r], V [N, n, r] of each matrix [N, m, n], by the
    method `options.svd` names. `key` (the tensor name) with the shape keys the sketch."""
    if options.svd == "exact":
        return ops.truncated_svd(matrices, rank)
    return ops.randomized_svd(
        matrices,
        rank,
        options.oversample,
        options.n_iter,
        options.seed,
        reference.name_key(key, matrices.shape[-2:]),
    )


def mean_update(tensors: TaskTensors, entry: TensorPlan, scale: float = 1.0) -> Merged:
    """theta_0 + scale * sum_i tau_i / N, elementwise, fused (average; means of other methods)."""
    n = tensors.n_experts
    weights = torch.full((1, n), scale / n, dtype=torch.float64)
    zero_weight = range(1, n + 1) if scale == 0 else ()
    for rows, base, experts in tensors.raw_blocks(entry):
        merged = ops.combine(base, experts, weights, 1.0, tensors.compute_dtype, entry.out_dtype)
        tensors.check_finite(entry, rows, merged, zero_weight)
        yield entry.name, rows, merged[0]


def truncates(entry: TensorPlan, rank: int) -> bool:
    """Whether a rank-`rank` truncation changes this tensor (matrices below full rank only)."""
    return entry.tensor_class is TensorClass.MATRIX and rank < min(entry.shape)
