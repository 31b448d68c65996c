#!/usr/bin/env bash
# One command for scarce GPU time: install fastgen (building its CUDA kernels), run the
# gpu-marked tests and the whole suite on the real GPU, then every benchmark, and write
# at most 8 files into DIR:
#   gpu_check.log      install log, `fastgen info`, timings of each step
#   pytest.log         the test suite (gpu-marked tests included) on this GPU
#   <device>.csv       every benchmark row (bench/harness.py format)
#   <device>.png       one plot of every op (bench/plot.py)
# usage: bash bench/gpu_check.sh DIR      (from the repository root, on the GPU machine)
# Sources .gpu-faiss/3/env.sh when present so that faiss-gpu is a peer (../shared/gpu-faiss).
set -u
OUT=${1:?usage: bash bench/gpu_check.sh DIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python3}
LOG=$OUT/gpu_check.log
: >"$LOG"
step() { echo "=== $(date +%T) $*" | tee -a "$LOG"; }

if [ -f .gpu-faiss/3/env.sh ]; then
  step "faiss-gpu: sourcing .gpu-faiss/3/env.sh"
  # shellcheck disable=SC1091
  source .gpu-faiss/3/env.sh >>"$LOG" 2>&1 || echo "faiss-gpu setup failed (see above)" >>"$LOG"
fi

step "nvidia-smi"
nvidia-smi >>"$LOG" 2>&1
step "install (no network: --no-deps --no-build-isolation)"
FASTGEN_CUDA=1 FASTGEN_REQUIRE_EXT=1 MAX_JOBS=${MAX_JOBS:-16} $PY -m pip install -q --no-deps --no-build-isolation -e . >>"$LOG" 2>&1 \
  || { echo "install with the CUDA extension failed; retrying without requiring it" | tee -a "$LOG";
       FASTGEN_CUDA=auto $PY -m pip install -q --no-deps --no-build-isolation -e . >>"$LOG" 2>&1; }
step "fastgen info"
$PY -c "from fastgen._info import print_info; print_info()" >>"$LOG" 2>&1
$PY -c "from fastgen import _backend as b; print('fastgen._C_cuda:', b.load_cuda_ext(), b.cuda_ext_error())" >>"$LOG" 2>&1

step "pytest (whole suite, gpu-marked tests included)"
$PY -m pytest -q -ra --durations=15 tests >"$OUT/pytest.log" 2>&1
echo "pytest exit $?" | tee -a "$LOG"

step "benchmarks"
$PY -m bench --device cuda --outdir "$OUT" >>"$LOG" 2>&1
echo "bench exit $?" | tee -a "$LOG"

step "plot"
$PY -m bench.plot "$OUT"/*.csv >>"$LOG" 2>&1
step "done"
ls -la "$OUT" | tee -a "$LOG"
