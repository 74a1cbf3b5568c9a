"""Pure-torch implementations of the native ops: the oracle the kernels are tested against and the
path used when the extension is not built. Any floating dtype, any device."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from r2m_ext.determinism import GOLDEN_GAMMA, DareMask, signed64, sketch_stream


def delta_gram(base: torch.Tensor, experts: Sequence[torch.Tensor]) -> torch.Tensor:
    """G[i, j] = <experts[i] - base, experts[j] - base>, accumulated in float64, shape [N, N]."""
    tasks = torch.stack([(e.double() - base.double()).reshape(-1) for e in experts])
    return tasks @ tasks.T


def combine(
    base: torch.Tensor,
    experts: Sequence[torch.Tensor],
    weights: torch.Tensor,
    base_weight: float,
    compute_dtype: torch.dtype,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """out[k] = base_weight * base + sum_j weights[k, j] (experts[j] - base), [K, *base.shape]."""
    b = base.to(compute_dtype)
    tau = torch.stack([e.to(compute_dtype) - b for e in experts]).reshape(len(experts), -1)
    # weights may be a host tensor (the methods build them there) while the inputs are on a GPU.
    out = weights.to(tau.device, compute_dtype) @ tau + base_weight * b.reshape(1, -1)
    return out.reshape(weights.shape[0], *base.shape).to(out_dtype)


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def splitmix64_uniform(stream: int, index: torch.Tensor) -> torch.Tensor:
    """Uniform [0, 1) float64 for each int64 `index`: entry `index` of the SplitMix64 sequence
    of `stream` (int64 products wrap modulo 2^64, as the generator needs). A pure function of
    (stream, index), so any block of a tensor draws what the whole tensor would."""
    z = (index + 1) * signed64(GOLDEN_GAMMA) + signed64(stream)
    z = (z ^ _shift_right(z, 30)) * signed64(0xBF58476D1CE4E5B9)
    z = (z ^ _shift_right(z, 27)) * signed64(0x94D049BB133111EB)
    z = z ^ _shift_right(z, 31)
    return _shift_right(z, 11).double() * 2.0**-53


def gaussian_test_matrix(
    seed: int, key: int, rows: int, columns: int, dtype=torch.float32, device="cpu"
) -> torch.Tensor:
    """The sketch's rows x columns Gaussian test matrix: Box-Muller on SplitMix64 counters,
    column-major, so it depends on (seed, key) alone and a wider sketch only appends columns.
    Written in torch as an independent twin of csrc/sketch/gaussian.h (results agree to float32
    rounding; libm and torch's vectorised log/cos may differ in the last bit of a double)."""
    stream = sketch_stream(seed, key)
    index = 2 * (torch.arange(columns).view(1, -1) * rows + torch.arange(rows).view(-1, 1))
    u1 = splitmix64_uniform(stream, index)
    u2 = splitmix64_uniform(stream, index + 1)
    normal = torch.sqrt(-2.0 * torch.log1p(-u1)) * torch.cos(2 * math.pi * u2)
    return normal.float().to(device=device, dtype=dtype)


def truncated_svd(a: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact rank-`rank` SVD of a (batched) matrix [..., m, n] -> U [..., m, r], S [..., r],
    V [..., n, r], from a full SVD per matrix (the accuracy reference). One matrix at a time,
    kept factors sliced at once: a batched full SVD would hold every task's full factors and
    LAPACK workspace together (measured: 1 GB over a 1 GB budget on ViT-B/16, 8 experts)."""
    batch = a.shape[:-2]
    parts = []
    for matrix in a.reshape(-1, *a.shape[-2:]):
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        parts.append((u[:, :rank].clone(), s[:rank].clone(), vh[:rank].mT.clone()))
        del u, s, vh
    u, s, v = (torch.stack(p) for p in zip(*parts, strict=True))
    kept = s.shape[-1]
    return u.reshape(*batch, -1, kept), s.reshape(*batch, kept), v.reshape(*batch, -1, kept)


def orthonormal_basis(y: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(y, mode="reduced").Q


def randomized_svd(
    a: torch.Tensor,
    rank: int,
    oversample: int,
    n_iter: int,
    seed: int,
    key: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank-`rank` randomized SVD of [..., m, n] (Halko, Martinsson and Tropp 2011, Alg. 4.4):
    the Gaussian test matrix of (seed, key) with rank + oversample columns, shared by the batch;
    `n_iter` power iterations with a Householder re-orthonormalisation after every product; an
    exact SVD of the small projected matrix. 16-bit inputs are factored in float32.
    Returns U [..., m, r], S [..., r], V [..., n, r]."""
    work = torch.float64 if a.dtype == torch.float64 else torch.float32
    a = a.to(work)
    m, n = a.shape[-2:]
    width = min(rank + oversample, m, n)
    omega = gaussian_test_matrix(seed, key, n, width, work, a.device)
    q = orthonormal_basis(a @ omega)
    for _ in range(n_iter):
        q = orthonormal_basis(a @ orthonormal_basis(a.mT @ q))
    u_small, s, vh = torch.linalg.svd(q.mT @ a, full_matrices=False)
    kept = min(rank, width)
    return (q @ u_small)[..., :kept], s[..., :kept], vh[..., :kept, :].mT


def dare_kept(dare: DareMask, shape: torch.Size) -> torch.Tensor:
    """Which entries of a block of `shape` DARE keeps, per task: bool [N, *shape] (on the CPU)."""
    index = torch.arange(dare.first_index, dare.first_index + shape.numel(), dtype=torch.int64)
    return torch.stack(
        [
            (splitmix64_uniform(stream, index) >= dare.drop_rate).view(shape)
            for stream in dare.streams
        ]
    )


def dare_masked(tasks: torch.Tensor, dare: DareMask) -> torch.Tensor:
    """A block's task vectors [N, ...] after DARE's mask: kept entries rescaled, dropped ones 0."""
    kept = dare_kept(dare, tasks.shape[1:]).to(tasks.device)
    return torch.where(kept, tasks / (1.0 - dare.drop_rate), torch.zeros_like(tasks))


def _masked_tasks(
    base: torch.Tensor, experts: Sequence[torch.Tensor], dare: DareMask | None
) -> list[torch.Tensor]:
    """The float32 task vectors of a block, after DARE's mask when one is given."""
    b = base.to(torch.float32)
    tasks = torch.stack([expert.to(torch.float32) - b for expert in experts])
    return list(tasks if dare is None else dare_masked(tasks, dare))


def _magnitude_patterns(
    base: torch.Tensor, experts: Sequence[torch.Tensor], dare: DareMask | None
) -> torch.Tensor:
    """[N, numel] int64 bit patterns of the float32 |task vectors| (after DARE's mask)."""
    tau = torch.stack(_masked_tasks(base, experts, dare))
    return (tau.reshape(len(experts), -1).view(torch.int32).long()) & 0x7FFFFFFF


def magnitude_histogram(
    base: torch.Tensor,
    experts: Sequence[torch.Tensor],
    prefixes: torch.Tensor,
    shift: int,
    width: int,
    dare: DareMask | None = None,
) -> torch.Tensor:
    """The oracle of ops.magnitude_histogram: bincount of the float32 magnitude bit patterns."""
    bins = 1 << width
    counts = torch.zeros(len(experts), bins, dtype=torch.int64, device=base.device)
    for i, row in enumerate(_magnitude_patterns(base, experts, dare)):
        matches = row[(row >> (shift + width)) == int(prefixes[i])]
        counts[i] += torch.bincount((matches >> shift) & (bins - 1), minlength=bins)
    return counts


def magnitude_histogram_collect(
    base: torch.Tensor,
    experts: Sequence[torch.Tensor],
    prefixes: torch.Tensor,
    shift: int,
    width: int,
    window: tuple[torch.Tensor, torch.Tensor] | None,
    dare: DareMask | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
    """The oracle of ops.magnitude_histogram_into: the counts, and with a window the nonzero bit
    patterns it collects (in index order)."""
    counts = magnitude_histogram(base, experts, prefixes, shift, width, dare)
    if window is None:
        return counts, None
    low, high = window
    collected = []
    for i, row in enumerate(_magnitude_patterns(base, experts, dare)):
        digits = (row >> shift) & ((1 << width) - 1)
        inside = ((row >> (shift + width)) == int(prefixes[i])) & (digits >= int(low[i]))
        inside &= (digits <= int(high[i])) & (row != 0)
        collected.append(row[inside].to(torch.int32))
    return counts, collected


def ties_merge(
    base: torch.Tensor,
    experts: Sequence[torch.Tensor],
    thresholds: torch.Tensor,
    lam: float,
    dare: DareMask | None = None,
) -> torch.Tensor:
    """The oracle of ops.ties_merge, in float32 with the kernel's order of every sum."""
    b = base.to(torch.float32)
    limits = thresholds.to(device=b.device, dtype=torch.float32)
    trimmed = []
    for i, task in enumerate(_masked_tasks(base, experts, dare)):
        trimmed.append(torch.where(task.abs() >= limits[i], task, torch.zeros_like(task)))
    total = torch.zeros_like(b)
    for values in trimmed:
        total = total + values
    positive = total >= 0
    agreeing = torch.zeros_like(b)
    count = torch.zeros_like(b)
    for values in trimmed:
        agrees = torch.where(positive, values > 0, values < 0)
        agreeing = agreeing + torch.where(agrees, values, torch.zeros_like(values))
        count = count + agrees.to(torch.float32)
    mean = agreeing / count.clamp_min(1)
    return b + torch.tensor(lam, dtype=torch.float32) * mean


def nth_at_magnitude(
    base: torch.Tensor,
    experts: Sequence[torch.Tensor],
    thresholds: torch.Tensor,
    needed: Sequence[int],
) -> list[int]:
    """The oracle of ops.nth_at_magnitude."""
    b = base.to(torch.float32).reshape(-1)
    found = []
    for i, expert in enumerate(experts):
        at = (expert.to(torch.float32).reshape(-1) - b).abs() == thresholds[i].to(torch.float32)
        indices = torch.nonzero(at).view(-1)
        found.append(int(indices[needed[i] - 1]) if 0 < needed[i] <= indices.numel() else -1)
    return found


def ties_merge_weighted(
    base: torch.Tensor,
    experts: Sequence[torch.Tensor],
    thresholds: torch.Tensor,
    cutoffs: Sequence[int],
    weights: Sequence[float],
    normalize: bool,
    lam: float,
) -> torch.Tensor:
    """The oracle of ops.ties_merge_weighted, in float32 with the kernel's order of every sum."""
    b = base.to(torch.float32)
    limits = thresholds.to(device=b.device, dtype=torch.float32)
    index = torch.arange(b.numel(), device=b.device).view(b.shape)
    weighted = []
    for i, expert in enumerate(experts):
        task = expert.to(torch.float32) - b
        kept = (task.abs() > limits[i]) | ((task.abs() == limits[i]) & (index <= cutoffs[i]))
        weight = torch.tensor(weights[i], dtype=torch.float32, device=b.device)
        weighted.append(torch.where(kept, task, torch.zeros_like(task)) * weight)
    total = torch.zeros_like(b)
    for values in weighted:
        total = total + values
    positive = total >= 0
    agreeing = torch.zeros_like(b)
    divisor = torch.zeros_like(b)
    for i, values in enumerate(weighted):
        agrees = torch.where(positive, values > 0, values < 0)
        agreeing = agreeing + torch.where(agrees, values, torch.zeros_like(values))
        weight = torch.tensor(weights[i], dtype=torch.float32, device=b.device)
        divisor = divisor + torch.where(agrees, weight, torch.zeros_like(weight))
    mean = agreeing / torch.where(divisor == 0, 1.0, divisor) if normalize else agreeing
    return b + torch.tensor(lam, dtype=torch.float32) * mean


def dare_merge(
    base: torch.Tensor, experts: Sequence[torch.Tensor], dare: DareMask, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The oracle of ops.dare_merge, in float32 with the kernel's order of the sum."""
    b = base.to(torch.float32)
    probe = torch.zeros((), dtype=torch.float32, device=b.device)
    for expert in experts:
        probe = probe + ((expert.to(torch.float32) - b) * 0).sum()
    total = torch.zeros_like(b)
    for task in _masked_tasks(base, experts, dare):
        total = total + task
    probe = torch.where(probe.isnan(), probe, torch.zeros_like(probe))
    return b + torch.tensor(lam, dtype=torch.float32) * total, probe
