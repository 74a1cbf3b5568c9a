"""One merge on several ranks of torch.distributed (gloo, CPU): real `torchrun` subprocesses and
hand-launched ranks (RANK/WORLD_SIZE/MASTER_ADDR as any launcher sets them), against the same
merge in one process. Every method's output must have the same bits for every world size."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from checkpoints import save_sharded, tensors_in
from conftest import REPO, make_experts
from safetensors.torch import load_file, save_file

import r2m_ext
from r2m_ext.engine.ranks import Ranks, launch_environment
from r2m_ext.errors import R2MError
from r2m_ext.io import open_source
from r2m_ext.options import resolve_options
from r2m_ext.plan import plan_merge
from r2m_ext.report import combine_rank_reports, sum_counts

N_EXPERTS = 3
SHARD = "40KB"  # several output shards, some holding tensors of two ranks
# Each configuration: (name, method, options). "streamed" runs R²M under a budget too small
# for its largest matrices, which it then factors over row blocks.
CONFIGS = [
    ("r2m", "r2m", {"seed": 3}),
    ("r2m_exact", "r2m", {"svd": "exact"}),
    ("r2m_streamed", "r2m", {"seed": 3, "max_memory": "400KB"}),
    ("ties", "ties", {}),
    ("ties_tensor", "ties", {"ties_scope": "tensor"}),
    ("dare", "dare", {"seed": 5}),
    ("dare_ties", "dare", {"dare_combine": "ties", "seed": 5}),
    ("tsv", "tsv", {}),
    ("cart", "cart", {}),
    ("average", "average", {}),
    ("task_arithmetic", "task_arithmetic", {}),
]
# Report entries that are about this run's time and memory, not its result.
RUN_FIGURES = {"timings_s", "memory", "io_bytes", "ranks", "resumed_shards"}


def model(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {"pos_embed": torch.randn(8, 32, generator=g)}
    for block in range(4):
        state[f"blocks.{block}.attn.qkv.weight"] = torch.randn(96, 32, generator=g)
        state[f"blocks.{block}.attn.qkv.bias"] = torch.randn(96, generator=g)
        state[f"blocks.{block}.mlp.fc1.weight"] = torch.randn(128, 32, generator=g)
        state[f"blocks.{block}.norm.weight"] = torch.randn(32, generator=g)
    state["head.weight"] = torch.randn(2, 32, generator=g)
    state["num_batches_tracked"] = torch.tensor(5, dtype=torch.int64)
    return state


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> list[Path]:
    directory = tmp_path_factory.mktemp("distributed")
    base = model()
    paths = [save_sharded(base, directory / "base", shards=2, config={"model_type": "toy"})]
    for index, expert in enumerate(make_experts(base, N_EXPERTS)):
        paths.append(save_sharded(expert, directory / f"expert{index}", shards=2))
    return paths


def merge_arguments(method: str, options: dict) -> dict:
    return {"method": method, "shard_size": SHARD, "io_threads": 1, **options}


@pytest.fixture(scope="module")
def single(inputs, tmp_path_factory) -> dict[str, Path]:
    """Every configuration merged by one process: the reference."""
    directory = tmp_path_factory.mktemp("single")
    outs = {}
    for name, method, options in CONFIGS:
        outs[name] = r2m_ext.merge_files(
            inputs[0], inputs[1:], directory / name, **merge_arguments(method, options)
        )
    return outs


def environment(**extra) -> dict[str, str]:
    # The ranks use as many intra-op threads as this process: torch's GEMMs on the CPU may
    # round differently with another count (R²M's streamed SVD, README "Scaling out").
    return {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": str(torch.get_num_threads()),
        **extra,
    }


def torchrun(ranks: int, *arguments, **env) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += [f"--nproc-per-node={ranks}", *map(str, arguments)]
    return subprocess.run(
        command, capture_output=True, text=True, env=environment(**env), timeout=300
    )


DRIVER = """
import json, sys
import torch.distributed as dist
import r2m_ext

# The caller's own process group: merge_files runs inside it.
dist.init_process_group("gloo")
base, experts, directory, shard, configs = json.loads(sys.argv[1])
for name, method, options in configs:
    arguments = {"method": method, "shard_size": shard, "io_threads": 1, **options}
    r2m_ext.merge_files(base, experts, f"{directory}/{name}", **arguments)
dist.destroy_process_group()
"""


def run_in_group(ranks: int, inputs, directory: Path) -> subprocess.CompletedProcess:
    script = directory / "driver.py"
    script.write_text(DRIVER)
    job = [str(inputs[0]), [str(p) for p in inputs[1:]], str(directory), SHARD, CONFIGS]
    return torchrun(ranks, script, json.dumps(job))


def assert_same_merge(single_out: Path, ranks_out: Path) -> dict:
    """The same tensors (torch.equal), the same shard files and index byte for byte, and the
    same report figures; returns the distributed run's report."""
    ours, theirs = tensors_in(single_out), tensors_in(ranks_out)
    assert list(ours) == list(theirs)
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name
    single_files = sorted(p.name for p in single_out.iterdir() if p.suffix != ".json")
    assert single_files == sorted(p.name for p in ranks_out.iterdir() if p.suffix != ".json")
    for path in single_out.glob("*.safetensors"):
        assert path.read_bytes() == (ranks_out / path.name).read_bytes(), path.name
    index = "model.safetensors.index.json"
    assert (single_out / index).read_bytes() == (ranks_out / index).read_bytes()
    expected = json.loads((single_out / "report.json").read_text())
    report = json.loads((ranks_out / "report.json").read_text())
    for key in set(expected) | set(report):
        if key not in RUN_FIGURES:
            assert report.get(key) == expected.get(key), key
    assert not list(ranks_out.parent.glob(f".{ranks_out.name}.r2m-partial"))
    return report


@pytest.mark.parametrize("world", [2, 3])
def test_every_method_on_ranks_equals_one_process(inputs, single, tmp_path, world):
    run = run_in_group(world, inputs, tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    for name, method, _ in CONFIGS:
        report = assert_same_merge(single[name], tmp_path / name)
        ranks = report["ranks"]
        assert [r["rank"] for r in ranks] == list(range(world))
        assert sum(r["tensors"] for r in ranks) == len(tensors_in(single[name]))
        # Each rank reads its own tensors' inputs, as many times as the method passes over
        # them: read / assigned is about 1 for one pass (10%: heads are read from the experts
        # alone) and the same on every rank for several.
        ratios = [r["input_bytes_read"] / r["input_bytes"] for r in ranks]
        assert all(
            abs(ratio - sum(ratios) / world) <= 0.1 * sum(ratios) / world for ratio in ratios
        )
        assert min(ratios) >= 0.9
        if method in ("average", "task_arithmetic"):
            assert max(ratios) <= 1.1
        if name == "r2m":
            # Each of the 8 truncated matrices factored once per expert, by one rank or another.
            assert report["factorisations"]["R²M truncation pass"] == 8 * N_EXPERTS


def test_torchrun_cli_equals_the_cli_and_prints_once(inputs, tmp_path):
    arguments = ["--base", inputs[0], "--out", None, "--shard-size", SHARD, "--max-memory", "1MB"]
    for expert in inputs[1:]:
        arguments += ["--expert", expert]
    alone = [a if a is not None else tmp_path / "alone" for a in arguments]
    single_run = subprocess.run(
        [sys.executable, "-m", "r2m_ext", "merge", *map(str, alone)],
        capture_output=True,
        text=True,
        env=environment(),
        timeout=300,
    )
    assert single_run.returncode == 0, single_run.stderr
    on_ranks = [a if a is not None else tmp_path / "ranks" for a in arguments]
    run = torchrun(2, "-m", "r2m_ext", "merge", *on_ranks)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("merged 3 experts with r2m") == 1
    assert_same_merge(tmp_path / "alone", tmp_path / "ranks")


def test_a_failing_rank_ends_every_rank_naming_it_and_leaves_nothing(inputs, tmp_path):
    # A NaN in the last tensor of an expert: the last rank owns it.
    broken = tmp_path / "broken"
    for path in inputs[1].iterdir():
        (broken / path.name).parent.mkdir(exist_ok=True)
        (broken / path.name).write_bytes(path.read_bytes())
    shard = sorted(broken.glob("*.safetensors"))[-1]
    tensors = load_file(shard)
    last = sorted(tensors)[-1]
    tensors[last] = torch.full_like(tensors[last], float("nan"))
    save_file(tensors, str(shard))
    out = tmp_path / "out"
    run = torchrun(
        2,
        "-m",
        "r2m_ext",
        "merge",
        "--base",
        inputs[0],
        "--expert",
        broken,
        "--expert",
        inputs[2],
        "--out",
        out,
        "--method",
        "average",
    )
    assert run.returncode != 0
    assert "r2m: error: rank " in run.stderr and "NaN or Inf" in run.stderr
    assert str(shard) in run.stderr
    assert not out.exists() and not (tmp_path / ".out.r2m-partial").exists()


def free_port() -> int:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        return listener.getsockname()[1]


def launch_by_hand(per_rank_arguments: list[list], **env) -> list[subprocess.CompletedProcess]:
    """Ranks started as any launcher starts them: one process each, with the environment
    torch.distributed reads (no torchrun agent to stop the others when one dies)."""
    port = str(free_port())
    processes = []
    for rank, arguments in enumerate(per_rank_arguments):
        rank_env = environment(
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(len(per_rank_arguments)),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=port,
            **env,
        )
        command = [sys.executable, "-m", "r2m_ext", "merge", *map(str, arguments)]
        processes.append(
            subprocess.Popen(
                command, env=rank_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        )
    results = []
    for process in processes:
        stdout, stderr = process.communicate(timeout=300)
        results.append(
            subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
        )
    return results


def cli_arguments(inputs, out, *more) -> list:
    arguments = ["--base", inputs[0], "--out", out, "--shard-size", SHARD, "--io-threads", "0"]
    for expert in inputs[1:]:
        arguments += ["--expert", expert]
    return [*arguments, *more]


def test_a_killed_rank_stops_the_others_in_time_and_resume_on_three_ranks_finishes(
    inputs, single, tmp_path
):
    out = tmp_path / "out"
    arguments = cli_arguments(inputs, out, "--seed", "3", "--dist-timeout", "60")
    started = time.monotonic()
    # Rank 1 dies (SIGKILL, no cleanup) once its part of one shard is on disk.
    results = launch_by_hand([arguments, arguments], R2M_TEST_KILL_RANK_AFTER_SHARDS="1:1")
    assert time.monotonic() - started < 60
    assert results[1].returncode == -9
    assert results[0].returncode == 1
    assert "rank 0: another rank left the merge" in results[0].stderr
    assert not out.exists()
    partial = tmp_path / ".out.r2m-partial"
    assert (partial / "r2m_progress-rank-1.json").exists()
    # What the two ranks completed is resumed by three.
    run = torchrun(3, "-m", "r2m_ext", "merge", *arguments, "--resume")
    assert run.returncode == 0, run.stderr[-3000:]
    report = assert_same_merge(single["r2m"], out)
    assert report["resumed_shards"] >= 1
    assert not partial.exists()


def test_ranks_started_with_other_arguments_are_refused_before_any_work(inputs, tmp_path):
    out = tmp_path / "out"
    results = launch_by_hand(
        [cli_arguments(inputs, out, "--seed", "1"), cli_arguments(inputs, out, "--seed", "2")]
    )
    for result in results:
        assert result.returncode == 1
        assert "rank(s) 1 of 2 were started with other arguments" in result.stderr
    assert not out.exists() and not (tmp_path / ".out.r2m-partial").exists()


# -- the parts, without processes ------------------------------------------------------------
def test_split_is_contiguous_balanced_and_the_same_everywhere(inputs):
    sources = [open_source(p) for p in inputs]
    plan = plan_merge(sources, resolve_options("average"))
    cost = lambda t: t.numel * t.in_dtype.itemsize  # noqa: E731
    total = sum(cost(t) for t in plan.tensors)
    largest = max(cost(t) for t in plan.tensors)
    for world in (1, 2, 3, 5):
        shares = []
        for rank in range(world):
            ranks = Ranks(rank=rank, world=world)
            ranks.split(plan, cost)
            shares.append([t.name for t in plan.tensors if ranks.owns(t.name)])
        owners = [rank for rank, share in enumerate(shares) for _ in share]
        assert sorted(owners) == owners  # contiguous runs, in rank order
        assert sum(len(share) for share in shares) == len(plan.tensors)
        for share in shares:
            share_cost = sum(cost(t) for t in plan.tensors if t.name in share)
            assert abs(share_cost - total / world) <= largest
    for source in sources:
        source.close()


def test_launch_environment_reads_torchrun_and_slurm_and_refuses_nonsense():
    assert launch_environment({}) is None
    assert launch_environment({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == (1, 4, 1)
    slurm = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1"}
    assert launch_environment(slurm) is None  # no MASTER_ADDR: not meant as a process group
    assert launch_environment({**slurm, "MASTER_ADDR": "node0"}) == (5, 8, 1)
    with pytest.raises(R2MError, match="RANK='x' is not an integer"):
        launch_environment({"RANK": "x", "WORLD_SIZE": "2"})
    with pytest.raises(R2MError, match="RANK=2 is not a rank of WORLD_SIZE=2"):
        launch_environment({"RANK": "2", "WORLD_SIZE": "2"})


def test_rank_reports_add_counts_and_keep_each_tensor_from_its_rank():
    assert sum_counts([3, 4]) == 7
    assert sum_counts([{"a": 1, "b": {"c": 2}}, {"b": {"c": 5}, "a": 0}]) == {"a": 1, "b": {"c": 7}}
    reports = [
        {"eta": 0.5, "factors_cached": 2, "tensors": {"y": {"rank": 1}}},
        {"eta": 0.5, "factors_cached": 3, "tensors": {"x": {"rank": 4}}},
    ]
    combined = combine_rank_reports(reports, ("factors_cached",), ["x", "y"])
    assert combined == {
        "eta": 0.5,
        "factors_cached": 5,
        "tensors": {"x": {"rank": 4}, "y": {"rank": 1}},
    }
    assert list(combined["tensors"]) == ["x", "y"]  # plan order


def test_a_rank_takes_its_gpu_and_its_share_of_the_machines_memory():
    assert Ranks().device_and_share("cuda") == ("cuda", 1)  # one process: as given
    four = Ranks(rank=5, world=8, local_rank=1, local_world=4)
    assert four.device_and_share("cpu") == ("cpu", 4)
    assert four.device_and_share("cuda:0") == ("cuda:0", 1)  # named by the caller
    gpus = max(1, torch.cuda.device_count())
    assert four.device_and_share("cuda") == (f"cuda:{1 % gpus}", -(-4 // gpus))
