"""The streaming engine: merges within small memory budgets equal the in-memory reference for every
method, tiling really happens, the background reader changes nothing, over-budget tensors give a
sized error, interrupted runs resume to identical bytes, and report.json says what happened."""

import errno
import json
import math
import os
import random
import threading
from types import SimpleNamespace

import pytest
import torch
from checkpoints import save_sharded, save_single
from conftest import make_experts, random_model, relative_error, run_cli
from safetensors.torch import load_file

import r2m_ext
from r2m_ext import ops
from r2m_ext.engine.inputs import MergeInputs, _Prefetcher
from r2m_ext.errors import R2MError
from r2m_ext.io import writer as writer_module
from r2m_ext.io.buffers import HostBuffers
from r2m_ext.io.output import MANIFEST_FILE, partial_dir
from r2m_ext.io.writer import INTERRUPT_AFTER_SHARDS_ENV, ShardWriter
from r2m_ext.methods import select as select_module
from r2m_ext.methods.select import KthLargestMagnitude, combine_partials
from r2m_ext.reference import splitmix64_uniform


def streaming_model(seed=0):
    # token_embed (excluded from truncation, 24 kB per model in float32) is too large to take
    # whole under the budgets below, so every method has to read it in row blocks.
    base = random_model(seed)
    g = torch.Generator().manual_seed(seed + 100)
    base["token_embed.weight"] = torch.randn(400, 16, generator=g)
    return base


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("streaming")
    base = streaming_model()
    experts = make_experts(base, 3)
    base_path = save_sharded(base, tmp / "base", shards=2)
    paths = [save_single(e, tmp / f"e{i}.safetensors") for i, e in enumerate(experts)]
    return tmp, base, experts, base_path, paths


def read_dir(directory):
    tensors = {}
    for file in directory.glob("*.safetensors"):
        tensors.update(load_file(str(file)))
    return tensors


CASES = [
    ("r2m", {}),
    ("r2m", {"svd": "exact", "norm_scope": "tensor", "residual": "projection", "center": True}),
    ("r2m", {"residual_scale": "literal", "k": 2}),
    ("average", {}),
    ("task_arithmetic", {}),
    ("ties", {}),
    ("ties", {"ties_scope": "tensor", "density": 0.5}),
    ("dare", {}),
    ("dare", {"dare_combine": "ties"}),
    ("tsv", {}),
    ("cart", {}),
]


@pytest.mark.parametrize("method,options", CASES)
def test_small_budget_matches_in_memory_reference(files, method, options):
    tmp, base, experts, base_path, paths = files
    out = tmp / f"out-{method}-{len(options)}"
    report = {}
    r2m_ext.merge_files(
        base_path,
        paths,
        out,
        method,
        max_memory="160kB",
        io_threads=1,
        report=report,
        overwrite=True,
        **options,
    )
    assert "token_embed.weight" in report["tiled_tensors"]
    assert report["memory"]["peak_accounted"] <= 160_000
    want = r2m_ext.merge(base, experts, method, **options)
    got = read_dir(out)
    assert set(got) == set(want)
    for name in want:
        assert got[name].dtype == want[name].dtype
        assert relative_error(got[name], want[name]) <= 1e-5, name


@pytest.mark.parametrize("method", ["r2m", "ties", "dare"])
def test_background_reader_and_budget_do_not_change_the_bytes(files, method):
    tmp, base, experts, base_path, paths = files
    outputs = []
    for index, (budget, threads) in enumerate([("160kB", 0), ("160kB", 3), ("2GB", 2)]):
        out = tmp / f"det-{method}-{index}"
        r2m_ext.merge_files(
            base_path, paths, out, method, max_memory=budget, io_threads=threads, overwrite=True
        )
        outputs.append(read_dir(out))
    for name in outputs[0]:
        # Same budget: bitwise. Whole vs row blocks: the same elementwise math, also bitwise here;
        # R²M's Gram is summed in a different order, so it may differ by rounding.
        assert torch.equal(outputs[0][name], outputs[1][name]), name
        assert relative_error(outputs[2][name], outputs[0][name]) <= 1e-6, name


def test_tensor_too_large_for_the_budget_says_how_much_it_needs(files):
    # The exact SVD needs the whole matrix; the randomized one can work in row blocks (below).
    # qkv: 768 elements x 66 B = 50,688 B (N = 3, float32, 2 + 1.5 workspace stacks for the
    # exact SVD: (3 + 1 + 10.5 + 1) x 4 + 4).
    tmp, base, experts, base_path, paths = files
    with pytest.raises(
        r2m_ext.R2MError,
        match=r"'blocks.0.attn.qkv.weight' \[48, 16\] needs 50.69 kB to truncate its residuals"
        r" with 3 experts.*raise --max-memory",
    ):
        r2m_ext.merge_files(
            base_path, paths, tmp / "too-small", max_memory="40kB", io_threads=0, svd="exact"
        )
    assert not (tmp / "too-small").exists() and not partial_dir(tmp / "too-small").exists()


def test_r2m_factors_matrices_too_large_to_hold_whole_in_row_blocks(files):
    # At 40 kB qkv's whole truncation step (41,472 B) does not fit: its randomized SVD runs over
    # row blocks of its residuals, with the same sketch, and agrees with the whole-matrix merge.
    tmp, base, experts, base_path, paths = files
    report = {}
    out = r2m_ext.merge_files(
        base_path, paths, tmp / "streamed-svd", max_memory="40kB", io_threads=0, report=report
    )
    assert report["tensors"]["blocks.0.attn.qkv.weight"].get("streamed") is True
    assert report["memory"]["peak_accounted"] <= 40_000
    want = r2m_ext.merge(base, experts, "r2m")
    got = read_dir(out)
    for name in want:
        assert relative_error(got[name], want[name]) <= 1e-5, name
    # Too small even for the thin factors and one row: a sized error, nothing written.
    with pytest.raises(
        r2m_ext.R2MError, match=r"needs [0-9.]+ MB to factor its residuals in row blocks"
    ):
        r2m_ext.merge_files(base_path, paths, tmp / "tiny", max_memory="12kB", io_threads=0)
    assert not (tmp / "tiny").exists() and not partial_dir(tmp / "tiny").exists()


def test_r2m_recomputes_factors_it_cannot_cache(files):
    # The largest truncation step, qkv, needs 768 elements x 54 B = 41,472 B (N = 3, float32,
    # 2.5 workspace stacks: (3 + 1 + 7.5 + 1) x 4 + 4). Steps get 75% of the budget (the rest is
    # the reader's): 42,375 B at 56.5 kB, which keeps qkv's factors (768 B) but not fc1's (576 B
    # more), so fc1's and fc2's are recomputed (same seed, same bits) without a scratch file,
    # and go to the scratch file with one.
    tmp, base, experts, base_path, paths = files
    small, large, spilled = {}, {}, {}
    r2m_ext.merge_files(
        base_path,
        paths,
        tmp / "f-small",
        max_memory="56.5kB",
        io_threads=0,
        report=small,
        overwrite=True,
        scratch_dir="none",
    )
    r2m_ext.merge_files(
        base_path,
        paths,
        tmp / "f-spilled",
        max_memory="56.5kB",
        io_threads=0,
        report=spilled,
        overwrite=True,
    )
    r2m_ext.merge_files(
        base_path,
        paths,
        tmp / "f-large",
        max_memory="2GB",
        io_threads=0,
        report=large,
        overwrite=True,
    )
    assert large["factors_recomputed"] == 0 and large["factors_cached"] == 3
    assert small["factors_cached"] == 1 and small["factors_recomputed"] == 2
    assert spilled["factors_cached"] == 1 and spilled["factors_spilled"] == 2
    assert spilled["factors_recomputed"] == 0
    got, want = read_dir(tmp / "f-small"), read_dir(tmp / "f-large")
    for name in want:
        assert relative_error(got[name], want[name]) <= 1e-6, name
    assert read_dir(tmp / "f-spilled").keys() == got.keys()
    assert all(torch.equal(read_dir(tmp / "f-spilled")[n], got[n]) for n in got)


def test_report_json(files):
    tmp, base, experts, base_path, paths = files
    out = tmp / "reported"
    r2m_ext.merge_files(base_path, paths, out, max_memory="1GB", overwrite=True)
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "r2m" and len(report["gram"]) == 3
    assert set(report["timings_s"]) >= {
        "R²M gram pass",
        "R²M truncation pass",
        "R²M write pass",
        "total",
    }
    assert report["memory"]["max_memory"] == 10**9 and report["memory"]["peak_rss"] > 0
    qkv = report["tensors"]["blocks.0.attn.qkv.weight"]
    assert qkv["class"] == "matrix" and qkv["rank"] == 1  # floor(0.1 * 16)
    assert all(0 < e <= 1 for e in qkv["energy_kept"]) and len(qkv["singular_values"][0]) == 1
    # The kept energy is the kept singular value squared over the residual's squared norm.
    before = qkv["residual_norm_before"]
    assert [s[0] for s in qkv["singular_values"]] == pytest.approx(before, rel=1e-5)
    bias = report["tensors"]["blocks.0.attn.qkv.bias"]
    assert bias["class"] == "other" and "rank" not in bias
    # Global norm matching: after = before * (mean of task norms / task norm).
    norms = report["residual_norms"]
    scale = [sum(norms) / len(norms) / v for v in norms]
    assert bias["residual_norm_after"] == pytest.approx(
        [b * s for b, s in zip(bias["residual_norm_before"], scale, strict=True)]
    )


def test_report_command_prints_and_plots(files):
    tmp, base, experts, base_path, paths = files
    out = tmp / "for-report"
    r2m_ext.merge_files(base_path, paths, out, overwrite=True)
    result = run_cli("report", out, "--plot", tmp / "plots", "--tensor", "blocks.0.mlp.fc1.weight")
    assert result.returncode == 0, result.stderr
    assert "Real core coefficients" in result.stdout and "blocks.0.attn.qkv.weight" in result.stdout
    for name in ("residual_norms.png", "energy_kept.png", "spectrum_blocks.0.mlp.fc1.weight.png"):
        assert (tmp / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bad = run_cli("report", out, "--plot", tmp / "plots", "--tensor", "pos_embed")
    assert bad.returncode == 1 and "no recorded spectrum" in bad.stderr


def test_interrupted_run_resumes_to_identical_bytes(files, monkeypatch):
    tmp, base, experts, base_path, paths = files
    args = [
        "merge",
        "--base",
        base_path,
        "--expert",
        paths[0],
        "--expert",
        paths[1],
        "--expert",
        paths[2],
        "--shard-size",
        "3kB",
        "--quiet",
    ]
    reference = tmp / "uninterrupted"
    assert run_cli(*args, "--out", reference).returncode == 0
    out = tmp / "interrupted"
    monkeypatch.setenv(INTERRUPT_AFTER_SHARDS_ENV, "2")
    first = run_cli(*args, "--out", out)
    assert first.returncode == 130 and "rerun with --resume" in first.stderr
    assert not out.exists()
    progress = json.loads((partial_dir(out) / "r2m_progress.json").read_text())
    assert progress["complete"] == [0, 1]
    monkeypatch.delenv(INTERRUPT_AFTER_SHARDS_ENV)
    again = run_cli(*args, "--out", out)
    assert again.returncode == 1 and "pass --resume" in again.stderr
    different = run_cli(*args, "--out", out, "--resume", "--alpha", "0.3")
    assert different.returncode == 1 and "alpha differ" in different.stderr
    resumed = run_cli(*args, "--out", out, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert not partial_dir(out).exists()
    assert json.loads((out / "report.json").read_text())["resumed_shards"] == 2
    files_out = sorted(p.name for p in reference.glob("*.safetensors"))
    assert len(files_out) > 3 and files_out == sorted(p.name for p in out.glob("*.safetensors"))
    for name in files_out + ["model.safetensors.index.json"]:
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name


def test_our_shards_load_with_the_safetensors_library_and_match_its_layout(files):
    tmp, base, experts, base_path, paths = files
    out = tmp / "layout"
    r2m_ext.merge_files(base_path, paths, out, "average", overwrite=True)
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert set(f.keys()) == set(base)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_streamed_kth_largest_is_exact(dtype):
    # Against torch.kthvalue on the whole data, with values tied across blocks, and with a tiny
    # collection limit that forces histogram refinement 16 bits at a time.
    # Each pass's block partials are combined left to right, or as a balanced tree (how ranks
    # would combine theirs): the same counts, the same answer.
    g = torch.Generator().manual_seed(0)
    data = torch.randn(3, 5000, generator=g, dtype=dtype).abs()
    data[:, ::7] = data[:, :1]  # many exact ties
    ks = [1, 123, 5000]
    want = torch.stack([data[i].kthvalue(5000 - k + 1).values for i, k in enumerate(ks)])

    def tree(partials):
        while len(partials) > 1:
            pairs = [partials[i : i + 2] for i in range(0, len(partials), 2)]
            partials = [p[0] if len(p) == 1 else combine_partials(p[0], p[1]) for p in pairs]
        return partials[0]

    def left(partials):
        total = None
        for partial in partials:
            total = combine_partials(total, partial)
        return total

    for limit in (1 << 20, 4):
        for fold in (left, tree):
            selector = KthLargestMagnitude(ks, dtype, collect_limit=limit)
            passes = 0
            while not selector.done:
                selector.finish_pass(fold([selector.observe(b) for b in data.split(777, dim=1)]))
                passes += 1
            assert torch.equal(selector.values(), want)
            if limit == 4 and dtype == torch.float64:
                assert passes >= 3  # refined 16 bits at a time past the first two digits
            else:
                assert passes == 2


@pytest.mark.skipif(not ops.ties_kernels_native("cpu"), reason="r2m_ext._C is not built")
def test_windowed_select_is_exact_whether_its_window_holds_the_answer_or_not(monkeypatch):
    # The k-th largest magnitudes (and how many entries tie at them) are those of torch.kthvalue
    # and of two histogram passes, whatever the sample: one pass when the sample's window holds
    # the answer's first digit, a second where it does not, where the window collects more than
    # its limit, or where one digit alone holds more than the limit (an empty window).
    g = torch.Generator().manual_seed(4)
    base = torch.randn(400, 300, generator=g)
    scales = (0.01, 0.02, 0.03, 0.04)
    experts = [base + scale * torch.randn(400, 300, generator=g) for scale in scales]
    base[:, ::5], experts[0][:, ::5] = 1.0, 1.5  # 24000 entries of task 0 tie at 0.5
    # Task 3 as after DARE's mask: 90% exact zeros, its answer among them (counted, not
    # collected); task 2's is the smallest magnitude, past the sample's.
    dropped = torch.rand(400, 300, generator=g) < 0.9
    experts[3][dropped] = base[dropped]
    total = base.numel()
    ks = [23456, 1, total, total // 5]
    magnitudes = torch.stack([e - base for e in experts]).abs().flatten(1)
    want = torch.stack([magnitudes[i].kthvalue(total - k + 1).values for i, k in enumerate(ks)])

    def select(sample=None, limit_in_pass=None):
        selector = KthLargestMagnitude(ks, torch.float32, collect_limit=-1)
        if sample is not None:
            selector.plan_window(sample, int(sample.sum()) // 4, total)
        if limit_in_pass is not None:
            monkeypatch.setattr(select_module, "WINDOW_COLLECT_LIMIT", limit_in_pass)
        passes = 0
        while not selector.done:
            prefixes, shift, width = selector.histogram_digit()
            window = selector.histogram_window()
            total_partial = None  # two blocks counted apart, then combined (as ranks would)
            for rows in (slice(0, 150), slice(150, 400)):
                b, e = base[rows], [x[rows] for x in experts]
                partial = selector.new_histograms()
                partial.collect(
                    ops.magnitude_histogram_into(
                        partial.counts, b, e, prefixes, shift, width, window
                    )
                )
                total_partial = combine_partials(total_partial, partial)
            selector.finish_pass(total_partial)
            passes += 1
        monkeypatch.undo()
        return selector.values(), selector.needed_at_value(), selector.at_value(), passes

    plain = select()
    assert torch.equal(plain[0], want) and plain[3] == 2
    assert plain[1][0] == 23456 and plain[2][0] == 24000  # the ties at task 0's answer
    assert want[3] == 0 and plain[2][3] == int(dropped.sum())

    def first_digits(tensors_base, tensors_experts):
        return ops.magnitude_histogram(
            tensors_base, tensors_experts, torch.zeros(4, dtype=torch.int64), 15, 16
        )

    sample = first_digits(base[::16], [e[::16] for e in experts])
    far = first_digits(base[::16], [base[::16] + 8 * (e[::16] - base[::16]) for e in experts])
    for case, passes in [
        (dict(sample=sample), 1),
        (dict(sample=far), 2),
        (dict(sample=sample, limit_in_pass=100), 2),
    ]:
        got = select(**case)
        assert torch.equal(got[0], want) and got[1:3] == plain[1:3], case
        assert got[3] == passes, case
    monkeypatch.setattr(select_module, "WINDOW_COLLECT_LIMIT", 100)
    selector = KthLargestMagnitude(ks, torch.float32, collect_limit=-1)
    selector.plan_window(sample, int(sample.sum()) // 4, total)
    # Task 0's answer's digit alone holds 24000 entries: no window; the others' hold a few
    # (task 3's zeros are not collected).
    low, high = selector.histogram_window()
    assert low[0] == high[0] == 1 << 16 and bool((low[1:] <= high[1:]).all())
    assert high[1] == (1 << 16) - 1 and low[2] == 0  # past the sample's extremes: every digit
    assert low[3] == 0


def test_splitmix64_matches_the_reference_generator():
    # SplitMix64 (Steele, Lea and Flood 2014) written with Python's exact integers.
    def reference(key, index):
        mask = (1 << 64) - 1
        z = (key + (index + 1) * 0x9E3779B97F4A7C15) & mask
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        z ^= z >> 31
        return (z >> 11) * 2.0**-53

    rng = random.Random(1)
    keys = [0, 1, (1 << 63) - 1, rng.getrandbits(63)]
    indices = [0, 1, 2, 10**6, (1 << 40) + 3]
    for key in keys:
        got = splitmix64_uniform(key, torch.tensor(indices, dtype=torch.int64))
        assert got.tolist() == [reference(key, i) for i in indices]
    # A million draws look uniform: mean 1/2, variance 1/12 (5 sd bounds).
    draws = splitmix64_uniform(12345, torch.arange(10**6))
    assert abs(float(draws.mean()) - 0.5) < 5 * math.sqrt(1 / 12 / 10**6)
    assert abs(float(draws.var()) - 1 / 12) < 1e-3


def test_all_finite_shortcut_is_exact():
    from r2m_ext.engine.inputs import all_finite

    assert all_finite(torch.ones(1000))
    for bad in (float("nan"), float("inf"), float("-inf")):
        values = torch.ones(1000)
        values[567] = bad
        assert not all_finite(values)
    # Finite values whose sum overflows: the shortcut says "maybe", the elementwise check "yes".
    assert all_finite(torch.full((4,), 60000.0, dtype=torch.float16))
    assert all_finite(torch.full((4,), 3e38))
    assert not all_finite(torch.tensor([3e38, 3e38, float("nan")]))


def _layout(sizes):
    return [(f"t{i}", (rows, 4), torch.float32) for i, rows in enumerate(sizes)]


def test_write_behind_holds_at_most_its_allowance_and_writes_the_same_bytes(tmp_path):
    layout = _layout([2, 8, 1, 3])  # 32, 128, 16 and 48 bytes
    tensors = {name: torch.randn(shape) for name, shape, _ in layout}
    outputs = []
    for behind in (0, 64):
        out = tmp_path / f"behind-{behind}"
        with ShardWriter(out, layout, 100, {"run": 1}, write_behind=behind) as writer:
            for name, tensor in tensors.items():
                writer.write(name, tensor)
                # t1 (128 B) exceeds the 64 B allowance: it is on disk before write returns.
                assert writer.queued_bytes <= behind
                assert writer.queued_bytes == 0 or name != "t1"
        outputs.append({p.name: p.read_bytes() for p in out.iterdir() if p.name != MANIFEST_FILE})
    assert outputs[0] == outputs[1] and len(outputs[0]) == 4  # 3 shards and the index
    for name, tensor in read_dir(tmp_path / "behind-64").items():
        assert torch.equal(tensor, tensors[name])


def test_a_failed_write_on_the_writer_thread_reaches_the_caller_and_leaves_nothing(
    tmp_path, monkeypatch
):
    layout = _layout([2, 2, 2])
    out = tmp_path / "failing"
    writes = []

    def disk_full_after_two_writes(fd, data, offset):  # the header and t0's bytes, then ENOSPC
        writes.append(threading.current_thread().name)
        if len(writes) > 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        os.pwrite(fd, data, offset)

    monkeypatch.setattr(writer_module, "_write_all", disk_full_after_two_writes)
    with pytest.raises(R2MError, match="write failed \\(No space left on device\\)"):
        with ShardWriter(out, layout, 1000, {"run": 1}, write_behind=1000) as writer:
            for name in ("t0", "t1", "t2"):
                writer.write(name, torch.zeros(2, 4))
    assert all(name.startswith("r2m-write") for name in writes)
    assert not out.exists() and not partial_dir(out).exists()


def test_the_reader_moves_past_a_tensor_too_large_to_read_ahead():
    read = []

    def reader(name):
        return lambda: (read.append(name) or [torch.zeros(1)], None)

    prefetcher = _Prefetcher(1, 50)
    prefetcher.plan(
        [
            (name, size, reader(name))
            for name, size in (("a", 10), ("big", 100), ("b", 10), ("c", 10))
        ]
    )
    assert prefetcher.take("a") is not None
    assert prefetcher.take("big") is None  # the caller reads it itself
    assert prefetcher.take("b") is not None and prefetcher.take("c") is not None
    prefetcher.close()
    assert "big" not in read


@pytest.mark.parametrize("raw_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.float64])
def test_task_vectors_formed_while_stacking_have_the_bits_of_stack_then_subtract(
    raw_dtype, compute_dtype
):
    g = torch.Generator().manual_seed(5)
    raw = [torch.randn(33, 17, generator=g).to(raw_dtype) for _ in range(4)]
    raw[2][3, 4] = float("inf")  # as allow_nonfinite lets through: Inf - x and x - x alike
    want_base, experts = MergeInputs._stack(SimpleNamespace(compute_dtype=compute_dtype), raw)
    # Into fresh memory, and into a kept host buffer that still holds an earlier stack's bytes.
    pool = HostBuffers(retain_bytes=1 << 20)
    stale = pool.take(3 * 33 * 17 * compute_dtype.itemsize)
    stale.fill_(0xFF)  # NaN in every float dtype
    del stale
    assert pool.free_bytes > 0
    for workspace in (None, pool):
        source = SimpleNamespace(
            compute_dtype=compute_dtype,
            _workspace=workspace,
            n_experts=3,
            device=torch.device("cpu"),
        )
        source.empty_stack = lambda shape, source=source: MergeInputs.empty_stack(source, shape)
        base, tau = MergeInputs._stack(source, raw, task_vectors=True)
        assert tau.dtype == compute_dtype and tau.shape == (3, 33, 17)
        assert torch.equal(base, want_base)
        assert torch.equal(tau, experts - want_base)
    assert pool.free_bytes == 0  # the stack is in the kept buffer while tau lives
    del tau
    assert pool.free_bytes > 0


def test_report_prints_the_gpu_peak_of_each_pass():
    from r2m_ext.report import format_report

    memory = {"max_memory": 4 * 10**9, "peak_accounted": 3 * 10**9, "peak_rss": 10**9}
    memory["device_peak_after_pass"] = {"R²M gram pass": 1_821_918_208, "R²M write pass": 2 * 10**9}
    text = format_report({"method": "r2m", "memory": memory})
    assert "GPU memory peak after each pass: R²M gram pass 1.82 GB, R²M write pass 2.00 GB" in text
    assert "GPU memory" not in format_report(
        {"method": "r2m", "memory": {**memory, "device_peak_after_pass": {}}}
    )


@pytest.mark.parametrize("budget", [None, "24kB"])
def test_global_ties_thresholds_from_native_histograms_are_the_selector_s(files, budget, tmp_path):
    # The two histogram passes over raw inputs give the exact k-th largest magnitudes: the merge
    # equals the one whose thresholds come from torch.kthvalue over every magnitude at once.
    import r2m_ext.methods.ties as ties

    _, base, experts, base_path, expert_paths = files
    got = read_dir(
        r2m_ext.merge_files(
            base_path, expert_paths, tmp_path / "native", "ties", density=0.3, max_memory=budget
        )
    )
    body = [n for n, v in base.items() if v.is_floating_point() and not n.startswith("head")]
    magnitudes = torch.cat(
        [
            torch.stack([e[n].float() - base[n].float() for e in experts]).abs().flatten(1)
            for n in body
        ],
        dim=1,
    )
    thresholds = ties._per_task_kth_largest(magnitudes, 0.3)
    want = {}
    for name in body:
        tau = torch.stack([e[name].float() - base[name].float() for e in experts])
        want[name] = (base[name].float() + ties.ties_combine(tau, thresholds)).to(base[name].dtype)
    for name in body:
        assert torch.equal(got[name], want[name]), name
