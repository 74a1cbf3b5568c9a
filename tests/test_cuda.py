"""CUDA twins of the native ops against the CPU kernels and the float64 reference, and the
sync-free orthonormalisation the CUDA path uses (tested on the CPU too). CUDA cases skip where
there is no GPU; `benchmarks/gpu/run_all.sh` runs them on one."""

import pytest
import torch

from r2m_ext import ops, reference
from r2m_ext._backend import native_module
from r2m_ext.determinism import name_key

NATIVE = native_module() is not None
CUDA = NATIVE and native_module().with_cuda and torch.cuda.is_available()
needs_native = pytest.mark.skipif(not NATIVE, reason="r2m_ext._C is not built")
needs_cuda = pytest.mark.skipif(not CUDA, reason="no CUDA build or no GPU")
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def _inputs(shape, n, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g, dtype=torch.float64)
    experts = [
        (base + 0.1 * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype)
        for _ in range(n)
    ]
    return base.to(dtype), experts


def _matrix(kind: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    if kind == "gaussian":
        return randn(300, 20)
    if kind == "ill-conditioned":
        # Condition number 1e12: far beyond plain CholeskyQR's reach in float64 without the shift.
        return randn(300, 20) @ torch.diag(torch.logspace(0, -12, 20, dtype=torch.float64))
    if kind == "batched-float32":
        return randn(4, 100, 12).float()
    if kind == "rank-deficient":
        return randn(300, 3) @ randn(3, 20)
    return torch.zeros(50, 10, dtype=torch.float64)


@needs_native
@pytest.mark.parametrize("kind", ["gaussian", "ill-conditioned", "batched-float32"])
def test_shifted_cholesky_qr3_is_an_orthonormal_basis(kind):
    y = _matrix(kind)
    q = torch.ops.r2m_ext.shifted_cholesky_qr3(y)
    assert q.shape == y.shape and q.dtype == y.dtype
    tolerance = 1e-5 if y.dtype == torch.float32 else 1e-10
    eye = torch.eye(y.shape[-1], dtype=torch.float64)
    assert (q.double().mT @ q.double() - eye).abs().max() < tolerance
    # Q spans y: projecting y onto Q leaves nothing.
    residual = y.double() - q.double() @ (q.double().mT @ y.double())
    assert residual.norm() <= 1e-5 * y.double().norm()


@needs_native
@pytest.mark.parametrize("kind", ["rank-deficient", "zero"])
def test_shifted_cholesky_qr3_degenerate_inputs_stay_finite(kind):
    # Columns beyond y's rank carry no direction of y; without a host-side check they need not
    # come out orthonormal (the CPU path falls back to Householder there). They stay finite,
    # and Q still spans y.
    y = _matrix(kind)
    q = torch.ops.r2m_ext.shifted_cholesky_qr3(y)
    assert torch.isfinite(q).all()
    if not y.any():
        assert not q.any()
        return
    # Project y onto the column space of Q, from an SVD that drops Q's negligible directions.
    u, s, _ = torch.linalg.svd(q, full_matrices=False)
    space = u[:, s > 1e-8 * s.max()]
    assert (y - space @ (space.mT @ y)).norm() <= 1e-8 * y.norm()


@needs_native
def test_shifted_cholesky_qr3_opcheck():
    torch.library.opcheck(torch.ops.r2m_ext.shifted_cholesky_qr3.default, (torch.randn(30, 5),))


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 3, 8, 11, 17])
@pytest.mark.parametrize("shape", [(1,), (7, 5), (3, 40000), (0,)])
def test_delta_gram_cuda_matches_cpu_and_reference(dtype, n, shape):
    base, experts = _inputs(shape, n, dtype)
    cpu = ops.delta_gram(base, experts)
    cuda = ops.delta_gram(base.cuda(), [e.cuda() for e in experts])
    assert cuda.device.type == "cuda" and cuda.dtype == torch.float64
    want = reference.delta_gram(base.double(), [e.double() for e in experts])
    assert torch.allclose(cuda.cpu(), want, rtol=1e-12, atol=1e-12)
    assert torch.allclose(cuda.cpu(), cpu, rtol=1e-12, atol=1e-12)
    again = ops.delta_gram(base.cuda(), [e.cuda() for e in experts])
    assert torch.equal(cuda, again), "not deterministic"


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("compute", [torch.float32, torch.float64])
@pytest.mark.parametrize("out_dtype", DTYPES)
def test_combine_cuda_is_bitwise_the_cpu_kernel(dtype, compute, out_dtype):
    base, experts = _inputs((37, 1000), 5, dtype)
    weights = torch.randn(20, 5, dtype=torch.float64)  # 20 outputs: two sweeps of the kernel
    weights[3, 2] = 0.0
    cpu = ops.combine(base, experts, weights, 0.5, compute, out_dtype)
    cuda = ops.combine(base.cuda(), [e.cuda() for e in experts], weights, 0.5, compute, out_dtype)
    assert cuda.dtype == out_dtype and cuda.device.type == "cuda"
    assert torch.equal(cuda.cpu(), cpu)


def _ties_inputs(dtype, masked):
    """Inputs with ties at the threshold, zeros, a negative zero, a subnormal and a NaN-free
    spread; with `masked`, DARE's mask arguments (64-bit streams as int64)."""
    from r2m_ext.determinism import signed64

    base, experts = _inputs((53, 301), 4, dtype)
    experts[0][0, :5] = base[0, :5]  # zero task-vector entries
    experts[1][1, 0] = -0.0
    experts[2][2, :3] = base[2, :3] + 1e-40  # subnormal differences where the dtype has them
    streams = [signed64(s) for s in (2**64 - 3, 5, 77, 12345)] if masked else []
    return base, experts, (streams, 53 * 7 if masked else 0, 0.6 if masked else 0.0)


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("masked", [False, True])
def test_ties_kernels_cuda_are_bitwise_the_cpu_kernels(dtype, masked):
    """magnitude_histogram, ties_merge and dare_merge on the GPU against the CPU kernels, bit for
    bit (each element's float operations are the same, in the same order; counts are integers)."""
    base, experts, dare = _ties_inputs(dtype, masked)
    gpu = (base.cuda(), [e.cuda() for e in experts])
    ops_ = torch.ops.r2m_ext
    n = len(experts)
    for shift, width, prefix in ((15, 16, 0), (0, 15, 0x3C00), (4, 12, 0x1F)):
        prefixes = torch.full((n,), prefix, dtype=torch.int64)
        want = ops_.magnitude_histogram.default(base, experts, prefixes, shift, width, *dare)
        got = ops_.magnitude_histogram.default(*gpu, prefixes.cuda(), shift, width, *dare)
        assert torch.equal(got.cpu(), want), (shift, width)
        # Counted into given counts: added to what they held.
        into = got.clone()
        ops_.magnitude_histogram_into.default(
            into, *gpu, prefixes.cuda(), shift, width, None, None, *dare
        )
        assert torch.equal(into.cpu(), 2 * want), (shift, width)
    thresholds = torch.tensor([0.05, 0.0, 0.1, 1e30], dtype=torch.float32)
    want = ops_.ties_merge.default(base, experts, thresholds, 0.7, *dare)
    got = ops_.ties_merge.default(*gpu, thresholds.cuda(), 0.7, *dare)
    assert torch.equal(got.cpu(), want)
    if not masked:  # mergekit's TIES: weights, cutoffs in a tie, with and without normalising
        weighted = (thresholds, [base.numel(), 100, -1, 7], [0.3, -1.0, 2.0, 0.0])
        for normalize in (True, False):
            want = ops_.ties_merge_weighted.default(base, experts, *weighted, normalize, 0.7)
            got = ops_.ties_merge_weighted.default(
                *gpu, thresholds.cuda(), *weighted[1:], normalize, 0.7
            )
            assert torch.equal(got.cpu(), want), normalize
    if masked:
        merged, probe = ops_.dare_merge.default(base, experts, *dare, 0.3)
        merged_gpu, probe_gpu = ops_.dare_merge.default(*gpu, *dare, 0.3)
        assert torch.equal(merged_gpu.cpu(), merged) and probe_gpu.item() == probe.item() == 0.0
        experts[3][4, 4] = float("inf")  # a non-finite input, kept or dropped, shows in the probe
        _, probe_gpu = ops_.dare_merge.default(gpu[0], [e.cuda() for e in experts], *dare, 0.3)
        assert probe_gpu.isnan().item()


@needs_cuda
def test_ties_kernels_cuda_opcheck():
    base, experts, dare = _ties_inputs(torch.float32, masked=True)
    base, experts = base.cuda(), [e.cuda() for e in experts]
    prefixes = torch.zeros(4, dtype=torch.int64, device="cuda")
    thresholds = torch.full((4,), 0.05, device="cuda")
    ops_ = torch.ops.r2m_ext
    torch.library.opcheck(
        ops_.magnitude_histogram.default, (base, experts, prefixes, 15, 16, *dare)
    )
    torch.library.opcheck(ops_.ties_merge.default, (base, experts, thresholds, 0.7, *dare))
    torch.library.opcheck(ops_.dare_merge.default, (base, experts, *dare, 0.3))
    torch.library.opcheck(
        ops_.ties_merge_weighted.default,
        (base, experts, thresholds, [9, 0, 5, 3], [1.0] * 4, True, 0.7),
    )


@needs_cuda
def test_combine_into_cuda_buffers_gives_the_functional_bits():
    base, experts = _inputs((37, 1000), 5, torch.bfloat16)
    base, experts = base.cuda(), [e.cuda() for e in experts]
    weights = torch.randn(6, 5, dtype=torch.float64)
    for out_dtype in (torch.float32, torch.bfloat16):
        want = ops.combine(base, experts, weights, 0.5, torch.float32, out_dtype)
        buffer = torch.full((6, 37, 1000), float("nan"), dtype=out_dtype, device="cuda")
        transposed = torch.full((6, 1000, 37), float("nan"), dtype=out_dtype, device="cuda")
        for out in (buffer, transposed.transpose(1, 2)):
            ops.combine(base, experts, weights, 0.5, torch.float32, out_dtype, out=out)
            assert torch.equal(out, want)


@needs_cuda
def test_sketch_and_randomized_svd_agree_across_devices():
    key = name_key("blocks.0.attn.qkv.weight", (768, 768))
    a = torch.randn(4, 300, 200, dtype=torch.float64).float()
    u_cpu, s_cpu, v_cpu = ops.randomized_svd(a, 20, seed=3, key=key)
    u, s, v = ops.randomized_svd(a.cuda(), 20, seed=3, key=key)
    assert torch.allclose(s.cpu(), s_cpu, rtol=1e-4)
    low_cpu = u_cpu @ torch.diag_embed(s_cpu) @ v_cpu.mT
    low = (u @ torch.diag_embed(s) @ v.mT).cpu()
    assert (low - low_cpu).norm() <= 1e-4 * low_cpu.norm()
    eye = torch.eye(20, device="cuda")
    assert (u.mT @ u - eye).abs().max() < 1e-5 and (v.mT @ v - eye).abs().max() < 1e-5


@needs_cuda
def test_lowrank_accumulate_cuda_matches_cpu():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(64, 48, generator=g)
    left, right = torch.randn(3, 64, 5, generator=g), torch.randn(3, 48, 5, generator=g)
    weights = torch.tensor([0.5, -1.0, 2.0])
    cpu = ops.lowrank_accumulate(base, left, right, weights, torch.bfloat16)
    cuda = ops.lowrank_accumulate(base.cuda(), left.cuda(), right.cuda(), weights, torch.bfloat16)
    assert torch.allclose(cuda.cpu().float(), cpu.float(), rtol=1e-2, atol=1e-2)


@needs_cuda
def test_cuda_ops_opcheck():
    base, experts = _inputs((33, 17), 3, torch.float32)
    base, experts = base.cuda(), [e.cuda() for e in experts]
    torch.library.opcheck(torch.ops.r2m_ext.delta_gram.default, (base, experts))
    torch.library.opcheck(
        torch.ops.r2m_ext.combine.default,
        (base, experts, torch.ones(2, 3, dtype=torch.float64), 1.0, torch.float32, torch.bfloat16),
    )


@needs_cuda
def test_cuda_errors_name_the_argument():
    base, experts = _inputs((4, 4), 2, torch.float32)
    with pytest.raises(RuntimeError, match=r"expert 1 is on cpu"):
        ops.delta_gram(base.cuda(), [experts[0].cuda(), experts[1]])


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_device_cuda_without_a_gpu_is_a_clear_error(tmp_path):
    from conftest import random_model, run_cli
    from safetensors.torch import save_file

    base = {k: v for k, v in random_model().items() if v.is_floating_point()}
    save_file(base, str(tmp_path / "base.safetensors"))
    save_file(base, str(tmp_path / "e.safetensors"))
    for device, message in (("cuda", "sees no CUDA GPU"), ("tpu", "not a device torch knows")):
        result = run_cli(
            "merge",
            "--base",
            tmp_path / "base.safetensors",
            "--expert",
            tmp_path / "e.safetensors",
            "--out",
            tmp_path / device,
            "--device",
            device,
        )
        assert result.returncode == 1 and message in result.stderr, result.stderr
        assert not (tmp_path / device).exists()


@needs_cuda
@pytest.mark.parametrize("method", ["r2m", "average", "ties", "dare", "tsv", "cart"])
@pytest.mark.parametrize("max_memory", [None, "40kB"])
def test_gpu_streaming_equals_the_cpu_merge(tmp_path, method, max_memory):
    from conftest import make_experts, random_model, relative_error
    from safetensors.torch import load_file, save_file

    from r2m_ext.api import merge_files

    # 40 kB tiles tensors for most methods; CART's whole-tensor SVD of the qkv matrix needs
    # 32.3 kB, more than 40 kB leaves for one step (30 kB): its smallest workable budget is 48 kB.
    if max_memory is not None and method == "cart":
        max_memory = "48kB"
    base = random_model()
    paths = []
    for index, state in enumerate([base, *make_experts(base, 3)]):
        paths.append(tmp_path / f"m{index}.safetensors")
        save_file(state, str(paths[-1]))
    results = {}
    for device in ("cpu", "cuda"):
        out = merge_files(
            paths[0], paths[1:], tmp_path / device, method, max_memory=max_memory, device=device
        )
        results[device] = load_file(str(out / "model.safetensors"))
    for name, want in results["cpu"].items():
        got = results["cuda"][name]
        assert got.dtype == want.dtype and got.shape == want.shape, name
        if want.is_floating_point():
            assert relative_error(got, want) <= 1e-5, name
        else:
            assert torch.equal(got, want), name


@needs_cuda
@pytest.mark.parametrize("io_threads", [0, 2])
def test_gpu_factor_tiers_give_the_same_bits(tmp_path, io_threads):
    """On the GPU, R²M's factors beyond a budget that keeps none on the device: in page-locked
    host memory, in the scratch file (through host memory), partly each, or recomputed; the
    same bytes every way (tests/test_factor_store.py checks the same on the CPU)."""
    from checkpoints import save_sharded
    from conftest import make_experts
    from test_factor_store import TRUNCATED, merged, model

    from r2m_ext.api import merge_files

    base = model()
    paths = [save_sharded(base, tmp_path / "base", shards=2)]
    for index, expert in enumerate(make_experts(base, 3)):
        paths.append(save_sharded(expert, tmp_path / f"expert{index}", shards=2))
    ways = {
        "recomputed": {"scratch_dir": "none", "host_memory": "0"},
        "host": {"host_memory": "1GB"},
        "scratch": {"host_memory": "0"},
        # Page-locked blocks are powers of two: 98 kB per small matrix's factors, so one fits.
        "both": {"host_memory": "150kB"},
    }
    reports = {}
    for way, arguments in ways.items():
        reports[way] = {}
        merge_files(
            paths[0],
            paths[1:],
            tmp_path / way,
            "r2m",
            device="cuda",
            max_memory="1200kB",
            io_threads=io_threads,
            report=reports[way],
            **arguments,
        )
        assert merged(tmp_path / way) == merged(tmp_path / "recomputed"), way
    assert reports["recomputed"]["factors_recomputed"] == TRUNCATED
    assert reports["host"]["factors_in_host_memory"] == TRUNCATED
    assert reports["scratch"]["factors_spilled"] == TRUNCATED
    both = reports["both"]
    assert 0 < both["factors_in_host_memory"] < TRUNCATED
    assert both["factors_in_host_memory"] + both["factors_spilled"] == TRUNCATED
    assert "R²M write pass" not in both["factorisations"]
