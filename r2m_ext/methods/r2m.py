"""R²M (spec §1-3): Real core from the task-vector Gram, truncated Fake residuals, per-task norm
matching, theta* = theta_0 + tau_core + eta * tau_res.

Three passes over the body tensors: a Gram pass (N x N Gram of task vectors on the core set S),
a truncation pass (residuals, their rank-rho factors, and the N x N Gram of truncated residuals
per tensor, from which every norm follows), and a write pass. Everything global is an N-vector
or N x N matrix, so a streaming source can serve the tensors.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from r2m_ext import ops
from r2m_ext.classify import TensorClass
from r2m_ext.methods.common import TaskTensors, kept_rank, low_rank_factors, task_vectors
from r2m_ext.options import MergeOptions

# Eigenvalues at or below this fraction of the largest are treated as zero (spec §1).
EIGEN_CUTOFF = 1e-12
# A truncated residual whose norm is below this many machine epsilons of its task vector's norm is
# rounding noise, not a Fake component (identical experts leave exactly such residuals): it counts
# as zero, so eta = alpha |core| / |res| never scales noise up to the size of the core.
RESIDUAL_ROUNDING_EPS = 64


def core_projection(gram: torch.Tensor, k: int, center: bool) -> torch.Tensor:
    """P [N, N] with Pi tau_i = sum_j P[i, j] tau_j on S, from the uncentered Gram G_M = M M^T.

    With X = A M (A = I - 11^T/N when centering, else I), G = A G_M A = U Lambda U^T and
    Pi = X^T U_k Lambda_k^-1 U_k^T X, so Pi tau_i = M^T A W e_i with
    W = U_k Lambda_k^-1 U_k^T A G_M.
    Zero when no eigenvalue is kept (G = 0, or N = 1 with centering).
    """
    n = gram.shape[0]
    gram = gram.to(torch.float64)
    identity = torch.eye(n, dtype=torch.float64, device=gram.device)
    a = identity - 1.0 / n if center else identity
    g = a @ gram @ a
    eigenvalues, eigenvectors = torch.linalg.eigh((g + g.T) / 2)
    eigenvalues, eigenvectors = eigenvalues.flip(0), eigenvectors.flip(1)
    if not eigenvalues[0] > 0:
        return torch.zeros_like(gram)
    kept = int((eigenvalues[:k] > EIGEN_CUTOFF * eigenvalues[0]).sum())
    u_k = eigenvectors[:, :kept]
    w = u_k @ torch.diag(1.0 / eigenvalues[:kept]) @ u_k.T @ a @ gram
    return (a @ w).T


def merge_r2m(
    tensors: TaskTensors, options: MergeOptions, report: dict
) -> Iterator[tuple[str, torch.Tensor]]:
    n = tensors.n_experts
    body = tensors.body

    gram = torch.zeros(n, n, dtype=torch.float64)
    for entry in tensors.progress([t for t in body if t.in_core_set], "R²M gram pass"):
        base, experts = tensors.load(entry.name)
        gram += ops.delta_gram(base, list(experts)).cpu()
    projection = core_projection(gram, options.k, options.center)
    identity = torch.eye(n, dtype=torch.float64)
    mean_weights = torch.full((n,), 1.0 / n, dtype=torch.float64)
    core_weights = projection.T @ mean_weights  # tau_core = sum_j c_j tau_j on S
    if options.residual == "core":
        residual_weights = identity - core_weights.expand(n, n)
    else:
        residual_weights = identity - projection
    off_core_residual_weights = identity - mean_weights.expand(n, n)

    def weights_for(entry):
        if entry.in_core_set:
            return core_weights, residual_weights
        return mean_weights, off_core_residual_weights

    def residuals(entry, tau):
        """Untruncated residuals r_i as rows [N, numel]."""
        _, r_weights = weights_for(entry)
        return r_weights.to(tau) @ tau.reshape(n, -1)

    def truncated(entry, rows):
        """Rank-rho residuals [N, numel] and, where truncation changed them, their factors
        (U S [N, m, rho], V [N, n, rho])."""
        if entry.tensor_class is not TensorClass.MATRIX:
            return rows, None
        rank = kept_rank(entry.shape, options.rank_ratio)
        if rank >= min(entry.shape):
            return rows, None
        u, s, v = low_rank_factors(rows.reshape(n, *entry.shape), rank, options, entry.name)
        factors = (u * s.unsqueeze(-2), v)
        return (factors[0] @ v.mT).reshape(n, -1), factors

    # Truncation pass: factors are cached (rho (m + n) numbers per task and matrix).
    factor_cache = {}
    residual_grams = {}
    core_norm_sq = 0.0
    tensor_reports = report.setdefault("tensors", {})
    for entry in tensors.progress(body, "R²M truncation pass"):
        _, tau = task_vectors(tensors, entry.name)
        c_weights, _ = weights_for(entry)
        core = c_weights.to(tau) @ tau.reshape(n, -1)
        core_norm_sq += float(core.double().square().sum())
        rows = residuals(entry, tau)
        kept_rows, factors = truncated(entry, rows)
        if factors is not None:
            factor_cache[entry.name] = factors
        truncated64 = kept_rows.double()
        rounding_floor = (
            RESIDUAL_ROUNDING_EPS
            * torch.finfo(tau.dtype).eps
            * tau.reshape(n, -1).double().norm(dim=1)
        )
        signal = truncated64.norm(dim=1) > rounding_floor
        residual_grams[entry.name] = (
            truncated64 @ truncated64.T * torch.outer(signal, signal)
        ).cpu()
        tensor_report = {"class": entry.tensor_class.value}
        if entry.tensor_class is TensorClass.MATRIX:
            full_sq = rows.double().square().sum(1).cpu()
            kept_sq = truncated64.square().sum(1).cpu()
            tensor_report["rank"] = kept_rank(entry.shape, options.rank_ratio)
            tensor_report["energy_kept"] = torch.where(
                full_sq > 0, kept_sq / full_sq, torch.ones_like(full_sq)
            ).tolist()
        tensor_reports[entry.name] = tensor_report

    def matched_scales(grams):
        norms = grams.diagonal().clamp_min(0).sqrt()
        target = norms.mean()
        return torch.where(norms > 0, target / norms, torch.zeros_like(norms)), norms

    if options.norm_scope == "global":
        total = sum(residual_grams.values(), torch.zeros(n, n, dtype=torch.float64))
        global_scales, residual_norms = matched_scales(total)
        scales = {name: global_scales for name in residual_grams}
        report["residual_norms"] = residual_norms.tolist()
    else:
        scales = {name: matched_scales(g)[0] for name, g in residual_grams.items()}
    residual_norm_sq = sum(
        float(scales[name] @ g @ scales[name]) / n**2 for name, g in residual_grams.items()
    )
    core_norm, residual_norm = core_norm_sq**0.5, residual_norm_sq**0.5
    if options.residual_scale == "relative":
        eta = (
            options.alpha * core_norm / residual_norm
            if core_norm > 0 and residual_norm > 0
            else 0.0
        )
    elif options.residual_scale == "literal":
        eta = options.alpha * core_norm
    else:
        eta = options.alpha
    report.update(
        gram=gram.tolist(),
        core_coefficients=core_weights.tolist(),
        core_norm=core_norm,
        residual_norm=residual_norm,
        eta=eta,
    )

    for entry in tensors.progress(body, "R²M write pass"):
        base, tau = task_vectors(tensors, entry.name)
        c_weights, _ = weights_for(entry)
        core = (c_weights.to(tau) @ tau.reshape(n, -1)).reshape(entry.shape)
        residual_weights_out = (eta / n) * scales[entry.name]
        if entry.name in factor_cache:
            left, right = factor_cache.pop(entry.name)
            left = left * residual_weights_out.to(left).view(n, 1, 1)
            residual = torch.einsum("imr,inr->mn", left, right)
        else:
            kept_rows, _ = truncated(entry, residuals(entry, tau))
            residual = (residual_weights_out.to(tau) @ kept_rows).reshape(entry.shape)
        yield entry.name, base + core + residual
