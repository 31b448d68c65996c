"""Backend selection, the optional extension, and `fastgen info`."""
import os
import subprocess
import sys

import pytest
import torch

from fastgen import _backend, _dispatch


def test_every_op_has_a_torch_backend():
    for op in _dispatch.ORDER:
        assert (op, "torch") in _dispatch._IMPLS, op
        assert _dispatch.unavailable_reason(op, "torch", "cpu") is None


def test_auto_on_cpu_never_picks_a_gpu_backend():
    for op in _dispatch.ORDER:
        name, fn = _dispatch.select(op, "auto", "cpu")
        assert name in ("cpu", "faiss", "torch"), (op, name)
        assert callable(fn)


def test_auto_prefers_the_compiled_kernel_when_built():
    for op in _dispatch.ORDER:
        if _backend.has_kernel(op, "CPU"):
            assert _dispatch.select(op, "auto", "cpu")[0] == "cpu", op


def test_unknown_and_unavailable_backends():
    with pytest.raises(ValueError, match="backend"):
        _dispatch.select("knn", "nope", "cpu")
    with pytest.raises(TypeError, match="backend"):
        _dispatch.select("knn", 3, "cpu")
    with pytest.raises(RuntimeError, match="cuda"):
        _dispatch.select("knn", "cuda", "cpu")


def test_use_backend_and_env_override(monkeypatch):
    with _dispatch.use_backend("torch"):
        assert _dispatch.select("gaussian_nll", "auto", "cpu")[0] == "torch"
        # an explicit argument is stronger than the context
        assert _dispatch.select("knn", "torch", "cpu")[0] == "torch"
    with _dispatch.use_backend("torch", op="knn"):
        assert _dispatch.select("knn", "auto", "cpu")[0] == "torch"
    monkeypatch.setenv("FASTGEN_BACKEND", "knn=torch,gaussian_nll=torch")
    assert _dispatch.select("knn", "auto", "cpu")[0] == "torch"
    assert _dispatch.select("gaussian_nll", "auto", "cpu")[0] == "torch"
    monkeypatch.setenv("FASTGEN_BACKEND", "torch")
    assert _dispatch.select("spread_noise", "auto", "cpu")[0] == "torch"


def test_report_gives_a_reason_for_every_missing_backend():
    rows = _dispatch.report(("cpu", "cuda"))
    assert rows
    for op, dev, name, why in rows:
        assert why is None or (isinstance(why, str) and len(why) > 10), (op, dev, name, why)
    # the CUDA-only backends are never available for CPU tensors, with a reason
    assert all(why for op, dev, name, why in rows if dev == "cpu" and name == "cuda")


def _run(code: str, **env):
    e = dict(os.environ, **env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=e, timeout=300)


def test_import_works_without_the_extension():
    code = ("import torch, fastgen\n"
            "from fastgen import _backend, _dispatch\n"
            "assert _backend.load_ext() is None\n"
            "assert 'FASTGEN_DISABLE_EXT' in _backend.ext_error()\n"
            "print(_dispatch.select('knn', 'auto', 'cpu')[0])\n"
            "d, i = fastgen.knn(torch.randn(5, 3), torch.randn(7, 3), k=2)\n"
            "print(tuple(d.shape), tuple(i.shape))\n")
    r = _run(code, FASTGEN_DISABLE_EXT="1")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.split()
    assert lines[0] in ("torch", "faiss")
    assert "(5, 2) (5, 2)" in r.stdout


def test_fastgen_info_names_each_missing_backend():
    r = _run("from fastgen._info import print_info; print_info()", FASTGEN_DISABLE_EXT="1")
    assert r.returncode == 0, r.stderr
    assert "fastgen._C: not loaded: disabled by FASTGEN_DISABLE_EXT=1" in r.stdout
    assert "missing:" in r.stdout
    for op in _dispatch.ORDER:
        assert op in r.stdout
