"""Every method against an independent dense float64 NumPy implementation written from the spec:
R²M with the explicit D x D projector Pi = V_k V_k^T (no Gram shortcut), truncations by NumPy SVD,
TSV-M's polar factor as U (U^T U)^-1/2, TIES thresholds by sorting."""

import fnmatch
import itertools
import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from conftest import make_experts, random_model

import r2m_ext
from r2m_ext.report import format_report

HEADS = ("head.*", "*.head.*", "classifier.*", "*.classifier.*", "fc.*")
EXCLUDED = ("*embed*", "*pos*", "*token*")


def body_names(base):
    return [
        n
        for n, v in base.items()
        if v.is_floating_point() and not any(fnmatch.fnmatchcase(n, p) for p in HEADS)
    ]


def is_matrix(name, shape):
    excluded = any(fnmatch.fnmatchcase(name.lower(), p) for p in EXCLUDED)
    return len(shape) == 2 and min(shape) >= 2 and not excluded


def rank_for(shape, ratio):
    return max(1, math.floor(Fraction(str(ratio)) * min(shape)))


def best_rank(matrix, rank):
    u, s, vt = np.linalg.svd(matrix, full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vt[:rank]


def numpy_inputs(base, experts):
    names = body_names(base)
    b = {n: base[n].double().numpy() for n in names}
    tau = {n: np.stack([e[n].double().numpy() - b[n] for e in experts]) for n in names}
    return names, b, tau


def numpy_r2m(
    base,
    experts,
    k=1,
    center=False,
    residual="core",
    rank_ratio=0.1,
    norm_scope="global",
    residual_scale="relative",
    alpha=0.6,
):
    names, b, tau = numpy_inputs(base, experts)
    n = len(experts)
    core_names = sorted(x for x in names if b[x].ndim >= 2)
    m = np.concatenate([tau[x].reshape(n, -1) for x in core_names], axis=1)
    mean = m.mean(0)
    x_mat = m - mean if center else m
    _, s, vt = np.linalg.svd(x_mat, full_matrices=False)
    lam = s**2
    keep = [j for j in range(min(k, len(lam))) if lam[0] > 0 and lam[j] > 1e-12 * lam[0]]
    v = vt[keep].T
    projector = v @ v.T
    offsets = np.cumsum([0] + [b[x].size for x in core_names])
    span = {x: slice(offsets[i], offsets[i + 1]) for i, x in enumerate(core_names)}

    core, res = {}, {}
    projected = (projector @ m.T).T  # row i: Pi tau_i on S
    core_flat = projector @ mean
    for x in names:
        flat = tau[x].reshape(n, -1)
        if x in span:
            core[x] = core_flat[span[x]]
            if residual == "core":
                r = flat - core[x]
            else:
                r = flat - projected[:, span[x]]
        else:
            core[x] = flat.mean(0)
            r = flat - core[x]
        if is_matrix(x, b[x].shape):
            r = np.stack(
                [
                    best_rank(ri.reshape(b[x].shape), rank_for(b[x].shape, rank_ratio)).ravel()
                    for ri in r
                ]
            )
        res[x] = r

    def scales(norms):
        target = norms.mean()
        return np.array([target / v if v > 0 else 0.0 for v in norms])

    if norm_scope == "global":
        g = scales(np.sqrt(sum((res[x] ** 2).sum(1) for x in names)))
        scale = {x: g for x in names}
    else:
        scale = {x: scales(np.sqrt((res[x] ** 2).sum(1))) for x in names}
    tau_res = {x: (scale[x][:, None] * res[x]).mean(0) for x in names}
    core_norm = math.sqrt(sum((core[x] ** 2).sum() for x in names))
    res_norm = math.sqrt(sum((tau_res[x] ** 2).sum() for x in names))
    if residual_scale == "relative":
        eta = alpha * core_norm / res_norm if core_norm > 0 and res_norm > 0 else 0.0
    elif residual_scale == "literal":
        eta = alpha * core_norm
    else:
        eta = alpha
    return {x: b[x] + (core[x] + eta * tau_res[x]).reshape(b[x].shape) for x in names}


def numpy_tsv(base, experts, alpha=1.0):
    names, b, tau = numpy_inputs(base, experts)
    n = len(experts)
    out = {}
    for x in names:
        if not is_matrix(x, b[x].shape):
            out[x] = b[x] + tau[x].mean(0)
            continue
        rank = min(b[x].shape) // n
        svds = [np.linalg.svd(t, full_matrices=False) for t in tau[x]]
        u = np.concatenate([sv[0][:, :rank] for sv in svds], axis=1)
        s = np.concatenate([sv[1][:rank] for sv in svds])
        v = np.concatenate([sv[2][:rank].T for sv in svds], axis=1)

        def polar(a):
            w, q = np.linalg.eigh(a.T @ a)
            return a @ (q / np.sqrt(w)) @ q.T

        out[x] = b[x] + alpha * (polar(u) * s) @ polar(v).T
    return out


def numpy_cart(base, experts, rank_ratio=0.12, lam=2.0):
    names, b, tau = numpy_inputs(base, experts)
    out = {}
    for x in names:
        mean = tau[x].mean(0)
        out[x] = b[x] + mean
        if is_matrix(x, b[x].shape):
            rank = rank_for(b[x].shape, rank_ratio)
            out[x] = out[x] + lam * sum(best_rank(t - mean, rank) for t in tau[x])
    return out


def numpy_ties(base, experts, density=0.2, lam=1.0, scope="global"):
    names, b, tau = numpy_inputs(base, experts)
    n = len(experts)

    def threshold(values):
        keep = math.ceil(Fraction(str(density)) * values.shape[1])
        return np.sort(np.abs(values), axis=1)[:, -keep]

    if scope == "global":
        global_thr = threshold(np.concatenate([tau[x].reshape(n, -1) for x in names], axis=1))
    out = {}
    for x in names:
        flat = tau[x].reshape(n, -1)
        thr = global_thr if scope == "global" else threshold(flat)
        trimmed = np.where(np.abs(flat) >= thr[:, None], flat, 0.0)
        sign = np.where(trimmed.sum(0) >= 0, 1.0, -1.0)
        agree = np.sign(trimmed) == sign
        merged = (trimmed * agree).sum(0) / np.maximum(agree.sum(0), 1)
        out[x] = b[x] + lam * merged.reshape(b[x].shape)
    return out


@pytest.fixture(scope="module")
def models():
    base = random_model(0, torch.float64)
    return base, make_experts(base, 4, seed=2)


def assert_matches(merged, want, tol=1e-10):
    for name, value in want.items():
        got = merged[name].numpy()
        err = np.linalg.norm(got - value) / max(np.linalg.norm(value), 1e-300)
        assert err <= tol, f"{name}: relative error {err:.3g}"


R2M_VARIANTS = list(itertools.product([False, True], [1, 2, 4], ["core", "projection"]))


@pytest.mark.parametrize("center,k,residual", R2M_VARIANTS)
def test_r2m_core_variants(models, center, k, residual):
    base, experts = models
    options = dict(center=center, k=k, residual=residual)
    merged = r2m_ext.merge(base, experts, svd="exact", compute_dtype="float64", **options)
    assert_matches(merged, numpy_r2m(base, experts, **options))


@pytest.mark.parametrize(
    "norm_scope,residual_scale",
    list(itertools.product(["global", "tensor"], ["relative", "literal", "fixed"])),
)
@pytest.mark.parametrize("rank_ratio", [0.1, 0.3, 1.0])
def test_r2m_scale_variants(models, norm_scope, residual_scale, rank_ratio):
    base, experts = models
    options = dict(
        norm_scope=norm_scope, residual_scale=residual_scale, rank_ratio=rank_ratio, alpha=0.8
    )
    merged = r2m_ext.merge(base, experts, svd="exact", compute_dtype="float64", **options)
    assert_matches(merged, numpy_r2m(base, experts, **options))


def test_tsv(models):
    base, experts = models
    merged = r2m_ext.merge(base, experts, "tsv", svd="exact", alpha=0.7, compute_dtype="float64")
    assert_matches(merged, numpy_tsv(base, experts, alpha=0.7))


@pytest.mark.parametrize("rank_ratio", [0.12, 0.5, 1.0])
def test_cart(models, rank_ratio):
    base, experts = models
    merged = r2m_ext.merge(
        base, experts, "cart", svd="exact", rank_ratio=rank_ratio, compute_dtype="float64"
    )
    assert_matches(merged, numpy_cart(base, experts, rank_ratio=rank_ratio))


@pytest.mark.parametrize("scope", ["global", "tensor"])
@pytest.mark.parametrize("density", [0.2, 0.55, 1.0])
def test_ties(models, scope, density):
    base, experts = models
    merged = r2m_ext.merge(
        base, experts, "ties", density=density, ties_scope=scope, lam=0.9, compute_dtype="float64"
    )
    assert_matches(merged, numpy_ties(base, experts, density=density, lam=0.9, scope=scope))


@pytest.mark.parametrize("scope", ["global", "tensor"])
@pytest.mark.parametrize("density", [0.2, 0.55, 1.0])
def test_ties_on_the_native_float32_kernels(models, scope, density):
    # Thresholds by magnitude_histogram, the merge by ties_merge: float32 rounding of the same
    # selection as the float64 oracle.
    base, experts = models
    merged = r2m_ext.merge(base, experts, "ties", density=density, ties_scope=scope, lam=0.9)
    assert_matches(
        merged, numpy_ties(base, experts, density=density, lam=0.9, scope=scope), tol=1e-6
    )


def mirrored_experts(dtype, seed):
    """theta_0 + a + d and theta_0 + a - d on one 64 x 32 matrix: the core is ~ a and the residuals
    ~ +d and -d, which cancel in tau_res down to 2e-5-2e-4 of their norms (float64)."""
    g = torch.Generator().manual_seed(seed)
    base, a, d = (torch.randn(64, 32, generator=g, dtype=torch.float64) for _ in range(3))
    experts = [{"blocks.0.fc.weight": (base + a + sign * 0.1 * d).to(dtype)} for sign in (1, -1)]
    return {"blocks.0.fc.weight": base.to(dtype)}, experts


@pytest.mark.parametrize("seed", range(5))
def test_r2m_cancelling_residuals(seed):
    # Float32 Grams know |tau_res|^2 = w^T G w only to about eps (sum_i |w_i| |r_i|)^2; here the
    # form fell within that, at either sign (a negative one crashed the merge with a complex
    # norm, a positive one set eta ~ 1e5 on rounding noise). It counts as zero: eta = 0 (spec §3)
    # and the merge is theta_0 + tau_core. Float64 compute resolves it and matches the reference.
    base, experts = mirrored_experts(torch.float64, seed)
    report = {}
    merged = r2m_ext.merge(base, experts, svd="exact", compute_dtype="float64", report=report)
    assert not report["residual_cancelled"] and report["eta"] > 1e4
    # eta ~ 1e5 scales float64 rounding up with it: 1.1e-7 seen.
    assert_matches(merged, numpy_r2m(base, experts), tol=1e-6)
    base, experts = mirrored_experts(torch.float32, seed)
    for svd in ("exact", "randomized"):
        report = {}
        merged = r2m_ext.merge(base, experts, svd=svd, report=report)
        assert report["residual_cancelled"] and report["residual_norm"] == 0 and report["eta"] == 0
        assert "residuals cancel below the rounding" in format_report(report)
        assert_matches(merged, numpy_r2m(base, experts, alpha=0.0), tol=1e-6)


def test_r2m_small_resolved_residual_keeps_eta():
    # Experts whose scaled residuals cancel to ~1e-3 of their norms, above the float32 Grams'
    # rounding (13 eps of it): float32 keeps eta, within 1% of the float64 reference's.
    base = random_model(0, torch.float64)
    shared, mirrored = make_experts(base, 1, seed=3)[0], make_experts(base, 1, seed=4)[0]
    experts = [
        {
            name: value + (shared[name] - value) + sign * 0.1 * (mirrored[name] - value)
            if value.is_floating_point()
            else value
            for name, value in base.items()
        }
        for sign in (1, -1)
    ]
    report64, report32 = {}, {}
    merged64 = r2m_ext.merge(base, experts, svd="exact", compute_dtype="float64", report=report64)
    # The float64 eta is itself checked against the NumPy reference first.
    assert_matches(merged64, numpy_r2m(base, experts), tol=1e-8)
    single = [{n: v.float() if v.is_floating_point() else v for n, v in e.items()} for e in experts]
    base32 = {n: v.float() if v.is_floating_point() else v for n, v in base.items()}
    r2m_ext.merge(base32, single, svd="exact", report=report32)
    assert not report32["residual_cancelled"] and report64["eta"] > 1e3
    assert report32["eta"] == pytest.approx(report64["eta"], rel=1e-2)
