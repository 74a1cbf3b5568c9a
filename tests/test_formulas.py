"""Each formula of ../shared/r2m-spec.md on a case small enough to work out by hand. The expected
numbers are derived in the comments, never by calling the code under test."""

import math
from unittest import mock

import pytest
import torch

import r2m_ext

F64 = torch.float64


def t(values):
    return torch.tensor(values, dtype=F64)


def r2m_hand_case():
    """N = 2. 'w' (2x2, a matrix, in S) and 'b' (1-D, off S) with base 0; a head; a buffer.

    w: tau_1 = [[2, 0], [0, 0]], tau_2 = [[0, 1], [0, 0]]   b: tau_1 = [2, 0], tau_2 = [0, 2]
    """
    base = {
        "w": torch.zeros(2, 2, dtype=F64),
        "b": torch.zeros(2, dtype=F64),
        "head.weight": t([[100.0, 100.0]]),
        "steps": torch.tensor([7]),
    }
    e1 = {
        "w": t([[2, 0], [0, 0]]),
        "b": t([2, 0]),
        "head.weight": t([[1, 2]]),
        "steps": torch.tensor([7]),
    }
    e2 = {
        "w": t([[0, 1], [0, 0]]),
        "b": t([0, 2]),
        "head.weight": t([[3, 6]]),
        "steps": torch.tensor([7]),
    }
    return base, [e1, e2]


def test_r2m_uncentered_core_and_norm_matching_by_hand():
    # G_M = diag(4, 1): top eigenvector e_1, lambda = 4. X tau_bar = G_M (1/2, 1/2) = (2, 1/2),
    # w = e_1 e_1^T (2, 1/2) / 4 = (1/2, 0): tau_core(w) = tau_1 / 2 = [[1, 0], [0, 0]].
    # Off S the core is the mean: tau_core(b) = [1, 1].
    # Residuals: r_1(w) = [[1, 0], [0, 0]], r_2(w) = [[-1, 1], [0, 0]] (both rank 1: rho = 1
    # keeps them); r_1(b) = [1, -1], r_2(b) = [-1, 1].
    # Global norms: n_1^2 = 1 + 2 = 3, n_2^2 = 2 + 2 = 4; m = (sqrt3 + 2) / 2;
    # s_1 = m / sqrt3, s_2 = m / 2; tau_res = (s_1 r_1 + s_2 r_2) / 2.
    base, experts = r2m_hand_case()
    s1 = (math.sqrt(3) + 2) / 2 / math.sqrt(3)
    s2 = (math.sqrt(3) + 2) / 2 / 2
    res_w = t([[s1 - s2, s2], [0, 0]]) / 2
    res_b = (s1 - s2) / 2 * t([1, -1])
    report = {}
    merged = r2m_ext.merge(
        base,
        experts,
        "r2m",
        svd="exact",
        residual_scale="fixed",
        alpha=1.0,
        compute_dtype="float64",
        report=report,
    )
    torch.testing.assert_close(merged["w"], t([[1, 0], [0, 0]]) + res_w, rtol=0, atol=1e-12)
    torch.testing.assert_close(merged["b"], t([1, 1]) + res_b, rtol=0, atol=1e-12)
    torch.testing.assert_close(t(report["core_coefficients"]), t([0.5, 0.0]), rtol=0, atol=1e-12)
    torch.testing.assert_close(t(report["gram"]), t([[4, 0], [0, 1]]), rtol=0, atol=0)
    torch.testing.assert_close(
        t(report["residual_norms"]), t([math.sqrt(3), 2]), rtol=0, atol=1e-12
    )
    # Head: mean of the experts' heads, the base's ignored; the integer buffer is copied.
    torch.testing.assert_close(merged["head.weight"], t([[2, 4]]), rtol=0, atol=0)
    assert torch.equal(merged["steps"], torch.tensor([7]))

    # residual_scale="relative" (default): eta = alpha |tau_core| / |tau_res|, |tau_core|^2 = 1 + 2.
    res_norm = math.sqrt(float(res_w.square().sum() + res_b.square().sum()))
    eta = 0.6 * math.sqrt(3) / res_norm
    merged = r2m_ext.merge(base, experts, svd="exact", compute_dtype="float64", report=report)
    torch.testing.assert_close(merged["w"], t([[1, 0], [0, 0]]) + eta * res_w, rtol=0, atol=1e-12)
    assert report["eta"] == pytest.approx(eta, rel=1e-12)
    # residual_scale="literal": eta = alpha |tau_core|.
    merged = r2m_ext.merge(
        base, experts, svd="exact", compute_dtype="float64", residual_scale="literal", alpha=0.5
    )
    torch.testing.assert_close(
        merged["b"], t([1, 1]) + 0.5 * math.sqrt(3) * res_b, rtol=0, atol=1e-12
    )


def test_r2m_centered_core_by_hand():
    # Centered rows of w: tau_1 - tau_bar = (1, -1/2, 0, 0), tau_2 - tau_bar = (-1, 1/2, 0, 0).
    # Their top direction is v = (1, -1/2) / sqrt(5/4); Pi tau_bar = v (v . (1, 1/2)) =
    # (1, -1/2) * (3/4) / (5/4) = (0.6, -0.3), i.e. coefficients (0.3, -0.3) on tau_1, tau_2.
    # alpha = 0 leaves theta_0 + tau_core.
    base, experts = r2m_hand_case()
    report = {}
    merged = r2m_ext.merge(
        base, experts, center=True, alpha=0.0, compute_dtype="float64", report=report
    )
    torch.testing.assert_close(merged["w"], t([[0.6, -0.3], [0, 0]]), rtol=0, atol=1e-12)
    torch.testing.assert_close(merged["b"], t([1, 1]), rtol=0, atol=1e-12)
    torch.testing.assert_close(t(report["core_coefficients"]), t([0.3, -0.3]), rtol=0, atol=1e-12)


def test_r2m_projection_residual_with_tensor_norm_scope_by_hand():
    # Pi projects onto tau_1's direction: Pi tau_1 = tau_1, Pi tau_2 = 0 (orthogonal), so
    # r_1(w) = 0, r_2(w) = tau_2 = [[0, 1], [0, 0]]; off S r(b) = tau - tau_bar = +-[1, -1].
    # Per-tensor norms: w: n = (0, 1), m = 1/2, s = (0, 1/2) -> tau_res(w) = [[0, 1/4], [0, 0]];
    # b: n = (sqrt2, sqrt2), s = (1, 1) -> tau_res(b) = 0.
    base, experts = r2m_hand_case()
    merged = r2m_ext.merge(
        base,
        experts,
        residual="projection",
        norm_scope="tensor",
        residual_scale="fixed",
        alpha=1.0,
        svd="exact",
        compute_dtype="float64",
    )
    torch.testing.assert_close(merged["w"], t([[1, 0.25], [0, 0]]), rtol=0, atol=1e-12)
    torch.testing.assert_close(merged["b"], t([1, 1]), rtol=0, atol=1e-12)


def test_r2m_degenerate_cases():
    base, experts = r2m_hand_case()
    # N = 1 with centering: G = 0, no eigenvalue kept, tau_core = 0 on S (b: the mean, tau_1).
    report = {}
    merged = r2m_ext.merge(base, experts[:1], center=True, compute_dtype="float64", report=report)
    assert report["core_coefficients"] == [0.0]
    # residual r = tau_1 (rank 1, kept); norms match trivially; eta = 0.6 |core| / |res| with
    # |core| = |b| = 2 and |res| = |(w: tau_1, b: 0)| = 2 -> eta = 0.6.
    torch.testing.assert_close(merged["w"], 0.6 * t([[2, 0], [0, 0]]), rtol=0, atol=1e-12)
    torch.testing.assert_close(merged["b"], t([2, 0]), rtol=0, atol=1e-12)
    # All task vectors zero: G = 0, eta = 0, output = base.
    merged = r2m_ext.merge(base, [base, base], compute_dtype="float64")
    torch.testing.assert_close(merged["w"], base["w"], rtol=0, atol=0)


def test_average_and_task_arithmetic_by_hand():
    base = {"x": t([1, 1, 1])}
    experts = [{"x": t([2, 1, 4])}, {"x": t([1, 3, 1])}]  # tau = (1, 0, 3) and (0, 2, 0)
    torch.testing.assert_close(r2m_ext.merge(base, experts, "average")["x"], t([1.5, 2, 2.5]))
    torch.testing.assert_close(
        r2m_ext.merge(base, experts, "task_arithmetic", compute_dtype="float64")["x"],
        t([1.3, 1.6, 1.9]),
        rtol=0,
        atol=1e-12,
    )
    torch.testing.assert_close(
        r2m_ext.merge(base, experts, "task_arithmetic", lam=1.0, compute_dtype="float64")["x"],
        t([2, 3, 4]),
        rtol=0,
        atol=1e-12,
    )


TIES_BASE = {"a": torch.zeros(4, dtype=F64), "b": torch.zeros(2, dtype=F64)}
TIES_EXPERTS = [
    {"a": t([3, -1, 0.5, 2]), "b": t([10, 0.1])},
    {"a": t([-2, 4, -1, -1]), "b": t([0.1, 0.1])},
    {"a": t([1, -3, 2, -2]), "b": t([0.1, 0.1])},
]


# float64 compute runs the pure-torch TIES, float32 the native kernels (ops.ties_merge).
TIES_COMPUTE = pytest.mark.parametrize("compute,tol", [("float64", 1e-12), ("float32", 1e-6)])


@TIES_COMPUTE
def test_ties_tensor_scope_by_hand(compute, tol):
    # density 0.5, per tensor. a: keep ceil(0.5 * 4) = 2 largest |tau| per task (ties kept):
    #   [3, 0, 0, 2], [-2, 4, 0, 0], [0, -3, 2, -2] (|1|, |3|, |2|, |2|: threshold 2, a tie).
    #   sum [1, 1, 2, 0] -> elected signs +, +, +, + (0 -> +); agreeing means [3, 4, 2, 2].
    # b: keep 1: [10, 0], [0.1, 0.1], [0.1, 0.1] (ties); signs +, +; means [10.2 / 3, 0.1].
    merged = r2m_ext.merge(
        TIES_BASE, TIES_EXPERTS, "ties", density=0.5, ties_scope="tensor", compute_dtype=compute
    )
    torch.testing.assert_close(merged["a"], t([3, 4, 2, 2]), rtol=0, atol=tol)
    torch.testing.assert_close(merged["b"], t([10.2 / 3, 0.1]), rtol=0, atol=tol)


@TIES_COMPUTE
def test_ties_global_scope_by_hand(compute, tol):
    # All 6 entries per task: keep ceil(0.5 * 6) = 3.
    #   task 1: |.| 3, 1, .5, 2, 10, .1 -> threshold 2: a [3, 0, 0, 2], b [10, 0]
    #   task 2: 2, 4, 1, 1, .1, .1 -> threshold 1: a [-2, 4, -1, -1], b [0, 0]
    #   task 3: 1, 3, 2, 2, .1, .1 -> threshold 2: a [0, -3, 2, -2], b [0, 0]
    # a: sum [1, 1, 1, -1] -> +, +, +, -: means [3, 4, 2, -1.5]; b: [10, 0]. lam = 2.
    merged = r2m_ext.merge(
        TIES_BASE, TIES_EXPERTS, "ties", density=0.5, lam=2.0, compute_dtype=compute
    )
    torch.testing.assert_close(merged["a"], 2 * t([3, 4, 2, -1.5]), rtol=0, atol=tol)
    torch.testing.assert_close(merged["b"], 2 * t([10, 0]), rtol=0, atol=tol)


def test_cart_by_hand():
    # tau = diag(6, 0, 0), diag(0, 9, 0), 0; mean diag(2, 3, 0). Centered: diag(4, -3, 0),
    # diag(-2, 6, 0), diag(-2, -3, 0); rank 1 (floor(0.34 * 3)) keeps diag(4, 0, 0),
    # diag(0, 6, 0), diag(0, -3, 0): sum diag(4, 3, 0). theta = diag(2, 3, 0) + 2 * diag(4, 3, 0).
    base = {"w": torch.zeros(3, 3, dtype=F64)}
    experts = [{"w": torch.diag(t(d))} for d in ([6, 0, 0], [0, 9, 0], [0, 0, 0])]
    for svd in ("exact", "randomized"):
        merged = r2m_ext.merge(
            base, experts, "cart", rank_ratio=0.34, svd=svd, compute_dtype="float64"
        )
        torch.testing.assert_close(merged["w"], torch.diag(t([10, 9, 0])), rtol=0, atol=1e-10)


def test_tsv_by_hand():
    # N = 2, 2x2: keep floor(2 / 2) = 1 triplet each. tau_1 = diag(3, 1) -> 3 e1 e1^T;
    # tau_2 = diag(0, 2) -> 2 e2 e2^T. U = [e1, e2] and V = [e1, e2] are already orthogonal, so the
    # polar factors change nothing: update = diag(3, 2), times alpha = 0.5. The 1-D tensor: mean.
    base = {"w": torch.zeros(2, 2, dtype=F64), "b": t([1, 1])}
    experts = [
        {"w": torch.diag(t([3, 1])), "b": t([3, 1])},
        {"w": torch.diag(t([0, 2])), "b": t([1, 5])},
    ]
    merged = r2m_ext.merge(base, experts, "tsv", alpha=0.5, svd="exact", compute_dtype="float64")
    torch.testing.assert_close(merged["w"], torch.diag(t([1.5, 1.0])), rtol=0, atol=1e-12)
    torch.testing.assert_close(merged["b"], t([2, 3]), rtol=0, atol=0)


def test_polar_factor_by_hand_and_by_either_route():
    from r2m_ext.methods import tsv

    # [[3, 0], [0, 4], [0, 0], [0, 0]] = P diag(3, 4) with P its first two unit columns: the
    # polar factor is P. Tall (4 >= 2 * 2) and cond(G) = 16 / 9: the Gram route serves it.
    tall = torch.zeros(4, 2, dtype=F64)
    tall[0, 0], tall[1, 1] = 3.0, 4.0
    torch.testing.assert_close(tsv.polar_factor(tall), t([[1, 0], [0, 1], [0, 0], [0, 0]]))
    # Against the SVD's P Q^T in float64, float32 results within 1e-5: well-conditioned tall
    # columns (the Gram route), tall columns with cond(G) = 1e4 (past the limit: the SVD), and a
    # square matrix (always the SVD).
    g = torch.Generator().manual_seed(0)
    cases = {
        "tall": torch.randn(600, 100, generator=g, dtype=F64),
        "tall, ill-conditioned": torch.randn(600, 100, generator=g, dtype=F64)
        @ torch.diag(torch.logspace(0, -2, 100, dtype=F64)),
        "square": torch.randn(100, 100, generator=g, dtype=F64),
    }
    svd = torch.linalg.svd
    for (name, matrix), svds in zip(cases.items(), (0, 1, 1), strict=True):
        p, _, qh = svd(matrix, full_matrices=False)
        with mock.patch.object(torch.linalg, "svd", wraps=svd) as counted:
            got = tsv.polar_factor(matrix.float()).double()
        assert counted.call_count == svds, name  # which route served it
        assert float((got - p @ qh).norm() / (p @ qh).norm()) < 1e-5, name
        eye = torch.eye(matrix.shape[1], dtype=F64)
        assert float((got.T @ got - eye).abs().max()) < 1e-5, name


def test_dare_by_hand():
    base = {"x": torch.zeros(20000, dtype=F64)}
    experts = [{"x": torch.full((20000,), 2.0, dtype=F64)}]
    # drop_rate 0 keeps everything: task arithmetic.
    merged = r2m_ext.merge(base, experts, "dare", drop_rate=0.0, lam=1.0)
    torch.testing.assert_close(merged["x"], experts[0]["x"], rtol=0, atol=0)
    # drop_rate 0.75: each entry is 0 (dropped) or 2 / 0.25 = 8 (kept, rescaled), about 25% kept
    # (binomial sd 0.3%, so +-2% is > 6 sd).
    x = r2m_ext.merge(base, experts, "dare", drop_rate=0.75, lam=1.0, seed=3)["x"]
    assert set(x.unique().tolist()) == {0.0, 8.0}
    assert abs(float((x == 8).double().mean()) - 0.25) < 0.02
    again = r2m_ext.merge(base, experts, "dare", drop_rate=0.75, lam=1.0, seed=3)["x"]
    other = r2m_ext.merge(base, experts, "dare", drop_rate=0.75, lam=1.0, seed=4)["x"]
    assert torch.equal(x, again) and not torch.equal(x, other)


@pytest.mark.parametrize(
    "combine,extra",
    [("task_arithmetic", {}), ("ties", {"density": 0.4}), ("ties", {"ties_scope": "tensor"})],
)
def test_dare_on_the_native_float32_kernels_is_the_float64_merge_rounded(combine, extra):
    # float32 DARE runs ops.dare_merge (DARE-TIES: magnitude_histogram and ties_merge under the
    # mask), float64 the pure-torch masks and sums: the same masks, the same selection.
    g = torch.Generator().manual_seed(7)
    base = {"w": torch.randn(300, 40, generator=g, dtype=F64), "b": torch.randn(40, dtype=F64)}
    experts = [{k: v + torch.randn(v.shape, generator=g, dtype=F64) for k, v in base.items()}]
    experts.append({k: v - 0.5 for k, v in experts[0].items()})
    options = {"drop_rate": 0.8, "lam": 0.5, "seed": 9, "dare_combine": combine, **extra}
    fused = r2m_ext.merge(base, experts, "dare", **options)
    exact = r2m_ext.merge(base, experts, "dare", compute_dtype="float64", **options)
    for name in base:
        torch.testing.assert_close(fused[name], exact[name], rtol=1e-6, atol=1e-6)


def test_dare_ties_combines_sparsified_vectors():
    # drop_rate 0 makes DARE-TIES exactly TIES (same defaults: density 0.2, lam 1.0).
    merged = r2m_ext.merge(
        TIES_BASE, TIES_EXPERTS, "dare", drop_rate=0.0, dare_combine="ties", density=0.5
    )
    want = r2m_ext.merge(TIES_BASE, TIES_EXPERTS, "ties", density=0.5)
    for name in want:
        torch.testing.assert_close(merged[name], want[name], rtol=0, atol=0)


def test_rank_ratio_floor_reads_the_decimal():
    # floor(0.29 * 100) = 29 even though 0.29 * 100 == 28.999999999999996 in float.
    from r2m_ext.methods.common import kept_rank

    assert kept_rank((100, 300), 0.29) == 29
    assert kept_rank((768, 3072), 0.1) == 76
    assert kept_rank((3, 50), 0.1) == 1  # max(1, 0)
