"""GPU benchmarks of the native ops and the merge on one device, every speed a ratio to a baseline
measured in the same run (../../shared/PERFORMANCE.md):

- ceilings: device-to-device copy bandwidth and the bf16 matrix-product rate;
- randomized_svd, N=8 matrices 4096x4096, bf16 input, rank 128, vs torch.svd_lowrank on the same
  float32 data (same rank, oversample, iterations) vs a loop of torch.linalg.svd (and of
  cupy.linalg.svd where CuPy is present); error ratios to the exact truncation;
- delta_gram and combine with N=8 resident bf16 inputs, as a fraction of the copy bandwidth;
- R²M in memory on a 1B-parameter decoder-shaped model (bf16, N=8) with the tensors on the GPU,
  and on the first layers of it: native randomized vs the pure-torch exact path on the GPU (what
  users wait for today; a subprocess with R2M_EXT_BACKEND=torch);
- streaming: `merge_files(device="cuda", max_memory="4GB")` of such checkpoints on disk
  (make_checkpoints.py, page cache warm) against the I/O floor measured in the same run, its peak
  GPU memory, and its output against the CPU merge of the same files, tensor by tensor.

Timing: CUDA events around the region, warm-up first, median of repeats. Inputs are random
(never zeros). After every part, gpu_<parts>.json and .md in --out hold what has run so far.
`--smoke` runs every part at toy sizes on whatever device there is (CPU in CI): it checks this
script, not the speed."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import bench_streaming  # noqa: E402
import make_checkpoints  # noqa: E402

import r2m_ext  # noqa: E402
from r2m_ext import ops  # noqa: E402
from r2m_ext._backend import backend_info  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
FULL = {
    "copy_numel": 2**29,  # 2 GiB of float32
    "matmul": 8192,
    "svd": (8, 4096, 128),  # batch, size, rank
    "bandwidth_numel": 2**28,
    "architecture": "decoder_1b",
    "exact_layers": 1,
    "max_memory": "4GB",
}
SMOKE = {
    "copy_numel": 2**16,
    "matmul": 64,
    "svd": (2, 96, 8),
    "bandwidth_numel": 2**12,
    "architecture": "decoder_tiny",
    "exact_layers": 1,
    "max_memory": "1MB",
}
EXPERTS = 8


def timed(function, repeat: int = 10, warmup: int = 2) -> float:
    """Median seconds of `function`: CUDA events on the current stream, or the host clock."""
    for _ in range(warmup):
        function()
    times = []
    for _ in range(repeat):
        if DEVICE.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            function()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            started = time.perf_counter()
            function()
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def synchronize() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def peak_device_bytes() -> int | None:
    return torch.cuda.max_memory_allocated() if DEVICE.type == "cuda" else None


def reset_peak() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def ceilings(size: dict) -> dict:
    source = torch.randn(size["copy_numel"], device=DEVICE)
    target = torch.empty_like(source)
    copy_s = timed(lambda: target.copy_(source))
    n = size["matmul"]
    a = torch.randn(n, n, device=DEVICE, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=DEVICE, dtype=torch.bfloat16)
    matmul_s = timed(lambda: a @ b)
    return {
        "copy_bytes_per_s": 2 * source.numel() * 4 / copy_s,
        "bf16_matmul_flops": 2 * n**3 / matmul_s,
    }


def exact_tail_error(singular_values: torch.Tensor, rank: int) -> torch.Tensor:
    return singular_values[..., rank:].double().pow(2).sum(-1).sqrt()


def svd_benchmark(size: dict) -> dict:
    batch, n, rank = size["svd"]
    generator = torch.Generator(device=DEVICE).manual_seed(0)
    # A decaying spectrum (sigma_j = j^-1) under random rotations: the task-vector-like case.
    left = torch.linalg.qr(torch.randn(batch, n, n, device=DEVICE, generator=generator))[0]
    right = torch.linalg.qr(torch.randn(batch, n, n, device=DEVICE, generator=generator))[0]
    sigma = 1.0 / torch.arange(1, n + 1, device=DEVICE, dtype=torch.float32)
    bf16 = ((left * sigma) @ right.mT).to(torch.bfloat16)
    data = bf16.float()  # the same numbers for every method
    oversample, n_iter = ops.DEFAULT_OVERSAMPLE, ops.DEFAULT_N_ITER

    ours_s = timed(lambda: ops.randomized_svd(bf16, rank, oversample, n_iter), repeat=5)
    theirs_s = timed(lambda: torch.svd_lowrank(data, q=rank + oversample, niter=n_iter), repeat=5)
    # One warm-up decomposition so the solver's handles and workspace are not in the loop.
    torch.linalg.svd(data[0], full_matrices=False)
    synchronize()
    started = time.perf_counter()
    exact = [torch.linalg.svd(m, full_matrices=False) for m in data]
    synchronize()
    loop_s = time.perf_counter() - started
    result = {"cupy_svd_loop_s": None}
    if DEVICE.type == "cuda":
        try:
            import cupy
        except ImportError:
            cupy = None
        if cupy is not None:
            matrices = [cupy.asarray(m) for m in data]
            cupy.linalg.svd(matrices[0], full_matrices=False)
            cupy.cuda.Device().synchronize()
            started = time.perf_counter()
            for m in matrices:
                cupy.linalg.svd(m, full_matrices=False)
            cupy.cuda.Device().synchronize()
            result["cupy_svd_loop_s"] = time.perf_counter() - started

    s_exact = torch.stack([s for _, s, _ in exact])
    floor = exact_tail_error(s_exact, rank)

    def ratio(u, s, v):
        low = (u[..., :rank] * s[..., None, :rank]) @ v[..., :rank].mT
        return ((data.double() - low.double()).norm(dim=(-2, -1)) / floor).max().item()

    u, s, v = ops.randomized_svd(bf16, rank, oversample, n_iter)
    tu, ts, tv = torch.svd_lowrank(data, q=rank + oversample, niter=n_iter)
    return {
        **result,
        "shape": [batch, n, n],
        "rank": rank,
        "oversample": oversample,
        "n_iter": n_iter,
        "randomized_svd_s": ours_s,
        "torch_svd_lowrank_s": theirs_s,
        "linalg_svd_loop_s": loop_s,
        "speedup_vs_svd_lowrank": theirs_s / ours_s,
        "speedup_vs_svd_loop": loop_s / ours_s,
        "speedup_vs_cupy_svd_loop": (
            result["cupy_svd_loop_s"] / ours_s if result["cupy_svd_loop_s"] else None
        ),
        "error_ratio_randomized_svd": ratio(u, s, v),
        "error_ratio_svd_lowrank": ratio(tu, ts, tv),
        "top_singular_value_relative_error": (
            (s[..., 0].double() - s_exact[..., 0].double()).abs() / s_exact[..., 0].double()
        )
        .max()
        .item(),
    }


def bandwidth_benchmark(size: dict, copy_bytes_per_s: float) -> dict:
    numel = size["bandwidth_numel"]
    generator = torch.Generator(device=DEVICE).manual_seed(1)
    base = torch.randn(numel, device=DEVICE, generator=generator).to(torch.bfloat16)
    inputs = [
        (base.float() + 0.01 * torch.randn(numel, device=DEVICE, generator=generator)).to(
            torch.bfloat16
        )
        for _ in range(EXPERTS)
    ]
    read_bytes = (EXPERTS + 1) * numel * 2
    gram_s = timed(lambda: ops.delta_gram(base, inputs), repeat=5)
    weights = torch.full((1, EXPERTS), 1.0 / EXPERTS, dtype=torch.float64)
    combine_s = timed(
        lambda: ops.combine(base, inputs, weights, 1.0, torch.float32, torch.bfloat16), repeat=5
    )
    # Correctness beside the timing: the Gram of a slice against float64 on the same inputs.
    part = min(numel, 2**24)
    deltas = torch.stack([(x.double() - base.double())[:part] for x in inputs])
    want = deltas @ deltas.T
    check = ops.delta_gram(base[:part], [x[:part] for x in inputs])
    return {
        "experts": EXPERTS,
        "numel": numel,
        "delta_gram_s": gram_s,
        "delta_gram_fraction_of_copy": read_bytes / gram_s / copy_bytes_per_s,
        "combine_s": combine_s,
        "combine_fraction_of_copy": (read_bytes + numel * 2) / combine_s / copy_bytes_per_s,
        "delta_gram_relative_error": ((check.to(want) - want).norm() / want.norm()).item(),
        "gram_finite": bool(torch.isfinite(ops.delta_gram(base, inputs)).all()),
    }


def decoder_states(architecture: str, layers: int | None = None, seed: int = 2):
    """Base and EXPERTS experts (bf16, on DEVICE) with the architecture's names and shapes; with
    `layers`, only the matrices and norms of its first `layers` layers. Same seed, same numbers,
    so two processes build the same model."""
    shapes = make_checkpoints.ARCHITECTURES[architecture]()
    if layers is not None:
        prefixes = tuple(f"model.layers.{i}." for i in range(layers))
        shapes = {k: v for k, v in shapes.items() if k.startswith(prefixes)}
    generator = torch.Generator(device=DEVICE).manual_seed(seed)
    base = {
        name: (0.02 * torch.randn(shape, device=DEVICE, generator=generator)).to(torch.bfloat16)
        for name, shape in shapes.items()
    }
    experts = [
        {
            name: (
                value.float() + 1e-3 * torch.randn(value.shape, device=DEVICE, generator=generator)
            ).to(torch.bfloat16)
            for name, value in base.items()
        }
        for _ in range(EXPERTS)
    ]
    return base, experts


def timed_merge(base, experts, **options) -> float:
    synchronize()
    started = time.perf_counter()
    r2m_ext.merge(base, experts, "r2m", **options)
    synchronize()
    return time.perf_counter() - started


def merge_benchmark(size: dict) -> dict:
    reset_peak()
    base, experts = decoder_states(size["architecture"])
    resident = peak_device_bytes()
    seconds = timed_merge(base, experts)
    result = {
        "parameters": sum(v.numel() for v in base.values()),
        "experts": EXPERTS,
        "r2m_in_memory_s": seconds,
        "inputs_bytes": resident,
        "peak_gpu_bytes": peak_device_bytes(),
    }
    del base, experts
    reset_peak()
    # The first layers alone, where the exact path finishes in minutes: same inputs in both runs.
    layers = size["exact_layers"]
    base, experts = decoder_states(size["architecture"], layers)
    timed_merge(base, experts)  # warm-up: kernels loaded, allocator filled
    native_s = timed_merge(base, experts)
    worker = subprocess.run(
        [sys.executable, __file__, "--exact-worker", size["architecture"], str(layers)],
        env={**os.environ, "R2M_EXT_BACKEND": "torch"},
        capture_output=True,
        text=True,
    )
    if worker.returncode != 0:
        raise RuntimeError(f"the exact-path worker failed:\n{worker.stderr[-3000:]}")
    exact = json.loads(worker.stdout.strip().splitlines()[-1])
    total_layers = sum(
        1
        for k in make_checkpoints.ARCHITECTURES[size["architecture"]]()
        if k.endswith("q_proj.weight")
    )
    return {
        **result,
        "subset": f"layers 0-{layers - 1} of {total_layers} (no embeddings)",
        "subset_native_randomized_s": native_s,
        "subset_torch_exact_s": exact["seconds"],
        "subset_torch_exact_backend": exact["backend"],
        "subset_speedup": exact["seconds"] / native_s,
    }


def exact_worker(architecture: str, layers: int) -> None:
    """Runs in a subprocess with R2M_EXT_BACKEND=torch: the pure-torch exact R²M, timed."""
    base, experts = decoder_states(architecture, layers)
    timed_merge(base, experts, svd="exact")  # warm-up
    seconds = timed_merge(base, experts, svd="exact")
    print(json.dumps({"seconds": seconds, "backend": backend_info()}))


def compare_outputs(got: Path, want: Path) -> dict:
    """Relative Frobenius difference per tensor between two merged outputs (HF directories)."""
    from safetensors import safe_open

    def tensors(directory: Path):
        for file in sorted(directory.glob("*.safetensors")):
            with safe_open(str(file), "pt") as handle:
                for name in handle.keys():  # safe_open has keys(), no __iter__
                    yield name, handle.get_tensor(name)

    expected = dict(tensors(want))
    differences = {}
    for name, value in tensors(got):
        reference = expected.pop(name).double()
        scale = reference.norm().item() or 1.0
        differences[name] = (value.double() - reference).norm().item() / scale
    if expected:
        raise RuntimeError(f"{got}: tensors missing: {sorted(expected)[:5]}")
    ordered = sorted(differences.values())
    worst = max(differences, key=differences.get)
    return {
        "tensors": len(ordered),
        "max_relative_difference": ordered[-1],
        "median_relative_difference": ordered[len(ordered) // 2],
        "worst_tensor": worst,
        "tensors_over_1e-4": sum(d > 1e-4 for d in ordered),
    }


def streaming_benchmark(size: dict, workdir: Path) -> dict:
    """Average and R²M streamed from disk on the GPU vs the I/O floor (inputs in the page cache:
    the floor's first read warms it), peak GPU memory against the budget, and the outputs
    against the CPU merges of the same files."""
    architecture = size["architecture"]
    checkpoints = workdir / f"{architecture}_bf16"
    if not (checkpoints / "checkpoints.json").exists():
        started = time.perf_counter()
        make_checkpoints.make(
            architecture, EXPERTS, "bfloat16", checkpoints, jobs=min(EXPERTS + 1, os.cpu_count())
        )
        print(f"checkpoints written in {time.perf_counter() - started:.0f} s", flush=True)
    inputs = sorted(checkpoints.glob("*/*.safetensors"))
    output_bytes = sum(p.stat().st_size for p in (checkpoints / "base").glob("*.safetensors"))
    bench_streaming.io_floor(inputs, output_bytes, workdir / "scratch")  # warms the page cache
    floor = min(
        bench_streaming.io_floor(inputs, output_bytes, workdir / "scratch") for _ in range(2)
    )
    result = {
        "input_bytes": sum(p.stat().st_size for p in inputs),
        "io_floor_s": floor,
        "max_memory": size["max_memory"],
    }
    expert_dirs = [checkpoints / f"expert_{i}" for i in range(EXPERTS)]

    def merge(
        method: str, device: str, max_memory: str | None, label: str, **options
    ) -> tuple[Path, float]:
        out = workdir / f"merged_{method}_{label}"
        started = time.perf_counter()
        r2m_ext.merge_files(
            checkpoints / "base",
            expert_dirs,
            out,
            method,
            overwrite=True,
            device=device,
            max_memory=max_memory,
            report=reports.setdefault((method, label), {}),
            **options,
        )
        return out, time.perf_counter() - started

    reports = {}

    # R²M's factors beyond the GPU budget in page-locked host memory (the default), and with
    # no host tier, through the scratch file; the same bits either way.
    for method, label, options in (
        ("average", "device", {}),
        ("r2m", "device", {}),
        ("r2m", "scratch", {"host_memory": "0"}),
    ):
        reset_peak()
        out, seconds = merge(method, DEVICE.type, size["max_memory"], label, **options)
        report = reports[method, label]
        result[method if label == "device" else f"{method}_{label}"] = {
            "wall_s": seconds,
            "wall_over_floor": seconds / floor,
            "peak_gpu_bytes": peak_device_bytes(),
            # Where the time and the device memory went, pass by pass.
            "timings_s": report.get("timings_s"),
            "memory": report.get("memory"),
            "tiled_tensors": report.get("tiled_tensors"),
            # Where R²M's truncation factors were kept, and how often each matrix was factored.
            "factors": {
                tier: report[key]
                for tier, key in bench_streaming.FACTOR_TIERS.items()
                if key in report
            },
            "factorisations": report.get("factorisations"),
        }
        print(f"{method} ({label}) on {DEVICE.type}: {seconds:.1f} s", flush=True)
    result["r2m_scratch"]["same_bits_as_host_tier"] = (
        compare_outputs(workdir / "merged_r2m_scratch", workdir / "merged_r2m_device")[
            "max_relative_difference"
        ]
        == 0.0
    )
    # The CPU merges of the same files (default budget), the reference the GPU must match.
    for method in ("average", "r2m"):
        out, seconds = merge(method, "cpu", None, "cpu")
        result[method]["cpu_wall_s"] = seconds
        result[method]["vs_cpu"] = compare_outputs(workdir / f"merged_{method}_device", out)
        print(f"{method} on cpu: {seconds:.1f} s", flush=True)
    return result


def machine_facts() -> dict:
    def command(*args):
        try:
            return subprocess.run(args, capture_output=True, text=True, timeout=30).stdout.strip()
        except OSError:
            return None

    return {
        "gpu": torch.cuda.get_device_name(0) if DEVICE.type == "cuda" else "none (CPU)",
        "driver": command("nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "cpu_cores": os.cpu_count(),
        "backend": backend_info(),
    }


def _gb(value) -> str:
    return "n/a" if value is None else f"{value / 1e9:.2f} GB"


def table(result: dict, commit: str) -> list[str]:
    machine = result["machine"]
    lines = [
        f"# GPU benchmarks, {machine['gpu']}, {result['date']}, commit {commit}",
        "",
        f"torch {machine['torch']} (CUDA {machine['cuda']}), driver {machine['driver']}, "
        f"{machine['cpu_cores']} CPU cores; {machine['backend']}",
        "",
    ]
    ceiling = result.get("ceilings")
    if ceiling:
        lines += [
            f"Ceilings measured in this run: copy {ceiling['copy_bytes_per_s'] / 1e12:.2f} TB/s "
            f"(bytes read + written), bf16 matmul {ceiling['bf16_matmul_flops'] / 1e12:.0f} "
            "TFLOP/s",
            "",
        ]
    lines += ["| measurement | value | target |", "|---|---|---|"]

    def failed(part):
        entry = result.get(part)
        if entry is None:
            lines.append(f"| {part} | not run | |")
        elif "error" in entry:
            lines.append(f"| {part} | failed: {entry['error']} | |")
        else:
            return False
        return True

    svd = result.get("randomized_svd")
    if not failed("randomized_svd"):
        b, m, n = svd["shape"]
        cupy_ratio = svd["speedup_vs_cupy_svd_loop"]
        lines += [
            f"| randomized_svd {b}x{m}x{n}, bf16, rank {svd['rank']} (oversample "
            f"{svd['oversample']}, {svd['n_iter']} iterations) | {svd['randomized_svd_s'] * 1e3:.2f}"
            " ms | |",
            f"| torch.svd_lowrank, same fp32 data and settings | "
            f"{svd['torch_svd_lowrank_s'] * 1e3:.2f} ms = **{svd['speedup_vs_svd_lowrank']:.2f}x** "
            "ours | >= 3x |",
            f"| loop of torch.linalg.svd | {svd['linalg_svd_loop_s']:.2f} s = "
            f"**{svd['speedup_vs_svd_loop']:.0f}x** ours | >= 100x |",
            "| loop of cupy.linalg.svd | "
            + (
                "CuPy not present"
                if cupy_ratio is None
                else f"{svd['cupy_svd_loop_s']:.2f} s = {cupy_ratio:.0f}x ours"
            )
            + " | |",
            f"| error ratio to exact truncation, ours / svd_lowrank | "
            f"{svd['error_ratio_randomized_svd']:.4f} / {svd['error_ratio_svd_lowrank']:.4f} | "
            "<= 1.02 |",
            f"| top singular value, relative error | "
            f"{svd['top_singular_value_relative_error']:.1e} | |",
        ]
    band = result.get("bandwidth")
    if not failed("bandwidth"):
        lines += [
            f"| delta_gram, N={band['experts']} resident bf16 inputs of {band['numel']:,} "
            f"elements | {band['delta_gram_s'] * 1e3:.2f} ms = "
            f"**{band['delta_gram_fraction_of_copy']:.2f}** of copy bandwidth | >= 0.8 |",
            f"| combine, same inputs, bf16 out | {band['combine_s'] * 1e3:.2f} ms = "
            f"{band['combine_fraction_of_copy']:.2f} of copy bandwidth | |",
            f"| delta_gram relative error vs float64 | {band['delta_gram_relative_error']:.1e} | |",
        ]
    merge = result.get("r2m_merge")
    if not failed("r2m_merge"):
        lines += [
            f"| R²M in memory, {merge['parameters'] / 1e9:.2f}B decoder bf16, N={merge['experts']}"
            f", on the GPU | {merge['r2m_in_memory_s']:.1f} s, peak {_gb(merge['peak_gpu_bytes'])}"
            f" (inputs {_gb(merge['inputs_bytes'])}) | |",
            f"| same, {merge['subset']}: native randomized vs pure-torch exact on the GPU | "
            f"{merge['subset_native_randomized_s']:.2f} s vs {merge['subset_torch_exact_s']:.2f} s"
            f" = {merge['subset_speedup']:.0f}x | |",
        ]
    streaming = result.get("streaming")
    if not failed("streaming"):
        floor = streaming["io_floor_s"]
        lines.append(
            f"| I/O floor: read {_gb(streaming['input_bytes'])} + write the output | "
            f"{floor:.2f} s | |"
        )
        for method in ("average", "r2m"):
            entry = streaming[method]
            versus = entry["vs_cpu"]
            lines += [
                f"| {method} streamed, GPU, --max-memory {streaming['max_memory']} | "
                f"{entry['wall_s']:.1f} s = **{entry['wall_over_floor']:.2f}x** the floor, "
                f"peak {_gb(entry['peak_gpu_bytes'])} | "
                + ("<= 1.25x, <= 4 GB" if method == "r2m" else "")
                + " |",
                f"| {method}: GPU output vs CPU merge ({entry['cpu_wall_s']:.1f} s) | max "
                f"{versus['max_relative_difference']:.1e} ({versus['worst_tensor']}), median "
                f"{versus['median_relative_difference']:.1e}, {versus['tensors_over_1e-4']} of "
                f"{versus['tensors']} over 1e-4 | |",
            ]
        write_pass = "R²M write pass"
        for key, label in (("r2m", "host tier (default)"), ("r2m_scratch", "--host-memory 0")):
            entry = streaming[key]
            tiers = ", ".join(f"{tier} {count}" for tier, count in entry["factors"].items())
            lines.append(
                f"| r2m, {label}: factors per tier {tiers}; write pass "
                f"{entry['timings_s'][write_pass]:.1f} s = "
                f"{entry['timings_s'][write_pass] / streaming['average']['wall_s']:.2f}x "
                f"`average`'s wall | {entry['wall_s']:.1f} s | write pass <= 1.5x |"
            )
        lines.append(
            "| r2m: scratch-tier output bitwise the host tier's | "
            f"{streaming['r2m_scratch']['same_bits_as_host_tier']} | True |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--commit", default="unknown")
    parser.add_argument(
        "--parts", default="ops,streaming", help="ops, streaming or both (comma-separated)"
    )
    parser.add_argument(
        "--workdir", type=Path, default=Path("/tmp/r2m_gpu"), help="checkpoints for streaming"
    )
    parser.add_argument("--smoke", action="store_true", help="toy sizes: checks the script")
    parser.add_argument("--exact-worker", nargs=2, metavar=("ARCHITECTURE", "LAYERS"))
    args = parser.parse_args()
    if args.exact_worker:
        exact_worker(args.exact_worker[0], int(args.exact_worker[1]))
        return
    if args.out is None:
        parser.error("--out is required")
    size = SMOKE if args.smoke else FULL
    chosen = set(args.parts.split(","))
    unknown = chosen - {"ops", "streaming"}
    if unknown:
        parser.error(f"unknown parts {sorted(unknown)}: expected ops, streaming")
    result = {"machine": machine_facts(), "commit": args.commit, "date": time.strftime("%Y-%m-%d")}
    result["ceilings"] = ceilings(size)
    copy = result["ceilings"]["copy_bytes_per_s"]
    runs = []
    if "ops" in chosen:
        runs += [
            ("randomized_svd", lambda: svd_benchmark(size)),
            ("bandwidth", lambda: bandwidth_benchmark(size, copy)),
            ("r2m_merge", lambda: merge_benchmark(size)),
        ]
    if "streaming" in chosen:
        runs.append(("streaming", lambda: streaming_benchmark(size, args.workdir)))
    stem = "gpu_" + "_".join(sorted(chosen)) + ("_smoke" if args.smoke else "")
    for name, run in runs:
        print(f"== {name}", flush=True)
        try:
            result[name] = run()
        except Exception as error:  # one failing part must not hide the others' numbers
            result[name] = {
                "error": f"{type(error).__name__}: {error}",
                "trace": traceback.format_exc(),
            }
            print(result[name]["trace"], flush=True)
        if DEVICE.type == "cuda":
            torch.cuda.empty_cache()
        # Written after every part: a call cut short still leaves what it measured.
        bench_streaming.write_results(args.out, stem, result, table(result, args.commit))
    failures = [name for name, _ in runs if "error" in result[name]]
    if failures:
        sys.exit(f"failed parts: {', '.join(failures)}")


if __name__ == "__main__":
    main()
