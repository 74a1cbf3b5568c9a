"""Properties every merge must have, on a small ViT-like model (tests/conftest.py)."""

import pytest
import torch
from conftest import make_experts, random_model, relative_error

import r2m_ext

DETERMINISTIC = [
    ("r2m", {"svd": "exact"}),
    ("r2m", {"svd": "randomized"}),
    ("r2m", {"center": True, "residual": "projection", "norm_scope": "tensor"}),
    ("average", {}),
    ("task_arithmetic", {}),
    ("ties", {}),
    ("ties", {"ties_scope": "tensor"}),
    ("tsv", {"svd": "exact"}),
    ("cart", {"svd": "randomized"}),
]


@pytest.mark.parametrize("method,options", DETERMINISTIC)
def test_permuting_experts_changes_nothing(toy, method, options):
    base, experts = toy
    merged = r2m_ext.merge(base, experts, method, **options)
    permuted = r2m_ext.merge(base, [experts[2], experts[0], experts[1]], method, **options)
    for name in merged:
        assert relative_error(permuted[name], merged[name]) < 1e-5, name


def test_dare_mask_depends_on_task_position_only_through_seed(toy):
    # DARE's masks are keyed by task index, so permuting experts changes the draw; the same
    # order and seed must reproduce bit for bit.
    base, experts = toy
    first = r2m_ext.merge(base, experts, "dare", seed=5)
    second = r2m_ext.merge(base, experts, "dare", seed=5)
    assert all(torch.equal(first[n], second[n]) for n in first)


@pytest.mark.parametrize("method", ["r2m", "average", "cart"])
def test_identical_experts_give_base_plus_their_task_vector(method):
    # Identical experts: the core is tau itself (uncentered), residuals vanish, so R²M, average
    # and CART all return the expert.
    base = random_model(0)
    expert = make_experts(base, 1)[0]
    merged = r2m_ext.merge(base, [expert] * 4, method)
    for name in base:
        if name.startswith("head") or not base[name].is_floating_point():
            continue
        assert relative_error(merged[name], expert[name]) < 1e-5, name


def test_k_equal_to_n_makes_the_core_the_mean(toy):
    # Pi projects onto the span of all task vectors, which holds tau_bar: tau_core = tau_bar on S.
    base, experts = toy
    merged = r2m_ext.merge(base, experts, k=3, alpha=0.0, compute_dtype="float64")
    average = r2m_ext.merge(base, experts, "average", compute_dtype="float64")
    for name in merged:
        assert relative_error(merged[name], average[name]) < 1e-7, name


def test_alpha_zero_gives_base_plus_core(toy):
    # With alpha = 0, theta* = theta_0 + tau_core. tau_core on S is the projection of tau_bar on
    # the top right singular vector of M (computed here by torch.linalg.svd of M).
    base, experts = toy
    report = {}
    merged = r2m_ext.merge(base, experts, alpha=0.0, compute_dtype="float64", report=report)
    names = sorted(n for n, v in base.items() if v.dim() >= 2 and not n.startswith("head"))
    m = torch.stack(
        [torch.cat([(e[n] - base[n]).double().ravel() for n in names]) for e in experts]
    )
    top = torch.linalg.svd(m, full_matrices=False).Vh[0]
    core = top * (top @ m.mean(0))
    offset = 0
    for name in names:
        size = base[name].numel()
        want = base[name].double() + core[offset : offset + size].reshape(base[name].shape)
        assert relative_error(merged[name], want) < 1e-5, name
        offset += size
    bias = "blocks.0.attn.qkv.bias"
    want_bias = base[bias] + torch.stack([e[bias] - base[bias] for e in experts]).mean(0)
    assert relative_error(merged[bias], want_bias) < 1e-6


@pytest.mark.parametrize("svd", ["exact", "randomized"])
def test_full_rank_truncation_is_the_identity(toy, svd):
    # rank_ratio = 1 keeps every singular triplet, so no tensor is changed by truncation: the
    # result equals R²M on a model whose matrices are all excluded from truncation.
    base, experts = toy
    full = r2m_ext.merge(base, experts, rank_ratio=1.0, svd=svd, compute_dtype="float64")
    untruncated = r2m_ext.merge(base, experts, exclude_truncation=["*"], compute_dtype="float64")
    for name in full:
        assert relative_error(full[name], untruncated[name]) < 1e-12, name


def test_truncation_changes_matrices(toy):
    # ... and rank_ratio < 1 does change them (so the test above cannot pass vacuously).
    base, experts = toy
    truncated = r2m_ext.merge(base, experts, rank_ratio=0.1, svd="exact")
    untruncated = r2m_ext.merge(base, experts, exclude_truncation=["*"])
    assert (
        relative_error(
            truncated["blocks.0.attn.qkv.weight"], untruncated["blocks.0.attn.qkv.weight"]
        )
        > 1e-4
    )


@pytest.mark.parametrize("method", ["r2m", "average", "ties", "tsv", "cart", "dare"])
def test_heads_averaged_and_buffers_copied(toy, method):
    base, experts = toy
    base = dict(base, **{"head.weight": torch.zeros(7, 16)})  # base head ignored, even reshaped
    merged = r2m_ext.merge(base, experts, method)
    for name in ("head.weight", "head.bias"):
        torch.testing.assert_close(merged[name], torch.stack([e[name] for e in experts]).mean(0))
    assert merged["num_batches_tracked"].dtype == torch.int64
    assert torch.equal(merged["num_batches_tracked"], base["num_batches_tracked"])
    assert list(merged) == list(base)


def test_head_missing_from_base_and_from_all_experts():
    base = random_model(0)
    experts = make_experts(base, 2)
    base_without_head = {k: v for k, v in base.items() if not k.startswith("head")}
    merged = r2m_ext.merge(base_without_head, experts, "average")
    assert list(merged)[-2:] == ["head.weight", "head.bias"]
    # A head only the base has counts as 0 (spec §4).
    experts_without_bias = [{k: v for k, v in e.items() if k != "head.bias"} for e in experts]
    merged = r2m_ext.merge(base, experts_without_bias, "average")
    assert torch.equal(merged["head.bias"], torch.zeros(2))


@pytest.mark.parametrize("method", ["r2m", "ties", "tsv", "cart", "dare"])
def test_float32_and_float64_compute_agree(method):
    base = random_model(0, torch.float64)
    experts = make_experts(base, 3)
    svd = "exact" if method in ("r2m", "tsv", "cart") else None
    single = r2m_ext.merge(base, experts, method, svd=svd)
    double = r2m_ext.merge(base, experts, method, compute_dtype="float64", svd=svd)
    for name in double:
        if double[name].is_floating_point():
            assert relative_error(single[name], double[name]) < 1e-5, name


def test_output_dtype_follows_base_unless_out_dtype():
    base = random_model(0, torch.bfloat16)
    experts = make_experts(base, 2)
    merged = r2m_ext.merge(base, experts)
    assert all(merged[n].dtype == base[n].dtype for n in base)
    merged = r2m_ext.merge(base, experts, out_dtype="float32")
    assert merged["blocks.0.mlp.fc1.weight"].dtype == torch.float32
    assert merged["num_batches_tracked"].dtype == torch.int64


def test_randomized_truncation_close_to_exact():
    # Issue 4's criterion on merged tensors: randomized vs exact within 1e-2 relative Frobenius
    # on task vectors with a clear spectral decay.
    base = random_model(0)
    experts = make_experts(base, 4)
    exact = r2m_ext.merge(base, experts, svd="exact", rank_ratio=0.25)
    randomized = r2m_ext.merge(base, experts, svd="randomized", rank_ratio=0.25)
    for name in exact:
        if exact[name].is_floating_point():
            assert relative_error(randomized[name], exact[name]) < 1e-2, name


def test_repeated_runs_are_bitwise_identical(toy):
    base, experts = toy
    first = r2m_ext.merge(base, experts)
    second = r2m_ext.merge(base, experts)
    assert all(torch.equal(first[n], second[n]) for n in first)


def test_nonfinite_inputs_refused_unless_allowed(toy):
    base, experts = toy
    broken = dict(experts[1])
    broken["blocks.0.norm1.weight"] = broken["blocks.0.norm1.weight"].clone()
    broken["blocks.0.norm1.weight"][3] = float("nan")
    with pytest.raises(r2m_ext.R2MError, match=r"'blocks.0.norm1.weight' in expert 1 contains NaN"):
        r2m_ext.merge(base, [experts[0], broken], "average")
    merged = r2m_ext.merge(base, [experts[0], broken], "average", allow_nonfinite=True)
    assert torch.isnan(merged["blocks.0.norm1.weight"][3])


@pytest.mark.parametrize(
    "method, options",
    [
        ("average", {}),
        ("task_arithmetic", {}),
        ("task_arithmetic", {"lam": 0.0}),  # zero weights: the inputs are checked one by one
        ("r2m", {}),
        ("r2m", {"residual_scale": "fixed", "alpha": 0.0}),
        ("ties", {}),
        # Under DARE's mask the NaN may be dropped: the inputs held are checked themselves.
        ("dare", {"dare_combine": "ties", "drop_rate": 0.9}),
    ],
)
@pytest.mark.parametrize("source", [0, 1, 2])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("name", ["blocks.0.norm1.weight", "blocks.0.mlp.fc1.weight"])
def test_every_nonfinite_input_is_found_and_named(toy, method, options, source, bad, name):
    # The check of fused passes runs on what they computed (NaN and Inf propagate through it):
    # whichever input, value, tensor class and weight, the error names the input.
    base, experts = toy
    inputs = [dict(base), *(dict(e) for e in experts[:2])]
    inputs[source][name] = inputs[source][name].clone()
    inputs[source][name].view(-1)[5] = bad
    label = "base" if source == 0 else f"expert {source - 1}"
    with pytest.raises(r2m_ext.R2MError, match=rf"'{name}' in {label} contains NaN or Inf"):
        r2m_ext.merge(inputs[0], inputs[1:], method, **options)


@pytest.mark.parametrize(
    "change,message",
    [
        (
            lambda e: e.pop("blocks.0.norm1.weight"),
            r"'blocks.0.norm1.weight' in base base missing from expert expert 1",
        ),
        (lambda e: e.update(extra=torch.zeros(2)), r"'extra' in expert expert 1 is not in base"),
        (
            lambda e: e.update({"pos_embed": torch.zeros(6, 16)}),
            r"'pos_embed' has shape \[6, 16\] in expert expert 1 but \[5, 16\]",
        ),
        (
            lambda e: e.update({"pos_embed": torch.zeros(5, 16, dtype=torch.float64)}),
            r"'pos_embed' has dtype torch.float64",
        ),
        (
            lambda e: e.pop("head.bias"),
            r"head tensor 'head.bias' is in expert expert 0 but missing from expert expert 1",
        ),
    ],
)
def test_mismatches_are_errors_naming_the_tensor(toy, change, message):
    base, experts = toy
    broken = dict(experts[1])
    change(broken)
    with pytest.raises(r2m_ext.R2MError, match=message):
        r2m_ext.merge(base, [experts[0], broken, experts[2]])


def test_option_errors():
    base = random_model(0)
    with pytest.raises(r2m_ext.R2MError, match="do not apply to method 'average'"):
        r2m_ext.merge(base, [base], "average", alpha=0.5)
    with pytest.raises(r2m_ext.R2MError, match=r"rank_ratio: 1.5 must be in \(0, 1\]"):
        r2m_ext.merge(base, [base], rank_ratio=1.5)
    with pytest.raises(r2m_ext.R2MError, match="unknown option"):
        r2m_ext.merge(base, [base], rank=3)
    with pytest.raises(r2m_ext.R2MError, match="at least one expert"):
        r2m_ext.merge(base, [])
