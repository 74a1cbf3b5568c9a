"""Distributed merge benchmark (issue 22): one `r2m merge` as one process and as K torchrun ranks
on this machine, same inputs, same per-rank --max-memory, outputs compared byte for byte. Reports
wall time, each rank's share (tensors, bytes read, time per pass, peak RSS), and a model of
multi-node scaling from the measured per-rank rates (a model, not a measurement).

    python benchmarks/make_checkpoints.py vit_l14 --experts 8 --dtype float32 --out /tmp/ckpt
    python benchmarks/bench_distributed.py /tmp/ckpt --ranks 2 --max-memory 1GB

Thread counts: the single process uses every core (torch's default); each of K ranks gets
cores / K intra-op threads (OMP_NUM_THREADS), so both runs use the same cores. Benchmarks
report; they never assert.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench_streaming import machine_facts, startup_seconds, write_results

REPO = Path(__file__).resolve().parents[1]


def merge_command(
    checkpoints: Path, experts: int, out: Path, method: str, budget: str, device: str
) -> list:
    command = ["-m", "r2m_ext", "merge", "--base", str(checkpoints / "base"), "--out", str(out)]
    command += ["--method", method, "--max-memory", budget, "--overwrite", "--quiet"]
    command += ["--device", device]
    for index in range(experts):
        command += ["--expert", str(checkpoints / f"expert_{index}")]
    return command


def digests(out: Path) -> dict[str, str]:
    found = {}
    for path in sorted(out.glob("*.safetensors")):
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            while chunk := handle.read(64 * 2**20):
                digest.update(chunk)
        found[path.name] = digest.hexdigest()
    return found


def run(command: list, ranks: int, out: Path) -> dict:
    threads = max(1, (os.cpu_count() or 1) // ranks)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(threads)}
    if ranks > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        command = [*launcher, f"--nproc-per-node={ranks}", *command]
    else:
        command = [sys.executable, *command]
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"merge failed: {result.stderr[-3000:]}")
    report = json.loads((out / "report.json").read_text())
    found = digests(out)
    shutil.rmtree(out)
    return {"wall_s": wall, "threads_per_rank": threads, "report": report, "digests": found}


def rank_rows(report: dict) -> list[dict]:
    """Per rank: tensors, bytes assigned and read, time per pass, peak RSS (one process: the
    whole merge as rank 0)."""
    if "ranks" in report:
        return report["ranks"]
    return [
        {
            "rank": 0,
            "tensors": len(report.get("tensors", {})) or None,
            "input_bytes": None,
            "input_bytes_read": sum(p["input_bytes_read"] for p in report["io_bytes"].values()),
            "timings_s": {k: v for k, v in report["timings_s"].items() if k != "total"},
            "peak_rss": report["memory"]["peak_rss"],
        }
    ]


def scaling_model(single: dict, ranked: dict, ranks: int, startup: float) -> list[dict]:
    """Modelled wall time on M machines of this kind (one rank each, each its own disk and
    cores, inputs on a shared filesystem as fast as local disk): the single process's in-process
    time divided by M, times the imbalance the K-rank run measured (slowest rank's pass time
    over the mean), plus the interpreter start and the exchanges' cost measured as the K-rank
    run's in-process time less its slowest rank's pass time."""
    rows = ranked["report"]["ranks"]
    pass_totals = [sum(r["timings_s"].values()) for r in rows]
    imbalance = max(pass_totals) / statistics.mean(pass_totals)
    exchange = max(0.0, ranked["report"]["timings_s"]["total"] - max(pass_totals))
    single_in_process = single["report"]["timings_s"]["total"]
    return [
        {
            "machines": machines,
            "modelled_wall_s": startup + single_in_process / machines * imbalance + exchange,
        }
        for machines in (1, 2, 4, 8, 16)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("checkpoints", type=Path, help="a directory from make_checkpoints.py")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--max-memory", default="1GB", help="per rank")
    parser.add_argument("--methods", nargs="+", default=["average", "r2m"])
    parser.add_argument("--repeat", type=int, default=3, help="runs of average")
    parser.add_argument(
        "--device", default="cpu", help="cuda: every rank on cuda:LOCAL_RANK (modulo the GPUs)"
    )
    parser.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()

    info = json.loads((args.checkpoints / "checkpoints.json").read_text())
    experts = info["experts"]
    out = args.checkpoints / "_bench_distributed"
    startup = startup_seconds(3)
    rows = []
    for method in args.methods:
        command = merge_command(
            args.checkpoints, experts, out, method, args.max_memory, args.device
        )
        runs: dict[int, list[dict]] = {1: [], args.ranks: []}
        for _ in range(args.repeat if method == "average" else 1):
            for ranks in runs:  # alternating, so both see the same state of the machine
                runs[ranks].append(run(command, ranks, out))
        median = {
            ranks: sorted(found, key=lambda r: r["wall_s"])[len(found) // 2]
            for ranks, found in runs.items()
        }
        single, ranked = median[1], median[args.ranks]
        rows.append(
            {
                "method": method,
                "runs": {ranks: [r["wall_s"] for r in found] for ranks, found in runs.items()},
                "single": single,
                "ranked": ranked,
                "identical": all(
                    r["digests"] == single["digests"] for found in runs.values() for r in found
                ),
                "speedup": single["wall_s"] / ranked["wall_s"],
                "model": scaling_model(single, ranked, args.ranks, startup),
            }
        )

    machine = machine_facts()
    result = {
        "benchmark": "distributed",
        "machine": machine,
        "checkpoints": info,
        "ranks": args.ranks,
        "max_memory_per_rank": args.max_memory,
        "device": args.device,
        "startup_s": startup,
        "rows": rows,
    }
    lines = [
        f"# Distributed merge, {info['architecture']} x {experts} experts ({info['dtype']}), "
        f"1 process vs {args.ranks} torchrun ranks (gloo), --device {args.device}, --max-memory "
        f"{args.max_memory} per rank",
        "",
        f"{machine['cpu']}, {machine['cores']} cores, torch {machine['torch']}, commit "
        f"{machine['commit']}, {machine['date']}; one process with {rows[0]['single']['threads_per_rank']}"
        f" threads, each rank with {rows[0]['ranked']['threads_per_rank']}; interpreter start "
        f"{startup:.2f} s",
        "",
        "| method | 1 process wall (s) | ranks wall (s) | speed-up | outputs identical | runs (s) |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        runs = "; ".join(
            f"{ranks}: " + ", ".join(f"{w:.1f}" for w in walls)
            for ranks, walls in row["runs"].items()
        )
        lines.append(
            f"| {row['method']} | {row['single']['wall_s']:.1f} | {row['ranked']['wall_s']:.1f} | "
            f"{row['speedup']:.2f}x | {'yes' if row['identical'] else 'NO'} | {runs} |"
        )
    for row in rows:
        lines += [
            "",
            f"## {row['method']}: each rank's share",
            "",
            "| run | rank | tensors | bytes assigned | bytes read | passes (s) | peak RSS |",
            "|---|---|---|---|---|---|---|",
        ]
        for label, measured in (
            ("1 process", row["single"]),
            (f"{args.ranks} ranks", row["ranked"]),
        ):
            for r in rank_rows(measured["report"]):
                assigned = f"{r['input_bytes'] / 1e9:.2f} GB" if r.get("input_bytes") else "all"
                passes = ", ".join(f"{k} {v:.1f}" for k, v in r["timings_s"].items())
                lines.append(
                    f"| {label} | {r['rank']} | {r['tensors'] or 'all'} | {assigned} | "
                    f"{r['input_bytes_read'] / 1e9:.2f} GB | {passes} | {r['peak_rss'] / 1e9:.2f} GB |"
                )
        lines += [
            "",
            f"Model (not measured) of {row['method']} on M machines like this one, one rank each: "
            + ", ".join(f"M={m['machines']}: {m['modelled_wall_s']:.1f} s" for m in row["model"]),
        ]
    stem = (
        f"distributed_{info['architecture']}_{info['dtype']}_{machine['date']}_{machine['commit']}"
    )
    write_results(args.results, stem, result, lines)


if __name__ == "__main__":
    main()
