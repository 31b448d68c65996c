#!/usr/bin/env bash
# One command for scarce GPU time (the device tool runs one command for at most 10 minutes; a
# lent H200 gives a session 15 minutes in all). From the repository root, on the GPU machine:
#
#   bash bench/gpu_check.sh DIR          (e.g. bash bench/gpu_check.sh "$OUT")
#
# Steps, most valuable first, each under its own time cap and all under one deadline
# (GPU_CHECK_BUDGET seconds, default 540, so that the whole run ends inside a 600 s call):
#   1. environment: nvidia-smi, python / torch / triton versions        -> gpu_check.log
#   2. build fastgen._C and fastgen._C_cuda in place (no network, no pip) -> gpu_check.log
#      (a failed build is logged; the triton / torch / faiss backends are still checked)
#   3. fastgen check --device cuda --json DIR/check.json: every backend of every op against
#      the reference, timed beside torch eager / torch.compile / faiss   -> check.json, check.txt
#   4. the gpu-marked tests (pytest -m gpu)                              -> pytest.log
#   5. the benchmarks, one process per bench script, peers in the same run -> <device>.csv
#   6. one plot of the CSV                                               -> <device>.png
# At most 7 files land in DIR (the device tool brings back 8). Copy check.json and the CSV to
# bench/results/ and commit them. Nothing here changes the GPU's settings.
#
# Sources .gpu-faiss/3/env.sh when present so that faiss-gpu is a peer (../shared/gpu-faiss).
set -u
OUT=${1:?usage: bash bench/gpu_check.sh DIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python3}
LOG=$OUT/gpu_check.log
BUDGET=${GPU_CHECK_BUDGET:-540}
START=$(date +%s)
: >"$LOG"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET
step() { echo "=== $(date +%T) +$(( $(date +%s) - START ))s $*" | tee -a "$LOG"; }
# run CAP CMD...: CMD under min(CAP, time left before the deadline); logs its exit status
run() {
  local cap=$1; shift
  local left=$(( BUDGET - ($(date +%s) - START) ))
  [ "$left" -lt "$cap" ] && cap=$left
  if [ "$cap" -le 5 ]; then echo "skipped (deadline): $*" >>"$LOG"; return 124; fi
  timeout --kill-after=5 "$cap" "$@"
  local rc=$?
  [ $rc -eq 124 ] && echo "timed out after ${cap}s: $*" >>"$LOG"
  return $rc
}

if [ -f .gpu-faiss/3/env.sh ]; then
  step "faiss-gpu: sourcing .gpu-faiss/3/env.sh"
  # shellcheck disable=SC1091
  source .gpu-faiss/3/env.sh >>"$LOG" 2>&1 || echo "faiss-gpu setup failed (see above)" >>"$LOG"
fi

step "environment"
nvidia-smi >>"$LOG" 2>&1
$PY - >>"$LOG" 2>&1 <<'EOF'
import sys, torch
print("python", sys.version.split()[0], sys.executable)
print("torch", torch.__version__, "cuda", torch.version.cuda, "device", torch.cuda.get_device_name(0),
      "capability", torch.cuda.get_device_capability(0),
      "SMs", torch.cuda.get_device_properties(0).multi_processor_count)
try:
    import triton; print("triton", triton.__version__)
except Exception as e: print("triton missing:", e)
try:
    import faiss; print("faiss", faiss.__version__, "GPUs", faiss.get_num_gpus())
except Exception as e: print("faiss missing:", e)
EOF

step "build fastgen._C and fastgen._C_cuda in place (MAX_JOBS=${MAX_JOBS:-16})"
FASTGEN_CUDA=1 MAX_JOBS=${MAX_JOBS:-16} run 150 $PY setup.py build_ext --inplace >>"$LOG" 2>&1
echo "build exit $?" | tee -a "$LOG"
run 30 $PY -c "from fastgen._info import print_info; print_info()" >>"$LOG" 2>&1

step "fastgen check --device cuda (check.json is rewritten after each op: a cut run keeps the finished ops)"
run 170 $PY -m fastgen.cli check --device cuda --json "$OUT/check.json" >"$OUT/check.txt" 2>&1
echo "check exit $?" | tee -a "$LOG"
tail -n 45 "$OUT/check.txt" >>"$LOG"

step "pytest -m gpu"
run 90 $PY -m pytest -q -m gpu -ra --durations=10 -p no:cacheprovider tests >"$OUT/pytest.log" 2>&1
echo "pytest exit $?" | tee -a "$LOG"
tail -n 5 "$OUT/pytest.log" >>"$LOG"

step "benchmarks (one process each; rows of a bench cut by the deadline are lost, the others stay)"
# knn first (the headline op), without its time-vs-M sweep; each bench at most 100 s
for b in knn gaussian_nll spread_noise spread_log_likelihood knn_cuda select_latents; do
  extra=(); [ "$b" = knn ] && extra=(--no-sweep)
  run 100 $PY -m bench --device cuda --outdir "$OUT" --only="$b" "${extra[@]}" >>"$LOG" 2>&1
  echo "bench $b exit $?" | tee -a "$LOG"
done

step "plot"
ls "$OUT"/*.csv >/dev/null 2>&1 && run 30 $PY -m bench.plot "$OUT"/*.csv >>"$LOG" 2>&1
step "done"
ls -la "$OUT" | tee -a "$LOG"
