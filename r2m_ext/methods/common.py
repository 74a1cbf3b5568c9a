"""What the methods share: the source of task tensors they read from, and truncation."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from fractions import Fraction
from typing import Protocol

import torch

from r2m_ext import ops
from r2m_ext.options import MergeOptions
from r2m_ext.plan import TensorPlan


class TaskTensors(Protocol):
    """The head-free floating tensors of one merge, served one at a time in the compute dtype.

    Methods make as many passes over `body` as they need; the source decides where tensors come
    from (state dicts in memory, or files)."""

    body: tuple[TensorPlan, ...]
    n_experts: int

    def load(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(base [*shape], experts [N, *shape]) in the compute dtype."""

    def progress(self, items: Iterable[TensorPlan], description: str) -> Iterator[TensorPlan]:
        """`items`, reporting progress of a pass to the user."""


def exact_floor(ratio: float, count: int) -> int:
    """floor(ratio * count) with `ratio` read as the decimal the user wrote: 0.29 * 100 is 29,
    not float's 28.999999999999996."""
    return math.floor(Fraction(repr(ratio)) * count)


def exact_ceil(ratio: float, count: int) -> int:
    return math.ceil(Fraction(repr(ratio)) * count)


def kept_rank(shape: tuple[int, ...], rank_ratio: float) -> int:
    """Spec §2: rho = max(1, floor(rank_ratio * min(m, n)))."""
    return max(1, exact_floor(rank_ratio, min(shape)))


def low_rank_factors(
    matrices: torch.Tensor, rank: int, options: MergeOptions, key: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank-`rank` factors U [N, m, r], S [N, r], V [N, n, r] of each matrix [N, m, n], by the
    method `options.svd` names. `key` (the tensor name) seeds the randomized sketch."""
    if options.svd == "exact":
        return ops.truncated_svd(matrices, rank)
    return ops.randomized_svd(matrices, rank, options.oversample, options.n_iter, options.seed, key)


def task_vectors(tensors: TaskTensors, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(base, tau [N, *shape]) for one tensor."""
    base, experts = tensors.load(name)
    return base, experts - base
