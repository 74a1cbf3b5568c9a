"""What a method asks the engine to run: passes over the model that gather statistics, each
reduced before the next is asked for, then the write pass that emits every output tensor.

A statistic pass says, per tensor, what it observes (a small typed value: R²M's N x N Gram,
TIES's integer magnitude counts), how two of them combine, and what the method does with the
total. The engine observes the pass's tensors in the plan's canonical order and folds them with
`combine` in that order, so a float statistic reduces to the same bits however the tensors were
split (one process, or ranks of a distributed merge that each observe a share and gather
every part: engine/run.py, engine/ranks.py). `exact` marks statistics whose combination is
order-free (integer counts), which may be folded in any grouping (and all-reduced).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import torch

from r2m_ext.plan import TensorPlan

Statistic = TypeVar("Statistic")


@dataclass(frozen=True)
class LowRankUpdate:
    """A merged matrix given by its update of the base: base + left @ right^T (left [m, K],
    right [n, K]), or with a `core` [K, K'] base + left @ core @ right^T where left and right
    have orthonormal columns (so the update's SVD is the core's). What a method emits for a
    matrix whose experts are low-rank updates (LoRA) when the output takes updates rather than
    weights (an adapter: TaskTensors.writes_updates): nothing m x n is formed, the base not read."""

    left: torch.Tensor
    right: torch.Tensor
    core: torch.Tensor | None = None

    def cpu(self) -> LowRankUpdate:
        core = None if self.core is None else self.core.cpu()
        return LowRankUpdate(self.left.cpu(), self.right.cpu(), core)

    def is_zero(self) -> bool:
        return not all(bool(t.any()) for t in self.tensors())

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.left, self.right) + (() if self.core is None else (self.core,))


# What a method emits: (tensor name, rows or None for the whole tensor, merged values).
MergedBlock = tuple[str, "slice | None", "torch.Tensor | LowRankUpdate"]
Merged = Iterator[MergedBlock]


@dataclass(frozen=True)
class StatisticPass(Generic[Statistic]):
    label: str  # progress bar and report timings
    tensors: Sequence[TensorPlan]
    observe: Callable[[TensorPlan], Statistic]
    combine: Callable[[Statistic, Statistic], Statistic]  # (tensors so far, the next tensor)
    start: Statistic  # the total before any tensor
    finish: Callable[[Statistic], Any]  # receives the total, once
    exact: bool = False
    # False where `observe` reads only parts of its tensors (a sample): nothing is read ahead.
    read_ahead: bool = True
    # Exact statistics only, optional: adds a tensor's observation into the total (None: the
    # start), which it may change in place, and returns it; what a process folding its tensors
    # uses instead of observe-then-combine (a histogram counted straight into the pass's counts,
    # not into a fresh one per tensor). `observe(t)` must equal observe_into(start, t).
    observe_into: Callable[[Statistic, TensorPlan], Statistic] | None = None


@dataclass(frozen=True)
class KeptValues:
    """What a method keeps between passes (TaskTensors.keep): at most `total_bytes`, held in
    memory only while a whole step of any of `steps_after` with `step_stacks` of workspace would
    still fit beside them (else in a scratch file, else not at all). Declared up front, so that
    a scratch directory too small for them is refused before any tensor is read."""

    total_bytes: int
    steps_after: Sequence[TensorPlan]
    step_stacks: float


@dataclass(frozen=True)
class MethodPasses:
    """A method's work for one merge. `statistics` is iterated lazily: a pass may depend on
    what the one before reduced to (TIES's next digit, R²M's core weights)."""

    write_label: str
    emit: Callable[[TensorPlan], Merged]  # one output tensor, whole or in rows
    statistics: Iterable[StatisticPass] = ()
    keeps: KeptValues | None = None


def add(total: Any, value: Any) -> Any:
    """`combine` for statistics that are numbers or tensors summed in order."""
    return total + value


def ordered_parts(parts: Iterable[float]) -> float:
    """Float parts summed one by one from 0.0 in the order given: the canonical reduction of a
    scalar statistic whose parts (one per tensor or per row block) arrive in plan order."""
    total = 0.0
    for part in parts:
        total += part
    return total
