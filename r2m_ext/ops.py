"""Public ops. Each runs the native kernel when r2m_ext._C is built and supports the inputs, and
the pure-torch reference (r2m_ext/reference.py) otherwise, with the same result to rounding."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from r2m_ext import reference
from r2m_ext._backend import native_module
from r2m_ext.determinism import DareMask, signed64

_NATIVE_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

if native_module() is not None:

    @torch.library.register_fake("r2m_ext::delta_gram")
    def _delta_gram_fake(base, experts):
        return base.new_empty((len(experts), len(experts)), dtype=torch.float64)

    @torch.library.register_fake("r2m_ext::randomized_svd")
    def _randomized_svd_fake(a, rank, oversample, n_iter, seed, key):
        m, n = a.shape[-2:]
        kept = min(rank, m, n)
        work = torch.float64 if a.dtype == torch.float64 else torch.float32
        batch = a.shape[:-2]
        return (
            a.new_empty((*batch, m, kept), dtype=work),
            a.new_empty((*batch, kept), dtype=work),
            a.new_empty((*batch, n, kept), dtype=work),
        )

    @torch.library.register_fake("r2m_ext::lowrank_accumulate")
    def _lowrank_accumulate_fake(base, left, right, weights, out_dtype):
        return base.new_empty(base.shape, dtype=out_dtype)

    @torch.library.register_fake("r2m_ext::combine")
    def _combine_fake(base, experts, weights, base_weight, compute_dtype, out_dtype):
        return base.new_empty((weights.shape[0], *base.shape), dtype=out_dtype)

    @torch.library.register_fake("r2m_ext::combine_into")
    def _combine_into_fake(base, experts, weights, base_weight, compute_dtype, out):
        return None

    @torch.library.register_fake("r2m_ext::magnitude_histogram")
    def _magnitude_histogram_fake(
        base, experts, prefixes, shift, width, dare_streams=(), first_index=0, drop_rate=0.0
    ):
        return base.new_empty((len(experts), 1 << width), dtype=torch.int64)

    @torch.library.register_fake("r2m_ext::magnitude_histogram_into")
    def _magnitude_histogram_into_fake(
        counts,
        base,
        experts,
        prefixes,
        shift,
        width,
        low=None,
        high=None,
        dare_streams=(),
        first_index=0,
        drop_rate=0.0,
    ):
        if low is None:
            return []
        ctx = torch.library.get_ctx()
        return [base.new_empty((ctx.new_dynamic_size(),), dtype=torch.int32) for _ in experts]

    @torch.library.register_fake("r2m_ext::ties_merge")
    def _ties_merge_fake(
        base, experts, thresholds, lam, dare_streams=(), first_index=0, drop_rate=0.0
    ):
        return base.new_empty(base.shape, dtype=torch.float32)

    @torch.library.register_fake("r2m_ext::nth_at_magnitude")
    def _nth_at_magnitude_fake(base, experts, thresholds, needed):
        return base.new_empty((len(experts),), dtype=torch.int64)

    @torch.library.register_fake("r2m_ext::ties_merge_weighted")
    def _ties_merge_weighted_fake(base, experts, thresholds, cutoffs, weights, normalize, lam):
        return base.new_empty(base.shape, dtype=torch.float32)

    @torch.library.register_fake("r2m_ext::dare_merge")
    def _dare_merge_fake(base, experts, streams, first_index, drop_rate, lam):
        return (
            base.new_empty(base.shape, dtype=torch.float32),
            base.new_empty((), dtype=torch.float32),
        )

    @torch.library.register_fake("r2m_ext::shifted_cholesky_qr3")
    def _shifted_cholesky_qr3_fake(y):
        return y.new_empty(
            y.shape, dtype=torch.float64 if y.dtype == torch.float64 else torch.float32
        )


def _native_device(tensor: torch.Tensor) -> bool:
    """Whether the built extension has kernels for the tensor's device (CUDA only if built so)."""
    module = native_module()
    if module is None:
        return False
    return tensor.device.type == "cpu" or (tensor.device.type == "cuda" and module.with_cuda)


def _native_supports(base: torch.Tensor, experts: Sequence[torch.Tensor]) -> bool:
    return _native_device(base) and base.dtype in _NATIVE_DTYPES and len(experts) > 0


def delta_gram(base: torch.Tensor, experts: Sequence[torch.Tensor]) -> torch.Tensor:
    """Gram matrix of task vectors, G[i, j] = <experts[i] - base, experts[j] - base>.

    base: any shape; experts: N tensors of base's shape and dtype (float32, float64, bfloat16 or
    float16). Returns float64 [N, N]. The subtraction is fused into the reduction (no task vector
    is materialised) and accumulation is in float64 in fixed-size blocks summed in order, so the
    result is bitwise deterministic for any thread count. Results of row blocks of one tensor
    may be summed across calls.
    """
    if _native_supports(base, experts):
        return torch.ops.r2m_ext.delta_gram.default(base, list(experts))
    return reference.delta_gram(base, experts)


def combine(
    base: torch.Tensor,
    experts: Sequence[torch.Tensor],
    weights: torch.Tensor,
    base_weight: float = 1.0,
    compute_dtype: torch.dtype = torch.float32,
    out_dtype: torch.dtype | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """K linear combinations of task vectors in one pass over the inputs:
    out[k] = base_weight * base + sum_j weights[k, j] * (experts[j] - base).

    base and the N experts: one shape and floating dtype (16-bit inputs are widened on load);
    weights: [K, N]. Computed in `compute_dtype` (float32 or float64) and returned as
    [K, *base.shape] in `out_dtype` (default: compute_dtype). No task vector is materialised;
    each element is computed independently in a fixed order, so the result is bitwise the same
    for any thread count and any split of the tensor into blocks.

    `out`, a [K, *base.shape] tensor of `out_dtype` on base's device, receives the result and is
    returned (the same bits): a reused buffer saves the page faults of fresh memory.
    """
    out_dtype = compute_dtype if out_dtype is None else out_dtype
    native = _native_supports(base, experts)
    if out is not None:
        shape = (weights.shape[0], *base.shape)
        if out.shape != shape or out.dtype != out_dtype:
            raise ValueError(
                f"combine: out must be {list(shape)} {out_dtype}, got {list(out.shape)} {out.dtype}"
            )
        if native:
            torch.ops.r2m_ext.combine_into(
                base, list(experts), weights, float(base_weight), compute_dtype, out
            )
            return out
        result = reference.combine(base, experts, weights, base_weight, compute_dtype, out_dtype)
        return out.copy_(result)
    if native:
        return torch.ops.r2m_ext.combine.default(
            base, list(experts), weights, float(base_weight), compute_dtype, out_dtype
        )
    return reference.combine(base, experts, weights, base_weight, compute_dtype, out_dtype)


def magnitude_histogram(
    base: torch.Tensor,
    experts: Sequence[torch.Tensor],
    prefixes: torch.Tensor,
    shift: int,
    width: int,
    dare: DareMask | None = None,
) -> torch.Tensor:
    """One pass of an exact radix select of the k-th largest |experts[i] - base| per task.

    The difference is formed in float32 (inputs widened, or float64 rounded, to float32 as the
    merge computes it) and its magnitude's bit pattern read as an integer, which orders like the
    value. Returns int64 counts [N, 2^width]: for task i, of the digit bits[shift, shift + width)
    among the entries whose bits above shift + width equal prefixes[i] (int64 [N]). Integer
    counts, so the same for any thread count or split of the tensor; row blocks may be summed.
    With `dare`, the task vectors after DARE's mask (DARE-TIES). Native on the CPU; elsewhere
    the pure-torch reference.
    """
    if ties_kernels_native(base.device) and _native_supports(base, experts):
        return torch.ops.r2m_ext.magnitude_histogram.default(
            base, list(experts), prefixes, shift, width, *_dare_arguments(dare)
        )
    return reference.magnitude_histogram(base, experts, prefixes, shift, width, dare)


def magnitude_histogram_into(
    counts: torch.Tensor,
    base: torch.Tensor,
    experts: Sequence[torch.Tensor],
    prefixes: torch.Tensor,
    shift: int,
    width: int,
    window: tuple[torch.Tensor, torch.Tensor] | None = None,
    dare: DareMask | None = None,
) -> list[torch.Tensor] | None:
    """magnitude_histogram's counts added into `counts` (int64 [N, 2^width] on the CPU), so
    that a pass counts every tensor into one histogram. With a `window` (low, high: int64 [N]
    digits, inclusive; [2^width, 2^width] for none), also returns per task the magnitude bit
    patterns (int32, in no particular order) of the nonzero entries it counted in the window
    (exact zeros are only counted: after DARE's mask most entries are zeros): where the
    window holds the digit a select pass pins, the rest of the answer is read off those, with no
    further pass over the inputs. Native on the CPU; elsewhere the reference."""
    if ties_kernels_native(base.device) and _native_supports(base, experts):
        low, high = window if window is not None else (None, None)
        collected = torch.ops.r2m_ext.magnitude_histogram_into.default(
            counts,
            base,
            list(experts),
            prefixes,
            shift,
            width,
            low,
            high,
            *_dare_arguments(dare),
        )
        return collected if window is not None else None
    more, collected = reference.magnitude_histogram_collect(
        base, experts, prefixes, shift, width, window, dare
    )
    counts += more.to(counts.device)
    return collected


def ties_kernels_native(device: torch.device | str) -> bool:
    """Whether magnitude_histogram, ties_merge and dare_merge run as native kernels on `device`
    (the CPU so far), holding no [N, ...] temporaries."""
    return torch.device(device).type == "cpu" and native_module() is not None


def ties_merge(
    base: torch.Tensor,
    experts: Sequence[torch.Tensor],
    thresholds: torch.Tensor,
    lam: float,
    dare: DareMask | None = None,
) -> torch.Tensor:
    """TIES-Merging in one pass over the inputs, in float32 (spec §6): per task the entries of
    experts[i] - base below thresholds[i] (float32 [N]) in magnitude are trimmed, the sign is
    elected per entry (sum of the trimmed task vectors >= 0: +), and base + lam * the mean of the
    trimmed entries agreeing with it (0 where none) is returned, float32, base's shape. Sums run
    over the experts in order, so each element's bits depend on its inputs alone (any thread
    count, any split into blocks). With `dare`, on the task vectors after DARE's mask
    (DARE-TIES). Native on the CPU; elsewhere the pure-torch reference.
    """
    if ties_kernels_native(base.device) and _native_supports(base, experts):
        return torch.ops.r2m_ext.ties_merge.default(
            base, list(experts), thresholds, float(lam), *_dare_arguments(dare)
        )
    return reference.ties_merge(base, experts, thresholds, lam, dare)


def nth_at_magnitude(
    base: torch.Tensor,
    experts: Sequence[torch.Tensor],
    thresholds: torch.Tensor,
    needed: Sequence[int],
) -> list[int]:
    """Per task, the flat element index of the needed[i]-th entry (1-based, in index order) whose
    float32 |experts[i] - base| equals thresholds[i] exactly, -1 where there are fewer: where a
    top-k cut splits the entries tied at the k-th largest magnitude, the last one it keeps (the
    cutoff of ties_merge_weighted). Native on the CPU; elsewhere the reference."""
    if ties_kernels_native(base.device) and _native_supports(base, experts):
        found = torch.ops.r2m_ext.nth_at_magnitude.default(
            base, list(experts), thresholds, [int(n) for n in needed]
        )
        return found.tolist()
    return reference.nth_at_magnitude(base, experts, thresholds, needed)


def ties_merge_weighted(
    base: torch.Tensor,
    experts: Sequence[torch.Tensor],
    thresholds: torch.Tensor,
    cutoffs: Sequence[int],
    weights: Sequence[float],
    normalize: bool,
    lam: float,
) -> torch.Tensor:
    """mergekit's TIES of one whole tensor in one pass over the inputs, in float32: per task the
    entries of experts[i] - base above thresholds[i] (float32 [N]) in magnitude, or equal to it
    up to element index cutoffs[i] (the task's top k, ties at the cut in index order), times
    weights[i]; the sign elected per entry by their sum (>= 0: +); base + lam * the sum of the
    agreeing ones, divided where `normalize` by the agreeing tasks' weights (1 where 0). Float32,
    base's shape; sums over the experts in order. Native on the CPU; elsewhere the reference."""
    if ties_kernels_native(base.device) and _native_supports(base, experts):
        return torch.ops.r2m_ext.ties_merge_weighted.default(
            base,
            list(experts),
            thresholds,
            [int(c) for c in cutoffs],
            [float(w) for w in weights],
            bool(normalize),
            float(lam),
        )
    return reference.ties_merge_weighted(
        base, experts, thresholds, cutoffs, weights, normalize, lam
    )


def dare_merge(
    base: torch.Tensor, experts: Sequence[torch.Tensor], dare: DareMask, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """DARE with task arithmetic in one pass over the inputs, in float32 (spec §6): the task
    vectors experts[i] - base after DARE's mask (`dare`), summed over the experts in order;
    returns base + lam * that sum (float32, base's shape), and a float32 scalar that is 0 when
    every input is finite and NaN otherwise (dropped entries included). Native on the CPU;
    elsewhere the pure-torch reference."""
    if ties_kernels_native(base.device) and _native_supports(base, experts):
        return torch.ops.r2m_ext.dare_merge.default(
            base, list(experts), *_dare_arguments(dare), float(lam)
        )
    return reference.dare_merge(base, experts, dare, lam)


def _dare_arguments(dare: DareMask | None) -> tuple[list[int], int, float]:
    """A DareMask as the ops' (dare_streams, first_index, drop_rate): 64-bit streams as int64."""
    if dare is None:
        return [], 0, 0.0
    return [signed64(s) for s in dare.streams], dare.first_index, float(dare.drop_rate)


def lowrank_accumulate(
    base: torch.Tensor,
    left: torch.Tensor,
    right: torch.Tensor,
    weights: torch.Tensor,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """base + sum_i weights[i] * left[i] @ right[i]^T for left [N, m, r] (e.g. U S) and right
    [N, n, r] (V): one matrix product of inner dimension N * r with the base added in its
    epilogue, computed in the factors' dtype (float32/float64), returned in `out_dtype`
    (default: the factors' dtype)."""
    out_dtype = left.dtype if out_dtype is None else out_dtype
    if _native_device(base):
        return torch.ops.r2m_ext.lowrank_accumulate.default(base, left, right, weights, out_dtype)
    scaled = left * weights.to(left).view(-1, 1, 1)
    total = base.to(left.dtype) + torch.einsum("imr,inr->mn", scaled, right.to(left.dtype))
    return total.to(out_dtype)


# Defaults of the ops (not of the merge, whose spec fixes oversample 8 and n_iter 2): chosen so
# that the rank-r error stays within 1.01x of the exact truncation on decaying spectra and 1.03x
# on flat ones (tests/test_svd.py). Cost: (2 n_iter + 2) products with rank + oversample columns.
DEFAULT_OVERSAMPLE = 10
DEFAULT_N_ITER = 3


def randomized_svd(
    a: torch.Tensor,
    rank: int,
    oversample: int = DEFAULT_OVERSAMPLE,
    n_iter: int = DEFAULT_N_ITER,
    seed: int = 0,
    key: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank-`rank` SVD of a batch of matrices a [..., m, n] by a randomized sketch.

    The Gaussian test matrix has rank + oversample columns and is a function of (seed, key)
    (`seed` a 64-bit unsigned integer)
    alone (r2m_ext uses key = determinism.name_key(tensor name, shape)), the same on every device
    and memory budget. `n_iter` power iterations re-orthonormalise after every product
    (on the CPU CholeskyQR2, Householder when that loses orthogonality; on CUDA shifted
    CholeskyQR3, which needs no check and so never waits for the device). float32, float64,
    bfloat16 and float16 inputs; 16-bit inputs are factored in float32. Returns U [..., m, r],
    S [..., r] (descending), V [..., n, r] with r = min(rank, m, n), in float32 or float64.
    Deterministic: the same inputs give the same bits on the same device and thread count.
    """
    if _native_device(a) and a.dtype in _NATIVE_DTYPES:
        return torch.ops.r2m_ext.randomized_svd.default(
            a, rank, oversample, n_iter, signed64(seed), key
        )
    return reference.randomized_svd(a, rank, oversample, n_iter, seed, key)


def truncated_svd(a: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact rank-`rank` SVD of a [..., m, n] from a full SVD: U [..., m, r], S [..., r],
    V [..., n, r]. The drop-in for code that calls torch.linalg.svd and slices; the accuracy
    reference, and costly: prefer randomized_svd for r << min(m, n)."""
    return reference.truncated_svd(a, rank)


def svd_lowrank(
    a: torch.Tensor, q: int = 6, niter: int = 2, M: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """torch.svd_lowrank's signature and meaning (U [..., m, q], S [..., q], V [..., n, q] of
    a - M, from q sketch columns and niter power iterations), on this package's sketch: batched,
    bfloat16/float16 inputs accepted, and re-orthonormalised after every product. Swap
    `torch.svd_lowrank(x, q=k)` for `r2m_ext.ops.svd_lowrank(x, q=k)`."""
    if M is not None:
        a = a - M
    return randomized_svd(a, q, oversample=0, n_iter=niter, seed=0, key=0)
