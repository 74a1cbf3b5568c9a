"""What the methods share: the source of task tensors they read from, the SVD options, and
truncation."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from fractions import Fraction
from typing import Protocol

import torch

from r2m_ext import ops, reference
from r2m_ext.classify import TensorClass
from r2m_ext.determinism import name_key
from r2m_ext.methods.passes import LowRankUpdate, Merged
from r2m_ext.methods.registry import Range, option
from r2m_ext.plan import TensorPlan


class TaskTensors(Protocol):
    """The head-free floating tensors of one merge, in the compute dtype, within a memory budget.

    The engine runs a method's passes (methods/passes.py); when it asks a method to observe or
    emit a tensor, the method reads it whole with `load` (when its math needs all of it: an SVD,
    a per-tensor threshold) or in row blocks with `blocks` (elementwise math), declaring the
    workspace it will add. The write pass covers `outputs` (the body less what a resumed run
    already wrote)."""

    body: tuple[TensorPlan, ...]
    outputs: tuple[TensorPlan, ...]
    n_experts: int
    compute_dtype: torch.dtype
    device: torch.device  # where the compute-dtype tensors live
    timings: dict[str, float]
    # The output takes a factored matrix's update (LowRankUpdate), not its merged weights: an
    # adapter, which never needs the base's values.
    writes_updates: bool

    def load(
        self,
        name: str,
        extra_stacks: float = 0,
        purpose: str = "merge",
        task_vectors: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(base [*shape], experts [N, *shape]), or with `task_vectors` (base, experts - base)."""

    def empty_stack(self, shape: Sequence[int]) -> torch.Tensor:
        """An uninitialised [N, *shape] compute-dtype tensor on the compute device, for a step's
        workspace (counted in its `extra_stacks`); on the host, reused memory."""

    def load_raw(
        self, name: str, extra_stacks: float = 0, purpose: str = "merge"
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(base, [experts]) of a whole tensor in the inputs' own dtype, within the budget of
        `load` with the same workspace. Like `raw_blocks`, not yet checked for NaN/Inf: the
        caller passes what it computed from them to `check_finite`."""

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

    def statistic_allowance(self) -> int:
        """Bytes a statistic pass may hold beyond its steps while it runs (TIES's window
        collections), within the memory budget."""

    def raw_rows(
        self, entry: TensorPlan, rows: slice | None
    ) -> tuple[torch.Tensor, list[torch.Tensor]] | None:
        """(base rows, [expert rows]) as read (rows None: whole), for a sample of a tensor; None
        when they do not fit one step of the budget. Never checked for NaN/Inf (a pass over
        every entry is)."""

    def check_finite(
        self,
        entry: TensorPlan,
        rows: slice | None,
        result: torch.Tensor,
        zero_weight_sources: Iterable[int] = (),
        held: Sequence[torch.Tensor] | None = None,
    ) -> None:
        """Raises, naming the file, if an input of this raw block holds NaN or Inf. `result` is
        what the caller computed from the block with every input (source 0 the base, i the
        expert i - 1) entering with a nonzero weight except `zero_weight_sources`, which are
        checked one by one: in `held` (the block's inputs, base first) if given, else read
        again."""

    def low_rank_updates(self, entry: TensorPlan) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """Each expert's update of this matrix as factors (left [m, r_i], right [n, r_i]) where
        every expert is a low-rank update of the base there (LoRA adapters), else None."""

    def whole_base(self, entry: TensorPlan) -> torch.Tensor | None:
        """The base's tensor whole in the compute dtype, for a step that holds it and one
        result beside it; None when that does not fit the budget."""

    def fits_whole(self, entry: TensorPlan, extra_stacks: float = 0) -> bool:
        """Whether `load` can serve this tensor whole with that workspace (else a method that
        needs it whole must work over its row blocks)."""

    def workspace(
        self, entry: TensorPlan, nbytes: int, purpose: str, block_stacks: float
    ) -> AbstractContextManager[None]:
        """Holds `nbytes` of the method's own workspace (its algorithm's, e.g. a streamed SVD's
        thin factors) while `entry`'s row blocks with `block_stacks` are served; raises, saying
        `purpose`, when not even one row fits beside it."""

    def keep(self, key: str, values: tuple[torch.Tensor, ...]) -> None:
        """Holds `values` for a later pass (`take(key)`): in memory if they fit beside the later
        steps the method declared (MethodPasses.keeps), else in host memory within the merge's
        host tier, else in a scratch file if the merge has one with room, else not at all. The
        method does not change `values` afterwards."""

    def kept_where(self, key: str) -> str | None:
        """Where `keep` put `key`'s values ("memory", "host", "scratch"), or None: nowhere.
        Settled once the pass that kept them has ended."""

    def take(self, key: str) -> tuple[torch.Tensor, ...] | None:
        """What `keep` holds under `key` (and no longer), or None."""


@dataclass(frozen=True)
class SvdOptions:
    """How the methods that factor matrices (R²M, TSV-M, CART) compute their truncations."""

    svd: str = option(
        "randomized",
        "how truncations are computed: 'randomized' (seeded sketch) or 'exact' (full SVD)",
        choices=("randomized", "exact"),
    )
    oversample: int = option(
        8,
        "randomized SVD: extra sketch columns beyond the kept rank",
        check=Range(0, 2**31, high_open=True),
    )
    n_iter: int = option(
        2,
        "randomized SVD: power iterations (re-orthonormalised after every product)",
        check=Range(0, 2**31, high_open=True),
    )
    seed: int = option(0, "seed of the randomized sketch", check=Range(0, 2**64, high_open=True))


def exact_floor(ratio: float, count: int) -> int:
    """floor(ratio * count) with `ratio` read as the decimal the user wrote: 0.29 * 100 is 29,
    not float's 28.999999999999996."""
    return math.floor(Fraction(repr(ratio)) * count)


def exact_ceil(ratio: float, count: int) -> int:
    return math.ceil(Fraction(repr(ratio)) * count)


def kept_rank(shape: tuple[int, ...], rank_ratio: float) -> int:
    """Spec §2: rho = max(1, floor(rank_ratio * min(m, n)))."""
    return max(1, exact_floor(rank_ratio, min(shape)))


def truncation_rank(entry: TensorPlan, rank_ratio: float) -> int:
    """The kept rank of a 2-D tensor, 0 for any other (which no truncation touches)."""
    return kept_rank(entry.shape, rank_ratio) if len(entry.shape) == 2 else 0


def svd_workspace_stacks(options: SvdOptions) -> float:
    """[N, m, n] stacks an SVD adds beyond the matrices it factors: an exact SVD (one matrix at
    a time) its input copy and one matrix's factors and workspace; a randomized one works in
    rank + oversample columns, plus products."""
    return 1.5 if options.svd == "exact" else 0.5


def low_rank_factors(
    matrices: torch.Tensor, rank: int, options: SvdOptions, key: str
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
        name_key(key, matrices.shape[-2:]),
    )


@dataclass(frozen=True)
class FactorBasis:
    """Orthonormal bases of a matrix's stacked LoRA factors, [L_1 .. L_N] = Q_L T_L and
    [R_1 .. R_N] = Q_R T_R (QR, float64), for updates tau_j = L_j R_j^T: every tau_j, and every
    linear combination of them, is Q_L C Q_R^T for a core C of at most K x K (K = sum r_j),
    tau_j's own being T_L[:, cols_j] T_R[:, cols_j]^T. So the SVD methods factor such a matrix
    exactly from a K x K core, never an m x n one. Norms and inner products of such matrices are
    their cores' (Q orthonormal), so a pass that needs no m x n result takes the T's alone."""

    t_left: torch.Tensor  # [K_L, K]
    t_right: torch.Tensor  # [K_R, K]
    owner: torch.Tensor  # [K]: the expert of each column
    q_left: torch.Tensor | None  # [m, K_L]; None where not asked for
    q_right: torch.Tensor | None  # [n, K_R]

    @classmethod
    def of(
        cls, factors: Sequence[tuple[torch.Tensor, torch.Tensor]], with_q: bool = True
    ) -> FactorBasis:
        """From each expert's (left [m, r_j], right [n, r_j]); the Q's only `with_q` (forming
        them costs as much again as the T's, which are the same bits either way). A matrix no
        expert updates gets one zero column, so that every core is a 1 x 1 zero, not empty."""
        lefts = [left.double() for left, _ in factors]
        rights = [right.double() for _, right in factors]
        owner = [torch.full((left.shape[1],), j, dtype=torch.long) for j, left in enumerate(lefts)]
        if sum(left.shape[1] for left in lefts) == 0:
            lefts = [lefts[0].new_zeros(lefts[0].shape[0], 1)]
            rights = [rights[0].new_zeros(rights[0].shape[0], 1)]
            owner = [torch.zeros(1, dtype=torch.long)]
        mode = "reduced" if with_q else "r"
        q_left, t_left = torch.linalg.qr(torch.cat(lefts, dim=1), mode=mode)
        q_right, t_right = torch.linalg.qr(torch.cat(rights, dim=1), mode=mode)
        if not with_q:
            q_left = q_right = None
        return cls(t_left, t_right, torch.cat(owner).to(t_left.device), q_left, q_right)

    def core(self, weights: torch.Tensor) -> torch.Tensor:
        """The core of sum_j weights[..., j] tau_j: [..., K_L, K_R] for weights [..., N]."""
        scaled = self.t_left * weights.to(self.t_left)[..., self.owner].unsqueeze(-2)
        return scaled @ self.t_right.T


def factored_output(tensors: TaskTensors, entry: TensorPlan, update: LowRankUpdate):
    """What to emit for a matrix whose merged update is `update`: the update itself, where the
    output takes updates; else theta_0 + update, one product onto the base, where the base fits
    one step whole; else None (the method then takes its dense path over row blocks)."""
    if tensors.writes_updates:
        return update
    base = tensors.whole_base(entry)
    if base is None:
        return None
    left = update.left if update.core is None else update.left @ update.core.to(update.left)
    one = torch.ones(1, dtype=left.dtype, device=left.device)
    return ops.lowrank_accumulate(base, left.unsqueeze(0), update.right.unsqueeze(0), one)


def mean_update(tensors: TaskTensors, entry: TensorPlan, scale: float = 1.0) -> Merged:
    """theta_0 + scale * sum_i tau_i / N, elementwise, fused (average; means of other methods).
    Where every expert updates a matrix by LoRA factors, the update is their weighted
    concatenation, sum_i (scale / N) L_i R_i^T: no expert is densified."""
    n = tensors.n_experts
    factors = tensors.low_rank_updates(entry)
    if factors is not None:
        left = torch.cat([(scale / n) * left for left, _ in factors], dim=1)
        right = torch.cat([right for _, right in factors], dim=1)
        merged = factored_output(tensors, entry, LowRankUpdate(left, right))
        if merged is not None:
            yield entry.name, None, merged
            return
    weights = torch.full((1, n), scale / n, dtype=torch.float64)
    zero_weight = range(1, n + 1) if scale == 0 else ()
    for rows, base, experts in tensors.raw_blocks(entry):
        merged = ops.combine(base, experts, weights, 1.0, tensors.compute_dtype, entry.out_dtype)
        tensors.check_finite(entry, rows, merged, zero_weight)
        yield entry.name, rows, merged[0]


def truncates(entry: TensorPlan, rank: int) -> bool:
    """Whether a rank-`rank` truncation changes this tensor (matrices below full rank only)."""
    return entry.tensor_class is TensorClass.MATRIX and rank < min(entry.shape)


# Work per input byte of a matrix an SVD method factors, against a memory-bound pass: R²M over
# ViT-L/14 x 8 took about 50 s where `average` took 3.4 s (2-core EPYC, 2026-12-07), nearly all
# of it in the matrices. Balances the ranks of a distributed merge (MergeMethod.relative_work).
FACTORED_MATRIX_WORK = 12


def factoring_work(entry: TensorPlan) -> int:
    return FACTORED_MATRIX_WORK if entry.tensor_class is TensorClass.MATRIX else 1


def finite_if_factored(entry: TensorPlan) -> str | None:
    """Why a method that factors every matrix needs its inputs finite even with allow_nonfinite:
    an SVD of a non-finite matrix has no meaning."""
    return "it factors this matrix" if entry.tensor_class is TensorClass.MATRIX else None


# [N, ...] row blocks yield their rows and the matrices' values there: [N, rows, n].
RowBlocks = Callable[[], Iterator[tuple["slice | None", torch.Tensor]]]


def streamed_workspace_bytes(
    n_tasks: int, shape: tuple[int, int], rank: int, options: SvdOptions, itemsize: int
) -> int:
    """What `streamed_low_rank_factors` holds besides one row block: the range basis and its
    product [N, m, l] (twice), the co-range [N, n, l] and the projected matrix [N, l, n]."""
    m, n = shape
    width = min(rank + options.oversample, m, n)
    return n_tasks * itemsize * width * (2 * m + 2 * n)


def streamed_low_rank_factors(
    row_blocks: RowBlocks, shape: tuple[int, int], rank: int, options: SvdOptions, key: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The randomized SVD of `low_rank_factors`, for matrices too large to hold whole: each
    product with the matrices is a pass over their row blocks (`row_blocks()` starts one), so
    only the thin factors [N, m, l] and [N, n, l] stay in memory. The same sketch (seed and key
    as the whole-matrix path) and the same iterations, so the result agrees with it to rounding;
    2 n_iter + 2 passes."""
    m, n = shape
    width = min(rank + options.oversample, m, n)
    omega = None

    def range_of(right: torch.Tensor | None) -> torch.Tensor:
        """Orthonormal basis of A @ right ([N, m, l]), one pass (right None: the sketch)."""
        nonlocal omega
        parts = []
        for _, block in row_blocks():
            if omega is None:
                omega = reference.gaussian_test_matrix(
                    options.seed,
                    name_key(key, shape),
                    n,
                    width,
                    block.dtype,
                    block.device,
                )
            parts.append(block @ (omega if right is None else right))
            del block  # one block at a time (MergeInputs.blocks)
        return reference.orthonormal_basis(torch.cat(parts, dim=1))

    def accumulate(q: torch.Tensor, product) -> torch.Tensor:
        """sum over blocks of product(q rows, block): one pass."""
        total, start = None, 0
        for _, block in row_blocks():
            stop = start + block.shape[1]
            term = product(q[:, start:stop], block)
            del block  # one block at a time (MergeInputs.blocks)
            total = term if total is None else total + term
            start = stop
        return total

    q = range_of(None)
    for _ in range(options.n_iter):
        co_range = reference.orthonormal_basis(accumulate(q, lambda qb, b: b.mT @ qb))
        q = range_of(co_range)
    u_small, s, vh = torch.linalg.svd(accumulate(q, lambda qb, b: qb.mT @ b), full_matrices=False)
    kept = min(rank, width)
    return (q @ u_small)[..., :kept], s[..., :kept], vh[..., :kept, :].mT
