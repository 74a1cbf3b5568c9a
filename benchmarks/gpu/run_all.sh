#!/usr/bin/env bash
# The one script for a GPU machine (../../shared/PERFORMANCE.md): builds the extension with CUDA
# against the machine's own torch (no internet there), runs the CUDA tests (CUDA vs CPU vs the
# float64 reference) and the op tests, then the GPU benchmarks. Everything lands in RESULTS_DIR:
# build.log, tests.log, bench.log, gpu_<parts>.json and .md, environment.txt.
#   benchmarks/gpu/run_all.sh [RESULTS_DIR]      (R2M_COMMIT=<sha> names the commit measured)
# Where one lease call is too short: R2M_GPU_PARTS=ops first, then R2M_GPU_TESTS=0
# R2M_GPU_PARTS=streaming (the tests need not run twice). R2M_CPU_MERGE=1 adds the CPU merge
# benchmark (bench_svd.py, svd_<date>.json and .md); R2M_GPU_TESTS=0 R2M_GPU_PARTS=none
# R2M_CPU_MERGE=1 runs it alone after the build. R2M_GPU_DIST=0 leaves out the distributed part.
set -uo pipefail
cd "$(dirname "$0")/../.."
RESULTS="${1:-benchmarks/results/gpu_$(date +%Y-%m-%d)}"
mkdir -p "$RESULTS"
PY="${PYTHON:-python3}"
COMMIT="${R2M_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"
status=0

{
  echo "commit: $COMMIT"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1
  nvcc --version 2>&1 | tail -2
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
} > "$RESULTS/environment.txt" 2>&1
cat "$RESULTS/environment.txt"

echo "== build (sm_90) =="
# The GPU image sets CC/CXX to a GCC under /opt/gcc that links its own libstdc++ statically into
# the extension, beside the system libstdc++ that Python loads: two copies of the locale
# machinery, and the first error message that formats a number crashed (SIGSEGV in
# ostream::_M_insert, seen 2026-11-26). Build with the system compiler, whose libstdc++ it is.
if [ -x /usr/bin/g++ ]; then export CC=/usr/bin/gcc CXX=/usr/bin/g++; fi
if ! R2M_FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 \
    "$PY" -m pip install --no-build-isolation --no-deps -e . > "$RESULTS/build.log" 2>&1; then
  tail -40 "$RESULTS/build.log"
  echo "build failed: see $RESULTS/build.log"
  exit 1
fi
"$PY" -c "import r2m_ext; from r2m_ext._backend import backend_info; print(backend_info())"

if [ "${R2M_GPU_TESTS:-1}" = 1 ]; then  # R2M_GPU_TESTS=0: a second call, benchmarks only
  echo "== tests =="
  R2M_REQUIRE_NATIVE=1 "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_ops.py \
    tests/test_svd.py > "$RESULTS/tests.log" 2>&1 || status=1
  tail -5 "$RESULTS/tests.log"
fi

if [ "${R2M_GPU_PARTS:-ops,streaming}" != none ]; then
  echo "== benchmarks =="
  "$PY" benchmarks/gpu/bench_gpu.py --out "$RESULTS" --commit "$COMMIT" \
    --parts "${R2M_GPU_PARTS:-ops,streaming}" > "$RESULTS/bench.log" 2>&1 || status=1
  tail -30 "$RESULTS/bench.log"
fi

# R2M_CPU_MERGE=1: issue 4's whole-merge benchmark (native vs pure-torch exact and svd_lowrank
# R²M, N = 8 ViT-B/16 experts) on this machine's CPU cores, which the 2-core development machine
# cannot show: there the spec's sketch products alone take half of what 10x over exact allows.
if [ "${R2M_CPU_MERGE:-0}" = 1 ]; then
  echo "== CPU merge benchmark =="
  R2M_COMMIT="$COMMIT" "$PY" benchmarks/bench_svd.py --shapes --results "$RESULTS" \
    > "$RESULTS/bench_cpu_merge.log" 2>&1 || status=1
  tail -12 "$RESULTS/bench_cpu_merge.log"
fi
# R2M_GPU_DIST=1 (default): one merge on 2 torchrun ranks sharing this GPU (cuda:LOCAL_RANK
# modulo the GPUs; NCCL initialised beside gloo, exchanges on gloo) against one process, outputs
# compared byte for byte, then the CPU (gloo) distributed tests.
if [ "${R2M_GPU_DIST:-1}" = 1 ]; then
  echo "== distributed: 2 ranks on one GPU =="
  DIST_CKPT="${TMPDIR:-/tmp}/r2m_dist_vit_b16"
  "$PY" benchmarks/make_checkpoints.py vit_b16 --experts 8 --dtype float32 --out "$DIST_CKPT" \
    > "$RESULTS/bench_distributed.log" 2>&1
  R2M_COMMIT="$COMMIT" "$PY" benchmarks/bench_distributed.py "$DIST_CKPT" --ranks 2 --device cuda \
    --max-memory 4GB --repeat 1 --results "$RESULTS" >> "$RESULTS/bench_distributed.log" 2>&1 || status=1
  tail -12 "$RESULTS/bench_distributed.log"
  "$PY" -m pytest -q -p no:cacheprovider tests/test_distributed.py > "$RESULTS/tests_distributed.log" 2>&1 \
    || status=1
  tail -3 "$RESULTS/tests_distributed.log"
fi
exit $status
