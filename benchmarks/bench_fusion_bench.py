"""FusionBench's TaskSingularVectorMerging against r2m_ext's TSV-M algorithm for FusionBench
(issue 24), same process, same in-memory model pool: ViT-B/16-shaped models (12 blocks of qkv
2304x768, proj 768x768, fc1 3072x768, fc2 768x3072, biases and norms), N fine-tuned tasks =
base + 0.01 * noise + a rank-8 update each. r2m_ext runs with `svd: exact` (the same result as
FusionBench's, checked, once) and with its default randomized SVD (difference reported). After a
warm-up of every algorithm on a one-block pool, FusionBench and r2m_ext's default run in
`--repeat` interleaved rounds; the speed-up is the ratio of their medians, and every round's own
ratio is listed (this shared machine drifts by 20-30% between minutes).

    python benchmarks/bench_fusion_bench.py --tasks 8 --repeat 3

Benchmarks report; they never assert.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
from fusion_bench import BaseModelPool
from fusion_bench.method import TaskSingularVectorMerging as FusionBenchTSVM
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_streaming import REPO, machine_facts, write_results  # noqa: E402

from r2m_ext.integrations.fusion_bench import TaskSingularVectorMerging  # noqa: E402

WIDTH, MLP, DEPTH = 768, 3072, 12


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm1 = nn.LayerNorm(WIDTH)
        self.qkv = nn.Linear(WIDTH, 3 * WIDTH)
        self.proj = nn.Linear(WIDTH, WIDTH)
        self.norm2 = nn.LayerNorm(WIDTH)
        self.fc1 = nn.Linear(WIDTH, MLP)
        self.fc2 = nn.Linear(MLP, WIDTH)


class VitB16Shaped(nn.Module):
    def __init__(self, depth: int = DEPTH):
        super().__init__()
        self.blocks = nn.ModuleList(Block() for _ in range(depth))
        self.norm = nn.LayerNorm(WIDTH)


def model_pool_members(tasks: int, depth: int = DEPTH) -> dict[str, nn.Module]:
    torch.manual_seed(0)
    base = VitB16Shaped(depth)
    members = {"_pretrained_": base}
    for task in range(tasks):
        model = copy.deepcopy(base)
        generator = torch.Generator().manual_seed(task + 1)
        with torch.no_grad():
            for parameter in model.parameters():
                update = 0.01 * torch.randn(parameter.shape, generator=generator)
                if parameter.dim() == 2:
                    left = torch.randn(parameter.shape[0], 8, generator=generator)
                    right = torch.randn(8, parameter.shape[1], generator=generator)
                    update += 0.05 * left @ right / parameter.shape[1] ** 0.5
                parameter.add_(update)
        members[f"task{task}"] = model
    return members


def timed_run(algorithm, members) -> tuple[float, dict[str, torch.Tensor]]:
    pool = BaseModelPool(models={name: copy.deepcopy(m) for name, m in members.items()})
    started = time.perf_counter()
    merged = algorithm.run(pool)
    return time.perf_counter() - started, merged.state_dict()


def largest_relative_difference(ours: dict, theirs: dict) -> float:
    return max(
        float((ours[n].double() - theirs[n].double()).norm() / theirs[n].double().norm())
        for n in theirs
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3, help="interleaved timed rounds")
    parser.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()

    algorithms = {
        "fusion_bench": FusionBenchTSVM,
        "exact": lambda: TaskSingularVectorMerging(svd="exact"),
        "randomized": TaskSingularVectorMerging,
    }
    warm_up = model_pool_members(args.tasks, depth=1)
    for make in algorithms.values():
        timed_run(make(), warm_up)
    members = model_pool_members(args.tasks)
    times: dict[str, list[float]] = {name: [] for name in algorithms}
    outputs = {}
    for round_index in range(args.repeat):
        for name in ("fusion_bench", "randomized") + (("exact",) if round_index == 0 else ()):
            seconds, outputs[name] = timed_run(algorithms[name](), members)
            times[name].append(seconds)
            print(f"round {round_index}: {name} {seconds:.1f} s", flush=True)
    fusion_bench_s = statistics.median(times["fusion_bench"])
    rows = [
        {
            "algorithm": "FusionBench TaskSingularVectorMerging",
            "wall_s": fusion_bench_s,
            "runs_s": times["fusion_bench"],
        }
    ]
    for label, name in (
        ("r2m_ext TSV-M, svd exact", "exact"),
        ("r2m_ext TSV-M, svd randomized (default)", "randomized"),
    ):
        seconds = statistics.median(times[name])
        rows.append(
            {
                "algorithm": label,
                "wall_s": seconds,
                "runs_s": times[name],
                "speedup": fusion_bench_s / seconds,
                "largest_relative_difference": largest_relative_difference(
                    outputs[name], outputs["fusion_bench"]
                ),
            }
        )
    per_round = [
        theirs / ours
        for theirs, ours in zip(times["fusion_bench"], times["randomized"], strict=True)
    ]
    result = {
        "machine": machine_facts(),
        "tasks": args.tasks,
        "repeat": args.repeat,
        "speedup_per_round": per_round,
        "shapes": "ViT-B/16 blocks (12 x qkv, proj, fc1, fc2, 2 norms) and a final norm",
        "rows": rows,
    }
    facts = result["machine"]
    lines = [
        f"# FusionBench TSV-M vs r2m_ext's: ViT-B/16-shaped models, {args.tasks} tasks (float32)",
        "",
        f"{facts['cpu']}, {facts['cores']} cores, torch {facts['torch']}, commit "
        f"{facts['commit']}, {facts['date']}; same process, same model pool, merge time only; "
        f"medians of {args.repeat} interleaved rounds after a warm-up (exact: one run).",
        "",
        "| algorithm | wall (median) | runs | speed-up | largest rel. difference to FusionBench |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        speedup = f"{row['speedup']:.1f}x" if "speedup" in row else "1.0x"
        difference = (
            f"{row['largest_relative_difference']:.1e}" if "speedup" in row else "(reference)"
        )
        runs = ", ".join(f"{r:.1f}" for r in row["runs_s"])
        lines.append(
            f"| {row['algorithm']} | {row['wall_s']:.1f} s | {runs} | {speedup} | {difference} |"
        )
    lines += [
        "",
        "FusionBench over r2m_ext's default, round by round: "
        + ", ".join(f"{r:.1f}x" for r in per_round),
    ]
    stem = f"fusion_bench_tsv_vit_b16_x{args.tasks}_{facts['date']}_{facts['commit']}"
    write_results(args.results, stem, result, lines)


if __name__ == "__main__":
    main()
