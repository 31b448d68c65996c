"""Ahead-of-time compilation of fastgen's GPU code without a GPU (issue #14).

* ``python -m bench.aot``: every @triton.jit kernel of fastgen, every autotune config, with the
  specialisations real launches give, compiled with Triton's own compiler and ptxas for sm_90
  (in CI; ``--quick`` scope) and, with FASTGEN_AOT_ALL_ARCHS=1, for sm_80 and sm_100 too.
* ``csrc/cuda/compile_check.sh 80 90 100``: nvcc -c of csrc/cuda/*.cu for the three
  architectures (skipped where nvcc is missing).
Cheap unit tests of the recorder and the summary run first.
"""
import glob
import os
import re
import shutil
import subprocess
import sys

import pytest

from conftest import has_triton

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINE = re.compile(r"^aot: sm_(\d+) compiled (\d+)/(\d+) kernels \((\d+) configs, (\d+) with spills, max smem (\d+)\)$",
                  re.M)
needs_triton = pytest.mark.skipif(not has_triton(), reason="triton not installed")


def _jit_count() -> int:
    """@triton.jit functions in fastgen/, counted from the source text (independent of bench.aot)."""
    n = 0
    for path in glob.glob(os.path.join(ROOT, "fastgen", "**", "*.py"), recursive=True):
        with open(path) as f:
            n += sum(1 for line in f if line.strip().startswith("@triton.jit"))
    return n


def _env():
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TRITON_INTERPRET", None)  # compile for the GPU
    return env


def _aot(*args, timeout=3600):
    r = subprocess.run([sys.executable, "-m", "bench.aot", *args], cwd=ROOT, env=_env(), capture_output=True,
                       text=True, timeout=timeout)
    return r, {int(m.group(1)): tuple(int(g) for g in m.groups()[1:]) for m in LINE.finditer(r.stdout)}


_RECORD = r"""
import collections, json
from bench import aot
import fastgen.ops.knn_triton as kt
fns = aot.discover()
rec = aot.record([90, 80], ops=%r, quick=True)
specs = list(rec.specs.values())
out = dict(n_fns=len(fns), launched=sorted(rec.launched), n=len(specs),
           by_arch=collections.Counter(s.arch for s in specs),
           kernels=sorted({s.name.rsplit('.', 1)[1] for s in specs}))
nll = [s for s in specs if s.name.endswith('_nll_kernel') and s.arch == 90]
out['nll_dtypes'] = sorted({s.signature['X'] for s in nll})
out['nll_ptr_div16'] = all(s.attrs[(0,)] == [['tt.divisibility', 16]] for s in nll)
out['nll_warps'] = sorted({s.options['num_warps'] for s in nll})
cand = [s for s in specs if s.name.endswith('_candidates_kernel') and s.arch == 90]
names = kt._candidates_kernel.arg_names
got = collections.defaultdict(set)
for s in cand:
    cx = {names[k[0]]: v for k, v in s.constexprs.items()}
    if cx['Dp'] == 64 and cx['C'] == 4 and s.signature['QC'] == '*fp32':
        got['cfg'].add((cx['BLOCK_N'], cx['BLOCK_M'], cx['BLOCK_D'], s.options['num_warps'], s.options['num_stages']))
want = {(c.kwargs['BLOCK_N'], c.kwargs['BLOCK_M'], c.kwargs['BLOCK_D'], c.num_warps, c.num_stages)
        for c in kt._cand_tuner(64, 4, 4).configs}
out['cand_every_config'] = want <= got['cfg'] and len(want) > 1
print('JSON' + json.dumps(out, default=str))
"""


@needs_triton
def test_recorder_mirrors_real_launches():
    """The launches recorded from the public ops: every kernel of the driven ops, each dtype,
    16-byte pointer specialisation, every autotune config of the knn candidate pass."""
    code = _RECORD % (["gaussian_nll", "knn"],)
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(), capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    import json

    out = json.loads(r.stdout.split("JSON", 1)[1])
    assert out["n_fns"] == _jit_count()
    assert {"_nll_kernel", "_candidates_kernel", "_local_kernel", "_rerank_kernel", "_scan_kernel",
            "_center_kernel"} <= set(out["kernels"]), out["kernels"]  # knn tiers 2-4 reached too
    assert out["nll_dtypes"] == ["*bf16", "*fp16", "*fp32", "*fp64"]
    assert out["nll_ptr_div16"] is True
    assert out["cand_every_config"] is True
    assert out["by_arch"]["90"] == out["by_arch"]["80"] > 0


@needs_triton
def test_summary_counts_helpers_and_flags_failures():
    from bench import aot

    fns = aot.discover()
    assert len(fns) == _jit_count()
    noise = "fastgen.ops.spread_noise._noise_kernel"
    helpers = {"_chunk_noise", "_lane_store", "_sigma_off", "_words", "_radius", "_sincos2pi", "_laplace"}
    spec = aot.Spec(noise, 90, {}, {}, {}, {}, "noise")
    ok = dict(ok=True, smem=1024, regs=40, stack=0, seconds=0.1, error=None)
    line, good, problems = aot.summarise(90, fns, [spec], [ok])
    m = LINE.match(line)
    assert m, line
    assert int(m.group(2)) == 1 + len(helpers)  # the kernel and every helper it calls, transitively
    assert int(m.group(3)) == len(fns) and not good  # the other kernels were never compiled
    assert any("NOT COMPILED fastgen.ops.knn_triton._candidates_kernel" in p for p in problems)
    # over the shared-memory limit, or a compile failure: not compiled, reported
    big = dict(ok, smem=aot.SMEM_LIMIT[80] + 1)
    _, _, problems = aot.summarise(80, fns, [spec], [big])
    assert any(p.startswith("sm_80 SMEM") for p in problems)
    bad = dict(ok, ok=False, error="CompilationError: at 3:11: arange's range must be a power of 2")
    line, _, problems = aot.summarise(90, fns, [spec], [bad])
    assert " compiled 0/" in line and any("FAILED noise: CompilationError" in p for p in problems)


@needs_triton
@pytest.mark.slow
def test_aot_compiles_every_kernel_for_sm90():
    """CI: every kernel, every autotune config (--quick scope) compiles for sm_90, none spills
    past the limit of shared memory; ok == total."""
    r, lines = _aot("--quick", "--arch", "90", "--jobs", str(min(4, os.cpu_count() or 1)))
    assert 90 in lines, r.stdout[-3000:] + r.stderr[-3000:]
    ok, total, configs, spills, smem = lines[90]
    assert r.returncode == 0, r.stdout[-5000:]
    assert ok == total == _jit_count() and configs > 100
    assert smem <= 227 * 1024


@needs_triton
@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("FASTGEN_AOT_ALL_ARCHS") != "1",
                    reason="sm_80 and sm_100 AOT compile: about 3x the sm_90 time on 2 cores; "
                           "set FASTGEN_AOT_ALL_ARCHS=1 (or run python -m bench.aot)")
def test_aot_compiles_every_kernel_for_sm80_and_sm100():
    r, lines = _aot("--quick", "--arch", "80,100", "--jobs", str(min(4, os.cpu_count() or 1)))
    assert set(lines) == {80, 100}, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.returncode == 0, r.stdout[-5000:]
    for arch, (ok, total, configs, spills, smem) in lines.items():
        assert ok == total == _jit_count(), arch


def _nvcc():
    return shutil.which("nvcc") or (os.path.exists("/usr/local/cuda/bin/nvcc") and "/usr/local/cuda/bin/nvcc")


@pytest.mark.slow
@pytest.mark.skipif(not _nvcc(), reason="nvcc not on PATH (nor /usr/local/cuda/bin): the CUDA compile check "
                                         "needs the CUDA toolkit")
def test_cuda_kernels_compile_for_sm80_sm90_sm100():
    """csrc/cuda/compile_check.sh for 80, 90 and 100: nvcc -c of every .cu, no warnings in
    csrc/cuda (the script decides what it checks; this test only runs it)."""
    env = dict(os.environ, PYTHON=sys.executable)
    # one process per architecture (nvcc is single-threaded: the cores share the work)
    procs = {a: subprocess.Popen(["bash", "csrc/cuda/compile_check.sh", str(a)], cwd=ROOT, env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for a in (80, 90, 100)}
    for arch, p in procs.items():
        out, _ = p.communicate(timeout=3600)
        assert p.returncode == 0, f"sm_{arch}:\n" + out[-5000:]
        assert f" sm_{arch}" in out and "registers" in out, out[-2000:]
