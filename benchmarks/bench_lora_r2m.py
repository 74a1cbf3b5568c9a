"""R²M of LoRA experts (issue 21): 8 rank-16 adapters on every linear module of decoder layers
shaped like a 7B Llama (4096 hidden, 11008 MLP, bf16), merged by `r2m merge --method r2m`:

- factored: the adapters as experts, written as a PEFT adapter (`--out-format peft`): the Gram,
  the truncation and the merged update all come from the factors (nothing m x n is formed, the
  base's matrices are never read);
- dense: what tools that densify do: each adapter materialised into a full model on disk (as
  `merge_and_unload()` + save would), then the dense R²M of those models.

Both run on a subset of layers (`--layers`, default 2; the dense one extrapolated to 32 layers
by the layer count, and said to be). Then the factored merge runs on the whole 32-layer model
(`--full`, default on), measured: its base is a stand-in with the real tensor names, shapes and
dtype whose matrices are a sparse file of zeros (an adapter output never reads them: the report's
input bytes say so). Wall time and peak RSS per run (/usr/bin/time).

    python benchmarks/bench_lora_r2m.py --layers 2 --work /tmp/r2m_lora7b
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from bench_streaming import machine_facts, write_results
from safetensors.torch import save_file

from r2m_ext.io.safetensors_format import header_bytes

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


def base_layout(layers: int) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    layout = []
    for layer in range(layers):
        for module, shape in MODULES.items():
            layout.append((f"model.layers.{layer}.{module}.weight", shape, torch.bfloat16))
        layout.append((f"model.layers.{layer}.input_layernorm.weight", (HIDDEN,), torch.bfloat16))
    return layout


def write_stand_in_base(path: Path, layers: int) -> None:
    """A safetensors file with the base's names, shapes and dtype whose data is a sparse run of
    zeros (no disk blocks, nothing to generate): for merges that never read the base's values."""
    layout = base_layout(layers)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as file:
        file.write(header_bytes(layout))
        file.truncate(file.tell() + sum(math.prod(s) * d.itemsize for _, s, d in layout))


def make_inputs(work: Path, layers: int, stand_in_base: bool = False) -> None:
    g = torch.Generator().manual_seed(0)
    layout = base_layout(layers)
    if stand_in_base:
        write_stand_in_base(work / "base" / "model.safetensors", layers)
    else:
        base = {
            name: (torch.randn(shape, generator=g) * 0.02).to(dtype)
            if len(shape) == 2
            else torch.ones(shape, dtype=dtype)
            for name, shape, dtype in layout
        }
        (work / "base").mkdir(parents=True, exist_ok=True)
        save_file(base, str(work / "base" / "model.safetensors"), metadata={"format": "pt"})
    for expert in range(EXPERTS):
        factors = {}
        for name, shape, _ in layout:
            if len(shape) != 2:
                continue
            rows, columns = shape
            prefix = "base_model.model." + name.removesuffix(".weight")
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
    return {"wall_s": wall, "peak_rss_bytes": rss * 1024, "stdout": result.stdout}


MATERIALISE = """
import sys
from pathlib import Path
from safetensors.torch import save_file

from r2m_ext.io.safetensors_format import header_bytes
from r2m_ext.io import open_source
base = open_source(sys.argv[1])
expert = open_source(sys.argv[2], base=base)
out = Path(sys.argv[3]); out.mkdir(parents=True, exist_ok=True)
save_file({n: expert.read(n).contiguous() for n in expert.metadata()}, str(out / "model.safetensors"))
"""


# PEFT's own combination of the same adapters on the subset: a model of the subset's shapes
# (transformers' Llama, float32) with the 8 adapters loaded, then add_weighted_adapter(svd)
# by PEFT or by r2m_ext.peft (argv: layers, work directory, "peft" or "r2m_ext").
PEFT_SVD = """
import sys, time, torch
from peft import PeftModel
from transformers import LlamaConfig, LlamaForCausalLM
layers, work, which = int(sys.argv[1]), sys.argv[2], sys.argv[3]
config = LlamaConfig(vocab_size=32, hidden_size=4096, intermediate_size=11008,
                     num_hidden_layers=layers, num_attention_heads=32, num_key_value_heads=32)
model = PeftModel.from_pretrained(LlamaForCausalLM(config), f"{work}/lora_0", adapter_name="e0")
for i in range(1, 8):
    model.load_adapter(f"{work}/lora_{i}", adapter_name=f"e{i}")
names, weights = [f"e{i}" for i in range(8)], [1 / 8] * 8
started = time.perf_counter()
if which == "peft":
    model.add_weighted_adapter(names, weights, "merged", combination_type="svd")
else:
    from r2m_ext.peft import add_weighted_adapter
    add_weighted_adapter(model, names, weights, "merged", combination_type="svd")
print("seconds", time.perf_counter() - started)
"""


def peft_svd(work: Path, layers: int, which: str) -> dict:
    """add_weighted_adapter(svd) of the 8 adapters: its own time, and the process's peak RSS
    (the float32 model included)."""
    timing = timed([sys.executable, "-c", PEFT_SVD, layers, work, which])
    return {**timing, "combination_s": float(timing["stdout"].split()[-1])}


def factored_merge(work: Path, max_memory: str) -> tuple[dict, dict]:
    """The factored run over `work`'s base and adapters: (timing, report.json)."""
    command = [sys.executable, "-m", "r2m_ext", "merge", "--base", work / "base"]
    command += ["--method", "r2m", "--max-memory", max_memory, "--quiet"]
    command += [a for i in range(EXPERTS) for a in ("--expert", work / f"lora_{i}")]
    timing = timed([*command, "--out", work / "adapter", "--out-format", "peft"])
    return timing, json.loads((work / "adapter" / "report.json").read_text())


def input_bytes_read(report: dict) -> int:
    return sum(p["input_bytes_read"] for p in report["io_bytes"].values())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path("/tmp/r2m_lora7b"))
    parser.add_argument("--max-memory", default="4GB")
    parser.add_argument("--full", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()
    work = args.work
    shutil.rmtree(work, ignore_errors=True)
    subset = work / "subset"
    make_inputs(subset, args.layers)
    python = sys.executable
    factored, report = factored_merge(subset, args.max_memory)
    materialise = {"wall_s": 0.0, "peak_rss_bytes": 0}
    for i in range(EXPERTS):
        one = timed(
            [
                python,
                "-c",
                MATERIALISE,
                subset / "base",
                subset / f"lora_{i}",
                subset / f"dense_{i}",
            ]
        )
        materialise["wall_s"] += one["wall_s"]
        materialise["peak_rss_bytes"] = max(materialise["peak_rss_bytes"], one["peak_rss_bytes"])
    dense_experts = [a for i in range(EXPERTS) for a in ("--expert", subset / f"dense_{i}")]
    dense = timed(
        [python, "-m", "r2m_ext", "merge", "--base", subset / "base", "--method", "r2m"]
        + ["--max-memory", args.max_memory, "--quiet", *dense_experts, "--out", subset / "dense"]
    )
    combinations = {which: peft_svd(subset, args.layers, which) for which in ("peft", "r2m_ext")}
    shutil.rmtree(subset)
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
        f"# R²M of {EXPERTS} rank-{RANK} LoRA experts, decoder layers shaped like a 7B Llama "
        f"(bf16), --max-memory {args.max_memory}",
        "",
        f"{machine['cpu']}, {machine['cores']} cores, torch {machine['torch']}, commit "
        f"{machine['commit']}, {machine['date']}",
        "",
        f"## {args.layers} layers: factored against densify-then-merge",
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
        "",
        f'PEFT\'s own `add_weighted_adapter(combination_type="svd")` of the same 8 adapters on '
        f"a float32 Llama of these {args.layers} layers (another combination than R²M: the SVD "
        "of each module's weighted dense delta), against r2m_ext.peft's factored drop-in:",
        "",
        "| combination | add_weighted_adapter (s) | process peak RSS (model included) |",
        "|---|---|---|",
    ]
    for which, row in combinations.items():
        lines.append(
            f"| {which} | {row['combination_s']:.1f} | {row['peak_rss_bytes'] / 1e9:.2f} GB |"
        )
    result["peft_svd"] = {k: {**v, "stdout": None} for k, v in combinations.items()}
    lines += [
        "",
        f"PEFT svd / r2m_ext R²M adapter merge (wall): "
        f"{combinations['peft']['combination_s'] / factored['wall_s']:.0f}x.",
    ]
    if args.full:
        whole = work / "whole"
        make_inputs(whole, LAYERS_7B, stand_in_base=True)
        full, full_report = factored_merge(whole, args.max_memory)
        adapter_bytes = sum(
            (whole / f"lora_{i}" / "adapter_model.safetensors").stat().st_size
            for i in range(EXPERTS)
        )
        result["whole_model"] = {
            **full,
            "timings_s": full_report["timings_s"],
            "input_bytes_read": input_bytes_read(full_report),
            "adapter_bytes": adapter_bytes,
            "modules": len(full_report["adapter"]["modules"]),
            "energy_kept_min": min(
                m["energy_kept"] for m in full_report["adapter"]["modules"].values()
            ),
        }
        shutil.rmtree(whole)
        figures = result["whole_model"]
        lines += [
            "",
            f"## The whole {LAYERS_7B}-layer model, factored (measured)",
            "",
            f"{figures['modules']} modules, {EXPERTS} adapters of {adapter_bytes / EXPERTS / 1e6:.0f}"
            " MB (float32 factors); the base a stand-in of the real names, shapes and dtype "
            "(13.0 GB of bf16 zeros, sparse: never read by an adapter output).",
            "",
            "| run | wall (s) | peak RSS | base and expert bytes read by the engine |",
            "|---|---|---|---|",
            f"| factored, {LAYERS_7B} layers | {full['wall_s']:.1f} | "
            f"{full['peak_rss_bytes'] / 1e9:.2f} GB | {figures['input_bytes_read'] / 1e6:.1f} MB |",
            "",
            "Passes: "
            + ", ".join(f"{k} {v:.1f} s" for k, v in figures["timings_s"].items())
            + f". Smallest energy kept by a module: {figures['energy_kept_min']:.6f}.",
        ]
    write_results(
        args.results,
        f"lora_r2m_{args.layers}layers_{machine['date']}_{machine['commit']}",
        result,
        lines,
    )


if __name__ == "__main__":
    main()
