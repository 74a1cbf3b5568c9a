"""Pure-torch implementations of the native ops: the oracle the kernels are tested against and the
path used when the extension is not built. Any floating dtype, any device."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch


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
    out = weights.to(compute_dtype) @ tau + base_weight * b.reshape(1, -1)
    return out.reshape(weights.shape[0], *base.shape).to(out_dtype)


def sketch_seed(seed: int, key: str, shape: Sequence[int]) -> int:
    """A 63-bit seed from (seed, tensor name, tensor shape) alone (spec §7), stable across runs,
    processes and platforms (unlike Python's salted hash())."""
    text = f"{seed}\0{key}\0{tuple(int(s) for s in shape)}".encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1


def gaussian_test_matrix(
    seed: int, key: str, shape: Sequence[int], rows: int, cols: int, dtype, device
) -> torch.Tensor:
    """The sketch's Gaussian test matrix, drawn in float32 on the CPU so it is the same for every
    device, compute dtype and memory budget, then moved."""
    generator = torch.Generator(device="cpu").manual_seed(sketch_seed(seed, key, shape))
    omega = torch.randn(rows, cols, generator=generator, dtype=torch.float32)
    return omega.to(device=device, dtype=dtype)


def truncated_svd(a: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact rank-`rank` SVD of a (batched) matrix [..., m, n] -> U [..., m, r], S [..., r],
    V [..., n, r], from a full SVD (the accuracy reference)."""
    u, s, vh = torch.linalg.svd(a, full_matrices=False)
    return u[..., :rank], s[..., :rank], vh[..., :rank, :].mT


def _orthonormal_basis(y: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(y, mode="reduced").Q


def randomized_svd(
    a: torch.Tensor,
    rank: int,
    oversample: int,
    n_iter: int,
    seed: int,
    key: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank-`rank` randomized SVD of [..., m, n] (Halko, Martinsson and Tropp 2011, Alg. 4.4):
    Gaussian sketch of rank + oversample columns (one test matrix shared by the batch, a function
    of seed, key and shape), `n_iter` power iterations with a Householder re-orthonormalisation
    after every product, then an exact SVD of the small projected matrix.
    Returns U [..., m, r], S [..., r], V [..., n, r]."""
    m, n = a.shape[-2:]
    width = min(rank + oversample, m, n)
    omega = gaussian_test_matrix(seed, key, a.shape[-2:], n, width, a.dtype, a.device)
    q = _orthonormal_basis(a @ omega)
    for _ in range(n_iter):
        q = _orthonormal_basis(a @ _orthonormal_basis(a.mT @ q))
    u_small, s, vh = torch.linalg.svd(q.mT @ a, full_matrices=False)
    return (q @ u_small)[..., :rank], s[..., :rank], vh[..., :rank, :].mT
