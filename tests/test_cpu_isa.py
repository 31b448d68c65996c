"""The CPU paths of fastgen._C (issue #13): runtime choice from the CPU's features,
FASTGEN_CPU_ISA, and every path this machine runs checked against the references.

Each path runs in its own subprocess (the path is chosen once, when fastgen._C loads) that runs
tests/isa_check.py: all four kernels on hard inputs, and the max ulp error of the vector math over
a dense sweep of its domain, against the bounds stated in csrc/cpu/vmath.h.
"""
import json
import os
import subprocess
import sys

import pytest

from conftest import has_ext_kernel

pytestmark = pytest.mark.skipif(not has_ext_kernel("knn"), reason="fastgen._C not built")

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _env(isa):
    env = dict(os.environ)
    env.pop("FASTGEN_CPU_ISA", None)
    if isa is not None:
        env["FASTGEN_CPU_ISA"] = isa
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "2")
    return env


def _python(code, isa):
    return subprocess.run([sys.executable, "-c", code], env=_env(isa), capture_output=True, text=True, timeout=300)


def _available():
    from fastgen import _backend

    return _backend.cpu_isas_available()


def test_default_path_is_the_best_available():
    from fastgen import _backend

    avail = _available()
    assert avail, "no CPU path runs here"
    r = _python("from fastgen import _backend; print(_backend.cpu_isa())", None)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == avail[-1]
    if "FASTGEN_CPU_ISA" not in os.environ:
        assert _backend.cpu_isa() == avail[-1]


@pytest.mark.parametrize("isa", ["baseline", "avx2", "avx512"])
def test_path_against_references(isa):
    if isa not in _available():
        pytest.skip(f"this CPU / build does not run the {isa} path")
    r = subprocess.run([sys.executable, os.path.join(HERE, "isa_check.py"), "--json"], env=_env(isa),
                       capture_output=True, text=True, timeout=600)
    assert r.stdout.strip(), r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["path"] == isa
    failed = [c for c in res["checks"] if not c[1]]
    assert not failed, failed
    assert r.returncode == 0


def test_unknown_value_is_a_clear_error():
    r = _python("import torch, fastgen\nfrom fastgen import _backend\n_backend.load_ext()\n"
                "try:\n    torch.ops.fastgen._knn_kernel(torch.randn(1, 5, 3), torch.randn(1, 9, 3), 2)\n"
                "except RuntimeError as e:\n    print('RuntimeError:', e)\n", "sse9")
    assert r.returncode == 0, r.stderr
    assert "RuntimeError" in r.stdout and "FASTGEN_CPU_ISA" in r.stdout and "sse9" in r.stdout


def test_path_the_cpu_lacks_is_a_clear_error():
    missing = [p for p in ("avx2", "avx512") if p not in _available()]
    if not missing:
        pytest.skip("this CPU runs every path (the error was checked under qemu-x86_64 -cpu Nehalem)")
    r = _python("import torch, fastgen\nfrom fastgen import _backend\n"
                "try:\n    _backend.cpu_isa()\nexcept RuntimeError as e:\n    print('RuntimeError:', e)\n",
                missing[-1])
    assert "RuntimeError" in r.stdout and "FASTGEN_CPU_ISA" in r.stdout and "lacks" in r.stdout, r.stdout + r.stderr


def test_info_names_the_path():
    from fastgen._info import info_lines

    line = [ln for ln in info_lines() if ln.startswith("CPU kernel path:")]
    assert len(line) == 1
    assert any(p in line[0] for p in _available())
