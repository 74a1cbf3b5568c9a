"""Seeded fuzzing of everything `r2m merge` reads from files: safetensors headers, checkpoint
indexes, recipes and --resume progress files, mutated at random and run through the CLI's
`main` (in process, hundreds of cases in seconds). The only allowed outcomes are a merge or the
one-line error with exit 1: never an exception out of `main`, never a changed input, never an
output or partial directory left by a failure, and a resumed merge that succeeds gives the
bytes of an uninterrupted one."""

import hashlib
import json
import random
import struct
from pathlib import Path

import pytest
import yaml
from checkpoints import recipe_identity, save_sharded, save_single
from conftest import make_experts, random_model, run_main

from r2m_ext.io.output import partial_dir
from r2m_ext.io.writer import INDEX_FILE

SEED = 20261207
# Values of every JSON type and the strings a hostile file would try.
_HOSTILE = [
    None,
    True,
    False,
    -1,
    0,
    1,
    2**70,
    -(2**70),
    1.5,
    float("nan"),
    "",
    "x",
    "F32",
    "../outside.safetensors",
    "/etc/hostname",
    "a\u0000b",
    "\udcff",
    "!!python/object/apply:os.system ['echo pwned']",
    [],
    [1],
    [2, 3],
    [-1, 8],
    ["a", 1],
    [[[[[]]]]],
    {},
    {"a": 1},
    {"dtype": "F32"},
]


def _hostile(rng: random.Random):
    return rng.choice(_HOSTILE)


def _fingerprint(directory: Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


class Harness:
    def __init__(self, root: Path):
        self.root = root
        self.inputs = root / "inputs"
        base = random_model(0)
        self.base_state = base
        self.experts = make_experts(base, 2)
        self.base = save_single(base, self.inputs / "base.safetensors")
        self.expert_paths = [
            save_single(e, self.inputs / f"e{i}.safetensors") for i, e in enumerate(self.experts)
        ]
        self.sharded = save_sharded(base, self.inputs / "sharded", shards=3)
        self.cases = 0

    def merge_args(self, base, experts, out, *extra):
        args = ["merge", "--base", base, "--out", out, "--quiet"]
        for path in experts:
            args += ["--expert", path]
        return args + list(extra)

    def check(self, args, out: Path, description: str, partial_existed: bool = False) -> int:
        """Runs one case and checks the allowed outcomes; returns the exit status."""
        self.cases += 1
        before = _fingerprint(self.inputs)
        result = run_main(*args)
        status, stderr = result.returncode, result.stderr
        assert _fingerprint(self.inputs) == before, f"{description}: an input changed"
        if status == 0:
            return status
        lines = stderr.strip().splitlines()
        assert status == 1, f"{description}: exit {status}: {stderr}"
        assert len(lines) == 1 and lines[0].startswith("r2m: error: "), f"{description}: {stderr}"
        assert not out.exists(), f"{description}: failed but left {out}"
        if not partial_existed:
            assert not partial_dir(out).exists(), f"{description}: left a partial directory"
        return status


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    return Harness(tmp_path_factory.mktemp("fuzz"))


def _mutate_header(header: dict, rng: random.Random):
    names = [n for n in header if n != "__metadata__"]
    choice = rng.randrange(6)
    if choice == 0:
        name = rng.choice(names)
        header[name][rng.choice(["dtype", "shape", "data_offsets"])] = _hostile(rng)
    elif choice == 1:
        name = rng.choice(names)
        del header[name][rng.choice(["dtype", "shape", "data_offsets"])]
    elif choice == 2:
        header["__metadata__"] = _hostile(rng)
    elif choice == 3:
        header[rng.choice(names)] = _hostile(rng)
    elif choice == 4:
        name = rng.choice(names)
        shape = header[name]["shape"]
        if shape:
            shape[rng.randrange(len(shape))] += rng.choice([-1, 1, 2**40])
    else:
        return _hostile(rng)
    return header


def _mutated_safetensors(data: bytes, rng: random.Random) -> bytes:
    header_len = struct.unpack("<Q", data[:8])[0]
    header, body = json.loads(data[8 : 8 + header_len]), data[8 + header_len :]
    choice = rng.randrange(5)
    if choice <= 1:
        text = json.dumps(_mutate_header(header, rng)).encode()
        return struct.pack("<Q", len(text)) + text + body
    if choice == 2:  # flip bytes of the header text
        raw = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            raw[8 + rng.randrange(header_len)] = rng.randrange(256)
        return bytes(raw)
    if choice == 3:  # lie about the header length
        length = rng.choice([0, 1, 7, header_len - 1, header_len + 1, 2**40, 2**64 - 1])
        return struct.pack("<Q", length) + data[8:]
    return data[: rng.randrange(len(data))]  # truncated


def test_fuzz_safetensors_headers(harness, tmp_path):
    rng = random.Random(SEED)
    original = harness.expert_paths[1].read_bytes()
    bad = harness.inputs / "mutated.safetensors"
    outcomes = []
    for case in range(300):
        bad.write_bytes(_mutated_safetensors(original, rng))
        out = tmp_path / f"out{case}"
        args = harness.merge_args(
            harness.base,
            [harness.expert_paths[0], bad],
            out,
            "--method",
            rng.choice(["r2m", "ties"]),
        )
        outcomes.append(harness.check(args, out, f"safetensors case {case}"))
    assert outcomes.count(1) > 150  # the mutations mostly break the file


def test_fuzz_index_files(harness, tmp_path):
    rng = random.Random(SEED + 1)
    index_path = harness.sharded / "model.safetensors.index.json"
    original = index_path.read_bytes()
    try:
        for case in range(150):
            index = json.loads(original)
            choice = rng.randrange(5)
            if choice == 0:
                name = rng.choice(list(index["weight_map"]))
                index["weight_map"][name] = _hostile(rng)
            elif choice == 1:
                index["weight_map"] = _hostile(rng)
            elif choice == 2:
                index = _hostile(rng)
            elif choice == 3:
                index["weight_map"][rng.choice(["extra", "pos_embed"])] = rng.choice(
                    ["model-00001-of-00003.safetensors", "model-00009-of-00003.safetensors"]
                )
            text = json.dumps(index).encode()
            if choice == 4:
                text = bytes(b if rng.random() > 0.05 else rng.randrange(256) for b in original)
            index_path.write_bytes(text)
            out = tmp_path / f"out{case}"
            args = harness.merge_args(harness.sharded, harness.expert_paths, out)
            harness.check(args, out, f"index case {case}: {text[:80]!r}")
    finally:
        index_path.write_bytes(original)


def test_fuzz_recipes(harness, tmp_path):
    rng = random.Random(SEED + 2)
    first = tmp_path / "first"
    assert (
        harness.check(harness.merge_args(harness.base, harness.expert_paths, first), first, "") == 0
    )
    valid = (first / "r2m_recipe.yaml").read_text()
    recipe = tmp_path / "recipe.yaml"
    for case in range(200):
        document = yaml.safe_load(valid)
        choice = rng.randrange(5)
        if choice == 0:
            document[rng.choice(list(document))] = _hostile(rng)
        elif choice == 1:
            options = document["options"]
            options[rng.choice(list(options))] = _hostile(rng)
        elif choice == 2:
            document[rng.choice(["experts", "method", "unknown"])] = _hostile(rng)
        text = yaml.safe_dump(document, allow_unicode=True).encode("utf-8", "surrogatepass")
        if choice == 3:
            text = bytes(b if rng.random() > 0.03 else rng.randrange(256) for b in valid.encode())
        elif choice == 4:
            text = rng.choice(
                [b"", b"- a\n- b\n", b"a: &x [*x]\n", b"[" * 5000, b"\xff\xfe", b"!!binary aGk=\n"]
            )
        recipe.write_bytes(text)
        out = tmp_path / f"out{case}"
        status = harness.check(
            ["merge", "--config", recipe, "--out", out, "--quiet"],
            out,
            f"recipe case {case}: {text[:120]!r}",
        )
        if status == 0:  # a mutation the recipe format allows (a smaller shard_size, ...)
            assert (out / "model.safetensors").is_file() or (out / INDEX_FILE).is_file()


def test_fuzz_resume_progress_files(harness, tmp_path):
    rng = random.Random(SEED + 3)
    reference = tmp_path / "reference"
    args = harness.merge_args(harness.base, harness.expert_paths, reference, "--shard-size", "3kB")
    assert harness.check(args, reference, "reference merge") == 0
    identity = recipe_identity(reference / "r2m_recipe.yaml")
    shards = sorted(p.name for p in reference.glob("*.safetensors"))
    assert len(shards) > 2
    for case in range(60):
        out = tmp_path / f"out{case}"
        partial = partial_dir(out)
        partial.mkdir()
        state = {"identity": dict(identity), "complete": list(range(len(shards)))}
        complete = rng.sample(range(len(shards)), rng.randint(0, len(shards)))
        for index in complete:  # shards a real interruption would have left complete
            (partial / shards[index]).write_bytes((reference / shards[index]).read_bytes())
        state["complete"] = complete
        choice = rng.randrange(4)
        if choice == 0:
            state["complete"] = [*complete, _hostile(rng)]
        elif choice == 1:
            state["identity"][rng.choice(list(identity))] = _hostile(rng)
        elif choice == 2:
            state[rng.choice(["identity", "complete"])] = _hostile(rng)
        text = json.dumps(state)
        if rng.random() < 0.1:
            text = text[: rng.randrange(len(text))]
        (partial / "r2m_progress.json").write_text(text)
        args = harness.merge_args(
            harness.base, harness.expert_paths, out, "--shard-size", "3kB", "--resume"
        )
        if harness.check(args, out, f"progress case {case}: {text[:120]}", True) == 0:
            for name in shards:
                assert (out / name).read_bytes() == (reference / name).read_bytes(), case
