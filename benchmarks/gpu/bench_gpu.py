"""GPU benchmarks of the native ops on one device, every speed a ratio to a baseline measured in
the same run (../../shared/PERFORMANCE.md):

- ceilings: device-to-device copy bandwidth and the bf16 matrix-product rate;
- randomized_svd, N=8 matrices 4096x4096, bf16 input, rank 128, vs torch.svd_lowrank on the same
  float32 data (same rank, oversample, iterations) vs a loop of torch.linalg.svd; error ratios to
  the exact truncation;
- delta_gram and combine with N=8 resident bf16 inputs, as a fraction of the copy bandwidth;
- R²M in memory on a 1B-parameter decoder-shaped model (bf16, N=8) with the tensors on the GPU;
- streaming: `r2m merge --device cuda` of such checkpoints on disk (make_checkpoints.py, page
  cache warm) against the I/O floor measured in the same run (target: wall <= 1.25x floor).

Timing: CUDA events around the region, warm-up first, median of repeats. Inputs are random
(never zeros). Writes gpu_<parts>.json and .md into --out."""

from __future__ import annotations

import argparse
import json
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


def cuda_time(function, repeat: int = 10, warmup: int = 2) -> float:
    """Median seconds of `function` on the current stream, timed with CUDA events."""
    for _ in range(warmup):
        function()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        function()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def ceilings() -> dict:
    source = torch.randn(2**30 // 4 * 2, device="cuda")  # 2 GiB float32
    target = torch.empty_like(source)
    copy_s = cuda_time(lambda: target.copy_(source))
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    matmul_s = cuda_time(lambda: a @ b)
    return {
        "copy_bytes_per_s": 2 * source.numel() * 4 / copy_s,
        "bf16_matmul_flops": 2 * 8192**3 / matmul_s,
    }


def exact_tail_error(singular_values: torch.Tensor, rank: int) -> torch.Tensor:
    return singular_values[..., rank:].double().pow(2).sum(-1).sqrt()


def svd_benchmark(rank: int = 128, size: int = 4096, batch: int = 8) -> dict:
    generator = torch.Generator(device="cuda").manual_seed(0)
    # A decaying spectrum (sigma_j = j^-1) under random rotations: the task-vector-like case.
    left = torch.linalg.qr(torch.randn(batch, size, size, device="cuda", generator=generator))[0]
    right = torch.linalg.qr(torch.randn(batch, size, size, device="cuda", generator=generator))[0]
    sigma = 1.0 / torch.arange(1, size + 1, device="cuda", dtype=torch.float32)
    matrices = (left * sigma) @ right.mT
    bf16 = matrices.to(torch.bfloat16)
    data = bf16.float()  # the same numbers for every method
    oversample, n_iter = ops.DEFAULT_OVERSAMPLE, ops.DEFAULT_N_ITER

    ours_s = cuda_time(lambda: ops.randomized_svd(bf16, rank, oversample, n_iter), repeat=5)
    theirs_s = cuda_time(
        lambda: torch.svd_lowrank(data, q=rank + oversample, niter=n_iter), repeat=5
    )
    started = time.perf_counter()
    exact = [torch.linalg.svd(m, full_matrices=False) for m in data]
    torch.cuda.synchronize()
    loop_s = time.perf_counter() - started

    s_exact = torch.stack([s for _, s, _ in exact])
    floor = exact_tail_error(s_exact, rank)

    def ratio(u, s, v):
        low = (u[..., :rank] * s[..., None, :rank]) @ v[..., :rank].mT
        return ((data.double() - low.double()).norm(dim=(-2, -1)) / floor).max().item()

    u, s, v = ops.randomized_svd(bf16, rank, oversample, n_iter)
    tu, ts, tv = torch.svd_lowrank(data, q=rank + oversample, niter=n_iter)
    return {
        "shape": [batch, size, size],
        "rank": rank,
        "oversample": oversample,
        "n_iter": n_iter,
        "randomized_svd_s": ours_s,
        "torch_svd_lowrank_s": theirs_s,
        "linalg_svd_loop_s": loop_s,
        "speedup_vs_svd_lowrank": theirs_s / ours_s,
        "speedup_vs_svd_loop": loop_s / ours_s,
        "error_ratio_randomized_svd": ratio(u, s, v),
        "error_ratio_svd_lowrank": ratio(tu, ts, tv),
    }


def bandwidth_benchmark(copy_bytes_per_s: float, experts: int = 8, numel: int = 2**28) -> dict:
    generator = torch.Generator(device="cuda").manual_seed(1)
    base = torch.randn(numel, device="cuda", generator=generator).to(torch.bfloat16)
    inputs = [
        (base.float() + 0.01 * torch.randn(numel, device="cuda", generator=generator)).to(
            torch.bfloat16
        )
        for _ in range(experts)
    ]
    read_bytes = (experts + 1) * numel * 2
    gram_s = cuda_time(lambda: ops.delta_gram(base, inputs), repeat=5)
    weights = torch.full((1, experts), 1.0 / experts, dtype=torch.float64)
    combine_s = cuda_time(
        lambda: ops.combine(base, inputs, weights, 1.0, torch.float32, torch.bfloat16), repeat=5
    )
    # Correctness beside the timing: the Gram against float64 on the same inputs.
    gram = ops.delta_gram(base, inputs)
    deltas = torch.stack([(x.double() - base.double())[: 2**24] for x in inputs])
    check = ops.delta_gram(base[: 2**24], [x[: 2**24] for x in inputs])
    gram_error = ((check - deltas @ deltas.T).norm() / (deltas @ deltas.T).norm()).item()
    return {
        "experts": experts,
        "numel": numel,
        "delta_gram_s": gram_s,
        "delta_gram_fraction_of_copy": read_bytes / gram_s / copy_bytes_per_s,
        "combine_s": combine_s,
        "combine_fraction_of_copy": (read_bytes + numel * 2) / combine_s / copy_bytes_per_s,
        "delta_gram_relative_error": gram_error,
        "gram_finite": bool(torch.isfinite(gram).all()),
    }


def merge_benchmark(experts: int = 8) -> dict:
    shapes = make_checkpoints.ARCHITECTURES["decoder_1b"]()
    generator = torch.Generator(device="cuda").manual_seed(2)
    base = {
        name: (0.02 * torch.randn(shape, device="cuda", generator=generator)).to(torch.bfloat16)
        for name, shape in shapes.items()
    }
    expert_states = [
        {
            name: (
                value.float() + 1e-3 * torch.randn(value.shape, device="cuda", generator=generator)
            ).to(torch.bfloat16)
            for name, value in base.items()
        }
        for _ in range(experts)
    ]
    torch.cuda.synchronize()
    started = time.perf_counter()
    merged = r2m_ext.merge(base, expert_states, "r2m")
    torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    parameters = sum(v.numel() for v in base.values())
    return {
        "parameters": parameters,
        "experts": experts,
        "r2m_in_memory_s": seconds,
        "peak_gpu_bytes": torch.cuda.max_memory_allocated(),
        "outputs_on_gpu": all(v.is_cuda for v in merged.values()),
    }


def streaming_benchmark(workdir: Path, experts: int = 8) -> dict:
    """R²M and average streamed from disk on the GPU vs the I/O floor (inputs in the page cache:
    the floor's read warms it)."""
    checkpoints = workdir / "decoder_1b_bf16"
    if not (checkpoints / "checkpoints.json").exists():
        make_checkpoints.make("decoder_1b", experts, "bfloat16", checkpoints)
    inputs = sorted(checkpoints.glob("*/*.safetensors"))
    output_bytes = sum(p.stat().st_size for p in (checkpoints / "base").glob("*.safetensors"))
    bench_streaming.io_floor(inputs, output_bytes, workdir / "scratch")  # warms the page cache
    floor = min(
        bench_streaming.io_floor(inputs, output_bytes, workdir / "scratch") for _ in range(2)
    )
    result = {"input_bytes": sum(p.stat().st_size for p in inputs), "io_floor_s": floor}
    expert_dirs = [checkpoints / f"expert_{i}" for i in range(experts)]
    for method in ("average", "r2m"):
        torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        r2m_ext.merge_files(
            checkpoints / "base",
            expert_dirs,
            workdir / f"merged_{method}",
            method,
            overwrite=True,
            device="cuda",
            max_memory="40GB",
        )
        seconds = time.perf_counter() - started
        result[method] = {
            "wall_s": seconds,
            "wall_over_floor": seconds / floor,
            "peak_gpu_bytes": torch.cuda.max_memory_allocated(),
        }
    return result


def machine_facts() -> dict:
    def command(*args):
        try:
            return subprocess.run(args, capture_output=True, text=True, timeout=30).stdout.strip()
        except OSError:
            return None

    return {
        "gpu": torch.cuda.get_device_name(0),
        "driver": command("nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "backend": backend_info(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--commit", default="unknown")
    parser.add_argument(
        "--parts", default="ops,streaming", help="ops, streaming or both (comma-separated)"
    )
    parser.add_argument(
        "--workdir", type=Path, default=Path("/tmp/r2m_gpu"), help="checkpoints for streaming"
    )
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    result = {"machine": machine_facts(), "commit": args.commit, "date": time.strftime("%Y-%m-%d")}
    parts = {"ceilings": ceilings}
    for name, run in parts.items():
        result[name] = run()
    copy = result["ceilings"]["copy_bytes_per_s"]
    runs = []
    if "ops" in parts:
        runs += [
            ("randomized_svd", svd_benchmark),
            ("bandwidth", lambda: bandwidth_benchmark(copy)),
            ("r2m_merge", merge_benchmark),
        ]
    if "streaming" in parts:
        runs.append(("streaming", lambda: streaming_benchmark(args.workdir)))
    for name, run in runs:
        try:
            result[name] = run()
        except Exception as error:  # one failing part must not hide the others' numbers
            result[name] = {
                "error": f"{type(error).__name__}: {error}",
                "trace": traceback.format_exc(),
            }
        torch.cuda.empty_cache()
    lines = [
        f"# GPU ops, {result['machine']['gpu']}, {result['date']}, commit {args.commit}",
        "",
        f"torch {result['machine']['torch']} (CUDA {result['machine']['cuda']}), driver "
        f"{result['machine']['driver']}; {result['machine']['backend']}",
        "",
        f"Ceilings: copy {copy / 1e12:.2f} TB/s, bf16 matmul "
        f"{result['ceilings']['bf16_matmul_flops'] / 1e12:.0f} TFLOP/s",
        "",
        "| measurement | value | target |",
        "|---|---|---|",
    ]
    svd = result.get("randomized_svd", {"error": "not run"})
    if "error" not in svd:
        lines += [
            f"| randomized_svd 8x4096², bf16, rank 128 | {svd['randomized_svd_s'] * 1e3:.1f} ms | |",
            f"| speed-up vs torch.svd_lowrank (fp32) | {svd['speedup_vs_svd_lowrank']:.2f}x | >= 3x |",
            f"| speed-up vs linalg.svd loop | {svd['speedup_vs_svd_loop']:.0f}x | >= 100x |",
            f"| error ratio to exact (ours / svd_lowrank) | {svd['error_ratio_randomized_svd']:.4f} / {svd['error_ratio_svd_lowrank']:.4f} | <= 1.02 |",
        ]
    else:
        lines.append(f"| randomized_svd | failed: {svd['error']} | |")
    band = result.get("bandwidth", {"error": "not run"})
    if "error" not in band:
        lines += [
            f"| delta_gram N=8 bf16, fraction of copy bandwidth | {band['delta_gram_fraction_of_copy']:.2f} | >= 0.8 |",
            f"| combine N=8 bf16, fraction of copy bandwidth | {band['combine_fraction_of_copy']:.2f} | |",
            f"| delta_gram relative error vs float64 | {band['delta_gram_relative_error']:.1e} | |",
        ]
    else:
        lines.append(f"| delta_gram / combine | failed: {band['error']} | |")
    merge = result.get("r2m_merge", {"error": "not run"})
    if "error" not in merge:
        lines.append(
            f"| R²M in memory, 1B decoder bf16, N=8 | {merge['r2m_in_memory_s']:.1f} s, peak "
            f"{merge['peak_gpu_bytes'] / 1e9:.1f} GB | |"
        )
    else:
        lines.append(f"| R²M in memory | failed: {merge['error']} | |")
    streaming = result.get("streaming", {"error": "not run"})
    if "error" not in streaming:
        for method in ("average", "r2m"):
            lines.append(
                f"| {method} streamed, --device cuda, 1B decoder bf16 N=8 | "
                f"{streaming[method]['wall_s']:.1f} s = {streaming[method]['wall_over_floor']:.2f}x "
                f"the I/O floor ({streaming['io_floor_s']:.1f} s) | <= 1.25x (r2m) |"
            )
    else:
        lines.append(f"| streaming | failed: {streaming['error']} | |")
    stem = "gpu_" + "_".join(sorted(parts))
    bench_streaming.write_results(args.out, stem, result, lines)
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=1)[:3000])


if __name__ == "__main__":
    main()
