"""merge_files on real checkpoint files: every input layout, sharded output, recipe, copies."""

import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from checkpoints import save_pickled, save_sharded, save_single
from conftest import make_experts, random_model
from safetensors import safe_open

import r2m_ext
from r2m_ext.io import Checkpoint
from r2m_ext.recipe import load_recipe


def read_output(directory):
    """Every tensor of an output directory, checking the index against the shards on the way."""
    index_file = directory / "model.safetensors.index.json"
    if not index_file.exists():
        with safe_open(str(directory / "model.safetensors"), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    index = json.loads(index_file.read_text())
    tensors = {}
    for file in sorted(set(index["weight_map"].values())):
        with safe_open(str(directory / file), "pt") as f:
            assert f.metadata() == {"format": "pt"}
            for key in f.keys():
                assert index["weight_map"][key] == file
                tensors[key] = f.get_tensor(key)
    assert set(tensors) == set(index["weight_map"])
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for t in tensors.values()
    )
    return tensors


@pytest.fixture
def on_disk(tmp_path):
    base = random_model(0)
    experts = make_experts(base, 3)
    base_dir = save_sharded(
        base, tmp_path / "base", shards=3, config={"model_type": "vit", "hidden_size": 16}
    )
    (base_dir / "preprocessor_config.json").write_text("{}")
    paths = [
        save_single(experts[0], tmp_path / "e0.safetensors"),
        save_sharded(experts[1], tmp_path / "e1", shards=2),
        save_pickled(experts[2], tmp_path / "e2.bin"),
    ]
    return base, experts, base_dir, paths


@pytest.mark.parametrize("method", ["r2m", "ties", "tsv"])
def test_every_input_layout_gives_the_in_memory_result(on_disk, tmp_path, method):
    base, experts, base_dir, paths = on_disk
    out = r2m_ext.merge_files(base_dir, paths, tmp_path / "out", method)
    want = r2m_ext.merge(base, experts, method)
    got = read_output(out)
    assert set(got) == set(want)
    for name in want:
        assert torch.equal(got[name], want[name]), name


def test_sharded_output_and_index(on_disk, tmp_path):
    base, experts, base_dir, paths = on_disk
    out = r2m_ext.merge_files(base_dir, paths, tmp_path / "out", shard_size="4kB")
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    for shard in out.glob("*.safetensors"):
        assert shard.stat().st_size <= 4000 + 4 * 48 * 16 + 1024  # one tensor may exceed alone
    want = r2m_ext.merge(base, experts)
    got = read_output(out)
    assert all(torch.equal(got[n], want[n]) for n in want)


def test_copies_small_non_weight_files_and_writes_recipe(on_disk, tmp_path):
    base, experts, base_dir, paths = on_disk
    out = r2m_ext.merge_files(base_dir, paths, tmp_path / "out", "ties", density=0.3)
    assert json.loads((out / "config.json").read_text())["model_type"] == "vit"
    assert (out / "preprocessor_config.json").exists()
    assert not list(
        out.glob("model-0000*-of-00003.safetensors")
    )  # the base's shards are not copied
    recipe = yaml.safe_load((out / "r2m_recipe.yaml").read_text())
    assert recipe["method"] == "ties"
    assert recipe["options"]["density"] == 0.3 and recipe["options"]["lam"] == 1.0
    assert recipe["experts"] == [str(p.resolve()) for p in paths]
    assert recipe["base"] == str(base_dir.resolve())


def test_recipe_reruns_to_the_same_bytes(on_disk, tmp_path):
    base, experts, base_dir, paths = on_disk
    first = r2m_ext.merge_files(base_dir, paths, tmp_path / "first", shard_size="6kB", alpha=0.4)
    recipe = load_recipe(first / "r2m_recipe.yaml")
    second = r2m_ext.merge_files(
        recipe["base"],
        recipe["experts"],
        tmp_path / "second",
        recipe["method"],
        shard_size=recipe["shard_size"],
        **recipe["options"],
    )
    first_files = sorted(p.name for p in first.glob("*.safetensors"))
    assert (
        first_files == sorted(p.name for p in second.glob("*.safetensors")) and len(first_files) > 1
    )
    for name in first_files + ["model.safetensors.index.json"]:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name


def test_bf16_checkpoints_stay_bf16(tmp_path):
    base = random_model(0, torch.bfloat16)
    experts = make_experts(base, 2)
    paths = [save_single(e, tmp_path / f"e{i}.safetensors") for i, e in enumerate(experts)]
    out = r2m_ext.merge_files(
        save_single(base, tmp_path / "base.safetensors"), paths, tmp_path / "out"
    )
    got = read_output(out)
    assert got["blocks.0.mlp.fc1.weight"].dtype == torch.bfloat16
    want = r2m_ext.merge(base, experts)
    assert all(torch.equal(got[n], want[n]) for n in want)


def test_wrapped_state_dict_in_pt_file(tmp_path):
    base = random_model(0)
    path = tmp_path / "wrapped.pt"
    torch.save({"state_dict": base, "epoch": 3}, path)
    checkpoint = Checkpoint(path)
    assert set(checkpoint.metadata()) == set(base)
    assert torch.equal(checkpoint.read("pos_embed"), base["pos_embed"])


class NotATensor:
    pass


def test_pickles_are_loaded_with_weights_only(tmp_path):
    path = tmp_path / "evil.bin"
    torch.save({"w": torch.zeros(2), "payload": NotATensor()}, path)
    with pytest.raises(r2m_ext.R2MError, match=r"evil.bin: cannot load with weights_only=True"):
        Checkpoint(path)


def test_directory_with_several_files_and_no_index_is_ambiguous(tmp_path):
    save_single({"a": torch.zeros(2)}, tmp_path / "d" / "one.safetensors")
    save_single({"a": torch.zeros(2)}, tmp_path / "d" / "two.safetensors")
    with pytest.raises(r2m_ext.R2MError, match="2 weight files but no index"):
        Checkpoint(tmp_path / "d")


def test_shard_that_does_not_match_its_index(tmp_path):
    directory = save_sharded(random_model(0), tmp_path / "m", shards=2)
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    index["weight_map"]["ghost.weight"] = "model-00001-of-00002.safetensors"
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(
        r2m_ext.R2MError,
        match=r"model-00001-of-00002.safetensors: does not match .* lacks 'ghost.weight'",
    ):
        Checkpoint(directory)


def test_sharded_pickle_directory(tmp_path):
    # pytorch_model.bin.index.json with .bin shards, as older Hugging Face checkpoints ship.
    base = random_model(0)
    directory = tmp_path / "bins"
    names = list(base)
    weight_map = {}
    for i, group in enumerate((names[:5], names[5:]), start=1):
        file = f"pytorch_model-0000{i}-of-00002.bin"
        save_pickled({n: base[n] for n in group}, directory / file)
        weight_map.update({n: file for n in group})
    (directory / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    checkpoint = Checkpoint(directory)
    assert set(checkpoint.metadata()) == set(base)
    assert all(torch.equal(checkpoint.read(n), base[n]) for n in base)


def test_read_buffers_are_reused_only_once_no_tensor_views_them():
    import gc

    from r2m_ext.io.buffers import HostBuffers

    pool = HostBuffers(retain_bytes=1500)
    first = pool.take(1000)
    address = first.data_ptr()
    alias = first.view(torch.float32)[:10]  # a view shares the buffer
    del first
    gc.collect()
    second = pool.take(1000)
    assert second.data_ptr() != address and pool.free_bytes == 0
    del alias
    gc.collect()
    assert pool.free_bytes == 1000
    # A free buffer serves reads of at least half its size, never larger ones.
    assert pool.take(1200).data_ptr() != address
    reused = pool.take(600)
    assert reused.data_ptr() == address and reused.numel() == 600
    # No more than retain_bytes of free buffers are kept.
    del second, reused
    gc.collect()
    assert pool.free_bytes == 1000


def mapped_files() -> list[str]:
    with open("/proc/self/maps") as maps:
        return [line.split()[-1] for line in maps if len(line.split()) >= 6]


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")
def test_reads_map_only_the_tensor_and_unmap_it_with_the_last_view(tmp_path):
    import gc

    from safetensors.torch import save_file

    from r2m_ext.io.safetensors_format import SafetensorsFile

    path = tmp_path / "m.safetensors"
    tensors = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.arange(40000.0).reshape(200, 200)}
    save_file(tensors, str(path))
    original = path.read_bytes()
    reader = SafetensorsFile(path)
    b = reader.read("b")
    rows = reader.read("b", slice(10, 20))
    assert torch.equal(b, tensors["b"]) and torch.equal(rows, tensors["b"][10:20])
    assert torch.equal(reader.read("a"), tensors["a"])
    assert str(path) in mapped_files()
    # Copy-on-write: a merge may work in place on what it read; the file never changes.
    b.mul_(-1)
    assert torch.equal(reader.read("b"), tensors["b"]) and path.read_bytes() == original
    column = b[:, 0]  # a view keeps the mapping
    del b, rows
    gc.collect()
    assert str(path) in mapped_files()
    del column
    gc.collect()
    assert str(path) not in mapped_files()
    reader.close()


def test_data_at_an_offset_its_dtype_cannot_map_aligned_is_read_instead(tmp_path):
    # A header of 8k + 4 bytes puts float64 data off its 8-byte alignment: the reader falls back
    # to a positioned read into an aligned buffer, with the same values.
    from r2m_ext.io.safetensors_format import SafetensorsFile

    values = torch.arange(5.0, dtype=torch.float64)
    header = json.dumps(
        {"x": {"dtype": "F64", "shape": [5], "data_offsets": [0, 40]}}, separators=(",", ":")
    ).encode()
    header += b" " * ((-len(header) + 4) % 8)
    path = tmp_path / "odd.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + values.numpy().tobytes())
    assert (8 + len(header)) % 8 == 4
    reader = SafetensorsFile(path)
    got = reader.read("x")
    assert torch.equal(got, values) and got.data_ptr() % 8 == 0
    reader.close()


def test_a_file_cut_short_after_opening_gives_an_error_not_a_crash(tmp_path):
    from safetensors.torch import save_file

    from r2m_ext.errors import R2MError
    from r2m_ext.io.safetensors_format import SafetensorsFile

    path = tmp_path / "m.safetensors"
    save_file({"w": torch.ones(64, 64)}, str(path))
    reader = SafetensorsFile(path)
    os.truncate(path, path.stat().st_size - 4096)
    with pytest.raises(R2MError, match=r"m\.safetensors: file shrank while reading tensor 'w'"):
        reader.read("w")
    reader.close()
