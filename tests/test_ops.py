"""Native ops against the float64 reference, with torch.library.opcheck."""

import itertools
import os
import subprocess
import sys

import pytest
import torch

from r2m_ext import ops, reference
from r2m_ext._backend import native_module
from r2m_ext.determinism import DareMask, name_key

NATIVE = native_module() is not None
NAME_KEY_PIN = 2046361011703837434
needs_native = pytest.mark.skipif(not NATIVE, reason="r2m_ext._C is not built")


def test_native_extension_present_when_required():
    # `make test` sets R2M_REQUIRE_NATIVE=1: there a missing build is a failure, not a skip.
    if os.environ.get("R2M_REQUIRE_NATIVE") == "1":
        assert NATIVE, "r2m_ext._C failed to import although the build was required"


def test_delta_gram_by_hand():
    # task vectors (1, 0, 0) and (0, 2, 3): G = [[1, 0], [0, 13]].
    base = torch.tensor([1.0, 2.0, 3.0])
    experts = [torch.tensor([2.0, 2.0, 3.0]), torch.tensor([1.0, 4.0, 6.0])]
    want = torch.tensor([[1.0, 0.0], [0.0, 13.0]], dtype=torch.float64)
    assert torch.equal(ops.delta_gram(base, experts), want)
    assert torch.equal(reference.delta_gram(base, experts), want)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(0,), (1,), (7, 5), (3, 40000), (2, 3, 4, 5)])
def test_delta_gram_native_matches_float64_reference(dtype, shape):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(shape, generator=g).to(dtype)
    experts = [
        (base.double() + 0.1 * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype)
        for _ in range(4)
    ]
    got = torch.ops.r2m_ext.delta_gram.default(base, experts)
    # The reference widens the same low-precision values to float64, so only summation order
    # differs: both accumulate in float64.
    want = reference.delta_gram(base, experts)
    assert got.dtype == torch.float64 and got.shape == (4, 4)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@needs_native
def test_delta_gram_of_many_experts_matches_the_reference_pair_by_pair():
    # The CPU kernel sums up to 8 pairs of one row side by side; 11 experts take rows of 1 to 11
    # pairs, so groups of 8 and their remainders. Each pair's sum keeps its own order: the Gram
    # of the first 4 experts is, bit for bit, their corner of the Gram of all 11.
    g = torch.Generator().manual_seed(3)
    base = torch.randn(5, 40_001, generator=g)
    experts = [base + torch.randn(5, 40_001, generator=g) for _ in range(11)]
    got = torch.ops.r2m_ext.delta_gram.default(base, experts)
    torch.testing.assert_close(got, reference.delta_gram(base, experts), rtol=1e-12, atol=1e-9)
    assert torch.equal(got, got.T)
    assert torch.equal(got[:4, :4], torch.ops.r2m_ext.delta_gram.default(base, experts[:4]))


@needs_native
def test_delta_gram_bitwise_deterministic_across_thread_counts():
    g = torch.Generator().manual_seed(1)
    base = torch.randn(300_000, generator=g)
    experts = [base + torch.randn(300_000, generator=g) for _ in range(3)]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = torch.ops.r2m_ext.delta_gram.default(base, experts)
        torch.set_num_threads(max(2, threads))
        multi = torch.ops.r2m_ext.delta_gram.default(base, experts)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(single, multi)


@needs_native
def test_delta_gram_opcheck():
    g = torch.Generator().manual_seed(2)
    base = torch.randn(6, 5, generator=g)
    experts = [torch.randn(6, 5, generator=g) for _ in range(3)]
    torch.library.opcheck(torch.ops.r2m_ext.delta_gram.default, (base, experts))


@needs_native
@pytest.mark.parametrize(
    "experts,message",
    [
        ([], "needs at least one expert"),
        ([torch.zeros(3, 4)], r"expert 0 has shape \[3, 4\] but base has shape \[4, 3\]"),
        (
            [torch.zeros(4, 3, dtype=torch.float64)],
            "expert 0 has dtype Double but base has dtype Float",
        ),
    ],
)
def test_delta_gram_errors_name_the_argument(experts, message):
    with pytest.raises(RuntimeError, match=message):
        torch.ops.r2m_ext.delta_gram.default(torch.zeros(4, 3), experts)


@needs_native
def test_delta_gram_rejects_integer_inputs():
    with pytest.raises(RuntimeError, match="base must be float32, float64, bfloat16 or float16"):
        torch.ops.r2m_ext.delta_gram.default(
            torch.zeros(3, dtype=torch.int32), [torch.zeros(3, dtype=torch.int32)]
        )


def test_reference_combine_takes_host_weights_for_inputs_on_another_device():
    # The methods build weights on the host; the pure-torch path must move them to the inputs'
    # device (seen failing on a GPU). The meta device stands in for the GPU here.
    base = torch.randn(3, 4, device="meta")
    experts = [torch.randn(3, 4, device="meta") for _ in range(2)]
    weights = torch.ones(1, 2, dtype=torch.float64)
    out = reference.combine(base, experts, weights, 1.0, torch.float32, torch.bfloat16)
    assert out.device.type == "meta" and out.shape == (1, 3, 4) and out.dtype == torch.bfloat16


@pytest.mark.parametrize("shape", [(40, 30), (30, 40), (1, 25), (25, 1)])
def test_randomized_svd_reference_recovers_a_low_rank_matrix(shape):
    # Rank-3 matrix: a rank-3 randomized SVD reproduces it to rounding, with orthonormal factors.
    g = torch.Generator().manual_seed(3)
    rank = min(3, *shape)
    a = torch.randn(shape[0], rank, generator=g, dtype=torch.float64) @ torch.randn(
        rank, shape[1], generator=g, dtype=torch.float64
    )
    u, s, v = reference.randomized_svd(a[None], rank, oversample=4, n_iter=1, seed=0, key=1)
    torch.testing.assert_close((u * s.unsqueeze(-2)) @ v.mT, a[None], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(
        u.mT @ u, torch.eye(rank, dtype=torch.float64)[None], rtol=0, atol=1e-12
    )
    torch.testing.assert_close(s, torch.linalg.svdvals(a)[:rank][None], rtol=1e-10, atol=0)


def test_randomized_svd_reference_zero_matrix_has_no_nan():
    u, s, v = reference.randomized_svd(
        torch.zeros(2, 10, 8), 2, oversample=8, n_iter=2, seed=0, key=2
    )
    assert torch.equal(s, torch.zeros(2, 2)) and torch.isfinite(u).all() and torch.isfinite(v).all()


def test_sketch_depends_on_seed_and_key_only():
    first = reference.gaussian_test_matrix(0, 11, 6, 3, torch.float64)
    assert torch.equal(first, reference.gaussian_test_matrix(0, 11, 6, 3, torch.float64))
    assert not torch.equal(first, reference.gaussian_test_matrix(1, 11, 6, 3, torch.float64))
    assert not torch.equal(first, reference.gaussian_test_matrix(0, 12, 6, 3, torch.float64))
    # A wider sketch only appends columns.
    assert torch.equal(reference.gaussian_test_matrix(0, 11, 6, 5)[:, :3], first.float())
    # Tensor keys: name and shape; lists and tuples of sizes are the same shape. Pinned, because
    # recipes promise the same output across versions: the derivation must not change silently.
    assert name_key("a.weight", (8, 6)) == name_key("a.weight", [8, 6])
    assert name_key("a.weight", (8, 6)) != name_key("a.weight", (6, 8))
    assert name_key("a.weight", (8, 6)) == NAME_KEY_PIN


@needs_native
def test_native_sketch_matrix_equals_the_torch_twin():
    native = torch.ops.r2m_ext.sketch_matrix.default(7, name_key("w", (300, 200)), 200, 40)
    twin = reference.gaussian_test_matrix(7, name_key("w", (300, 200)), 200, 40)
    # Both round a double to float32; libm and torch's vectorised log/cos may differ in a last
    # double bit, which survives the rounding only rarely.
    torch.testing.assert_close(native, twin, rtol=1e-6, atol=1e-7)
    assert abs(float(native.mean())) < 0.05 and abs(float(native.std()) - 1) < 0.05


def test_import_works_without_the_extension_and_says_so():
    # A None entry in sys.modules makes `from r2m_ext import _C` raise ImportError, as on a machine
    # where the extension was never built: everything must still work, in pure torch.
    code = (
        "import sys; sys.modules['r2m_ext._C'] = None\n"
        "import torch, r2m_ext\n"
        "print(r2m_ext.backend_info())\n"
        "base = {'w': torch.zeros(3, 2)}\n"
        "experts = [{'w': torch.ones(3, 2)}, {'w': 3 * torch.ones(3, 2)}]\n"
        "merged = r2m_ext.merge(base, experts, 'average')\n"
        "print(merged['w'].sum().item())\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    info, total = result.stdout.strip().splitlines()
    assert "pure-torch backend (r2m_ext._C not built)" in info
    assert float(total) == 12.0  # mean task vector 2 on six entries


def run_python(code: str, *arguments: str, **environment: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code, *arguments],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **environment},
    )


@needs_native
def test_backend_variable_forces_the_pure_torch_ops_with_the_same_merge(tmp_path):
    code = (
        "import sys, torch, r2m_ext\n"
        "print(r2m_ext.backend_info())\n"
        "g = torch.Generator().manual_seed(0)\n"
        "base = {'w': torch.randn(40, 30, generator=g), 'b': torch.randn(30, generator=g)}\n"
        "experts = [{k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()}\n"
        "           for _ in range(3)]\n"
        "merged = r2m_ext.merge(base, experts, 'r2m', rank_ratio=0.2)\n"
        f"torch.save(merged, {str(tmp_path)!r} + '/' + sys.argv[1] + '.pt')\n"
        "print('r2m_ext._C' in sys.modules)\n"
    )
    outputs = {}
    for choice in ("torch", "native"):
        result = run_python(code, choice, R2M_EXT_BACKEND=choice)
        assert result.returncode == 0, result.stderr
        info, loaded = result.stdout.strip().splitlines()
        outputs[choice] = torch.load(tmp_path / f"{choice}.pt", weights_only=True)
        if choice == "torch":
            assert "pure-torch backend (R2M_EXT_BACKEND=torch)" in info
            assert loaded == "False"  # the kernels were never even loaded
        else:
            assert "native backend" in info and loaded == "True"
    for name, native in outputs["native"].items():
        difference = (outputs["torch"][name] - native).norm() / native.norm()
        assert difference < 1e-5, (name, float(difference))


def test_backend_variable_rejects_a_missing_extension_and_unknown_values():
    missing = run_python(
        "import sys; sys.modules['r2m_ext._C'] = None\nimport r2m_ext\nr2m_ext.backend_info()\n",
        R2M_EXT_BACKEND="native",
    )
    assert missing.returncode != 0
    assert "R2M_EXT_BACKEND=native, but the extension r2m_ext._C cannot be loaded" in missing.stderr
    unknown = run_python("import r2m_ext; r2m_ext.backend_info()", R2M_EXT_BACKEND="cuda")
    assert unknown.returncode != 0
    assert "R2M_EXT_BACKEND='cuda': expected one of auto, native, torch" in unknown.stderr


def test_combine_by_hand():
    # base (1, 1, 1); tau_1 = (1, 0, 3), tau_2 = (0, 2, 0).
    base = torch.tensor([1.0, 1.0, 1.0])
    experts = [torch.tensor([2.0, 1.0, 4.0]), torch.tensor([1.0, 3.0, 1.0])]
    weights = torch.tensor([[0.5, 0.5], [1.0, -1.0]], dtype=torch.float64)
    got = ops.combine(base, experts, weights, 1.0)
    assert torch.equal(got, torch.tensor([[1.5, 2.0, 2.5], [2.0, -1.0, 4.0]]))
    no_base = ops.combine(base, experts, weights, 0.0)
    assert torch.equal(no_base, torch.tensor([[0.5, 1.0, 1.5], [1.0, -2.0, 3.0]]))


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("compute", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(0,), (1,), (7, 5), (3, 5000)])
def test_combine_native_matches_float64_oracle(dtype, compute, shape):
    g = torch.Generator().manual_seed(4)
    base = torch.randn(shape, generator=g).to(dtype)
    experts = [
        (base.double() + 0.1 * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype)
        for _ in range(4)
    ]
    weights = torch.randn(3, 4, generator=g, dtype=torch.float64)
    got = torch.ops.r2m_ext.combine.default(base, experts, weights, 1.0, compute, compute)
    tau = torch.stack([e.double() - base.double() for e in experts]).reshape(4, -1)
    want = (weights @ tau + base.double().reshape(1, -1)).reshape(3, *shape)
    assert got.dtype == compute and got.shape == (3, *shape)
    tolerance = 1e-12 if compute == torch.float64 else 2e-6
    torch.testing.assert_close(got.double(), want, rtol=tolerance, atol=tolerance)


@needs_native
@pytest.mark.parametrize("fresh", [True, False], ids=["engine-allocator", "default-allocator"])
def test_combine_large_outputs_match_the_oracle_in_either_kind_of_memory(fresh):
    # Once the engine has lowered glibc's mmap threshold, outputs of 4 MB and more get their own
    # mapping for huge pages (python/ops/host_memory.h): 2 MB-aligned on Linux. Otherwise they
    # come from the default allocator, which reuses memory already faulted in. Many in a row,
    # each dropped, so the mapping's release path runs too; the same bits either way.
    native = native_module()
    before = native.large_allocations_fresh()
    g = torch.Generator().manual_seed(8)
    base = torch.randn(1031, 1024, generator=g)
    experts = [base + torch.randn(1031, 1024, generator=g) for _ in range(3)]
    weights = torch.randn(2, 3, generator=g, dtype=torch.float64)
    tau = torch.stack([e.double() - base.double() for e in experts]).reshape(3, -1)
    want = (weights @ tau + base.double().reshape(1, -1)).reshape(2, 1031, 1024)
    native.set_large_allocations_fresh(not fresh)
    other = ops.combine(base, experts, weights)
    try:
        native.set_large_allocations_fresh(fresh)
        for _ in range(20):
            got = ops.combine(base, experts, weights)
            if fresh and sys.platform == "linux":
                assert got.data_ptr() % (2 << 20) == 0
            torch.testing.assert_close(got.double(), want, rtol=2e-6, atol=2e-6)
            assert torch.equal(got, other)
            got.add_(1.0)  # the mapping is writable like any output
    finally:
        native.set_large_allocations_fresh(before)
    small = ops.combine(base[:10], [e[:10] for e in experts], weights)
    torch.testing.assert_close(small.double(), want[:, :10], rtol=2e-6, atol=2e-6)


@needs_native
def test_the_engine_tells_the_native_ops_that_large_allocations_are_fresh():
    # merge_files lowers glibc's mmap threshold for the whole process; the ops then map their
    # large outputs for huge pages. A subprocess, as the setting cannot be undone in this one.
    script = (
        "from r2m_ext._backend import native_module\n"
        "from r2m_ext.engine.budget import return_large_frees_to_os\n"
        "native = native_module()\n"
        "assert not native.large_allocations_fresh()\n"
        "return_large_frees_to_os()\n"
        "assert native.large_allocations_fresh()\n"
    )
    result = run_python(script)
    assert result.returncode == 0, result.stderr


@needs_native
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
def test_combine_16bit_output_is_torchs_rounding_of_the_float32_result(out_dtype):
    g = torch.Generator().manual_seed(5)
    base = torch.randn(10_000, generator=g)
    experts = [base + torch.randn(10_000, generator=g) for _ in range(3)]
    weights = torch.tensor([[0.2, 0.3, 0.5]], dtype=torch.float64)
    wide = torch.ops.r2m_ext.combine.default(
        base, experts, weights, 1.0, torch.float32, torch.float32
    )
    narrow = torch.ops.r2m_ext.combine.default(
        base, experts, weights, 1.0, torch.float32, out_dtype
    )
    assert torch.equal(narrow, wide.to(out_dtype))


@needs_native
def test_combine_is_the_same_for_any_block_split_and_thread_count():
    g = torch.Generator().manual_seed(6)
    base = torch.randn(100_003, generator=g)
    experts = [base + torch.randn(100_003, generator=g) for _ in range(5)]
    weights = torch.randn(2, 5, generator=g, dtype=torch.float64)
    whole = ops.combine(base, experts, weights)
    split = torch.cat(
        [
            ops.combine(base[a:b], [e[a:b] for e in experts], weights)
            for a, b in ((0, 777), (777, 100_003))
        ],
        dim=1,
    )
    assert torch.equal(whole, split)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = ops.combine(base, experts, weights)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(whole, single)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("compute", [torch.float32, torch.float64])
def test_every_combine_kernel_gives_the_same_bits(dtype, compute):
    # Three CPU kernels (csrc/merge/combine_cpu.cpp): one output; several, eight at a time over
    # spans of the block; and passes over whole blocks beyond 255 experts. A row asked alone,
    # among nine others and among 256 experts (the extra ones weighted zero, which every kernel
    # skips) runs each in turn: same operations in the same order, so equal bits, across tails,
    # NaN and zero weights too.
    g = torch.Generator().manual_seed(9)
    base = torch.randn(3 * 4096 + 21, generator=g).to(dtype)
    experts = [(base.float() + torch.randn(base.shape, generator=g)).to(dtype) for _ in range(4)]
    experts[2][5] = float("nan")
    row = torch.tensor([[0.3, 0.0, -1.25, 0.5]], dtype=torch.float64)
    alone = ops.combine(base, experts, row, 0.7, compute)
    others = torch.randn(9, 4, generator=g, dtype=torch.float64)
    among = ops.combine(base, experts, torch.cat([others[:8], row, others[8:]]), 0.7, compute)
    padding = [experts[0]] * 252
    wide_rows = torch.nn.functional.pad(torch.cat([row, others[:1]]), (0, 252))
    wide = ops.combine(base, experts + padding, wide_rows, 0.7, compute)
    bits = torch.int64 if compute == torch.float64 else torch.int32
    assert alone.isnan().sum() == 1
    assert torch.equal(alone[0].view(bits), among[8].view(bits))
    assert torch.equal(alone[0].view(bits), wide[0].view(bits))
    assert torch.equal(among[0].view(bits), wide[1].view(bits))


@needs_native
def test_combine_opcheck_and_errors():
    g = torch.Generator().manual_seed(7)
    base = torch.randn(6, 5, generator=g)
    experts = [torch.randn(6, 5, generator=g) for _ in range(3)]
    weights = torch.randn(2, 3, generator=g, dtype=torch.float64)
    torch.library.opcheck(
        torch.ops.r2m_ext.combine.default,
        (base, experts, weights, 1.0, torch.float32, torch.bfloat16),
    )
    with pytest.raises(RuntimeError, match=r"weights must be \[K, 3\] for 3 experts, got \[2, 4\]"):
        torch.ops.r2m_ext.combine.default(
            base, experts, torch.zeros(2, 4), 1.0, torch.float32, torch.float32
        )
    with pytest.raises(RuntimeError, match="compute_dtype must be float32 or float64"):
        torch.ops.r2m_ext.combine.default(
            base, experts, weights, 1.0, torch.bfloat16, torch.float32
        )


@pytest.mark.parametrize("backend", ["native", "torch"])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_combine_into_a_given_tensor_gives_the_functional_bits(backend, out_dtype, monkeypatch):
    if backend == "native" and ops.native_module() is None:
        pytest.skip("extension not built")
    monkeypatch.setattr(ops, "_native_supports", lambda *a: backend == "native")
    g = torch.Generator().manual_seed(12)
    base = torch.randn(40, 33, generator=g)
    experts = [base + torch.randn(40, 33, generator=g) for _ in range(3)]
    weights = torch.randn(5, 3, generator=g, dtype=torch.float64)
    want = ops.combine(base, experts, weights, 0.5, torch.float32, out_dtype)
    tau = torch.stack([e.double() - base.double() for e in experts]).reshape(3, -1)
    oracle = (weights @ tau + 0.5 * base.double().reshape(1, -1)).reshape(5, 40, 33)
    tolerance = 1e-2 if out_dtype == torch.bfloat16 else 2e-6
    torch.testing.assert_close(want.double(), oracle, rtol=tolerance, atol=tolerance)
    # Stale bytes in the buffer (NaN in every float dtype) must all be overwritten; a transposed
    # buffer takes the cast-and-copy route.
    buffer = torch.full((5, 40, 33), float("nan"), dtype=out_dtype)
    transposed = torch.full((5, 33, 40), float("nan"), dtype=out_dtype).transpose(1, 2)
    for out in (buffer, transposed):
        got = ops.combine(base, experts, weights, 0.5, torch.float32, out_dtype, out=out)
        assert got is out or got.data_ptr() == out.data_ptr()
        assert torch.equal(out, want)
    with pytest.raises(ValueError, match=r"out must be \[5, 40, 33\] torch.float32, got"):
        ops.combine(base, experts, weights, 0.5, out=torch.empty(5, 40, 32))
    with pytest.raises(ValueError, match=r"out must be \[5, 40, 33\] torch.float32, got"):
        ops.combine(base, experts, weights, 0.5, out=torch.empty(5, 40, 33, dtype=torch.float64))


@needs_native
def test_combine_into_opcheck_and_errors():
    g = torch.Generator().manual_seed(13)
    base = torch.randn(6, 5, generator=g)
    experts = [torch.randn(6, 5, generator=g) for _ in range(3)]
    weights = torch.randn(2, 3, generator=g, dtype=torch.float64)
    for out_dtype in (torch.float32, torch.bfloat16):
        out = torch.empty(2, 6, 5, dtype=out_dtype)
        args = (base, experts, weights, 1.0, torch.float32, out)
        torch.library.opcheck(torch.ops.r2m_ext.combine_into.default, args)
    with pytest.raises(RuntimeError, match=r"out must be \[2, 6, 5\], got \[2, 6, 4\]"):
        torch.ops.r2m_ext.combine_into(
            base, experts, weights, 1.0, torch.float32, torch.empty(2, 6, 4)
        )


def test_combine_reference_matches_native_path_semantics():
    base = torch.tensor([[1.0, 2.0]], dtype=torch.bfloat16)
    experts = [torch.tensor([[3.0, 2.0]], dtype=torch.bfloat16)]
    got = reference.combine(
        base, experts, torch.tensor([[0.5]]), 1.0, torch.float32, torch.bfloat16
    )
    assert got.dtype == torch.bfloat16 and got.tolist() == [[[2.0, 2.0]]]


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_lowrank_accumulate_matches_float64_oracle(out_dtype):
    g = torch.Generator().manual_seed(8)
    base = torch.randn(30, 20, generator=g)
    left, right = torch.randn(4, 30, 3, generator=g), torch.randn(4, 20, 3, generator=g)
    weights = torch.tensor([0.5, -1.0, 2.0, 0.0], dtype=torch.float64)
    got = ops.lowrank_accumulate(base, left, right, weights, out_dtype)
    want = base.double() + sum(
        w * left[i].double() @ right[i].double().T for i, w in enumerate(weights.tolist())
    )
    assert got.dtype == out_dtype
    torch.testing.assert_close(
        got.double(), want, rtol=1e-2 if out_dtype == torch.bfloat16 else 1e-5, atol=1e-5
    )


@needs_native
def test_lowrank_accumulate_opcheck_and_errors():
    g = torch.Generator().manual_seed(9)
    base = torch.randn(6, 5, generator=g)
    left, right = torch.randn(3, 6, 2, generator=g), torch.randn(3, 5, 2, generator=g)
    weights = torch.ones(3, dtype=torch.float64)
    torch.library.opcheck(
        torch.ops.r2m_ext.lowrank_accumulate.default, (base, left, right, weights, torch.float32)
    )
    with pytest.raises(RuntimeError, match=r"do not fit base \[5, 6\]"):
        torch.ops.r2m_ext.lowrank_accumulate.default(
            base.T.contiguous(), left, right, weights, torch.float32
        )
    with pytest.raises(RuntimeError, match=r"weights must be \[3\], got \[2\]"):
        torch.ops.r2m_ext.lowrank_accumulate.default(base, left, right, weights[:2], torch.float32)


def _magnitude_bits_by_hand(expert: float, base: float) -> int:
    """The float32 bit pattern of |f32(expert) - f32(base)|, with Python's struct."""
    import struct

    as_f32 = lambda v: struct.unpack("<f", struct.pack("<f", v))[0]  # noqa: E731
    difference = struct.unpack("<f", struct.pack("<f", as_f32(expert) - as_f32(base)))[0]
    return struct.unpack("<I", struct.pack("<f", difference))[0] & 0x7FFFFFFF


def test_magnitude_histogram_by_brute_force_on_edge_values():
    # Ties, zeros of both signs, a subnormal difference, Inf and NaN, counted digit by digit.
    tiny = 1e-45  # the smallest float32 subnormal
    base = torch.tensor([0.0, 1.0, -0.0, 2.0, 0.0, 5.0, 1.0, 3.0, 0.0])
    experts = [
        torch.tensor([1.0, 2.0, 0.0, 1.0, tiny, float("inf"), 1.0, 3.5, float("nan")]),
        torch.tensor([-1.0, 0.0, -0.0, 2.0, -tiny, 5.0, 1.5, 2.5, 1.0]),
    ]
    for shift, width, prefixes in [(15, 16, [0, 0]), (0, 15, [0x7F00, 0x7F00]), (20, 11, [0, 0])]:
        counts = torch.zeros(2, 1 << width, dtype=torch.int64)
        for i, expert in enumerate(experts):
            for x, b in zip(expert.tolist(), base.tolist(), strict=True):
                bits = _magnitude_bits_by_hand(x, b)
                if bits >> (shift + width) == prefixes[i]:
                    counts[i, (bits >> shift) & ((1 << width) - 1)] += 1
        p = torch.tensor(prefixes)
        assert torch.equal(ops.magnitude_histogram(base, experts, p, shift, width), counts)
        assert torch.equal(reference.magnitude_histogram(base, experts, p, shift, width), counts)
        # A window of every digit collects every counted entry but the exact zeros.
        into = torch.zeros_like(counts)
        window = (torch.zeros(2, dtype=torch.int64), torch.full((2,), (1 << width) - 1))
        collected = ops.magnitude_histogram_into(into, base, experts, p, shift, width, window)
        assert torch.equal(into, counts)
        for i, expert in enumerate(experts):
            bits = [
                _magnitude_bits_by_hand(x, b)
                for x, b in zip(expert.tolist(), base.tolist(), strict=True)
            ]
            want = sorted(b for b in bits if b >> (shift + width) == prefixes[i] and b != 0)
            assert sorted(collected[i].tolist()) == want


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_magnitude_histogram_matches_the_reference_and_sums_over_blocks(dtype):
    g = torch.Generator().manual_seed(3)
    base = torch.randn(300, 257, generator=g).to(dtype)
    experts = [(base.double() + 0.01 * torch.randn(300, 257, generator=g)).to(dtype) for _ in "abc"]
    prefixes = torch.tensor([0, 0, 0])
    whole = ops.magnitude_histogram(base, experts, prefixes, 15, 16)
    assert torch.equal(whole, reference.magnitude_histogram(base, experts, prefixes, 15, 16))
    assert int(whole.sum()) == 3 * base.numel()
    halves = sum(
        ops.magnitude_histogram(base[rows], [e[rows] for e in experts], prefixes, 15, 16)
        for rows in (slice(0, 137), slice(137, 300))
    )
    assert torch.equal(halves, whole)
    # The second pass counts only the entries under each task's chosen 16-bit prefix.
    top = whole.nonzero()[-1].tolist()
    second = ops.magnitude_histogram(base, experts, torch.tensor([top[1]] * 3), 0, 15)
    assert int(second[top[0]].sum()) == int(whole[top[0], top[1]])


@needs_native
def test_magnitude_histogram_opcheck():
    base = torch.randn(6, 5)
    experts = [torch.randn(6, 5), torch.randn(6, 5)]
    torch.library.opcheck(
        torch.ops.r2m_ext.magnitude_histogram.default,
        (base, experts, torch.zeros(2, dtype=torch.int64), 15, 16),
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_magnitude_histogram_into_counts_and_collects_its_windows(dtype):
    # Counts add into the given tensor (equal to magnitude_histogram's once more); the collected
    # bit patterns are, as a multiset, those of the nonzero entries in each task's window (bf16
    # differences are often exact zeros: counted, never collected) of digits, by
    # Python's struct, in a first pass and in a second under a prefix; an empty window [2^width,
    # 2^width] collects nothing; with DARE's mask the masked task vectors'. Over two of the
    # kernel's 65536-element blocks, on 1 and 2 threads (over tasks, 4 of them, and over
    # blocks, 3 of them).
    g = torch.Generator().manual_seed(12)
    base = torch.randn(600, 120, generator=g).to(dtype)
    experts = [
        (base.double() + 0.01 * torch.randn(600, 120, generator=g)).to(dtype) for _ in "abcd"
    ]
    bits = [
        torch.tensor(
            [
                _magnitude_bits_by_hand(x, b)
                for x, b in zip(
                    e.float().flatten().tolist(), base.float().flatten().tolist(), strict=True
                )
            ]
        )
        for e in experts
    ]
    zeros = torch.zeros(4, dtype=torch.int64)
    first = ops.magnitude_histogram(base, experts, zeros, 15, 16)
    peak = int(first.sum(0).argmax())
    empty = 1 << 16
    cases = [
        (zeros, 15, 16, [peak - 3, peak, empty, 0], [peak + 2, peak, empty, 65535]),
        (torch.tensor([peak] * 4), 0, 15, [0, 1000, 20000, 5], [32767, 1000, 30000, 5]),
    ]
    previous = torch.get_num_threads()
    try:
        for threads, n, (prefixes, shift, width, low, high) in itertools.product(
            (1, 2), (4, 3), cases
        ):
            torch.set_num_threads(threads)
            window = (torch.tensor(low[:n]), torch.tensor(high[:n]))
            plain = ops.magnitude_histogram(base, experts[:n], prefixes[:n], shift, width)
            counts = plain.clone()
            collected = ops.magnitude_histogram_into(
                counts, base, experts[:n], prefixes[:n], shift, width, window
            )
            assert torch.equal(counts, 2 * plain)
            for i in range(n):
                row = bits[i]
                digits = (row >> shift) & ((1 << width) - 1)
                inside = (row >> (shift + width) == int(prefixes[i])) & (digits >= low[i])
                want = row[inside & (digits <= high[i]) & (row != 0)].sort().values
                assert torch.equal(collected[i].long().sort().values, want), (shift, i)
                assert want.numel() > 0 or low[i] == empty or shift == 0, (shift, i)
        mask = DareMask((5, 2**64 - 3, 77, 8), 120 * 10, 0.5)
        window = (torch.tensor([peak - 2] * 4), torch.tensor([peak + 2] * 4))
        counts = torch.zeros(4, 1 << 16, dtype=torch.int64)
        got = ops.magnitude_histogram_into(counts, base, experts, zeros, 15, 16, window, mask)
        want = reference.magnitude_histogram_collect(base, experts, zeros, 15, 16, window, mask)
        assert torch.equal(counts, want[0])
        for a, b in zip(got, want[1], strict=True):
            assert b.numel() > 0 and torch.equal(a.sort().values, b.sort().values)
    finally:
        torch.set_num_threads(previous)


@needs_native
def test_magnitude_histogram_into_opcheck_and_errors():
    base = torch.randn(6, 5)
    experts = [torch.randn(6, 5), torch.randn(6, 5)]
    zeros = torch.zeros(2, dtype=torch.int64)
    counts = torch.zeros(2, 1 << 16, dtype=torch.int64)
    window = (torch.tensor([0, 10]), torch.tensor([65535, 65536]))
    op = torch.ops.r2m_ext.magnitude_histogram_into.default
    torch.library.opcheck(
        op,
        (counts, base, experts, zeros, 15, 16, *window),
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )
    with pytest.raises(RuntimeError, match=r"task 1's window \[10, 9\] is not a range"):
        op(counts, base, experts, zeros, 15, 16, torch.tensor([0, 10]), torch.tensor([5, 9]))
    with pytest.raises(RuntimeError, match=r"low and high must be int64 \[2\]"):
        op(counts, base, experts, zeros, 15, 16, torch.tensor([0]), torch.tensor([5]))
    with pytest.raises(RuntimeError, match=r"counts must be contiguous int64 \[2, 32768\]"):
        op(counts, base, experts, zeros, 0, 15)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_dare_merge_matches_its_oracle_and_draws_blocks_as_the_whole(dtype):
    g = torch.Generator().manual_seed(5)
    base = torch.randn(200, 33, generator=g).to(dtype)
    experts = [(base.double() + torch.randn(200, 33, generator=g)).to(dtype) for _ in range(3)]
    streams = [2**64 - 1, 12345, 2**63 + 7]  # 64-bit streams cross torch's int64 schema
    merged, probe = ops.dare_merge(base, experts, DareMask(streams, 0, 0.6), 0.3)
    want, want_probe = reference.dare_merge(base, experts, DareMask(streams, 0, 0.6), 0.3)
    assert torch.equal(merged, want) and float(probe) == 0 and float(want_probe) == 0
    # Rows 0-89 then 90-199, each told where it starts, draw what the whole tensor draws.
    parts = [
        ops.dare_merge(
            base[rows], [e[rows] for e in experts], DareMask(streams, rows.start * 33, 0.6), 0.3
        )
        for rows in (slice(0, 90), slice(90, 200))
    ]
    assert torch.equal(torch.cat([p[0] for p in parts]), merged)
    # drop_rate 0 keeps everything: base + lam * sum of the task vectors, in float32.
    kept, _ = ops.dare_merge(base, experts, DareMask(streams, 0, 0.0), 0.3)
    b = base.float()
    total = torch.zeros_like(b)
    for e in experts:
        total = total + (e.float() - b)
    assert torch.equal(kept, b + torch.tensor(0.3) * total)


def test_dare_merge_probe_sees_a_nan_even_where_it_is_dropped():
    base = torch.zeros(1000)
    experts = [torch.ones(1000), torch.ones(1000)]
    experts[1][17] = float("nan")
    for drop_rate in (0.0, 0.999999):
        merged, probe = ops.dare_merge(base, experts, DareMask((1, 2), 0, drop_rate), 1.0)
        assert probe.isnan()
        assert reference.dare_merge(base, experts, DareMask((1, 2), 0, drop_rate), 1.0)[1].isnan()


def _threshold_ops():
    """Each TIES/DARE kernel on 4 x 300,000 entries of 3 experts, as a function of no argument."""
    g = torch.Generator().manual_seed(4)
    base = torch.randn(4, 300_000, generator=g)
    experts = [base + torch.randn(4, 300_000, generator=g) for _ in range(3)]
    zeros = torch.zeros(3, dtype=torch.int64)
    mask = DareMask((3, 4, 5), 0, 0.9)
    return {
        "magnitude_histogram": lambda: ops.magnitude_histogram(base, experts, zeros, 15, 16),
        "masked_histogram": lambda: ops.magnitude_histogram(base, experts, zeros, 15, 16, mask),
        "ties_merge": lambda: ops.ties_merge(base, experts, torch.full((3,), 0.5), 0.7),
        "dare_merge": lambda: ops.dare_merge(base, experts, mask, 0.3)[0],
        "ties_merge_weighted": lambda: ops.ties_merge_weighted(
            base, experts, torch.full((3,), 0.5), [600_000, 10, -1], [0.5, -1.0, 2.0], True, 0.7
        ),
    }


@needs_native
@pytest.mark.parametrize(
    "op",
    ["magnitude_histogram", "masked_histogram", "ties_merge", "dare_merge", "ties_merge_weighted"],
)
def test_ties_and_dare_kernels_are_the_same_for_any_thread_count(op):
    compute = _threshold_ops()[op]
    threads = torch.get_num_threads()
    try:
        results = []
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            results.append(compute())
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(r, results[0]) for r in results)


@needs_native
def test_dare_merge_opcheck():
    base = torch.randn(6, 5)
    experts = [torch.randn(6, 5), torch.randn(6, 5)]
    torch.library.opcheck(
        torch.ops.r2m_ext.dare_merge.default, (base, experts, [1, -2], 0, 0.5, 0.3)
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dare_masked_histogram_and_ties_merge_match_their_oracles(dtype):
    g = torch.Generator().manual_seed(8)
    base = torch.randn(150, 40, generator=g).to(dtype)
    experts = [(base.double() + torch.randn(150, 40, generator=g)).to(dtype) for _ in range(3)]
    mask = DareMask((5, 2**64 - 3, 77), 40 * 10, 0.7)
    prefixes = torch.zeros(3, dtype=torch.int64)
    counts = ops.magnitude_histogram(base, experts, prefixes, 15, 16, mask)
    assert torch.equal(counts, reference.magnitude_histogram(base, experts, prefixes, 15, 16, mask))
    # Dropped entries count as magnitude 0: about 70% of each task's entries in digit 0.
    zeros = counts[:, 0].double() / base.numel()
    assert bool(((zeros > 0.6) & (zeros < 0.8)).all()), zeros
    thresholds = torch.tensor([0.5, 1.0, 0.0])
    merged = ops.ties_merge(base, experts, thresholds, 0.9, mask)
    assert torch.equal(merged, reference.ties_merge(base, experts, thresholds, 0.9, mask))
    # With the mask's kept entries and rescale spelled out, TIES of the unmasked kernel.
    index = torch.arange(400, 400 + base.numel())
    masked = [
        torch.where(
            (reference.splitmix64_uniform(s, index) >= 0.7).view(base.shape),
            base.float() + (e.float() - base.float()) / (1.0 - 0.7),
            base.float(),
        )
        for s, e in zip(mask.streams, experts, strict=True)
    ]
    unmasked = ops.ties_merge(base.float(), masked, thresholds, 0.9)
    torch.testing.assert_close(merged, unmasked, rtol=1e-6, atol=1e-6)


def mergekit_ties_by_sorting(base, experts, ks, weights, normalize, lam):
    """mergekit's TIES of one tensor in float64 from its definition: per task the k entries of
    largest |tau| (a stable sort: ties at the cut in index order) times its weight, the sign of
    their sum, the agreeing entries summed and divided by the agreeing weights."""
    b = base.double().reshape(-1)
    weighted = []
    for expert, k, weight in zip(experts, ks, weights, strict=True):
        tau = expert.double().reshape(-1) - b
        kept = torch.zeros_like(tau, dtype=torch.bool)
        kept[torch.sort(tau.abs(), descending=True, stable=True).indices[:k]] = True
        weighted.append(torch.where(kept, tau, 0.0) * weight)
    stack = torch.stack(weighted)
    positive = stack.sum(0) >= 0
    agrees = torch.where(positive, stack > 0, stack < 0)
    total = (stack * agrees).sum(0)
    divisor = (agrees.double() * torch.tensor(weights, dtype=torch.float64)[:, None]).sum(0)
    update = total / torch.where(divisor == 0, 1.0, divisor) if normalize else total
    return (b + lam * update).reshape(base.shape)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("normalize", [True, False])
def test_ties_merge_weighted_is_mergekits_ties_exactly(dtype, normalize):
    """Against the oracle bit for bit, and against the float64 definition (top k by a stable
    sort) with thresholds and cutoffs found as the merge finds them: entries tied at the cut
    (bfloat16 inputs: many), negative, zero and fractional weights, a zero task-vector entry,
    -0.0."""
    g = torch.Generator().manual_seed(11)
    base = torch.randn(60, 70, generator=g).to(dtype)
    experts = [(base.double() + torch.randn(60, 70, generator=g)).to(dtype) for _ in range(4)]
    experts[0][0, :5] = base[0, :5]
    experts[1][1, 0] = -0.0
    ks = [1, 900, 2100, 4200]
    weights = [0.3, -1.0, 0.0, 2.5]
    thresholds, cutoffs = [], []
    flat_base = base.float().reshape(-1)
    for expert, k in zip(experts, ks, strict=True):
        magnitude = (expert.float().reshape(-1) - flat_base).abs()
        order = torch.sort(magnitude, descending=True, stable=True).indices
        threshold = magnitude[order[k - 1]]
        thresholds.append(float(threshold))
        cutoffs.append(int(order[k - 1]) if int((magnitude == threshold).sum()) > 1 else 4200)
    thresholds = torch.tensor(thresholds, dtype=torch.float32)
    assert sum(c < 4200 for c in cutoffs) >= (2 if dtype == torch.bfloat16 else 0)
    merged = ops.ties_merge_weighted(base, experts, thresholds, cutoffs, weights, normalize, 0.7)
    oracle = reference.ties_merge_weighted(
        base, experts, thresholds, cutoffs, weights, normalize, 0.7
    )
    assert torch.equal(merged, oracle)
    want = mergekit_ties_by_sorting(base, experts, ks, weights, normalize, 0.7)
    torch.testing.assert_close(merged.double(), want, rtol=1e-5, atol=1e-5)


@needs_native
def test_ties_merge_weighted_opcheck():
    base = torch.randn(6, 5)
    experts = [torch.randn(6, 5), torch.randn(6, 5)]
    torch.library.opcheck(
        torch.ops.r2m_ext.ties_merge_weighted.default,
        (base, experts, torch.tensor([0.5, 0.1]), [30, 7], [1.0, 0.5], True, 0.3),
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nth_at_magnitude_finds_the_last_tied_entry_a_cut_keeps(dtype):
    """Against its oracle and against the definition by a stable sort, over blocks of the native
    kernel (200,000 entries: 4 blocks), for any thread count; -1 where too few tie."""
    g = torch.Generator().manual_seed(13)
    base = torch.randn(200_000, generator=g).to(dtype)
    # Rounded task vectors: thousands of entries share each magnitude.
    experts = [
        base + (torch.randn(200_000, generator=g) * 8).round().to(dtype) / 8 for _ in range(3)
    ]
    thresholds = torch.tensor([0.5, 1.0, 0.125])
    magnitudes = [(e.float() - base.float()).abs() for e in experts]
    ties = [int((m == t).sum()) for m, t in zip(magnitudes, thresholds, strict=True)]
    needed = [1, ties[1] // 2, ties[2] + 1]  # the first, a middle one, one too many
    want = reference.nth_at_magnitude(base, experts, thresholds, needed)
    for i, m in enumerate(magnitudes[:2]):
        order = torch.sort(torch.where(m == thresholds[i], 0, 1), stable=True).indices
        assert want[i] == int(order[needed[i] - 1])
    assert want[2] == -1
    threads = torch.get_num_threads()
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            assert ops.nth_at_magnitude(base, experts, thresholds, needed) == want
    finally:
        torch.set_num_threads(threads)


@needs_native
def test_nth_at_magnitude_opcheck():
    base = torch.zeros(6, 5)
    experts = [torch.ones(6, 5), torch.full((6, 5), -2.0)]
    torch.library.opcheck(
        torch.ops.r2m_ext.nth_at_magnitude.default,
        (base, experts, torch.tensor([1.0, 2.0]), [3, 30]),
    )
