"""Synthetic but realistic checkpoints for the benchmarks: a base with the tensor names and shapes
of a real architecture, and experts = base + a task vector made of a shared update, an
expert-specific low-rank update and noise, sharded as Hugging Face does. Deterministic from the
seed: every tensor is drawn from a generator keyed by (seed, model, tensor name).

    python benchmarks/make_checkpoints.py vit_l14 --experts 8 --dtype float32 --out /tmp/ckpt
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
from safetensors.torch import save_file


def vit(width: int, depth: int, patch: int, tokens: int, mlp: int) -> dict[str, tuple]:
    shapes = {
        "cls_token": (1, 1, width),
        "pos_embed": (1, tokens, width),
        "patch_embed.proj.weight": (width, 3, patch, patch),
        "patch_embed.proj.bias": (width,),
    }
    for i in range(depth):
        p = f"blocks.{i}."
        shapes.update(
            {
                p + "norm1.weight": (width,),
                p + "norm1.bias": (width,),
                p + "attn.qkv.weight": (3 * width, width),
                p + "attn.qkv.bias": (3 * width,),
                p + "attn.proj.weight": (width, width),
                p + "attn.proj.bias": (width,),
                p + "norm2.weight": (width,),
                p + "norm2.bias": (width,),
                p + "mlp.fc1.weight": (mlp, width),
                p + "mlp.fc1.bias": (mlp,),
                p + "mlp.fc2.weight": (width, mlp),
                p + "mlp.fc2.bias": (width,),
            }
        )
    shapes.update(
        {
            "norm.weight": (width,),
            "norm.bias": (width,),
            "head.weight": (2, width),
            "head.bias": (2,),
        }
    )
    return shapes


def decoder(hidden: int, layers: int, intermediate: int, kv: int, vocab: int = 32000) -> dict:
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update(
            {
                p + "input_layernorm.weight": (hidden,),
                p + "self_attn.q_proj.weight": (hidden, hidden),
                p + "self_attn.k_proj.weight": (kv, hidden),
                p + "self_attn.v_proj.weight": (kv, hidden),
                p + "self_attn.o_proj.weight": (hidden, hidden),
                p + "post_attention_layernorm.weight": (hidden,),
                p + "mlp.gate_proj.weight": (intermediate, hidden),
                p + "mlp.up_proj.weight": (intermediate, hidden),
                p + "mlp.down_proj.weight": (hidden, intermediate),
            }
        )
    shapes.update({"model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)})
    return shapes


ARCHITECTURES = {
    "decoder_tiny": lambda: decoder(64, 2, 160, 16, vocab=256),  # for the benchmarks' smoke tests
    "vit_b16": lambda: vit(768, 12, 16, 197, 3072),  # 86M parameters
    "vit_l14": lambda: vit(1024, 24, 14, 257, 4096),  # 303M
    "decoder_1b": lambda: decoder(2048, 22, 5632, 256),  # TinyLlama-1.1B shapes
    "decoder_7b": lambda: decoder(4096, 32, 11008, 4096),  # Llama-2-7B shapes
}


def generator(seed: int, *keys) -> torch.Generator:
    digest = hashlib.blake2b("\0".join(map(str, (seed, *keys))).encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)


def base_tensor(seed: int, name: str, shape: tuple) -> torch.Tensor:
    values = torch.randn(shape, generator=generator(seed, "base", name))
    return values * (0.02 if len(shape) >= 2 else 0.1) + (1.0 if "norm" in name else 0.0)


def task_vector(seed: int, expert: int, name: str, shape: tuple, rank: int = 8) -> torch.Tensor:
    """Shared update (same for every expert) + expert-specific rank-`rank` update + noise."""
    shared = torch.randn(shape, generator=generator(seed, "shared", name)) * 1e-3
    noise = torch.randn(shape, generator=generator(seed, "noise", expert, name)) * 2e-4
    update = shared + noise
    if len(shape) == 2 and min(shape) > rank:
        g = generator(seed, "lowrank", expert, name)
        left = torch.randn(shape[0], rank, generator=g)
        right = torch.randn(rank, shape[1], generator=g)
        update += (left @ right) * (2e-3 / (rank * shape[1]) ** 0.5)
    return update


def write_model(
    directory: Path, tensors, shapes: dict, dtype: torch.dtype, shard_bytes: int
) -> int:
    """Writes tensors(name) for every name, in shards of at most shard_bytes, with an index."""
    directory.mkdir(parents=True, exist_ok=True)
    groups, filled = [[]], 0
    for name, shape in shapes.items():
        size = torch.Size(shape).numel() * dtype.itemsize
        if groups[-1] and filled + size > shard_bytes:
            groups.append([])
            filled = 0
        groups[-1].append(name)
        filled += size
    weight_map, total = {}, 0
    for i, group in enumerate(groups, start=1):
        file = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        shard = {name: tensors(name).to(dtype).contiguous() for name in group}
        total += sum(t.numel() * t.element_size() for t in shard.values())
        save_file(shard, str(directory / file), metadata={"format": "pt"})
        weight_map.update({name: file for name in group})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    (directory / "config.json").write_text(json.dumps({"r2m_benchmark": True}))
    return total


def _write_one(
    architecture: str, model: str, seed: int, dtype: str, directory: Path, shard_size: int
) -> int:
    """Writes one model of the set: "base" or "expert_<i>"."""
    shapes = ARCHITECTURES[architecture]()
    if model == "base":

        def tensor(name):
            return base_tensor(seed, name, shapes[name])

    else:
        expert = int(model.removeprefix("expert_"))

        def tensor(name):
            return base_tensor(seed, name, shapes[name]) + task_vector(
                seed, expert, name, shapes[name]
            )

    return write_model(directory, tensor, shapes, getattr(torch, dtype), shard_size)


def make(
    architecture: str,
    experts: int,
    dtype: str,
    out: Path,
    seed: int = 0,
    shard_size: int = 2 * 10**9,
    jobs: int = 1,
) -> dict:
    """Writes base/ and expert_<i>/ under `out`. `jobs` > 1 writes that many models at once in
    worker processes (each tensor comes from its own keyed generator, so the files are the same)."""
    shapes = ARCHITECTURES[architecture]()
    models = ["base"] + [f"expert_{i}" for i in range(experts)]
    arguments = [(architecture, m, seed, dtype, out / m, shard_size) for m in models]
    if jobs <= 1:
        totals = [_write_one(*a) for a in arguments]
    else:
        threads = max(1, (os.cpu_count() or 1) // jobs)
        with ProcessPoolExecutor(
            jobs,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=torch.set_num_threads,
            initargs=(threads,),
        ) as pool:
            totals = list(pool.map(_write_one, *zip(*arguments, strict=True)))
    info = {
        "architecture": architecture,
        "experts": experts,
        "dtype": dtype,
        "seed": seed,
        "parameters": sum(torch.Size(s).numel() for s in shapes.values()),
        "bytes": dict(zip(models, totals, strict=True)),
    }
    (out / "checkpoints.json").write_text(json.dumps(info, indent=1))
    return info


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("architecture", choices=sorted(ARCHITECTURES))
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="bfloat16")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--jobs", type=int, default=1, help="models written at once (processes)")
    args = parser.parse_args()
    info = make(args.architecture, args.experts, args.dtype, args.out, args.seed, jobs=args.jobs)
    total = sum(info["bytes"].values())
    print(
        f"{args.architecture}: {info['parameters'] / 1e6:.0f}M parameters, base + {args.experts} "
        f"experts in {args.dtype}, {total / 1e9:.2f} GB in {args.out}"
    )


if __name__ == "__main__":
    main()
