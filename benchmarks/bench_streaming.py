"""Streaming engine benchmark (issue 3): peak RSS of `r2m merge` under --max-memory, and wall time
against the I/O floor measured in the same run. Prints a table; writes JSON and markdown.

    python benchmarks/make_checkpoints.py vit_l14 --experts 8 --dtype float32 --out /tmp/ckpt
    python benchmarks/bench_streaming.py /tmp/ckpt --max-memory 1GB --results benchmarks/results

The I/O floor is what no merge can beat on this machine: reading every input file once and
writing the output's bytes once (fsynced, as the merge does). Benchmarks report; they never assert.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHUNK = 64 * 2**20

METHODS = {
    "average": ["--method", "average"],
    "r2m": ["--method", "r2m"],
    "r2m_exact": ["--method", "r2m", "--svd", "exact"],
    # R²M with no scratch file: factors the budget cannot hold are recomputed in the write pass.
    "r2m_recompute": ["--method", "r2m", "--scratch-dir", "none"],
    # R²M with a host-memory tier beyond the budget (on the CPU: plain memory) for the factors
    # (--host-memory from the command line below).
    "r2m_host": ["--method", "r2m"],
    "ties": ["--method", "ties"],
    "ties_tensor": ["--method", "ties", "--ties-scope", "tensor"],
    "dare": ["--method", "dare"],
    "dare_ties": ["--method", "dare", "--dare-combine", "ties"],
}


def machine_facts() -> dict:
    import torch

    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    memory = int(Path("/proc/meminfo").read_text().split()[1]) * 1024
    # R2M_COMMIT: where the tree is a copy without .git (the GPU machine's), run_all.sh names it.
    commit = (
        os.environ.get("R2M_COMMIT")
        or subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()
    )
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_bytes": memory,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "commit": commit,
        "date": datetime.date.today().isoformat(),
    }


def write_results(directory: Path, stem: str, result: dict, lines: list[str]) -> None:
    """Prints the markdown table and writes it with the JSON as directory/stem.{md,json}."""
    table = "\n".join(lines)
    print(table)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{stem}.json").write_text(json.dumps(result, indent=1))
    (directory / f"{stem}.md").write_text(table + "\n")


def io_floor(inputs: list[Path], output_bytes: int, scratch: Path) -> float:
    """Seconds to read every input file once and write output_bytes once with fsync."""
    buffer = bytearray(CHUNK)
    started = time.perf_counter()
    for path in inputs:
        with open(path, "rb", buffering=0) as handle:
            while handle.readinto(buffer):
                pass
    scratch.mkdir(parents=True, exist_ok=True)
    target = scratch / "floor.bin"
    with open(target, "wb", buffering=0) as handle:
        remaining = output_bytes
        while remaining:
            remaining -= handle.write(memoryview(buffer)[: min(CHUNK, remaining)])
        os.fsync(handle.fileno())
    elapsed = time.perf_counter() - started
    target.unlink()
    return elapsed


def run_merge(
    checkpoints: Path, experts: int, out: Path, extra: list[str], max_memory: str
) -> dict:
    command = [
        "/usr/bin/time",
        "-v",
        sys.executable,
        "-m",
        "r2m_ext",
        "merge",
        "--base",
        str(checkpoints / "base"),
        "--out",
        str(out),
        "--max-memory",
        max_memory,
        "--overwrite",
        "--quiet",
        *extra,
    ]
    for i in range(experts):
        command += ["--expert", str(checkpoints / f"expert_{i}")]
    started = time.perf_counter()
    result = subprocess.run(
        command, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)}
    )
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"merge failed: {result.stderr[-2000:]}")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", result.stderr).group(1))
    report = json.loads((out / "report.json").read_text())
    shutil.rmtree(out)
    return {
        "wall_s": wall,
        "peak_rss_bytes": rss_kb * 1024,
        "timings_s": report["timings_s"],
        "engine_peak_bytes": report["memory"]["peak_accounted"],
        "tiled_tensors": len(report.get("tiled_tensors", [])),
        # Where R²M's truncation factors were kept, and what each pass read and wrote.
        "factors": {tier: report[key] for tier, key in FACTOR_TIERS.items() if key in report},
        "factorisations": report.get("factorisations"),
        "io_bytes": report.get("io_bytes"),
    }


FACTOR_TIERS = {
    "memory": "factors_cached",
    "host": "factors_in_host_memory",
    "scratch": "factors_spilled",
    "recomputed": "factors_recomputed",
}


def startup_seconds(repeat: int) -> float:
    """Median seconds for a fresh interpreter to import what `r2m merge` imports (torch first):
    the part of a CLI run's wall time that does not depend on the inputs."""
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        subprocess.run(
            [sys.executable, "-c", "import r2m_ext.cli"],
            check=True,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("checkpoints", type=Path, help="a directory from make_checkpoints.py")
    parser.add_argument("--max-memory", default="1GB")
    parser.add_argument("--methods", nargs="+", default=["average", "r2m"], choices=sorted(METHODS))
    parser.add_argument("--repeat", type=int, default=3, help="runs of the floor and of average")
    parser.add_argument("--host-memory", default="4GB", help="r2m_host's --host-memory")
    parser.add_argument("--scratch", type=Path, default=None, help="output directory (same disk)")
    parser.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()

    info = json.loads((args.checkpoints / "checkpoints.json").read_text())
    experts = info["experts"]
    inputs = sorted(args.checkpoints.glob("*/*.safetensors"))
    input_bytes = sum(p.stat().st_size for p in inputs)
    output_bytes = info["bytes"]["base"]
    scratch = args.scratch or args.checkpoints / "_bench_out"
    budget = (
        int(float(re.match(r"[\d.]+", args.max_memory).group()) * 10**9)
        if args.max_memory.upper().endswith("GB")
        else None
    )

    io_floor(inputs, output_bytes, scratch)  # warm-up: inputs into the page cache
    startup = startup_seconds(args.repeat)
    # The floor is measured between the merges it is compared with, so that both see the same
    # state of the machine (the page cache, writeback of earlier output): on this shared VM the
    # floor alone varied from 3.2 to 4.9 s between runs of the same files.
    floors = []
    rows = []
    for method in args.methods:
        runs = []
        for _ in range(args.repeat if method == "average" else 1):
            floors.append(io_floor(inputs, output_bytes, scratch))
            runs.append(
                run_merge(
                    args.checkpoints,
                    experts,
                    scratch / method,
                    METHODS[method]
                    + (["--host-memory", args.host_memory] if method == "r2m_host" else []),
                    args.max_memory,
                )
            )
            # Each run against the floor measured just before it, so that a run-to-run spread
            # shows (the median alone hides whether the ratio holds in every run).
            runs[-1]["adjacent_floor_ratio"] = floors[-1] / runs[-1]["wall_s"]
        floor = statistics.median(floors)
        median = sorted(runs, key=lambda r: r["wall_s"])[len(runs) // 2]
        rows.append(
            {
                "method": method,
                "runs": len(runs),
                **median,
                "runs_wall_s": [r["wall_s"] for r in runs],
                "runs_in_process_s": [r["timings_s"]["total"] for r in runs],
                "runs_adjacent_floor_ratio": [r["adjacent_floor_ratio"] for r in runs],
                "floor_ratio": floor / median["wall_s"],
                # merge_files' own time, from its report: comparable with the in-process floor.
                "floor_ratio_in_process": floor / median["timings_s"]["total"],
                "rss_over_budget_bytes": median["peak_rss_bytes"] - budget if budget else None,
            }
        )
    result = {
        "benchmark": "streaming",
        "machine": machine_facts(),
        "checkpoints": info,
        "input_bytes": input_bytes,
        "output_bytes": output_bytes,
        "max_memory": args.max_memory,
        "io_floor_s": statistics.median(floors),
        "io_floor_runs_s": floors,
        "startup_s": startup,
        "rows": rows,
    }

    lines = [
        f"# Streaming merge, {info['architecture']} x {experts} experts ({info['dtype']}), "
        f"--max-memory {args.max_memory}",
        "",
        f"{result['machine']['cpu']}, {result['machine']['cores']} cores, torch "
        f"{result['machine']['torch']}, commit {result['machine']['commit']}, {result['machine']['date']}",
        f"inputs {input_bytes / 1e9:.2f} GB, output {output_bytes / 1e9:.2f} GB; I/O floor "
        f"(read inputs once + write output once, fsync, page cache warm) "
        f"{result['io_floor_s']:.2f} s ({(input_bytes + output_bytes) / result['io_floor_s'] / 1e9:.2f}"
        f" GB/s; runs {', '.join(f'{f:.2f}' for f in floors)}); starting Python and importing "
        f"r2m_ext.cli (torch included) {startup:.2f} s",
        "",
        "in process: merge_files' own time from report.json (the wall time less interpreter start,",
        "imports and argument parsing)",
        "",
        "| method | wall (s) | floor / wall | in process (s) | floor / in process | peak RSS | RSS - budget | tensors tiled | passes (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        passes = ", ".join(f"{k} {v:.1f}" for k, v in row["timings_s"].items() if k != "total")
        over = (
            f"{row['rss_over_budget_bytes'] / 1e6:+.0f} MB"
            if row["rss_over_budget_bytes"] is not None
            else "n/a"
        )
        lines.append(
            f"| {row['method']} | {row['wall_s']:.1f} | {row['floor_ratio']:.2f} | "
            f"{row['timings_s']['total']:.1f} | {row['floor_ratio_in_process']:.2f} | "
            f"{row['peak_rss_bytes'] / 1e9:.2f} GB | {over} | {row['tiled_tensors']} | {passes} |"
        )
    for row in rows:
        if row["runs"] > 1:
            lines.append(
                f"\n{row['method']}, every run (wall s / merge_files s / the floor measured just "
                "before it over the wall): "
                + "; ".join(
                    f"{w:.2f} / {p:.2f} / {r:.2f}"
                    for w, p, r in zip(
                        row["runs_wall_s"],
                        row["runs_in_process_s"],
                        row["runs_adjacent_floor_ratio"],
                        strict=True,
                    )
                )
            )
    for row in rows:
        if not row["factors"]:
            continue
        scratch_io = {
            what: sum(counts.get(f"scratch_bytes_{what}", 0) for counts in row["io_bytes"].values())
            for what in ("written", "read")
        }
        lines.append(
            f"\n{row['method']}"
            + (f" (--host-memory {args.host_memory})" if row["method"] == "r2m_host" else "")
            + ": truncation factors per tier "
            + ", ".join(f"{tier} {count}" for tier, count in row["factors"].items())
            + f"; scratch file {scratch_io['written'] / 1e6:.0f} MB written, "
            f"{scratch_io['read'] / 1e6:.0f} MB read; factorisations "
            + ", ".join(f"{name} {n}" for name, n in row["factorisations"].items())
        )
    stem = f"streaming_{info['architecture']}_{info['dtype']}_{result['machine']['date']}"
    write_results(args.results, stem, result, lines)
    shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
