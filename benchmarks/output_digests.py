"""A SHA-256 of every merged tensor, for every method and the spec's option variants, under memory
budgets from "everything fits" to "row blocks": run it before and after a change that must not
change a bit (a refactoring), and compare the two JSON files.

    python benchmarks/output_digests.py --out /tmp/before.json [--specialists demo_out/cache/ID]
    python benchmarks/output_digests.py --out /tmp/after.json ... --compare /tmp/before.json

The synthetic model is sharded on disk with float32 and bfloat16 tensors, an excluded embedding,
a conv, biases, a head and an integer buffer; `--specialists` adds a second set of inputs (a
directory with base/ and one directory per expert, as `make demo` caches its specialists).
A merge that fails records its one-line error, so a changed error shows too.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import r2m_ext
from r2m_ext.errors import R2MError

VARIANTS = {
    "r2m": [
        {},
        {"center": True},
        {"residual": "projection"},
        {"norm_scope": "tensor"},
        {"residual_scale": "literal"},
        {"residual_scale": "fixed", "alpha": 0.3},
        {"svd": "exact"},
        {"k": 2, "rank_ratio": 0.25},
        {"compute_dtype": "float64"},
        {"out_dtype": "bfloat16"},
    ],
    "average": [{}],
    "task_arithmetic": [{}, {"lam": 0.5}],
    # float64 compute takes the pure-torch paths of TIES and DARE (float32: the native kernels).
    "ties": [
        {},
        {"ties_scope": "tensor"},
        {"density": 0.5, "lam": 0.7},
        {"compute_dtype": "float64"},
        {"compute_dtype": "float64", "ties_scope": "tensor"},
    ],
    "dare": [
        {},
        {"dare_combine": "ties"},
        {"dare_combine": "ties", "ties_scope": "tensor"},
        {"compute_dtype": "float64"},
        {"compute_dtype": "float64", "dare_combine": "ties"},
    ],
    "tsv": [{}, {"svd": "exact"}],
    "cart": [{}, {"svd": "exact"}],
}
BUDGETS = (None, "1GB", "24MB", "12MB", "3MB")  # None: the in-memory API, merge()


def synthetic_model(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)

    return {
        "patch_embed.proj.weight": rand(64, 3, 4, 4),
        "pos_embed": rand(1, 50, 64),
        "blocks.0.attn.qkv.weight": rand(768, 256),
        "blocks.0.attn.qkv.bias": rand(768),
        "blocks.0.mlp.fc1.weight": rand(512, 256, dtype=torch.bfloat16),
        "blocks.0.mlp.fc2.weight": rand(256, 512),
        "blocks.0.norm1.weight": rand(256),
        "blocks.1.mlp.fc1.weight": rand(1024, 64),
        "head.weight": rand(2, 256),
        "head.bias": rand(2),
        "num_batches_tracked": torch.tensor(7, dtype=torch.int64),
    }


def synthetic_inputs(directory: Path, n_experts: int = 4) -> tuple[Path, list[Path]]:
    base = synthetic_model(0)
    g = torch.Generator().manual_seed(1)
    shared = {
        k: torch.randn(v.shape, generator=g) for k, v in base.items() if v.is_floating_point()
    }
    paths = []
    for index in range(n_experts + 1):
        state = dict(base)
        if index > 0:
            for name, value in base.items():
                if value.is_floating_point():
                    own = torch.randn(value.shape, generator=g)
                    state[name] = (value.float() + 0.05 * (shared[name] + own)).to(value.dtype)
        folder = directory / ("base" if index == 0 else f"expert{index}")
        folder.mkdir(parents=True)
        names = list(state)
        half = len(names) // 2
        weight_map = {}
        for shard, part in enumerate((names[:half], names[half:]), start=1):
            file = f"model-{shard:05d}-of-00002.safetensors"
            save_file({n: state[n].contiguous() for n in part}, str(folder / file))
            weight_map.update(dict.fromkeys(part, file))
        index_file = folder / "model.safetensors.index.json"
        index_file.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        paths.append(folder)
    return paths[0], paths[1:]


def specialist_inputs(directory: Path) -> tuple[Path, list[Path]]:
    experts = sorted(
        p for p in directory.iterdir() if p.is_dir() and p.name not in ("base", "joint")
    )
    return directory / "base", experts


def digest(tensor: torch.Tensor) -> str:
    data = tensor.contiguous().view(torch.uint8) if tensor.dim() else tensor.reshape(1)
    return hashlib.sha256(data.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()[:16]


def load_dir(path: Path) -> dict[str, torch.Tensor]:
    state = {}
    for file in sorted(path.glob("*.safetensors")):
        state.update(load_file(str(file)))
    return state


def run_all(label: str, base: Path, experts: list[Path], scratch: Path) -> dict:
    results = {}
    base_state = load_dir(base)
    expert_states = [load_dir(e) for e in experts]
    for method, variants in VARIANTS.items():
        for options in variants:
            for budget in BUDGETS:
                key = f"{label} {method} {json.dumps(options, sort_keys=True)} {budget}"
                try:
                    if budget is None:
                        merged = r2m_ext.merge(base_state, expert_states, method, **options)
                    else:
                        out = scratch / f"{len(results)}"
                        r2m_ext.merge_files(
                            base, experts, out, method, max_memory=budget, io_threads=0, **options
                        )
                        merged = load_dir(out)
                    results[key] = {name: digest(t) for name, t in sorted(merged.items())}
                except R2MError as error:
                    results[key] = {"error": str(error)}
                print(key, "error" if "error" in results[key] else "ok", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--specialists", type=Path)
    parser.add_argument("--compare", type=Path, help="a JSON file an earlier run wrote")
    args = parser.parse_args()
    torch.set_num_threads(2)  # thread count is part of the determinism contract (spec §7)
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        results = run_all("synthetic", *synthetic_inputs(scratch / "in"), scratch / "out")
        if args.specialists:
            base, experts = specialist_inputs(args.specialists)
            results.update(run_all("specialists", base, experts, scratch / "out_specialists"))
    args.out.write_text(json.dumps(results, indent=1, sort_keys=True))
    if args.compare:
        before = json.loads(args.compare.read_text())
        changed = sorted(
            k for k in before.keys() | results.keys() if before.get(k) != results.get(k)
        )
        for key in changed:
            print("CHANGED:", key)
        print(f"{len(results)} merges, {len(changed)} differ from {args.compare}")
        sys.exit(1 if changed else 0)


if __name__ == "__main__":
    main()
