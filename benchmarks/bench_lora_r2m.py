"""R²M of LoRA experts (issue 21): 8 rank-16 adapters on every linear module of decoder layers
shaped like a 7B Llama (4096 hidden, 11008 MLP, bf16), merged by `r2m merge --method r2m`:

- factored: the adapters as experts, written as a PEFT adapter (`--out-format peft`): the Gram
  and the truncation come from the factors; the write pass forms each module's dense update;
- dense: what tools that densify do: each adapter materialised into a full model on disk (as
  `merge_and_unload()` + save would), then the dense R²M of those models.

A subset of layers (`--layers`, default 2) is measured; the whole 32-layer model is extrapolated
from it by the layer count, and said to be. Wall time and peak RSS per run (/usr/bin/time).

    python benchmarks/bench_lora_r2m.py --layers 2 --work /tmp/lora7b
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from bench_streaming import machine_facts, write_results
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[1]
HIDDEN, MLP, RANK, EXPERTS, LAYERS_7B = 4096, 11008, 16, 8, 32
MODULES = {
    "self_attn.q_proj": (HIDDEN, HIDDEN),
    "self_attn.k_proj": (HIDDEN, HIDDEN),
    "self_attn.v_proj": (HIDDEN, HIDDEN),
    "self_attn.o_proj": (HIDDEN, HIDDEN),
    "mlp.gate_proj": (MLP, HIDDEN),
    "mlp.up_proj": (MLP, HIDDEN),
    "mlp.down_proj": (HIDDEN, MLP),
}


def make_inputs(work: Path, layers: int) -> None:
    g = torch.Generator().manual_seed(0)
    base = {}
    for layer in range(layers):
        for module, (rows, columns) in MODULES.items():
            name = f"model.layers.{layer}.{module}.weight"
            base[name] = (torch.randn(rows, columns, generator=g) * 0.02).to(torch.bfloat16)
        base[f"model.layers.{layer}.input_layernorm.weight"] = torch.ones(HIDDEN).bfloat16()
    (work / "base").mkdir(parents=True, exist_ok=True)
    save_file(base, str(work / "base" / "model.safetensors"), metadata={"format": "pt"})
    for expert in range(EXPERTS):
        factors = {}
        for name, weight in base.items():
            if weight.dim() != 2:
                continue
            prefix = "base_model.model." + name.removesuffix(".weight")
            rows, columns = weight.shape
            factors[f"{prefix}.lora_A.weight"] = torch.randn(RANK, columns, generator=g) * 0.01
            factors[f"{prefix}.lora_B.weight"] = torch.randn(rows, RANK, generator=g) * 0.01
        directory = work / f"lora_{expert}"
        directory.mkdir(exist_ok=True)
        save_file(factors, str(directory / "adapter_model.safetensors"))
        config = {
            "peft_type": "LORA",
            "r": RANK,
            "lora_alpha": 2 * RANK,
            "target_modules": sorted({m.split(".")[-1] for m in MODULES}),
            "task_type": "CAUSAL_LM",
        }
        (directory / "adapter_config.json").write_text(json.dumps(config))


def timed(command: list) -> dict:
    started = time.perf_counter()
    result = subprocess.run(
        ["/usr/bin/time", "-v", *map(str, command)],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"failed: {result.stderr[-3000:]}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", result.stderr).group(1))
    return {"wall_s": wall, "peak_rss_bytes": rss * 1024}


MATERIALISE = """
import sys
from pathlib import Path
from safetensors.torch import save_file
from r2m_ext.io import open_source
base = open_source(sys.argv[1])
expert = open_source(sys.argv[2], base=base)
out = Path(sys.argv[3]); out.mkdir(parents=True, exist_ok=True)
save_file({n: expert.read(n).contiguous() for n in expert.metadata()}, str(out / "model.safetensors"))
"""


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path("/tmp/r2m_lora7b"))
    parser.add_argument("--max-memory", default="4GB")
    parser.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()
    work = args.work
    shutil.rmtree(work, ignore_errors=True)
    make_inputs(work, args.layers)
    python = sys.executable
    merge = [python, "-m", "r2m_ext", "merge", "--base", work / "base", "--method", "r2m"]
    merge += ["--max-memory", args.max_memory, "--quiet"]
    adapters = [a for i in range(EXPERTS) for a in ("--expert", work / f"lora_{i}")]
    factored = timed([*merge, *adapters, "--out", work / "adapter", "--out-format", "peft"])
    report = json.loads((work / "adapter" / "report.json").read_text())
    materialise = {"wall_s": 0.0, "peak_rss_bytes": 0}
    for i in range(EXPERTS):
        one = timed(
            [python, "-c", MATERIALISE, work / "base", work / f"lora_{i}", work / f"dense_{i}"]
        )
        materialise["wall_s"] += one["wall_s"]
        materialise["peak_rss_bytes"] = max(materialise["peak_rss_bytes"], one["peak_rss_bytes"])
    dense_experts = [a for i in range(EXPERTS) for a in ("--expert", work / f"dense_{i}")]
    dense = timed([*merge, *dense_experts, "--out", work / "dense_out"])
    scale = LAYERS_7B / args.layers
    rows = {
        "factored (adapters in, PEFT adapter out)": factored,
        "materialise 8 experts": materialise,
        "dense R²M of the materialised experts": dense,
    }
    result = {
        "benchmark": "lora_r2m",
        "machine": machine_facts(),
        "layers": args.layers,
        "max_memory": args.max_memory,
        "rows": rows,
        "timings_s": report["timings_s"],
        "energy_kept_min": min(m["energy_kept"] for m in report["adapter"]["modules"].values()),
    }
    machine = result["machine"]
    total_dense = materialise["wall_s"] + dense["wall_s"]
    lines = [
        f"# R²M of {EXPERTS} rank-{RANK} LoRA experts, {args.layers} decoder layers shaped like a "
        f"7B Llama (bf16), --max-memory {args.max_memory}",
        "",
        f"{machine['cpu']}, {machine['cores']} cores, torch {machine['torch']}, commit "
        f"{machine['commit']}, {machine['date']}",
        "",
        f"| run | wall ({args.layers} layers, s) | extrapolated to 32 layers (s) | peak RSS |",
        "|---|---|---|---|",
    ]
    for label, row in rows.items():
        lines.append(
            f"| {label} | {row['wall_s']:.1f} | {row['wall_s'] * scale:.0f} | "
            f"{row['peak_rss_bytes'] / 1e9:.2f} GB |"
        )
    lines += [
        f"| densify, then merge (the two above) | {total_dense:.1f} | {total_dense * scale:.0f} | |",
        "",
        f"factored / densified: {total_dense / factored['wall_s']:.1f}x faster. Passes of the "
        "factored run: "
        + ", ".join(f"{k} {v:.1f} s" for k, v in report["timings_s"].items())
        + f". Extrapolation (not measured): times the layer count ({scale:g}x). Smallest "
        f"energy kept by a module of the adapter: {result['energy_kept_min']:.6f}.",
    ]
    write_results(
        args.results,
        f"lora_r2m_{args.layers}layers_{machine['date']}_{machine['commit']}",
        result,
        lines,
    )


if __name__ == "__main__":
    main()
