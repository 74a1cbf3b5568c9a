"""Writes test models to disk in the layouts users have (real files, real formats)."""

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from r2m_ext.options import resolve_options
from r2m_ext.recipe import Recipe, load_recipe


def save_single(state: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata={"format": "pt"})
    return path


def save_sharded(state: dict, directory: Path, shards: int = 3, config: dict | None = None) -> Path:
    """A Hugging Face style sharded directory with model.safetensors.index.json."""
    directory.mkdir(parents=True, exist_ok=True)
    names = list(state)
    groups = [names[i::shards] for i in range(shards)]
    weight_map = {}
    for i, group in enumerate(groups, start=1):
        file = f"model-{i:05d}-of-{shards:05d}.safetensors"
        save_single({n: state[n] for n in group}, directory / file)
        weight_map.update({n: file for n in group})
    total = sum(v.numel() * v.element_size() for v in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    if config is not None:
        (directory / "config.json").write_text(json.dumps(config))
    return directory


def tensors_in(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the .safetensors files of a model directory (an output, a HF model)."""
    found = {}
    for shard in sorted(Path(directory).glob("*.safetensors")):
        found.update(load_file(shard))
    return found


def save_pickled(state: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path


def recipe_identity(recipe_path: Path) -> dict:
    """The identity a --resume progress file must carry for the merge of this recipe."""
    fields = load_recipe(recipe_path)
    options = resolve_options(fields["method"], **fields["options"])
    recipe = Recipe(fields["base"], tuple(fields["experts"]), options, fields["shard_size"])
    return recipe.identity()
