"""R²M (spec §1-3): Real core from the task-vector Gram, truncated Fake residuals, per-task norm
matching, theta* = theta_0 + tau_core + eta * tau_res.

Three passes over the body tensors: a Gram pass (N x N Gram of task vectors on the core set S),
a truncation pass (residuals, their rank-rho factors, and the N x N Gram of truncated residuals
per tensor, from which every norm follows), and a write pass. Everything global is an N-vector
or N x N matrix, so a streaming source can serve the tensors.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from r2m_ext import ops
from r2m_ext.classify import TensorClass
from r2m_ext.errors import R2MError
from r2m_ext.methods.common import (
    FactorBasis,
    SvdOptions,
    TaskTensors,
    factored_output,
    factoring_work,
    low_rank_factors,
    streamed_low_rank_factors,
    streamed_workspace_bytes,
    svd_workspace_stacks,
    truncates,
    truncation_rank,
)
from r2m_ext.methods.passes import (
    KeptValues,
    LowRankUpdate,
    Merged,
    MethodPasses,
    StatisticPass,
    add,
    ordered_parts,
)
from r2m_ext.methods.registry import MergeMethod, Range, option, register
from r2m_ext.plan import TensorPlan
from r2m_ext.report import PER_TENSOR_REPORT


@dataclass(frozen=True)
class R2mOptions(SvdOptions):
    k: int = option(
        1,
        "number of top eigenpairs of the task-vector Gram kept as the Real core",
        check=Range(1),
    )
    center: bool = option(
        False, "center task vectors before estimating the core (the paper's equation; see spec §1)"
    )
    residual: str = option(
        "core",
        "'core' (r_i = tau_i - tau_core) or 'projection' (r_i = tau_i - P tau_i)",
        choices=("core", "projection"),
    )
    rank_ratio: float = option(
        0.1,
        "kept rank = max(1, floor(rank_ratio * min(m, n))) per matrix",
        check=Range(0, 1, low_open=True),
    )
    norm_scope: str = option(
        "global",
        "match residual norms over all tensors together ('global') or per tensor ('tensor')",
        choices=("global", "tensor"),
    )
    residual_scale: str = option(
        "relative",
        "eta = alpha*|core|/|res| ('relative'), alpha*|core| ('literal'), or alpha ('fixed')",
        choices=("relative", "literal", "fixed"),
    )
    alpha: float = option(0.6, "residual strength")


# Eigenvalues at or below this fraction of the largest are treated as zero (spec §1).
EIGEN_CUTOFF = 1e-12
# A truncated residual whose norm is below this many machine epsilons of its task vector's norm is
# rounding noise, not a Fake component (identical experts leave exactly such residuals): it counts
# as zero, so eta = alpha |core| / |res| never scales noise up to the size of the core.
RESIDUAL_ROUNDING_EPS = 64
# |tau_res|^2 = w^T G w is read off Grams computed in the compute dtype, which know it only to about
# eps (sum_i |w_i| |r_i|)^2 (measured: 0.002-0.45 of that, 64 x 32 to 3072 x 768). Where the scaled
# residuals cancel below this many such units (two experts theta_0 + a +- d leave r_1 ~ -r_2), the
# form is rounding noise of either sign: it counts as zero, so eta = 0 (spec §3) instead of a
# complex norm or an eta that scales noise up to the core. So |tau_res| below ~1e-3 of
# sum_i |w_i| |r_i| reads as 0 in float32 compute; float64 compute resolves ~4e-8 of it.
QUADRATIC_FORM_ROUNDING_EPS = 8


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


def squared_norms(rows: torch.Tensor) -> torch.Tensor:
    """Squared norm of each row of [K, count] as float64, by one fused reduction in the rows'
    dtype (no squared or widened copy of the rows)."""
    return torch.linalg.vector_norm(rows, dim=-1).double().square()


def gram_norms(gram: torch.Tensor) -> torch.Tensor:
    """The norm of each vector a Gram matrix is taken of: sqrt of its diagonal, which rounding may
    leave a hair below zero for a zero vector."""
    return gram.diagonal().clamp_min(0).sqrt()


def factor_gram(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """<L_i R_i^T, L_j R_j^T> for factors L [N, m, r], R [N, n, r], without forming the [N, m, n]
    products: the sum over (a, b) of (L_i^T L_j)[a, b] (R_i^T R_j)[a, b]. Float64 [N, N].

    The Gram is symmetric, so only the pairs j >= i are formed (row i against the factors of
    tasks i..N-1, one product each): half the multiply-adds of the full [N r, N r] products."""
    n, _, rank = left.shape
    left_flat = left.permute(1, 0, 2).reshape(-1, n * rank)
    right_flat = right.permute(1, 0, 2).reshape(-1, n * rank)
    gram = torch.zeros(n, n, dtype=torch.float64, device=left.device)
    for i in range(n):
        row = slice(i * rank, (i + 1) * rank)
        left_products = left_flat[:, row].T @ left_flat[:, i * rank :]  # [r, (N - i) r]
        right_products = right_flat[:, row].T @ right_flat[:, i * rank :]
        products = left_products.double() * right_products.double()
        gram[i, i:] = products.reshape(rank, n - i, rank).sum(dim=(0, 2))
    return torch.triu(gram) + torch.triu(gram, diagonal=1).T


@dataclass(frozen=True)
class TruncationStatistic:
    """Tensors' parts of the truncation pass, in plan order: each one's N x N Gram of truncated
    residuals (rounding noise zeroed; every residual norm follows from it), and the parts of
    |tau_core|^2 in the order they were computed (one per tensor, or per row block where a
    tensor's core norm is reduced block by block)."""

    residual_grams: dict[str, torch.Tensor]
    core_norm_sq_parts: tuple[float, ...]

    def __add__(self, later: TruncationStatistic) -> TruncationStatistic:
        return TruncationStatistic(
            {**self.residual_grams, **later.residual_grams},
            self.core_norm_sq_parts + later.core_norm_sq_parts,
        )


TRUNCATION_PASS = "R²M truncation pass"
WRITE_PASS = "R²M write pass"


class _R2mMerge:
    """R²M's three passes over one merge's tensors: `statistic_passes` (the Gram pass, then the
    truncation pass, each reduced in plan order) and `emit` (the write pass, one tensor)."""

    def __init__(self, tensors: TaskTensors, options: R2mOptions, report: dict):
        self.tensors = tensors
        self.options = options
        self.report = report
        self.n = tensors.n_experts
        self.svd_stacks = svd_workspace_stacks(options)
        # Each tensor's own Gram (N^2 numbers): the truncation pass reads its task vectors' and
        # its core's norms off it instead of reducing over [N, m, n] stacks.
        self.tensor_grams: dict[str, torch.Tensor] = {}
        self.truncating = {
            t.name: t for t in tensors.body if truncates(t, truncation_rank(t, options.rank_ratio))
        }
        self.whole_stacks = 2 + self.svd_stacks
        # Where the engine held the factors of the truncated matrices this process observed.
        # How many matrices' factors each tier served (TaskTensors.kept_where), or none did.
        self.factors_kept = {"memory": 0, "host": 0, "scratch": 0, "recomputed": 0}
        # Factorisations of [N, m, n] stacks per pass (N each): a matrix factored in both the
        # truncation and the write pass counts twice.
        self.factorisations: dict[str, int] = {}
        self.streamed: set[str] = set()
        # Matrices every expert updates by LoRA factors: truncated from the factors, exactly.
        self.factored: set[str] = set()
        self.tensor_reports = report.setdefault(PER_TENSOR_REPORT, {})

    def statistic_passes(self) -> Iterator[StatisticPass]:
        n = self.n
        # N x N and N-sized statistics live on the host in float64, where the core, the norm
        # matching and the report use them; on a GPU that copies a few numbers per tensor.
        yield StatisticPass(
            label="R²M gram pass",
            tensors=[t for t in self.tensors.body if t.in_core_set],
            observe=self.observe_gram,
            combine=add,
            start=torch.zeros(n, n, dtype=torch.float64),
            finish=self.set_core,
        )
        yield StatisticPass(
            label=TRUNCATION_PASS,
            tensors=self.tensors.body,
            observe=self.observe_truncation,
            combine=add,
            start=TruncationStatistic({}, ()),
            finish=self.set_norm_matching,
        )

    # -- Gram pass: the N x N Gram of task vectors on the core set S --------------------------
    def observe_gram(self, entry: TensorPlan) -> torch.Tensor:
        factors = self.tensors.low_rank_updates(entry)
        if factors is not None:
            # LoRA experts: <L_i R_i^T, L_j R_j^T> = sum((L_i^T L_j) * (R_i^T R_j)), from the
            # factors (the inputs are read, and checked for NaN/Inf, by the write pass).
            # Two [K, K] Grams of the stacked factors, summed over each pair's block.
            lefts = torch.cat([left.double() for left, _ in factors], dim=1)
            rights = torch.cat([right.double() for _, right in factors], dim=1)
            owner = torch.cat(
                [torch.full((left.shape[1],), j) for j, (left, _) in enumerate(factors)]
            )
            blocks = torch.nn.functional.one_hot(owner, self.n).to(lefts)
            products = (lefts.T @ lefts) * (rights.T @ rights)
            tensor_gram = (blocks.T @ products @ blocks).cpu()
            tensor_gram = torch.triu(tensor_gram) + torch.triu(tensor_gram, diagonal=1).T
            self.tensor_grams[entry.name] = tensor_gram
            return tensor_gram
        tensor_gram = torch.zeros(self.n, self.n, dtype=torch.float64)
        for rows, base, experts in self.tensors.raw_blocks(entry, outputs=0):
            block_gram = ops.delta_gram(base, experts).cpu()
            self.tensors.check_finite(entry, rows, block_gram.diagonal())
            tensor_gram += block_gram
        self.tensor_grams[entry.name] = tensor_gram
        return tensor_gram

    def set_core(self, gram: torch.Tensor) -> None:
        n = self.n
        self.gram = gram
        projection = core_projection(gram, self.options.k, self.options.center)
        identity = torch.eye(n, dtype=torch.float64)
        self.mean_weights = torch.full((n,), 1.0 / n, dtype=torch.float64)
        self.core_weights = projection.T @ self.mean_weights  # tau_core = sum_j c_j tau_j on S
        if self.options.residual == "core":
            self.residual_weights = identity - self.core_weights.expand(n, n)
        else:
            self.residual_weights = identity - projection
        self.off_core_residual_weights = identity - self.mean_weights.expand(n, n)

    def weights_for(self, entry: TensorPlan, like: torch.Tensor):
        c, r = (
            (self.core_weights, self.residual_weights)
            if entry.in_core_set
            else (self.mean_weights, self.off_core_residual_weights)
        )
        return c.to(like), r.to(like)

    # -- truncation pass: residuals, their rank-rho factors and Grams --------------------------
    def residual_rows(self, entry: TensorPlan, base, experts) -> torch.Tensor:
        """The residual rows [N, numel] of a whole tensor, r_i = sum_j R[i, j] tau_j, in one fused
        pass over its raw inputs (no stack of task vectors). Both passes form them here, so a
        write-pass recomputation gives the truncation pass's bits."""
        n, tensors = self.n, self.tensors
        _, r_weights = self.weights_for(entry, torch.float64)
        rows = ops.combine(
            base,
            experts,
            r_weights,
            0.0,
            tensors.compute_dtype,
            out=tensors.empty_stack(entry.shape),
        )
        zero_weight = [j + 1 for j in range(n) if not r_weights[:, j].any()]
        tensors.check_finite(entry, None, rows, zero_weight)
        return rows.reshape(n, -1)

    def truncated_factors(self, entry: TensorPlan, residual_rows: torch.Tensor, in_pass: str):
        self.factorisations[in_pass] = self.factorisations.get(in_pass, 0) + self.n
        u, s, v = low_rank_factors(
            residual_rows.reshape(self.n, *entry.shape),
            truncation_rank(entry, self.options.rank_ratio),
            self.options,
            entry.name,
        )
        return u * s.unsqueeze(-2), v, s

    def factored_factors(self, basis: FactorBasis, entry: TensorPlan, in_pass: str):
        """truncated_factors of a matrix whose task vectors are low-rank updates
        tau_j = L_j R_j^T (LoRA experts), from the factors alone, exactly, in the coordinates of
        their `basis`: each residual r_i = sum_j W[i, j] tau_j is Q_L C_i Q_R^T for the small
        core C_i = T_L D_i T_R^T (D_i: W[i, j] over task j's columns), so its best rank-rho
        approximation is Q_L (that of C_i) Q_R^T. Returns (left, right) [N, K, keep] with
        r_i's truncation Q_L left_i right_i^T Q_R^T, the singular values, and each residual's
        squared norm (C_i's), in float64: no m x n matrix is formed and nothing is sketched, for
        svd=exact and randomized alike, and what a later pass keeps is K x K sized."""
        self.factorisations[in_pass] = self.factorisations.get(in_pass, 0) + self.n
        _, r_weights = self.weights_for(entry, basis.t_left)
        core = basis.core(r_weights)
        u, singular, vh = torch.linalg.svd(core, full_matrices=False)
        # Where sum r_j < rho the residuals have no more directions: keep sum r_j of them.
        keep = min(truncation_rank(entry, self.options.rank_ratio), singular.shape[-1])
        left = u[..., :keep] * singular[:, None, :keep]
        right = vh[:, :keep].mT
        full_sq = core.square().sum(dim=(1, 2)).cpu()
        return left, right, singular[:, :keep], full_sq

    def factored_update(self, entry: TensorPlan, weights_out: torch.Tensor) -> LowRankUpdate:
        """The merged update of a matrix the experts update by LoRA factors,
        tau_core + sum_i w_i trunc(r_i) = Q_L M Q_R^T for the K x K core
        M = sum_j c_j C_j + sum_i w_i left_i right_i^T of the truncation's factors, kept or
        recomputed (the same QRs and SVDs, the same bits)."""
        basis = FactorBasis.of(self.tensors.low_rank_updates(entry))
        kept = self.tensors.take(entry.name)
        if kept is None:
            left, right, _, _ = self.factored_factors(basis, entry, WRITE_PASS)
        else:
            left, right = kept
        c_weights, _ = self.weights_for(entry, basis.t_left)
        residuals = weights_out.to(left).view(-1, 1, 1) * left
        merged = basis.core(c_weights) + torch.einsum("iak,ibk->ab", residuals, right)
        return LowRankUpdate(basis.q_left, basis.q_right, merged)

    def streams(self, entry: TensorPlan) -> bool:
        """Whether a truncated matrix is factored over row blocks: it does not fit whole, and the
        randomized SVD (the exact one needs the whole matrix) can work in passes. Asked in the
        truncation pass only, which records the answer in `streamed`: a recomputation in the
        write pass then takes the same path (the same bits) whatever the budget holds by then."""
        return self.options.svd == "randomized" and not self.tensors.fits_whole(
            entry, self.whole_stacks
        )

    def streamed_factors(self, entry: TensorPlan, in_pass: str, on_block=None):
        """truncated_factors of a matrix too large to hold whole, from its residuals' row blocks
        (2 n_iter + 2 passes over its rows); `on_block(tau, c_weights, residuals)` sees each
        block of the first pass. Its thin factors are held as workspace meanwhile."""
        n, tensors, options = self.n, self.tensors, self.options
        self.factorisations[in_pass] = self.factorisations.get(in_pass, 0) + n
        rank = truncation_rank(entry, options.rank_ratio)
        itemsize = tensors.compute_dtype.itemsize
        need = streamed_workspace_bytes(n, entry.shape, rank, options, itemsize)
        first_pass = [on_block]

        def row_blocks():
            hook, first_pass[0] = first_pass[0], None
            for rows, base, experts in tensors.blocks(entry, extra_stacks=2):
                tau = (experts - base).reshape(n, -1)
                del base, experts
                c_weights, r_weights = self.weights_for(entry, tau)
                residuals = r_weights @ tau
                if hook is not None:
                    hook(tau, c_weights, residuals)
                del tau
                yield rows, residuals.reshape(n, -1, entry.shape[1])
                del residuals  # one block at a time (MergeInputs.blocks)

        purpose = "factor its residuals in row blocks"
        with tensors.workspace(entry, need, purpose, block_stacks=2):
            u, s, v = streamed_low_rank_factors(row_blocks, entry.shape, rank, options, entry.name)
        return u * s.unsqueeze(-2), v, s

    def observe_truncation(self, entry: TensorPlan) -> TruncationStatistic:
        """Per tensor, the N x N Gram of its truncated residuals (every norm follows from those)
        and, where the budget allows, the factors (rho (m + n) numbers per task); factors not
        cached are recomputed in the write pass from the same seed, to the same bits."""
        n, tensors = self.n, self.tensors
        grams = torch.zeros(n, n, dtype=torch.float64)
        task_sq = torch.zeros(n, dtype=torch.float64)
        core_parts: list[float] = []
        entry_report = {"class": entry.tensor_class.value}
        if entry.name in self.truncating:
            factored = tensors.low_rank_updates(entry)
            if factored is not None:
                self.factored.add(entry.name)
                # A truncated matrix is in S (spec §0), so the Gram pass took its Gram.
                task_gram = self.tensor_grams[entry.name]
                c_weights, _ = self.weights_for(entry, task_gram)
                task_sq += task_gram.diagonal()
                core_parts.append(float(c_weights @ task_gram @ c_weights))
                # In the basis's coordinates: orthonormal, so the Gram below is the residuals'.
                left, right, singular, full_sq = self.factored_factors(
                    FactorBasis.of(factored, with_q=False), entry, TRUNCATION_PASS
                )
                entry_report["factored"] = True
            elif self.streams(entry):
                self.streamed.add(entry.name)
                sums = {"core": 0.0, "task": torch.zeros(n, dtype=torch.float64), "full": 0.0}

                def gather(tau, c_weights, residuals):
                    sums["core"] += float(squared_norms(c_weights @ tau).sum())
                    sums["task"] += squared_norms(tau).cpu()
                    sums["full"] += squared_norms(residuals).cpu()

                left, right, singular = self.streamed_factors(entry, TRUNCATION_PASS, gather)
                core_parts.append(sums["core"])
                task_sq += sums["task"]
                full_sq = sums["full"]
                entry_report["streamed"] = True
            else:
                base, experts = tensors.load_raw(
                    entry.name, self.whole_stacks, purpose="truncate its residuals"
                )
                rows = self.residual_rows(entry, base, experts)
                del base, experts
                # A truncated matrix is in S (spec §0), so the Gram pass took its Gram.
                task_gram = self.tensor_grams[entry.name]
                c_weights, _ = self.weights_for(entry, task_gram)
                task_sq += task_gram.diagonal()
                core_parts.append(float(c_weights @ task_gram @ c_weights))
                left, right, singular = self.truncated_factors(entry, rows, TRUNCATION_PASS)
                full_sq = squared_norms(rows).cpu()
                del rows
            grams += factor_gram(left, right).cpu()
            kept_sq = grams.diagonal()
            entry_report.update(
                rank=truncation_rank(entry, self.options.rank_ratio),
                energy_kept=torch.where(full_sq > 0, kept_sq / full_sq, 1.0).tolist(),
                singular_values=singular.double().tolist(),
            )
            # Where they went is settled when the pass ends (set_norm_matching reports it).
            tensors.keep(entry.name, (left, right))
        else:
            for _, base, experts in tensors.blocks(entry, extra_stacks=2):
                tau = (experts - base).reshape(n, -1)
                del base, experts
                c_weights, r_weights = self.weights_for(entry, tau)
                core_parts.append(float(squared_norms(c_weights @ tau).sum()))
                rows = r_weights @ tau
                grams += (rows @ rows.T).double().cpu()
                task_sq += squared_norms(tau).cpu()
                del tau, rows  # one block at a time (MergeInputs.blocks)
        # Residuals at the rounding level of their task vector are noise: count them as zero.
        floor = RESIDUAL_ROUNDING_EPS * torch.finfo(tensors.compute_dtype).eps * task_sq.sqrt()
        signal = gram_norms(grams) > floor
        self.tensor_reports[entry.name] = entry_report
        return TruncationStatistic(
            {entry.name: grams * torch.outer(signal, signal)}, tuple(core_parts)
        )

    def set_norm_matching(self, total: TruncationStatistic) -> None:
        """Per-task norm matching and eta (spec §3) from the whole model's truncation pass."""
        n, options, report = self.n, self.options, self.report
        residual_grams = total.residual_grams

        def matched_scales(grams):
            norms = gram_norms(grams)
            target = norms.mean()
            return torch.where(norms > 0, target / norms, torch.zeros_like(norms))

        if options.norm_scope == "global":
            total_gram = sum(residual_grams.values(), torch.zeros(n, n, dtype=torch.float64))
            global_scales = matched_scales(total_gram)
            self.scales = {name: global_scales for name in residual_grams}
            report["residual_norms"] = gram_norms(total_gram).tolist()
        else:
            self.scales = {name: matched_scales(g) for name, g in residual_grams.items()}
        residual_norm_sq, rounding_sq = 0.0, 0.0
        for name, g in residual_grams.items():
            weights = self.scales[name] / n
            residual_norm_sq += float(weights @ g @ weights)
            rounding_sq += float(weights.abs() @ gram_norms(g)) ** 2
        rounding_sq *= QUADRATIC_FORM_ROUNDING_EPS * torch.finfo(self.tensors.compute_dtype).eps
        residual_resolved = residual_norm_sq > rounding_sq
        residual_norm = residual_norm_sq**0.5 if residual_resolved else 0.0
        # The task-vector Gram is accumulated in float64, so the core's form can only dip below
        # zero by float64 rounding, where the core is zero anyway.
        core_norm = max(ordered_parts(total.core_norm_sq_parts), 0.0) ** 0.5
        if options.residual_scale == "relative":
            has_both = core_norm > 0 and residual_norm > 0
            self.eta = options.alpha * core_norm / residual_norm if has_both else 0.0
        elif options.residual_scale == "literal":
            self.eta = options.alpha * core_norm
        else:
            self.eta = options.alpha
        for name in self.truncating:
            if name in self.tensor_reports:  # else observed by another rank, which reports it
                tier = self.tensors.kept_where(name) or "recomputed"
                self.tensor_reports[name]["factors"] = tier
                self.factors_kept[tier] += 1
        for name, grams in residual_grams.items():
            if name not in self.tensor_reports:
                continue  # observed by another rank, which reports it
            before = gram_norms(grams)
            self.tensor_reports[name]["residual_norm_before"] = before.tolist()
            self.tensor_reports[name]["residual_norm_after"] = (self.scales[name] * before).tolist()
        report.update(
            gram=self.gram.tolist(),
            core_coefficients=self.core_weights.tolist(),
            core_norm=core_norm,
            residual_norm=residual_norm,
            residual_cancelled=not residual_resolved and residual_norm_sq != 0,
            eta=self.eta,
            factors_cached=self.factors_kept["memory"],
            factors_in_host_memory=self.factors_kept["host"],
            factors_spilled=self.factors_kept["scratch"],
            factors_recomputed=self.factors_kept["recomputed"],
            factorisations=self.factorisations,
        )

    # -- write pass: theta* = theta_0 + tau_core + eta * tau_res --------------------------------
    def emit(self, entry: TensorPlan) -> Merged:
        n, tensors = self.n, self.tensors
        weights_out = (self.eta / n) * self.scales[entry.name]
        if entry.name in self.factored:
            update = self.factored_update(entry, weights_out)
            merged = factored_output(tensors, entry, update)
            if merged is not None:
                yield entry.name, None, merged
                return
            # The base does not fit one step whole: theta_0 + update over its row blocks (the
            # experts' rows are read too, only to be checked: they enter with weight 0).
            dtype = tensors.compute_dtype
            left, right = (update.left @ update.core).to(dtype), update.right.to(dtype)
            one = torch.ones(1, dtype=dtype, device=left.device)
            for rows, base, experts in tensors.raw_blocks(entry):
                block_left = left if rows is None else left[rows]
                merged = ops.lowrank_accumulate(
                    base.to(left.dtype), block_left.unsqueeze(0), right.unsqueeze(0), one
                )
                tensors.check_finite(entry, rows, merged, range(1, n + 1), [base, *experts])
                yield entry.name, rows, merged
            return
        if entry.name in self.truncating:
            kept = tensors.take(entry.name)
            if kept is not None:
                left, right = kept
            elif entry.name in self.streamed:
                left, right, _ = self.streamed_factors(entry, WRITE_PASS)
            else:
                # Factors the budget could not cache: recomputed from the whole residuals, with
                # the core update from the same task vectors.
                base, experts = tensors.load_raw(
                    entry.name, self.whole_stacks, purpose="write its merge"
                )
                rows = self.residual_rows(entry, base, experts)
                c_weights, _ = self.weights_for(entry, weights_out)
                with_core = ops.combine(
                    base, experts, c_weights.reshape(1, n), 1.0, tensors.compute_dtype
                )[0]
                del base, experts
                left, right, _ = self.truncated_factors(entry, rows, WRITE_PASS)
                del rows
                yield entry.name, None, ops.lowrank_accumulate(with_core, left, right, weights_out)
                return
            # theta_0 + tau_core in one fused pass over the raw inputs (no stack of task
            # vectors), then the truncated residuals' low-rank update on top.
            c_weights, _ = self.weights_for(entry, weights_out)
            core_row = c_weights.reshape(1, n)
            zero_weight = [j + 1 for j in range(n) if core_row[0, j] == 0]
            for rows, base, experts in tensors.raw_blocks(entry):
                with_core = ops.combine(
                    base, experts, core_row, 1.0, tensors.compute_dtype, tensors.compute_dtype
                )[0]
                tensors.check_finite(entry, rows, with_core, zero_weight)
                block_left = left if rows is None else left[:, rows]
                yield (
                    entry.name,
                    rows,
                    ops.lowrank_accumulate(with_core, block_left, right, weights_out),
                )
            return
        # theta_0 + c . tau + w . (R tau) = theta_0 + (c + w R) . tau: one fused combination.
        c_weights, r_weights = self.weights_for(entry, weights_out)
        combined = (c_weights + weights_out @ r_weights).reshape(1, n)
        zero_weight = [j + 1 for j in range(n) if combined[0, j] == 0]
        for rows, base, experts in tensors.raw_blocks(entry):
            merged = ops.combine(
                base, experts, combined, 1.0, tensors.compute_dtype, entry.out_dtype
            )
            tensors.check_finite(entry, rows, merged, zero_weight)
            yield entry.name, rows, merged[0]


def merge_r2m(tensors: TaskTensors, options: R2mOptions, report: dict) -> MethodPasses:
    merge = _R2mMerge(tensors, options, report)
    itemsize = tensors.compute_dtype.itemsize
    factor_bytes = sum(
        tensors.n_experts * truncation_rank(t, options.rank_ratio) * sum(t.shape) * itemsize
        for t in merge.truncating.values()
    )
    return MethodPasses(
        write_label=WRITE_PASS,
        emit=merge.emit,
        statistics=merge.statistic_passes(),
        # The factors, in memory only while any truncated matrix's whole step (a recomputation
        # in the write pass) would still fit beside them.
        keeps=KeptValues(factor_bytes, tuple(merge.truncating.values()), merge.whole_stacks),
    )


def _check_experts(options: R2mOptions, n_experts: int) -> None:
    if options.k > n_experts:
        raise R2MError(
            f"option k: {options.k} is more than the {n_experts} experts (the Gram of N task "
            "vectors has N eigenpairs)"
        )


def _why_finite_required(entry) -> str | None:
    # One non-finite entry would spoil the statistics every tensor shares: the Real core's Gram,
    # the norms of norm matching and eta.
    if entry.tensor_class in (TensorClass.MATRIX, TensorClass.OTHER):
        return "every tensor but the heads feeds its Real core and norm matching"
    return None


register(
    MergeMethod(
        name="r2m",
        summary="R²M: Real core + truncated, norm-matched Fake residuals",
        options=R2mOptions,
        merge=merge_r2m,
        passes=("gram", "truncation", "write"),
        update_in_expert_span=True,
        merges_factors=True,
        why_finite_required=_why_finite_required,
        check_experts=_check_experts,
        relative_work=factoring_work,
        summed_report_keys=(
            "factors_cached",
            "factors_in_host_memory",
            "factors_spilled",
            "factors_recomputed",
            "factorisations",
        ),
    )
)
