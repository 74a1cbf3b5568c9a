"""The CLI against a hostile or careless user, with real files on a real filesystem: `--overwrite`
never destroys what is not an r2m_ext output, no input is deleted or changed through a link,
shards stay inside their model, and every bad input ends in the one-line error, never a
traceback."""

import hashlib
import json
import os
import socket
import stat
import struct

import pytest
import torch
from checkpoints import recipe_identity, save_pickled, save_sharded, save_single
from conftest import make_experts, random_model, run_cli, run_main
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from test_cli import assert_clean_failure, merge_args

import r2m_ext
from r2m_ext import ops, reference
from r2m_ext.errors import R2MError
from r2m_ext.io.output import MANIFEST_FILE, partial_dir
from r2m_ext.io.writer import ShardWriter

METHODS = ("r2m", "average", "task_arithmetic", "ties", "dare", "tsv", "cart")


def fingerprint(*roots):
    """Every file under `roots` (links not followed): kind, and content hash of regular files."""
    seen = {}
    for root in roots:
        paths = [root] if not root.is_dir() or root.is_symlink() else sorted(root.rglob("*"))
        for path in paths:
            mode = os.lstat(path).st_mode
            digest = hashlib.sha256(path.read_bytes()).hexdigest() if stat.S_ISREG(mode) else ""
            seen[str(path)] = (stat.S_IFMT(mode), digest)
    return seen


@pytest.fixture
def files(tmp_path):
    base = random_model(0)
    experts = make_experts(base, 2)
    inputs = tmp_path / "inputs"
    base_path = save_single(base, inputs / "base.safetensors")
    expert_paths = [save_single(e, inputs / f"e{i}.safetensors") for i, e in enumerate(experts)]
    return tmp_path, base, experts, base_path, expert_paths


def assert_refused(result, tmp, *fragments):
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("r2m: error: "), result.stderr
    for fragment in fragments:
        assert str(fragment) in lines[0], (fragment, lines[0])
    assert not list(tmp.rglob(".*.r2m-*")), "a temporary directory was left behind"


# -- what --out may be ---------------------------------------------------------------------------


def _make_special(path, kind):
    """A special file of `kind` at path; the test is skipped where this sandbox may not make one."""
    try:
        _make(path, kind)
    except PermissionError:
        pytest.skip(f"cannot make a {kind} here")


def _make(path, kind):
    if kind == "character device":
        os.mknod(path, 0o644 | stat.S_IFCHR, os.makedev(1, 3))  # a copy of /dev/null
    elif kind == "FIFO":
        os.mkfifo(path)
    elif kind == "socket":
        server = socket.socket(socket.AF_UNIX)
        server.bind(str(path))
        server.close()  # the socket file stays
    elif kind == "regular file":
        path.write_text("my notes")
    elif kind == "symbolic link":
        (path.parent / "target").mkdir()
        path.symlink_to(path.parent / "target")


@pytest.mark.parametrize(
    "kind", ["character device", "FIFO", "socket", "regular file", "symbolic link"]
)
@pytest.mark.parametrize("overwrite", [False, True])
def test_out_that_is_not_a_directory_is_never_replaced(files, kind, overwrite):
    tmp, base, experts, base_path, expert_paths = files
    out = tmp / "out"
    _make_special(out, kind)
    before = fingerprint(tmp)
    extra = ["--overwrite"] if overwrite else []
    result = run_main(*merge_args(base_path, expert_paths, out, *extra))
    assert_refused(result, tmp, f"output {out} is a {kind}", "never replaces")
    assert fingerprint(tmp) == before


@pytest.mark.parametrize("kind", ["character device", "FIFO"])
def test_overwrite_onto_a_device_or_fifo_in_a_real_process(files, kind):
    tmp, base, experts, base_path, expert_paths = files
    out = tmp / "out"
    _make_special(out, kind)
    before = fingerprint(tmp)
    result = run_cli(*merge_args(base_path, expert_paths, out, "--overwrite"))
    assert_refused(result, tmp, f"output {out} is a {kind}")
    assert fingerprint(tmp) == before


def test_overwrite_replaces_an_unchanged_earlier_output_and_nothing_else(files):
    tmp, base, experts, base_path, expert_paths = files
    out = tmp / "out"
    assert run_main(*merge_args(base_path, expert_paths, out, "--quiet")).returncode == 0
    manifest = json.loads((out / MANIFEST_FILE).read_text())["files"]
    assert set(manifest) == {"model.safetensors", "r2m_recipe.yaml", "report.json"}
    inputs = fingerprint(base_path.parent)

    again = run_main(*merge_args(base_path, expert_paths, out, "--overwrite", "--alpha", "0.2"))
    assert again.returncode == 0, again.stderr
    assert "alpha: 0.2" in (out / "r2m_recipe.yaml").read_text()

    # An added file, a changed file, a subdirectory: no longer what r2m_ext wrote.
    for change, fragment in [
        (lambda: (out / "notes.txt").write_text("mine"), "holds 'notes.txt'"),
        (lambda: (out / "sub").mkdir(), "holds 'sub'"),
        (
            lambda: (out / "report.json").write_text((out / "report.json").read_text() + " "),
            "'report.json' changed after r2m_ext wrote it",
        ),
    ]:
        change()
        before = fingerprint(tmp)
        result = run_main(*merge_args(base_path, expert_paths, out, "--overwrite"))
        assert_refused(result, tmp, "is not replaced", fragment)
        assert fingerprint(tmp) == before
        assert (
            run_main(*merge_args(base_path, expert_paths, tmp / "fresh", "--quiet")).returncode == 0
        )
        for name in os.listdir(out):
            os.remove(out / name) if (out / name).is_file() else os.rmdir(out / name)
        os.rmdir(out)
        os.rename(tmp / "fresh", out)
    assert fingerprint(base_path.parent) == inputs


def test_a_foreign_directory_is_refused_and_an_empty_one_is_used(files):
    tmp, base, experts, base_path, expert_paths = files
    mine = tmp / "mine"
    mine.mkdir()
    (mine / "model.safetensors").write_bytes(base_path.read_bytes())  # looks like a model
    before = fingerprint(tmp)
    result = run_main(*merge_args(base_path, expert_paths, mine, "--overwrite"))
    assert_refused(result, tmp, "no readable r2m_manifest.json", "not an r2m_ext output")
    assert fingerprint(tmp) == before
    empty = tmp / "empty"
    empty.mkdir()
    assert run_main(*merge_args(base_path, expert_paths, empty, "--quiet")).returncode == 0
    assert (empty / "model.safetensors").is_file()


def test_output_that_changes_during_the_merge_is_checked_again_at_commit(tmp_path):
    layout = [("w", (2, 3), torch.float32)]
    out = tmp_path / "out"
    with ShardWriter(out, layout, 10**6, {"run": 1}) as writer:
        writer.write("w", torch.ones(2, 3))
    with pytest.raises(R2MError, match="holds 'late.txt', which r2m_ext did not write"):
        with ShardWriter(out, layout, 10**6, {"run": 2}, overwrite=True) as writer:
            writer.write("w", torch.zeros(2, 3))
            (out / "late.txt").write_text("written while the merge ran")
    assert (out / "late.txt").read_text() == "written while the merge ran"
    assert torch.equal(load_file(out / "model.safetensors")["w"], torch.ones(2, 3))
    assert not partial_dir(out).exists()


def test_stale_partial_directory_that_is_a_link_is_not_followed(files):
    tmp, base, experts, base_path, expert_paths = files
    out = tmp / "out"
    precious = tmp / "precious"
    precious.mkdir()
    (precious / "data.txt").write_text("keep")
    partial_dir(out).symlink_to(precious)
    result = run_main(*merge_args(base_path, expert_paths, out, "--overwrite"))
    assert result.returncode == 1 and "not a directory r2m_ext made" in result.stderr
    assert (precious / "data.txt").read_text() == "keep"


# -- inputs are never inside the output ---------------------------------------------------------


def test_input_reached_through_a_symlink_is_not_deleted_by_overwrite(files):
    tmp, base, experts, base_path, expert_paths = files
    other = tmp / "other"
    assert run_cli(*merge_args(base_path, expert_paths, other, "--quiet")).returncode == 0
    # The base directory's weights are a link to the earlier output's model file.
    base_dir = tmp / "base_dir"
    base_dir.mkdir()
    (base_dir / "model.safetensors").symlink_to(other / "model.safetensors")
    before = fingerprint(tmp)
    result = run_cli(*merge_args(base_dir, expert_paths, other, "--overwrite"))
    assert_refused(
        result, tmp, f"input file {base_dir / 'model.safetensors'}", "through a link", "inside"
    )
    assert fingerprint(tmp) == before


def test_shard_named_by_an_index_inside_the_output_is_refused(files):
    tmp, base, experts, base_path, expert_paths = files
    out = tmp / "out"
    assert run_main(*merge_args(base_path, expert_paths, out, "--quiet")).returncode == 0
    model = tmp / "model"
    model.mkdir()
    (model / "shard.safetensors").symlink_to(out / "model.safetensors")
    weight_map = {name: "shard.safetensors" for name in base}
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    before = fingerprint(tmp)
    result = run_main(
        *merge_args(model, expert_paths, out, "--overwrite", "--allow-external-shards")
    )
    assert_refused(result, tmp, "shard.safetensors", "inside the output")
    assert fingerprint(tmp) == before


def test_input_hard_linked_into_the_output_is_refused(files):
    tmp, base, experts, base_path, expert_paths = files
    out = tmp / "out"
    assert run_main(*merge_args(base_path, expert_paths, out, "--quiet")).returncode == 0
    linked = tmp / "linked.safetensors"
    os.link(out / "model.safetensors", linked)
    result = run_main(*merge_args(linked, expert_paths, out, "--overwrite"))
    assert_refused(result, tmp, f"input file {linked} is also a file of the output")


# -- shards stay inside their model, and are read by content ------------------------------------


@pytest.mark.parametrize("escape", ["parent", "absolute", "symlink"])
def test_index_shards_outside_the_model_directory_need_an_opt_in(files, escape):
    tmp, base, experts, base_path, expert_paths = files
    model = tmp / "model"
    model.mkdir()
    outside = tmp / "outside.safetensors"
    save_single(base, outside)
    shard = {
        "parent": "../outside.safetensors",
        "absolute": str(outside),
        "symlink": "link.safetensors",
    }[escape]
    if escape == "symlink":
        (model / "link.safetensors").symlink_to(outside)
    index = {"weight_map": {name: shard for name in base}}
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    out = tmp / "out"
    result = run_main(*merge_args(model, expert_paths, out))
    assert_clean_failure(result, out, repr(shard), "lies outside", "--allow-external-shards")
    allowed = run_main(*merge_args(model, expert_paths, out, "--allow-external-shards", "--quiet"))
    assert allowed.returncode == 0, allowed.stderr
    want = r2m_ext.merge(base, experts)
    got = load_file(out / "model.safetensors")
    assert all(torch.equal(got[n], want[n]) for n in want)


def test_hugging_face_cache_snapshot_reads_its_blobs(files):
    tmp, base, experts, base_path, expert_paths = files
    repo = tmp / "models--org--base"
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    save_sharded(base, tmp / "plain", shards=2)
    for file in (tmp / "plain").iterdir():
        blob = repo / "blobs" / hashlib.sha256(file.read_bytes()).hexdigest()
        blob.write_bytes(file.read_bytes())
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    out = tmp / "out"
    assert run_main(*merge_args(snapshot, expert_paths, out, "--quiet")).returncode == 0
    want = r2m_ext.merge(base, experts)
    got = load_file(out / "model.safetensors")
    assert all(torch.equal(got[n], want[n]) for n in want)


def test_files_are_read_by_their_content_not_their_name(files):
    tmp, base, experts, base_path, expert_paths = files
    model = tmp / "model"
    model.mkdir()
    # A safetensors shard named .bin in a pickle index, and a torch.save file named .safetensors.
    names = list(base)
    first, second = names[::2], names[1::2]
    save_single({n: base[n] for n in first}, model / "part1.bin")
    torch.save({n: base[n] for n in second}, model / "part2.safetensors")
    weight_map = {n: "part1.bin" for n in first} | {n: "part2.safetensors" for n in second}
    (model / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    out = tmp / "out"
    result = run_main(*merge_args(model, expert_paths, out, "--quiet"))
    assert result.returncode == 0, result.stderr
    want = r2m_ext.merge(base, experts)
    got = load_file(out / "model.safetensors")
    assert all(torch.equal(got[n], want[n]) for n in want)
    # A pickle that runs code, named .safetensors, still meets weights_only=True.
    evil = tmp / "evil.safetensors"
    torch.save({"w": torch.zeros(1), "run": print}, evil)
    assert_clean_failure(
        run_main(*merge_args(base_path, [evil], tmp / "out2")),
        tmp / "out2",
        "evil.safetensors",
        "weights_only=True",
    )


@pytest.mark.parametrize("kind", ["FIFO", "character device"])
def test_special_files_as_inputs_are_refused_without_blocking(files, kind):
    tmp, base, experts, base_path, expert_paths = files
    special = tmp / "special.safetensors"
    _make_special(special, kind)
    out = tmp / "out"
    result = run_cli(*merge_args(base_path, [special], out))
    assert_clean_failure(result, out, str(special), f"is a {kind}, not a checkpoint")
    # The same file named as a shard of an index.
    model = tmp / "model"
    model.mkdir()
    os.rename(special, model / "shard.safetensors")
    index = {"weight_map": {name: "shard.safetensors" for name in base}}
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    result = run_cli(*merge_args(model, expert_paths, out))
    assert_clean_failure(result, out, "shard.safetensors", f"is a {kind}, not a regular file")


# -- zero-element tensors -----------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_zero_element_tensors_merge_to_empty_tensors_and_change_nothing_else(tmp_path, method):
    base = random_model(0)
    experts = make_experts(base, 2)
    empties = {
        "empty.vector": torch.zeros(0),
        "empty.rows": torch.zeros(0, 12),
        "empty.columns": torch.zeros(12, 0, dtype=torch.bfloat16),
        "head.empty": torch.zeros(0, 3),
        "empty.count": torch.zeros(0, dtype=torch.int64),
    }
    with_empties = [{**state, **empties} for state in [base, *experts]]
    want = r2m_ext.merge(base, experts, method)
    got = r2m_ext.merge(with_empties[0], with_empties[1:], method)
    paths = [save_single(s, tmp_path / f"m{i}.safetensors") for i, s in enumerate(with_empties)]
    out = r2m_ext.merge_files(
        paths[0], paths[1:], tmp_path / "out", method, max_memory="64kB", shard_size="1kB"
    )
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    on_disk = {}
    for shard in set(index.values()):
        on_disk.update(load_file(out / shard))
    for merged in (got, on_disk):
        for name, value in empties.items():
            assert merged[name].shape == value.shape and merged[name].dtype == value.dtype
        for name in want:
            assert torch.equal(merged[name], want[name]), name


# -- NaN and Inf with --allow-nonfinite ---------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("where", ["blocks.0.mlp.fc1.weight", "blocks.0.attn.qkv.bias"])
def test_allow_nonfinite_carries_nan_through_arithmetic_and_refuses_where_a_method_cannot(
    files, method, where
):
    tmp, base, experts, base_path, expert_paths = files
    poisoned = dict(experts[1])
    poisoned[where] = poisoned[where].clone()
    poisoned[where].view(-1)[3] = float("nan")
    save_single(poisoned, expert_paths[1])
    out = tmp / "out"
    result = run_main(
        *merge_args(base_path, expert_paths, out, "--method", method, "--allow-nonfinite")
    )
    factored = where.endswith("weight") and method in ("tsv", "cart")
    if method == "r2m" or factored:
        reason = "every tensor but the heads" if method == "r2m" else "it factors this matrix"
        assert_clean_failure(
            result, out, repr(where), "e1.safetensors", "even with --allow-nonfinite", reason
        )
        return
    assert result.returncode == 0, result.stderr
    merged = load_file(out / "model.safetensors")
    want = r2m_ext.merge(base, [experts[0], poisoned], method, allow_nonfinite=True)
    if method in ("average", "task_arithmetic", "tsv", "cart"):
        # Arithmetic carries the NaN to its entry alone (TIES may trim it, DARE drop it).
        assert merged[where].isnan().view(-1).nonzero().view(-1).tolist() == [3]
    for name in want:
        assert torch.equal(merged[name].isnan(), want[name].isnan()), name
        assert torch.equal(merged[name].nan_to_num(), want[name].nan_to_num()), name


def test_nan_in_a_head_passes_with_allow_nonfinite_under_r2m(files):
    tmp, base, experts, base_path, expert_paths = files
    poisoned = dict(experts[1], **{"head.bias": torch.tensor([float("nan"), 1.0])})
    save_single(poisoned, expert_paths[1])
    out = tmp / "out"
    result = run_main(*merge_args(base_path, expert_paths, out, "--allow-nonfinite", "--quiet"))
    assert result.returncode == 0, result.stderr
    head = load_file(out / "model.safetensors")["head.bias"]
    assert head[0].isnan() and head[1] == (experts[0]["head.bias"][1] + 1.0) / 2


# -- fields from files and the command line -----------------------------------------------------


def test_index_whose_weight_map_value_is_not_a_string(files):
    tmp, base, experts, base_path, expert_paths = files
    model = save_sharded(base, tmp / "model", shards=2)
    index_path = model / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["pos_embed"] = ["model-00001-of-00002.safetensors"]
    index_path.write_text(json.dumps(index))
    out = tmp / "out"
    result = run_main(*merge_args(model, expert_paths, out))
    assert_clean_failure(result, out, str(index_path), "'pos_embed'", "not a file name")


@pytest.mark.parametrize(
    "entry,fragments",
    [
        ({1: torch.zeros(2)}, ["key 1 is a int, not a string"]),
        ({"w": torch.empty(2, 3, device="meta")}, ["'w' is a meta tensor"]),
        ({"w": torch.eye(3).to_sparse()}, ["'w' is a sparse_coo tensor"]),
        ({"w": torch.zeros(2, dtype=torch.complex64)}, ["torch.complex64"]),
    ],
)
def test_pickled_entries_that_are_not_dense_named_tensors(files, entry, fragments):
    tmp, base, experts, base_path, expert_paths = files
    bad = save_pickled({**experts[0], **entry}, tmp / "bad.pt")
    out = tmp / "out"
    result = run_main(*merge_args(base_path, [bad], out))
    assert_clean_failure(result, out, "bad.pt", *fragments)


def test_seed_is_any_64_bit_integer_with_every_method(files):
    tmp, base, experts, base_path, expert_paths = files
    for method in ("r2m", "dare", "tsv", "cart"):
        out = tmp / f"out_{method}"
        result = run_main(
            *merge_args(base_path, expert_paths, out, "--method", method, "--seed", str(2**64))
        )
        assert_clean_failure(result, out, "option seed", "[0, 2**64)")
        top = run_main(
            *merge_args(
                base_path,
                expert_paths,
                out,
                "--method",
                method,
                "--seed",
                str(2**64 - 1),
                "--quiet",
            )
        )
        assert top.returncode == 0, top.stderr
    # The native op receives the seed's 64 bits as torch's int64: the same sketch as the oracle.
    matrix = torch.randn(3, 20, 12, dtype=torch.float64)
    got = ops.randomized_svd(matrix, 3, 4, 1, seed=2**64 - 5, key=7)
    want = reference.randomized_svd(matrix, 3, 4, 1, 2**64 - 5, 7)
    for g, w in zip(got, want, strict=True):
        assert torch.allclose(g.abs(), w.abs(), atol=1e-9)


def test_over_long_paths_are_one_line_errors(files):
    tmp, base, experts, base_path, expert_paths = files
    long_name = tmp / ("x" * 300)
    for args in (
        merge_args(long_name, expert_paths, tmp / "out"),
        merge_args(base_path, expert_paths, long_name),
        merge_args(base_path, expert_paths, tmp / ("d" * 300) / "out"),
    ):
        result = run_main(*args)
        assert_refused(result, tmp, "File name too long")


def test_recipe_that_is_not_utf8_or_has_wrong_types(files):
    tmp, base, experts, base_path, expert_paths = files
    recipe = tmp / "recipe.yaml"
    out = tmp / "out"
    cases = [
        (b"method: r2m\nbase: \xff\xfe\n", "not UTF-8 text"),
        (b"experts: 5\n", "'experts' must be a list of paths"),
        (b"experts: [1, 2]\n", "'experts' must be a list of paths"),
        (b"method: [r2m]\n", "'method' must be a string"),
        (b"base: {a: 1}\n", "'base' must be a string"),
        (b"options: {1: 2}\n", "'options' must be a mapping"),
        (b"1: 2\n", "unknown recipe field(s) 1"),
        (b"shard_size: [1]\n", "'shard_size' must be a size"),
        (b"when: 2001-02-30\n", "not valid YAML"),
        (b"options:\n  head_patterns: 5\n", "expected a list of glob patterns"),
    ]
    for text, fragment in cases:
        recipe.write_bytes(text)
        args = ["merge", "--config", recipe, "--base", base_path, "--out", out]
        args += [part for path in expert_paths for part in ("--expert", path)]
        assert_clean_failure(run_main(*args), out, fragment)


@pytest.mark.parametrize(
    "progress",
    [
        [],
        {"identity": [], "complete": []},
        {"identity": None, "complete": {}},
        "just a string",
    ],
)
def test_resume_with_a_progress_file_of_the_wrong_types(files, progress):
    tmp, base, experts, base_path, expert_paths = files
    out = tmp / "out"
    partial = partial_dir(out)
    partial.mkdir()
    (partial / "r2m_progress.json").write_text(json.dumps(progress))
    result = run_main(*merge_args(base_path, expert_paths, out, "--resume"))
    assert result.returncode == 1 and "no readable r2m_progress.json" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not out.exists()


def test_resume_ignores_shard_numbers_that_are_not_in_the_layout(files):
    tmp, base, experts, base_path, expert_paths = files
    first = tmp / "first"
    assert run_main(*merge_args(base_path, expert_paths, first, "--quiet")).returncode == 0
    out = tmp / "out"
    partial = partial_dir(out)
    partial.mkdir()
    identity = recipe_identity(first / "r2m_recipe.yaml")
    (partial / "r2m_progress.json").write_text(
        json.dumps({"identity": identity, "complete": [5, -1, 0, 0]})
    )
    result = run_main(*merge_args(base_path, expert_paths, out, "--resume", "--quiet"))
    assert result.returncode == 0, result.stderr
    assert (out / "model.safetensors").read_bytes() == (first / "model.safetensors").read_bytes()


def _with_header(path, header, data=b""):
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


_F32_2 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


@pytest.mark.parametrize(
    "header,fragment,reference_words",
    [
        ({"w": {**_F32_2, "shape": [2.0]}}, "invalid JSON in header", "invalid type: floating"),
        ({"w": {**_F32_2, "shape": ["2"]}}, "invalid JSON in header", "invalid type: string"),
        ({"w": {**_F32_2, "shape": [True, 2]}}, "invalid JSON in header", "invalid type: boolean"),
        ({"w": {**_F32_2, "data_offsets": [0.0, 8]}}, "invalid JSON in header", "invalid type"),
        (
            {"__metadata__": {"a": 1}, "w": _F32_2},
            "__metadata__ must map strings to strings",
            "expected a string",
        ),
        ({"__metadata__": [1], "w": _F32_2}, "__metadata__ must map", "expected a map"),
        (b'{"w\xff": ' + json.dumps(_F32_2).encode() + b"}", "invalid UTF-8", "invalid UTF-8"),
        (json.dumps({"w": _F32_2}).encode("utf-16"), "invalid UTF-8", "invalid UTF-8"),
    ],
)
def test_headers_the_reference_reader_rejects_are_rejected_in_its_words(
    files, header, fragment, reference_words
):
    tmp, base, experts, base_path, expert_paths = files
    bad = _with_header(tmp / "bad.safetensors", header, b"\0" * 8)
    with pytest.raises(SafetensorError, match=reference_words):
        safe_open(str(bad), "pt")
    out = tmp / "out"
    result = run_main(*merge_args(base_path, [bad], out))
    assert_clean_failure(result, out, "bad.safetensors", "not a readable safetensors", fragment)


def test_data_beyond_what_the_header_describes(files):
    tmp, base, experts, base_path, expert_paths = files
    bad = _with_header(tmp / "long.safetensors", {"w": _F32_2}, b"\0" * 12)
    with pytest.raises(SafetensorError, match="file not fully covered"):
        safe_open(str(bad), "pt")
    out = tmp / "out"
    result = run_main(*merge_args(base_path, [bad], out))
    assert_clean_failure(result, out, "long.safetensors", "file not fully covered")


def test_header_over_the_size_limit_says_so(files):
    tmp, base, experts, base_path, expert_paths = files
    bad = tmp / "big.safetensors"
    bad.write_bytes(struct.pack("<Q", 100_000_001) + b"{}")
    out = tmp / "out"
    result = run_main(*merge_args(base_path, [bad], out))
    assert_clean_failure(result, out, "big.safetensors", "header too large", "over the limit")


def test_tensor_listed_twice_in_a_header(files):
    tmp, base, experts, base_path, expert_paths = files
    entry = '{"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}'
    bad = _with_header(
        tmp / "twice.safetensors", f'{{"w": {entry}, "w": {entry}}}'.encode(), b"\0" * 8
    )
    out = tmp / "out"
    assert_clean_failure(
        run_main(*merge_args(base_path, [bad], out)),
        out,
        "twice.safetensors",
        "'w' is listed twice",
    )


@pytest.mark.parametrize("flag", ["--alpha", "--lam"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_scales_are_rejected_up_front(files, flag, value):
    tmp, base, experts, base_path, expert_paths = files
    method = "r2m" if flag == "--alpha" else "task_arithmetic"
    out = tmp / "out"
    result = run_main(
        *merge_args(base_path, expert_paths, out, "--method", method, f"{flag}={value}")
    )
    assert_clean_failure(result, out, f"option {flag[2:]}", "not a finite number")


def test_k_larger_than_the_number_of_experts(files):
    tmp, base, experts, base_path, expert_paths = files
    out = tmp / "out"
    result = run_main(*merge_args(base_path, expert_paths, out, "--k", "3"))
    assert_clean_failure(result, out, "option k: 3 is more than the 2 experts")
    assert (
        run_main(*merge_args(base_path, expert_paths, out, "--k", "2", "--quiet")).returncode == 0
    )


def test_exit_codes_unknown_method_on_the_command_line_and_in_a_recipe(files):
    tmp, base, experts, base_path, expert_paths = files
    out = tmp / "out"
    usage = run_cli(*merge_args(base_path, expert_paths, out, "--method", "nope"))
    assert usage.returncode == 2 and "invalid choice: 'nope'" in usage.stderr
    recipe = tmp / "recipe.yaml"
    recipe.write_text("method: nope\n")
    args = ["merge", "--config", recipe, "--base", base_path, "--out", out]
    args += [part for path in expert_paths for part in ("--expert", path)]
    assert_clean_failure(run_cli(*args), out, "unknown method 'nope'")


def test_internal_invariants_are_assertions_not_user_errors(tmp_path):
    layout = [("w", (2, 3), torch.float32)]
    with pytest.raises(AssertionError, match="planned"):
        with ShardWriter(tmp_path / "out", layout, 10**6, {"run": 1}) as writer:
            writer.write("w", torch.ones(2, 4))
    assert not (tmp_path / "out").exists() and not partial_dir(tmp_path / "out").exists()


def test_error_naming_a_path_with_a_newline_stays_one_line(files):
    tmp, base, experts, base_path, expert_paths = files
    odd = tmp / "two\nlines.safetensors"
    odd.write_bytes(b"garbage that is no checkpoint")
    out = tmp / "out"
    result = run_cli(*merge_args(base_path, [odd], out))
    assert_clean_failure(result, out, "two\\nlines.safetensors")


@pytest.mark.parametrize("flag", ["--max-memory", "--shard-size"])
def test_sizes_beyond_any_machine_are_one_line_errors(files, flag):
    tmp, base, experts, base_path, expert_paths = files
    out = tmp / "out"
    result = run_main(*merge_args(base_path, expert_paths, out, flag, "9" * 400))
    assert_clean_failure(result, out, "beyond 2**63 bytes")


def test_overwrite_deletes_nothing_a_manifest_names_outside_the_output(files):
    # An edited manifest listing "../victim.txt" still describes the directory's own files, so
    # the output is replaced; the file it names beside the output must survive.
    tmp, base, experts, base_path, expert_paths = files
    out = tmp / "out"
    assert run_main(*merge_args(base_path, expert_paths, out, "--quiet")).returncode == 0
    victim = tmp / "victim.txt"
    victim.write_text("my only copy")
    found = victim.stat()
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    manifest["files"]["../victim.txt"] = {"size": found.st_size, "mtime_ns": found.st_mtime_ns}
    (out / MANIFEST_FILE).write_text(json.dumps(manifest))
    result = run_main(*merge_args(base_path, expert_paths, out, "--overwrite", "--quiet"))
    assert result.returncode == 0, result.stderr
    assert victim.read_text() == "my only copy"
    assert (out / "model.safetensors").is_file() and not list(tmp.glob(".out.r2m-*"))


def test_report_errors_of_its_own_keep_their_words(files):
    # A report without per-tensor statistics cannot be plotted: the report's own error, not
    # "not a report r2m_ext wrote" (R2MError is a ValueError, which malformed JSON raises too).
    tmp, base, experts, base_path, expert_paths = files
    out = tmp / "out"
    assert (
        run_main(*merge_args(base_path, expert_paths, out, "--method", "average")).returncode == 0
    )
    result = run_main("report", out, "--plot", tmp / "plots")
    assert result.returncode == 1 and "only R²M records them" in result.stderr, result.stderr
    assert "not a report r2m_ext wrote" not in result.stderr
