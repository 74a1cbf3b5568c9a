"""benchmarks/gpu/bench_gpu.py runs only where a GPU is lent, rarely; its --smoke mode runs every
part at toy sizes on this machine's device, so the script itself is checked in every CI run."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_benchmark_script_runs_every_part_at_toy_sizes(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "gpu" / "bench_gpu.py"),
            "--smoke",
            "--out",
            str(tmp_path / "out"),
            "--workdir",
            str(tmp_path / "work"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    data = json.loads((tmp_path / "out" / "gpu_ops_streaming_smoke.json").read_text())
    for part in ("ceilings", "randomized_svd", "bandwidth", "r2m_merge", "streaming"):
        assert "error" not in data[part], data[part]
    svd = data["randomized_svd"]
    assert 1.0 <= svd["error_ratio_randomized_svd"] <= 1.05
    assert data["bandwidth"]["delta_gram_relative_error"] < 1e-12
    streaming = data["streaming"]
    # Average is bitwise the same on any device and budget; R²M to rounding (a 1 MB budget
    # tiles the tensors, the reference merge does not).
    assert streaming["average"]["vs_cpu"]["max_relative_difference"] == 0.0
    assert streaming["r2m"]["vs_cpu"]["max_relative_difference"] < 1e-4
    assert streaming["r2m"]["vs_cpu"]["tensors"] == streaming["average"]["vs_cpu"]["tensors"] > 0
    assert set(streaming["r2m"]["timings_s"]) >= {"R²M gram pass", "total"}
    # Without a host tier (and on the CPU, where it is 0 unless told) the factors go through the
    # scratch file: the same bits, nothing factored twice.
    assert streaming["r2m_scratch"]["same_bits_as_host_tier"] is True
    for key in ("r2m", "r2m_scratch"):
        assert "R²M write pass" not in streaming[key]["factorisations"]
    table = (tmp_path / "out" / "gpu_ops_streaming_smoke.md").read_text()
    assert "failed" not in table and "not run" not in table
