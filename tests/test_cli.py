"""The real `r2m` command in a subprocess: success paths, and every bad input of the foundation
issue giving one clear line on stderr, a non-zero exit, and no output left behind."""

import json
import os
import resource
import shlex
import subprocess
import sys

import pytest
import torch
from checkpoints import save_pickled, save_sharded, save_single
from conftest import REPO, make_experts, random_model, run_cli
from safetensors.torch import load_file


@pytest.fixture
def files(tmp_path):
    base = random_model(0)
    experts = make_experts(base, 2)
    base_path = save_single(base, tmp_path / "base.safetensors")
    expert_paths = [save_single(e, tmp_path / f"e{i}.safetensors") for i, e in enumerate(experts)]
    return tmp_path, base, experts, base_path, expert_paths


def merge_args(base_path, expert_paths, out, *extra):
    args = ["merge", "--base", base_path, "--out", out]
    for path in expert_paths:
        args += ["--expert", path]
    return args + list(extra)


def assert_clean_failure(result, out, *fragments):
    assert result.returncode != 0, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("r2m: error: "), result.stderr
    for fragment in fragments:
        assert str(fragment) in lines[0], (fragment, lines[0])
    assert not out.exists(), f"{out} was left behind"
    assert not list(out.parent.glob(f".{out.name}.r2m-*")), "a temporary directory was left behind"


def test_merge_prints_a_summary_and_quiet_prints_nothing(files):
    tmp, base, experts, base_path, expert_paths = files
    result = run_cli(*merge_args(base_path, expert_paths, tmp / "out"))
    assert result.returncode == 0, result.stderr
    assert "merged 2 experts with r2m into" in result.stdout
    assert "Real core coefficients" in result.stdout and "eta" in result.stdout
    quiet = run_cli(*merge_args(base_path, expert_paths, tmp / "quiet", "--quiet"))
    assert quiet.returncode == 0 and quiet.stdout == "" and quiet.stderr == ""
    assert load_file(tmp / "out" / "model.safetensors").keys() == base.keys()


def test_cli_options_reach_the_method(files):
    tmp, base, experts, base_path, expert_paths = files
    out = tmp / "out"
    result = run_cli(
        *merge_args(
            base_path,
            expert_paths,
            out,
            "--method",
            "ties",
            "--density",
            "0.5",
            "--ties-scope",
            "tensor",
            "--head-patterns",
            "head.*",
            "--quiet",
        )
    )
    assert result.returncode == 0, result.stderr
    import r2m_ext

    want = r2m_ext.merge(
        base, experts, "ties", density=0.5, ties_scope="tensor", head_patterns=["head.*"]
    )
    got = load_file(out / "model.safetensors")
    assert all(torch.equal(got[n], want[n]) for n in want)


def test_config_reruns_to_the_same_bytes_and_flags_override(files):
    tmp, base, experts, base_path, expert_paths = files
    first = tmp / "first"
    assert (
        run_cli(
            *merge_args(base_path, expert_paths, first, "--shard-size", "5kB", "--quiet")
        ).returncode
        == 0
    )
    again = run_cli(
        "merge", "--config", first / "r2m_recipe.yaml", "--out", tmp / "again", "--quiet"
    )
    assert again.returncode == 0, again.stderr
    shards = sorted(p.name for p in first.glob("*.safetensors"))
    assert len(shards) > 1
    for name in shards:
        assert (first / name).read_bytes() == (tmp / "again" / name).read_bytes()
    changed = run_cli(
        "merge",
        "--config",
        first / "r2m_recipe.yaml",
        "--out",
        tmp / "changed",
        "--alpha",
        "0.2",
        "--quiet",
    )
    assert changed.returncode == 0, changed.stderr
    assert "alpha: 0.2" in (tmp / "changed" / "r2m_recipe.yaml").read_text()


def test_inspect_shows_classes(files):
    tmp, base, experts, base_path, expert_paths = files
    result = run_cli("inspect", base_path)
    assert result.returncode == 0, result.stderr
    rows = {
        line.split()[0]: line.split()[1]
        for line in result.stdout.splitlines()[2:]
        if line.strip() and ":" not in line
    }
    assert rows["blocks.0.attn.qkv.weight"] == "matrix"
    assert rows["pos_embed"] == "other"  # excluded from truncation by *pos*
    assert rows["head.weight"] == "head"
    assert rows["num_batches_tracked"] == "non-float"
    assert "matrix:     3 tensors" in result.stdout  # qkv, fc1, fc2; proj is 1 x 16


def test_help_explains_the_commands():
    result = run_cli("--help")
    assert result.returncode == 0 and "r2m merge --base" in result.stdout
    merge_help = run_cli("merge", "--help")
    assert (
        "--rank-ratio" in merge_help.stdout and "default: r2m 0.1, cart 0.12" in merge_help.stdout
    )


def rewrite(path, state):
    save_single(state, path)
    return path


@pytest.mark.parametrize(
    "breakage,fragments",
    [
        ("shape", ["'pos_embed'", "[6, 16]", "e1.safetensors", "base.safetensors"]),
        ("missing", ["'blocks.0.norm1.weight'", "missing from expert", "e1.safetensors"]),
        ("dtype", ["'pos_embed'", "torch.float64", "e1.safetensors"]),
        ("nan", ["'blocks.0.mlp.fc1.weight'", "e1.safetensors", "NaN or Inf", "--allow-nonfinite"]),
        ("garbage", ["e1.safetensors", "not a readable safetensors file"]),
        ("truncated", ["e1.safetensors", "not a readable safetensors file"]),
        ("absent", ["e1.safetensors", "no such file"]),
    ],
)
def test_bad_expert_is_a_one_line_error_with_no_output(files, breakage, fragments):
    tmp, base, experts, base_path, expert_paths = files
    bad = expert_paths[1]
    state = dict(experts[1])
    if breakage == "shape":
        rewrite(bad, dict(state, pos_embed=torch.zeros(6, 16)))
    elif breakage == "missing":
        rewrite(bad, {k: v for k, v in state.items() if k != "blocks.0.norm1.weight"})
    elif breakage == "dtype":
        rewrite(bad, dict(state, pos_embed=state["pos_embed"].double()))
    elif breakage == "nan":
        weight = state["blocks.0.mlp.fc1.weight"].clone()
        weight[1, 2] = float("inf")
        rewrite(bad, dict(state, **{"blocks.0.mlp.fc1.weight": weight}))
    elif breakage == "garbage":
        bad.write_bytes(b"this is not a checkpoint at all")
    elif breakage == "truncated":
        bad.write_bytes(bad.read_bytes()[:-100])
    elif breakage == "absent":
        bad.unlink()
    out = tmp / "out"
    assert_clean_failure(run_cli(*merge_args(base_path, expert_paths, out)), out, *fragments)
    if breakage == "nan":
        allowed = run_cli(
            *merge_args(
                base_path, expert_paths, out, "--allow-nonfinite", "--method", "average", "--quiet"
            )
        )
        assert allowed.returncode == 0, allowed.stderr


def test_missing_shard_of_a_sharded_directory(tmp_path):
    base = random_model(0)
    directory = save_sharded(base, tmp_path / "base", shards=2)
    (directory / "model-00002-of-00002.safetensors").unlink()
    expert = save_single(make_experts(base, 1)[0], tmp_path / "e.safetensors")
    out = tmp_path / "out"
    assert_clean_failure(
        run_cli(*merge_args(directory, [expert], out)),
        out,
        "model-00002-of-00002.safetensors",
        "missing",
        "model.safetensors.index.json",
    )


def test_unsafe_pickle_is_refused(tmp_path):
    base = random_model(0)
    base_path = save_single(base, tmp_path / "base.safetensors")
    evil = tmp_path / "evil.bin"
    torch.save({"w": torch.zeros(1), "run": print}, evil)
    out = tmp_path / "out"
    assert_clean_failure(
        run_cli(*merge_args(base_path, [evil], out)), out, "evil.bin", "weights_only=True"
    )


def test_output_equal_to_or_inside_an_input(tmp_path):
    base = random_model(0)
    base_dir = save_sharded(base, tmp_path / "base", shards=2)
    expert = save_pickled(make_experts(base, 1)[0], tmp_path / "expert.pt")
    before = {p.name: p.read_bytes() for p in base_dir.iterdir()}
    result = run_cli(*merge_args(base_dir, [expert], base_dir, "--overwrite"))
    assert (
        result.returncode != 0
        and "is the input" in result.stderr
        and str(base_dir) in result.stderr
    )
    inside = base_dir / "merged"
    assert_clean_failure(
        run_cli(*merge_args(base_dir, [expert], inside)), inside, "inside the input", base_dir
    )
    assert {p.name: p.read_bytes() for p in base_dir.iterdir()} == before


def test_existing_output_needs_overwrite_and_only_an_earlier_output_is_replaced(files):
    tmp, base, experts, base_path, expert_paths = files
    out = tmp / "out"
    assert run_cli(*merge_args(base_path, expert_paths, out, "--quiet")).returncode == 0
    first = (out / "model.safetensors").stat().st_ino
    result = run_cli(*merge_args(base_path, expert_paths, out, "--method", "average"))
    assert result.returncode == 1 and "exists and is not empty; pass --overwrite" in result.stderr
    assert (out / "model.safetensors").stat().st_ino == first
    replaced = run_cli(
        *merge_args(base_path, expert_paths, out, "--method", "average", "--overwrite", "--quiet")
    )
    assert replaced.returncode == 0, replaced.stderr
    assert "method: average" in (out / "r2m_recipe.yaml").read_text()
    assert not list(tmp.glob(".out.r2m-*"))
    mine = tmp / "mine"
    mine.mkdir()
    (mine / "keep.txt").write_text("my only copy")
    refused = run_cli(*merge_args(base_path, expert_paths, mine, "--overwrite"))
    assert refused.returncode == 1 and "not an r2m_ext output" in refused.stderr
    assert (mine / "keep.txt").read_text() == "my only copy"


def test_write_failure_leaves_no_output(files):
    # A real failing write: the file-size limit makes the shard write fail with EFBIG partway,
    # as a full disk would (Python ignores SIGXFSZ, so write() returns the error).
    tmp, base, experts, base_path, expert_paths = files
    out = tmp / "out"

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (2048, 2048))  # qkv alone is 3 kB

    result = run_cli(
        *merge_args(base_path, expert_paths, out, "--shard-size", "2kB"), preexec_fn=limit_file_size
    )
    assert_clean_failure(result, out, "write failed")


def test_option_errors_are_one_line(files):
    tmp, base, experts, base_path, expert_paths = files
    out = tmp / "out"
    assert_clean_failure(
        run_cli(*merge_args(base_path, expert_paths, out, "--density", "0.3")),
        out,
        "density",
        "do not apply to method 'r2m'",
    )
    assert_clean_failure(
        run_cli(*merge_args(base_path, expert_paths, out, "--rank-ratio", "0")),
        out,
        "rank_ratio",
        "(0, 1]",
    )
    assert_clean_failure(
        run_cli(*merge_args(base_path, expert_paths, out, "--shard-size", "lots")),
        out,
        "cannot read size 'lots'",
    )
    recipe = tmp / "bad.yaml"
    recipe.write_text("method: r2m\nbase: [unclosed\n")
    assert_clean_failure(
        run_cli("merge", "--config", recipe, "--out", out), out, "bad.yaml", "not valid YAML"
    )


def _in_private_mount(tmp, mount_options, *cli_args):
    """Runs the CLI in a private mount namespace with a tmpfs mounted at tmp/mnt (nothing is
    mounted outside the namespace, nothing to clean up)."""
    mount_point = tmp / "mnt"
    mount_point.mkdir(exist_ok=True)
    command = " ".join(
        [
            f"mount -t tmpfs -o {mount_options} tmpfs {mount_point} &&",
            sys.executable,
            "-m",
            "r2m_ext",
        ]
        + [shlex.quote(str(a)) for a in cli_args]
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        ["unshare", "-rm", "sh", "-c", command],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def _private_mounts_work() -> bool:
    try:
        return subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode == 0
    except FileNotFoundError:
        return False


needs_mounts = pytest.mark.skipif(not _private_mounts_work(), reason="unshare -rm not permitted")


@needs_mounts
def test_full_disk_leaves_nothing(files):
    # A real 16 kB filesystem: the 40 kB output cannot fit, the write fails with ENOSPC.
    tmp, base, experts, base_path, expert_paths = files
    out = tmp / "mnt" / "out"
    result = _in_private_mount(tmp, "size=16k", *merge_args(base_path, expert_paths, out))
    assert result.returncode == 1, result.stderr
    assert "write failed (No space left on device)" in result.stderr and str(out) in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@needs_mounts
def test_read_only_output_directory(files):
    tmp, base, experts, base_path, expert_paths = files
    out = tmp / "mnt" / "out"
    result = _in_private_mount(tmp, "ro,size=1m", *merge_args(base_path, expert_paths, out))
    assert result.returncode == 1, result.stderr
    assert (
        "cannot create output (Read-only file system)" in result.stderr
        and str(out) in result.stderr
    )


def test_header_that_lies_about_sizes(files):
    tmp, base, experts, base_path, expert_paths = files
    bad = expert_paths[1]
    data = bad.read_bytes()
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_len])
    header["pos_embed"]["shape"] = [5, 17]  # 340 bytes claimed for a 320-byte span
    text = json.dumps(header).encode()
    bad.write_bytes(len(text).to_bytes(8, "little") + text + data[8 + header_len :])
    out = tmp / "out"
    assert_clean_failure(
        run_cli(*merge_args(base_path, expert_paths, out)),
        out,
        "e1.safetensors",
        "'pos_embed'",
        "[5, 17]",
        "needs 340 bytes but its offsets span 320",
    )
