"""mergekit against `r2m merge --config` on the same mergekit YAML and the same files (issue 24):
wall time and peak RSS of each command (/usr/bin/time -v), after checking that both wrote the
same tensors. Checkpoints from make_checkpoints.py: each model is shown to mergekit through a
directory of links to its shards with a config.json (the synthetic checkpoints carry no
architecture): for decoder_1b a LlamaForCausalLM config derived from the shapes, for the
timm-named ViTs an unknown architecture, whose layout mergekit infers from the tensor names.

    python benchmarks/make_checkpoints.py decoder_1b --experts 4 --dtype bfloat16 --out /tmp/c
    python benchmarks/bench_mergekit.py /tmp/c --experts 4 --methods task_arithmetic ties

Benchmarks report; they never assert.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_streaming import REPO, io_floor, machine_facts, write_results  # noqa: E402

# method -> (global parameters, per-model parameters): TIES at the paper's density 0.2.
CONFIGS = {
    "task_arithmetic": ({"lambda": 0.5}, {"weight": 1.0}),
    "ties": ({"normalize": True}, {"weight": 1.0, "density": 0.2}),
}


def llama_config(model: Path) -> dict:
    """A LlamaForCausalLM config.json for a decoder_1b checkpoint, from its index alone."""
    index = json.loads((model / "model.safetensors.index.json").read_text())
    shapes = {}
    for name, shard in index["weight_map"].items():
        with safe_open(model / shard, "pt") as handle:
            shapes[name] = handle.get_slice(name).get_shape()
    vocab, hidden = shapes["model.embed_tokens.weight"]
    layers = 1 + max(int(n.split(".")[2]) for n in shapes if n.startswith("model.layers."))
    head_dim = 64
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": shapes["model.layers.0.mlp.gate_proj.weight"][0],
        "num_hidden_layers": layers,
        "num_attention_heads": hidden // head_dim,
        "num_key_value_heads": shapes["model.layers.0.self_attn.k_proj.weight"][0] // head_dim,
        "vocab_size": vocab,
        "tie_word_embeddings": "lm_head.weight" not in shapes,
        "torch_dtype": "bfloat16",
    }


# timm-named ViTs: mergekit infers the layout from the tensor names of an unknown architecture.
UNKNOWN_ARCHITECTURE = {"architectures": ["TimmVisionTransformer"], "model_type": "vit"}


def mergekit_view(model: Path, view: Path, decoder: bool) -> Path:
    """`model`'s shards and index linked into `view`, beside a config.json mergekit reads."""
    view.mkdir(parents=True, exist_ok=True)
    for item in model.iterdir():
        if item.suffix == ".safetensors" or item.name.endswith(".index.json"):
            link = view / item.name
            if not link.exists():
                link.symlink_to(item.resolve())
    config = llama_config(model) if decoder else UNKNOWN_ARCHITECTURE
    (view / "config.json").write_text(json.dumps(config, indent=1))
    return view


def write_yaml(path: Path, method: str, base: Path, experts: list[Path], dtype: str) -> Path:
    shared, per_model = CONFIGS[method]
    lines = [f"merge_method: {method}", f"base_model: {base}", "models:"]
    for expert in experts:
        lines.append(f"  - model: {expert}")
        lines.append(f"    parameters: {json.dumps(per_model)}")
    lines += [f"parameters: {json.dumps(shared)}", f"dtype: {dtype}"]
    path.write_text("\n".join(lines) + "\n")
    return path


def timed(command: list[str], env: dict | None = None) -> dict:
    started = time.perf_counter()
    done = subprocess.run(
        ["/usr/bin/time", "-v", *command],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
    )
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{command[0]} failed:\n{done.stderr[-3000:]}")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr).group(1))
    return {"wall_s": wall, "peak_rss_bytes": rss_kb * 1024}


def largest_relative_difference(ours: Path, theirs: Path) -> tuple[float, int]:
    """max over tensors of ||ours - theirs|| / ||theirs||, one tensor at a time; and the count."""

    def tensors(directory: Path) -> dict[str, Path]:
        return {
            name: shard
            for shard in sorted(directory.glob("*.safetensors"))
            for name in safe_open(shard, "pt").keys()
        }

    mine, other = tensors(ours), tensors(theirs)
    if sorted(mine) != sorted(other):
        raise SystemExit(f"tensor names differ: {sorted(set(mine) ^ set(other))[:5]}")
    worst = 0.0
    for name, shard in other.items():
        with safe_open(shard, "pt") as a, safe_open(mine[name], "pt") as b:
            want, got = a.get_tensor(name).double(), b.get_tensor(name).double()
        scale = want.norm().item()
        worst = max(worst, (got - want).norm().item() / scale if scale else 0.0)
    return worst, len(other)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("checkpoints", type=Path, help="a directory from make_checkpoints.py")
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--methods", nargs="+", default=list(CONFIGS), choices=sorted(CONFIGS))
    parser.add_argument("--max-memory", default="4GB", help="r2m_ext's budget")
    parser.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()

    info = json.loads((args.checkpoints / "checkpoints.json").read_text())
    dtype = info["dtype"]
    scratch = args.checkpoints / "_bench_mergekit"
    shutil.rmtree(scratch, ignore_errors=True)
    names = ["base", *(f"expert_{i}" for i in range(args.experts))]
    decoder = info["architecture"].startswith("decoder")
    views = {n: mergekit_view(args.checkpoints / n, scratch / "views" / n, decoder) for n in names}
    inputs = [p for n in names for p in sorted((args.checkpoints / n).glob("*.safetensors"))]
    output_bytes = info["bytes"]["base"]
    io_floor(inputs, output_bytes, scratch)  # warm-up: inputs into the page cache
    rows = []
    for method in args.methods:
        config_mk = write_yaml(
            scratch / f"{method}_mergekit.yaml",
            method,
            views["base"],
            [views[n] for n in names[1:]],
            dtype,
        )
        config_r2m = write_yaml(
            scratch / f"{method}_r2m.yaml",
            method,
            args.checkpoints / "base",
            [args.checkpoints / n for n in names[1:]],
            dtype,
        )
        # The floor (read every input once, write the output once, fsynced) just before.
        floor = io_floor(inputs, output_bytes, scratch)
        # Each tool starts with the inputs read once more just before it (into the page cache
        # as far as memory allows): the first run's peak memory (mergekit's: about 9.8 GB on
        # the decoder) would otherwise have evicted the second's inputs.
        warm = {"mergekit": io_floor(inputs, 0, scratch)}
        mergekit_run = timed(
            [
                str(Path(sys.executable).with_name("mergekit-yaml")),
                str(config_mk),
                str(scratch / "out_mergekit"),
                "--no-write-model-card",
                "--no-copy-tokenizer",
            ],
            env={"HF_HUB_OFFLINE": "1"},
        )
        warm["r2m_ext"] = io_floor(inputs, 0, scratch)
        r2m_run = timed(
            [
                sys.executable,
                "-m",
                "r2m_ext",
                "merge",
                "--config",
                str(config_r2m),
                "--out",
                str(scratch / "out_r2m"),
                "--max-memory",
                args.max_memory,
                "--quiet",
            ],
            env={"PYTHONPATH": str(REPO)},
        )
        difference, count = largest_relative_difference(
            scratch / "out_r2m", scratch / "out_mergekit"
        )
        shutil.rmtree(scratch / "out_r2m")
        shutil.rmtree(scratch / "out_mergekit")
        rows.append(
            {
                "method": method,
                "mergekit": mergekit_run,
                "r2m_ext": r2m_run,
                "io_floor_s": floor,
                "inputs_read_just_before_s": warm,
                "speedup": mergekit_run["wall_s"] / r2m_run["wall_s"],
                "memory_ratio": r2m_run["peak_rss_bytes"] / mergekit_run["peak_rss_bytes"],
                "tensors": count,
                "largest_relative_difference": difference,
            }
        )
        print(rows[-1], flush=True)

    input_bytes = sum(p.stat().st_size for p in inputs)
    result = {
        "machine": machine_facts(),
        "checkpoints": {**info, "experts_used": args.experts, "input_bytes": input_bytes},
        "max_memory": args.max_memory,
        "configs": {m: CONFIGS[m] for m in args.methods},
        "torch_threads": torch.get_num_threads(),
        "rows": rows,
    }
    facts = result["machine"]
    lines = [
        f"# mergekit 0.1.5 vs r2m merge --config: {info['architecture']} x {args.experts} "
        f"({dtype}, {input_bytes / 1e9:.1f} GB of inputs)",
        "",
        f"{facts['cpu']}, {facts['cores']} cores, commit {facts['commit']}, {facts['date']}; "
        f"r2m_ext under --max-memory {args.max_memory}; mergekit with its defaults (CPU).",
        "",
        "| method | I/O floor | mergekit wall | mergekit peak RSS | r2m_ext wall | "
        "r2m_ext peak RSS | speed-up | memory | largest rel. difference | inputs read just "
        "before each (mergekit, r2m_ext) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        mk, ours = row["mergekit"], row["r2m_ext"]
        lines.append(
            f"| {row['method']} | {row['io_floor_s']:.1f} s | {mk['wall_s']:.1f} s | "
            f"{mk['peak_rss_bytes'] / 1e9:.2f} GB | "
            f"{ours['wall_s']:.1f} s | {ours['peak_rss_bytes'] / 1e9:.2f} GB | "
            f"{row['speedup']:.2f}x | {row['memory_ratio']:.2f} | "
            f"{row['largest_relative_difference']:.1e} | "
            f"{row['inputs_read_just_before_s']['mergekit']:.1f} s, "
            f"{row['inputs_read_just_before_s']['r2m_ext']:.1f} s |"
        )
    stem = (
        f"mergekit_{info['architecture']}_x{args.experts}_{dtype}_{facts['date']}_{facts['commit']}"
    )
    write_results(args.results, stem, result, lines)
    shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
