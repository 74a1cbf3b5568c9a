"""PEFT's add_weighted_adapter(combination_type="svd") against r2m_ext.peft's drop-in on one
linear module of a 7B decoder's shape (4096 x 4096 by default), 8 rank-16 adapters (issue 21):
time per module and the difference of the merged deltas, same process, same adapters.

    python benchmarks/bench_peft_svd.py [--size 4096] [--adapters 8] [--rank 16]

Benchmarks report; they never assert.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_streaming import REPO, machine_facts, write_results  # noqa: E402

from r2m_ext.peft import add_weighted_adapter  # noqa: E402


class Module(nn.Module):
    def __init__(self, size: int):
        super().__init__()
        self.proj = nn.Linear(size, size, bias=False)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()

    torch.manual_seed(0)
    config = LoraConfig(r=args.rank, target_modules=["proj"], init_lora_weights=False)
    model = get_peft_model(Module(args.size), config, adapter_name="a0")
    for i in range(1, args.adapters):
        model.add_adapter(f"a{i}", config)
    names = [f"a{i}" for i in range(args.adapters)]
    weights = [1.0 / args.adapters] * args.adapters
    timings = {}
    results = {}
    for label, run in (
        ("PEFT", lambda m: m.add_weighted_adapter(names, weights, "merged", "svd")),
        ("r2m_ext", lambda m: add_weighted_adapter(m, names, weights, "merged", "svd")),
    ):
        copy_of = copy.deepcopy(model)
        started = time.perf_counter()
        run(copy_of)
        timings[label] = time.perf_counter() - started
        results[label] = copy_of.base_model.model.proj.get_delta_weight("merged").double()
        print(label, f"{timings[label]:.3f} s", flush=True)
    difference = float((results["r2m_ext"] - results["PEFT"]).norm() / results["PEFT"].norm())
    facts = machine_facts()
    result = {
        "machine": facts,
        "size": args.size,
        "adapters": args.adapters,
        "rank": args.rank,
        "seconds": timings,
        "speedup": timings["PEFT"] / timings["r2m_ext"],
        "relative_difference_of_merged_delta": difference,
    }
    lines = [
        f"# PEFT add_weighted_adapter(svd) vs r2m_ext.peft: one {args.size}x{args.size} module, "
        f"{args.adapters} adapters of rank {args.rank}",
        "",
        f"{facts['cpu']}, {facts['cores']} cores, torch {facts['torch']}, commit "
        f"{facts['commit']}, {facts['date']}.",
        "",
        "| | seconds per module | speed-up | merged delta vs PEFT's |",
        "|---|---|---|---|",
        f"| PEFT (dense delta, full SVD) | {timings['PEFT']:.3f} | 1x | (reference) |",
        f"| r2m_ext (factored) | {timings['r2m_ext']:.4f} | {result['speedup']:.0f}x | "
        f"{difference:.1e} |",
    ]
    stem = f"peft_svd_{args.size}_x{args.adapters}_r{args.rank}_{facts['date']}_{facts['commit']}"
    write_results(args.results, stem, result, lines)


if __name__ == "__main__":
    main()
