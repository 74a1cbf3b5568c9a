"""What R²M keeps between its truncation pass and its write pass (the truncation factors): in
memory, in a scratch file, or recomputed, always the same bits; the report says which tier served
each matrix and how often each was factored; the scratch file never outlives the merge."""

import json
import os
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import threading

import pytest
import torch
from checkpoints import save_sharded
from conftest import REPO, make_experts
from safetensors.torch import load_file, save_file

import r2m_ext
from r2m_ext.engine.inputs import MergeInputs
from r2m_ext.engine.kept import KeptStore

N_EXPERTS = 3


def model(seed: int = 0) -> dict[str, torch.Tensor]:
    """Matrices large enough that their factors (rank 12-25, ~40-140 kB each) can outgrow a small
    budget, plus a bias, an excluded embedding and a head."""
    g = torch.Generator().manual_seed(seed)
    shapes = {
        "pos_embed": (50, 64),
        "blocks.0.attn.qkv.weight": (384, 128),
        "blocks.0.attn.qkv.bias": (384,),
        "blocks.0.mlp.fc1.weight": (256, 128),
        "blocks.0.mlp.fc2.weight": (128, 256),
        "blocks.1.mlp.fc1.weight": (512, 128),
        "head.weight": (2, 128),
    }
    return {name: torch.randn(shape, generator=g) for name, shape in shapes.items()}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    directory = tmp_path_factory.mktemp("factor_store")
    base = model()
    paths = [save_sharded(base, directory / "base", shards=2)]
    for index, expert in enumerate(make_experts(base, N_EXPERTS)):
        paths.append(save_sharded(expert, directory / f"expert{index}", shards=2))
    return paths


def merged(out) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(out.glob("*.safetensors"))}


def merge(inputs, out, **arguments):
    report: dict = {}
    arguments = {"io_threads": 0, **arguments}
    r2m_ext.merge_files(inputs[0], inputs[1:], out, report=report, **arguments)
    return report


TRUNCATED = 4  # the four weight matrices; pos_embed is excluded, the rest are not matrices


@pytest.mark.parametrize("max_memory", ["1GB", "2MB", "1200kB", "700kB"])
def test_every_tier_gives_the_same_bits_and_the_report_counts_factorisations(
    inputs, tmp_path, max_memory
):
    kept = merge(inputs, tmp_path / "kept", max_memory=max_memory)
    recomputed = merge(inputs, tmp_path / "recomputed", max_memory=max_memory, scratch_dir="none")
    assert merged(tmp_path / "kept") == merged(tmp_path / "recomputed")

    for report in (kept, recomputed):
        tiers = [report["tensors"][name].get("factors") for name in report["tensors"]]
        assert sorted(t for t in tiers if t) == sorted(
            ["memory"] * report["factors_cached"]
            + ["host"] * report["factors_in_host_memory"]
            + ["scratch"] * report["factors_spilled"]
            + ["recomputed"] * report["factors_recomputed"]
        )
        assert len([t for t in tiers if t]) == TRUNCATED
        # Every truncated matrix is factored once for all N experts in the truncation pass; the
        # write pass factors again exactly the ones no tier kept.
        assert report["factorisations"]["R²M truncation pass"] == TRUNCATED * N_EXPERTS
        again = report["factorisations"].get("R²M write pass", 0)
        assert again == report["factors_recomputed"] * N_EXPERTS
    assert recomputed["factors_spilled"] == 0
    # With a scratch file nothing is factored twice, whatever the budget.
    assert kept["factors_recomputed"] == 0
    io = kept["io_bytes"]
    written = io["R²M truncation pass"]["scratch_bytes_written"]
    assert io["R²M write pass"]["scratch_bytes_read"] == written
    assert (written > 0) == (kept["factors_spilled"] > 0)
    assert io["R²M gram pass"]["input_bytes_read"] > 0


def test_small_budgets_spill_and_a_large_one_keeps_every_factor_in_memory(inputs, tmp_path):
    large = merge(inputs, tmp_path / "large", max_memory="1GB")
    small = merge(inputs, tmp_path / "small", max_memory="700kB")
    assert large["factors_cached"] == TRUNCATED and large["factors_spilled"] == 0
    assert small["factors_spilled"] == TRUNCATED


FACTOR_BYTES = {  # rank 12 of min(m, n) = 128 for each, float32, 3 experts: 12 (m + n) * 3 * 4
    "blocks.0.attn.qkv.weight": 73_728,
    "blocks.0.mlp.fc1.weight": 55_296,
    "blocks.0.mlp.fc2.weight": 55_296,
    "blocks.1.mlp.fc1.weight": 92_160,
}


@pytest.mark.parametrize("io_threads", [0, 2])
def test_host_memory_then_scratch_give_the_same_bits_written_behind_and_read_ahead(
    inputs, tmp_path, io_threads, monkeypatch
):
    """Beyond the budget (1200 kB holds no factors), --host-memory holds what fits, in plan
    order, the scratch file the rest; with I/O threads the scratch writes happen behind the
    truncation pass (those within 5% of the budget, 60 kB: the 55 kB ones) and the write pass
    reads the factors ahead. Every way gives the bytes of recomputing."""
    threads = {"write": [], "read": []}
    write, read = KeptStore._write, MergeInputs._read_kept

    def noted(what, function):
        def run(*args):
            threads[what].append(threading.current_thread().name.split("_")[0])
            return function(*args)

        return run

    monkeypatch.setattr(KeptStore, "_write", noted("write", write))
    monkeypatch.setattr(MergeInputs, "_read_kept", noted("read", read))
    reference = merge(inputs, tmp_path / "reference", max_memory="1200kB", scratch_dir="none")
    assert reference["factors_recomputed"] == TRUNCATED
    # 150 kB: the first two matrices' factors in plan order (fc2 and qkv: 129 kB), not a third.
    for host_memory, in_host in (("1GB", TRUNCATED), ("150kB", 2), ("0", 0)):
        out = tmp_path / f"host_{host_memory}"
        threads["write"].clear(), threads["read"].clear()
        report = merge(
            inputs, out, max_memory="1200kB", host_memory=host_memory, io_threads=io_threads
        )
        assert merged(out) == merged(tmp_path / "reference"), host_memory
        assert report["factors_in_host_memory"] == in_host
        assert report["factors_spilled"] == TRUNCATED - in_host
        assert report["factors_cached"] == report["factors_recomputed"] == 0
        assert "R²M write pass" not in report["factorisations"]
        in_plan_order = [n for n, t in report["tensors"].items() if "factors" in t]
        in_host_names = [n for n in in_plan_order if report["tensors"][n]["factors"] == "host"]
        assert in_host_names == in_plan_order[:in_host]
        host = report["memory"]["host_memory"]
        assert host["peak_kept"] == sum(FACTOR_BYTES[n] for n in in_host_names)
        io = report["io_bytes"]
        spilled = sum(FACTOR_BYTES[n] for n in in_plan_order[in_host:])
        assert io["R²M truncation pass"]["scratch_bytes_written"] == spilled
        assert io["R²M write pass"]["scratch_bytes_read"] == spilled
        assert len(threads["write"]) == TRUNCATED - in_host
        if io_threads == 0:
            assert set(threads["write"]) <= {"MainThread"} and threads["read"] == []
            continue
        # fc2 and fc1 (55 kB each) behind the pass; qkv (74 kB) and blocks.1 (92 kB) at once.
        behind = [n for n in in_plan_order[in_host:] if FACTOR_BYTES[n] <= 60_000]
        assert threads["write"].count("r2m-scratch") == len(behind)
        assert threads["read"] == ["r2m-read"] * (TRUNCATED - in_host)


def test_the_host_tier_defaults_to_a_quarter_of_available_memory_on_a_gpu_and_none_on_the_cpu():
    from r2m_ext.engine.budget import available_memory, host_tier_bytes

    cpu, cuda = torch.device("cpu"), torch.device("cuda")  # a device name: no GPU needed
    assert host_tier_bytes(None, cpu) == 0
    for given, want in (("0", 0), ("0GB", 0), ("0.0 MB", 0), ("1MB", 10**6), (4096, 4096)):
        assert host_tier_bytes(given, cuda) == want, given
    # Two ranks of a machine share it; available memory moves a little between the two reads.
    default = host_tier_bytes(None, cuda, sharing=2)
    assert abs(default - available_memory() // 8) < 0.05 * available_memory() // 8
    with pytest.raises(r2m_ext.R2MError, match="cannot read size 'lots'"):
        host_tier_bytes("lots", cpu)


def test_host_memory_from_the_command_line(inputs, tmp_path):
    common = ["--base", inputs[0], *[a for p in inputs[1:] for a in ("--expert", p)]]
    common += ["--max-memory", "700kB", "--quiet"]
    result = _cli(*common, "--out", tmp_path / "out", "--host-memory", "1MB")
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["factors_in_host_memory"] == TRUNCATED
    assert report["memory"]["host_memory"]["limit"] == 10**6
    bad = _cli(*common, "--out", tmp_path / "bad", "--host-memory", "lots")
    assert bad.returncode == 1 and "cannot read size 'lots'" in bad.stderr, bad.stderr
    assert not (tmp_path / "bad").exists()


def _scratch_fds() -> set[str]:
    """This process's open files that are anonymous scratch files."""
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if "r2m-scratch" in target or "O_TMPFILE" in target or "(deleted)" in target:
            found.add(target)
    return found


def test_the_scratch_file_is_gone_after_success_and_after_an_error(inputs, tmp_path):
    before = _scratch_fds()
    report = merge(inputs, tmp_path / "ok", max_memory="700kB")
    assert report["factors_spilled"] == TRUNCATED
    assert _scratch_fds() == before
    assert sorted(p.name for p in (tmp_path / "ok").iterdir() if "scratch" in p.name) == []

    # An error in the write pass, after the factors were spilled: a head that is not finite.
    broken = tmp_path / "broken_expert"
    state = load_file(str(next(inputs[1].glob("*00001-of*"))))
    shutil.copytree(inputs[1], broken)
    name = next(n for n in state if n.startswith("head"))
    state[name][0, 0] = float("nan")
    save_file(state, str(next(broken.glob("*00001-of*"))))
    with pytest.raises(r2m_ext.R2MError, match="contains NaN or Inf"):
        merge([inputs[0], broken, *inputs[2:]], tmp_path / "failed", max_memory="700kB")
    assert _scratch_fds() == before
    assert not (tmp_path / "failed").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".failed")] == []


def _limit_file_size():
    # Writes past the limit fail with EFBIG (SIGXFSZ ignored) as on a full disk: enough for the
    # first factors (~150 kB) and every output shard (bfloat16, under 100 kB), not all factors.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))


def _cli(*args, preexec_fn=None):
    return subprocess.run(
        [sys.executable, "-m", "r2m_ext", "merge", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=REPO,
        preexec_fn=preexec_fn,
        timeout=300,
    )


def test_a_full_scratch_disk_falls_back_to_recomputation_with_the_same_bits(inputs, tmp_path):
    common = ["--base", inputs[0], *[a for p in inputs[1:] for a in ("--expert", p)]]
    common += ["--max-memory", "700kB", "--out-dtype", "bfloat16", "--shard-size", "100kB"]
    full = _cli(*common, "--out", tmp_path / "full", preexec_fn=_limit_file_size)
    assert full.returncode == 0, full.stderr
    none = _cli(*common, "--out", tmp_path / "none", "--scratch-dir", "none")
    assert none.returncode == 0, none.stderr
    assert merged(tmp_path / "full") == merged(tmp_path / "none")
    report = json.loads((tmp_path / "full" / "report.json").read_text())
    assert 0 < report["factors_spilled"] < TRUNCATED  # the disk took some, then was full
    assert report["factors_recomputed"] == TRUNCATED - report["factors_spilled"]


def test_scratch_space_is_checked_before_the_merge_starts(inputs, tmp_path):
    tiny = tmp_path / "tiny"
    tiny.mkdir()
    out = tmp_path / "out"
    merge_command = [sys.executable, "-m", "r2m_ext", "merge", "--base", inputs[0]]
    merge_command += [a for p in inputs[1:] for a in ("--expert", p)]
    merge_command += ["--max-memory", "700kB", "--scratch-dir", tiny, "--out", out]
    result = _in_a_small_tmpfs(tiny, "64k", merge_command)
    assert result.returncode == 1, result.stderr
    assert f"{tiny}: the scratch space" in result.stderr and "free" in result.stderr
    assert "--scratch-dir none" in result.stderr
    assert not out.exists()


def _in_a_small_tmpfs(directory, size: str, command: list) -> subprocess.CompletedProcess:
    """Runs `command` (in the repository) with a fresh tmpfs of `size` mounted on `directory`,
    in a user and mount namespace of its own (no privileges needed); skips where it cannot."""
    if shutil.which("unshare") is None:
        pytest.skip("no unshare to mount a small tmpfs without privileges")
    mount = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c"]
    mount_tmpfs = f"mount -t tmpfs -o size={size} none {directory}"
    probe = subprocess.run([*mount, mount_tmpfs], capture_output=True, text=True, timeout=60)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {probe.stderr.strip()}")
    quoted = " ".join(shlex.quote(str(part)) for part in command)
    return subprocess.run(
        [*mount, f"{mount_tmpfs} && cd {REPO} && exec {quoted}"],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_a_tmpfs_that_fills_mid_merge_falls_back_to_recomputation_with_the_same_bits(
    inputs, tmp_path
):
    """The check before the merge counts the host tier's whole 150 kB as taken; first fit in
    plan order leaves it holding 129 kB (fc2, qkv), so the scratch file needs 147 kB (fc1, then
    blocks.1), more than the 136 kB tmpfs holds though the check passed (126 kB): fc1 goes to
    the scratch file, blocks.1's write fails with ENOSPC, and its factors are recomputed."""
    tiny = tmp_path / "tiny"
    tiny.mkdir()
    common = ["--base", inputs[0], *[a for p in inputs[1:] for a in ("--expert", p)]]
    common += ["--max-memory", "1200kB", "--host-memory", "150kB", "--quiet"]
    merge_command = [sys.executable, "-m", "r2m_ext", "merge", *common]
    filled = _in_a_small_tmpfs(
        tiny, "136k", [*merge_command, "--scratch-dir", tiny, "--out", tmp_path / "filled"]
    )
    assert filled.returncode == 0, filled.stderr
    none = _cli(*common, "--out", tmp_path / "none", "--scratch-dir", "none")
    assert none.returncode == 0, none.stderr
    assert merged(tmp_path / "filled") == merged(tmp_path / "none")
    report = json.loads((tmp_path / "filled" / "report.json").read_text())
    tiers = {n: t["factors"] for n, t in report["tensors"].items() if "factors" in t}
    assert tiers == {
        "blocks.0.mlp.fc2.weight": "host",
        "blocks.0.attn.qkv.weight": "host",
        "blocks.0.mlp.fc1.weight": "scratch",
        "blocks.1.mlp.fc1.weight": "recomputed",
    }
    assert report["factorisations"]["R²M write pass"] == N_EXPERTS


def test_ctrl_c_after_spilling_leaves_no_scratch_and_resume_gives_the_same_bits(
    inputs, tmp_path, monkeypatch
):
    """A real SIGINT in the write pass (after the factors went to the scratch file): the partial
    output holds shards and progress only, and --resume (spilling again) completes it to the
    bytes of a merge that recomputed every factor in one go."""
    from r2m_ext.io.output import partial_dir
    from r2m_ext.io.writer import INTERRUPT_AFTER_SHARDS_ENV

    common = ["--base", inputs[0], *[a for p in inputs[1:] for a in ("--expert", p)]]
    common += ["--max-memory", "700kB", "--shard-size", "200kB", "--quiet"]
    reference = _cli(*common, "--out", tmp_path / "reference", "--scratch-dir", "none")
    assert reference.returncode == 0, reference.stderr
    out = tmp_path / "interrupted"
    monkeypatch.setenv(INTERRUPT_AFTER_SHARDS_ENV, "1")
    first = _cli(*common, "--out", out)
    assert first.returncode == 130, first.stderr
    left = sorted(p.name for p in partial_dir(out).iterdir())
    assert left == ["model-00001-of-00004.safetensors", "r2m_progress.json"], left
    monkeypatch.delenv(INTERRUPT_AFTER_SHARDS_ENV)
    resumed = _cli(*common, "--out", out, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["resumed_shards"] == 1 and report["factors_spilled"] > 0
    assert merged(out) == merged(tmp_path / "reference")


def test_a_scratch_dir_that_is_not_a_directory_is_refused_before_anything_is_written(
    inputs, tmp_path
):
    not_a_directory = tmp_path / "file"
    not_a_directory.write_text("x")
    for given in (not_a_directory, tmp_path / "missing"):
        with pytest.raises(r2m_ext.R2MError, match=f"--scratch-dir {given}: not a directory"):
            merge(inputs, tmp_path / "out", max_memory="700kB", scratch_dir=given)
        assert not (tmp_path / "out").exists()
        assert not any(p.name.startswith(".out") for p in tmp_path.iterdir())
