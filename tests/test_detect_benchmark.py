"""The reduced built-in benchmark, end to end through `python -m r2m_ext.demo --reduced`: trains,
merges with every method, evaluates, expands; then a second run reuses the cached training."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from r2m_ext.demo import main as demo_main
from r2m_ext.detect.benchmark import REDUCED, SETTINGS
from r2m_ext.detect.evaluate import BUILTIN_SPEC, load_detector
from r2m_ext.detect.synthetic import SEEN_FAMILIES
from r2m_ext.methods.registry import default_runnable_names


@pytest.fixture(scope="module")
def benchmark_run(tmp_path_factory):
    directory = tmp_path_factory.mktemp("benchmark")
    demo_main(["--reduced", "--dir", str(directory)])
    return directory, json.loads((directory / "benchmark.json").read_text())


def test_specialists_beat_chance_on_their_own_family(benchmark_run):
    _, result = benchmark_run
    # 64 real + 64 fake test images: chance AUC has a standard deviation of about 0.05.
    for family in SEEN_FAMILIES:
        assert result["own_family_auc"][family] > 0.65, (family, result["own_family_auc"])


def test_every_method_gives_a_loadable_detector(benchmark_run):
    directory, result = benchmark_run
    assert set(result["merged"]) == set(default_runnable_names())
    for method, path in result["merged"].items():
        model = load_detector(BUILTIN_SPEC, path)
        assert model.config.image_size == REDUCED.model.image_size
        row = result["rows"][method]
        assert all(0 <= row[s] <= 1 and math.isfinite(row[s]) for s in SETTINGS), method
    assert (directory / "charts" / "auc_by_method.png").stat().st_size > 0
    assert (directory / "test_images").is_dir()


def test_composability_adds_one_family_at_a_time(benchmark_run):
    directory, result = benchmark_run
    steps = result["composability"]
    assert [s["k"] for s in steps] == list(range(1, len(SEEN_FAMILIES) + 1))
    assert [s["added"] for s in steps] == list(SEEN_FAMILIES)
    recipe = (directory / "expand" / f"r2m_{len(SEEN_FAMILIES)}" / "r2m_recipe.yaml").read_text()
    assert all(f"/{family}/" in recipe for family in SEEN_FAMILIES)


def test_second_run_reuses_the_trained_checkpoints(benchmark_run, capsys):
    directory, first = benchmark_run
    capsys.readouterr()
    demo_main(["--reduced", "--dir", str(directory)])
    printed = capsys.readouterr().out
    assert "fine-tuning" not in printed and "pretraining" not in printed
    second = json.loads((directory / "benchmark.json").read_text())
    assert second["training_seconds"] == first["training_seconds"]
    assert second["rows"] == first["rows"]


def test_bench_svd_compares_the_truncations_on_the_trained_specialists(benchmark_run, tmp_path):
    """benchmarks/bench_svd.py --specialists on this run's cache, as a real subprocess: the
    randomized and exact merges of the reduced benchmark's specialists agree to the issue's 1e-2
    of a merged tensor, and the report carries both truncations' energy."""
    directory, _ = benchmark_run
    (cache,) = (directory / "cache").iterdir()
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_svd.py"
    command = [sys.executable, str(script), "--shapes", "--no-merge", "--specialists", str(cache)]
    subprocess.run([*command, "--results", str(tmp_path)], check=True, capture_output=True)
    (written,) = tmp_path.glob("svd_*.json")
    result = json.loads(written.read_text())["specialists"]
    assert result["specialists"] == len(SEEN_FAMILIES)
    assert 0 < result["max_relative_difference_randomized_vs_exact"] < 1e-2
    assert 0 < result["max_relative_difference_exact_inputs_in_bf16_vs_float32"] < 1e-1
    for truncation in ("randomized", "exact"):
        median, least = result["energy_kept_median_min"][truncation]
        assert 0 < least <= median <= 1
