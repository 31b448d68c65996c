"""Smoke tests of the command line: short runs that write the run folder."""
import json
import os

import numpy as np
import pytest

from fastgen import cli


def test_train_grid_gmm_writes_run_folder(tmp_path, capsys):
    out = tmp_path / "grid"
    assert cli.main(["train", "--method", "imle", "--data", "grid-gmm", "--epochs", "3", "--seed", "1",
                     "--n-samples", "500", "--no-progress", "--out", str(out)]) == 0
    for f in ("samples.png", "loss.png", "samples.npy", "metrics.json", "model.pt"):
        assert (out / f).stat().st_size > 0, f
    m = json.loads((out / "metrics.json").read_text())
    assert 0 <= m["modes_covered"] <= 25 and m["n_modes"] == 25
    assert 0.0 <= m["high_quality_fraction"] <= 1.0
    assert m["config"]["epochs"] == 3 and m["config"]["seed"] == 1
    x = np.load(out / "samples.npy")
    assert x.shape == (500, 2) and x.dtype == np.float32
    assert "modes_covered" in capsys.readouterr().out


def test_tiny_digits_run(tmp_path):
    out = tmp_path / "digits"
    assert cli.main(["train", "--data", "digits", "--epochs", "2", "--pool-factor", "2", "--no-progress",
                     "--out", str(out)]) == 0
    for f in ("samples.png", "neighbours.png", "loss.png", "samples.npy", "metrics.json", "model.pt"):
        assert (out / f).stat().st_size > 0, f
    x = np.load(out / "samples.npy")
    assert x.shape == (1000, 8, 8) and x.dtype == np.float32 and x.min() >= 0 and x.max() <= 16
    m = json.loads((out / "metrics.json").read_text())
    for key in ("precision", "recall", "class_coverage", "train_seconds"):
        assert key in m and key in m["gaussian_mixture"] or key == "train_seconds"
    assert 0 <= m["precision"] <= 1 and 0 <= m["recall"] <= 1 and 0 <= m["class_coverage"] <= 10
    assert m["config"]["pool_factor"] == 2
    g = m["gaussian_mixture"]
    assert g["precision"] > 0.85 and g["class_coverage"] == 10      # the baseline is a real model


def test_demo_name_and_runs_dir(tmp_path, monkeypatch):
    calls = {}

    def fake_run(method, data, out, **kw):
        calls.update(method=method, data=data, out=out, **kw)
        return {"data": "digits", "precision": 1.0, "recall": 1.0, "class_coverage": 10, "train_seconds": 0.0}

    monkeypatch.setattr(cli, "run", fake_run)
    assert cli.main(["demo", "--name", "x", "--runs-dir", str(tmp_path), "--epochs", "7"]) == 0
    assert calls["method"] == "imle" and calls["data"] == "digits" and calls["epochs"] == 7
    assert calls["out"] == os.path.join(str(tmp_path), "x")


@pytest.mark.parametrize("argv", [
    ["train", "--data", "mnist"],
    ["train", "--method", "gan"],
    ["train", "--epochs", "0"],
    ["demo", "--n-samples", "3"],
])
def test_bad_arguments_exit(argv):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code != 0


def test_info(capsys):
    pytest.importorskip("fastgen._info")
    assert cli.main(["info"]) == 0
    assert "torch" in capsys.readouterr().out


@pytest.mark.parametrize("method", ["rs-imle", "adaptive-imle"])
def test_train_imle_methods_grid_gmm(tmp_path, method):
    out = tmp_path / method
    assert cli.main(["train", "--method", method, "--data", "grid-gmm", "--epochs", "2", "--n-samples", "300",
                     "--no-progress", "--out", str(out)]) == 0
    for f in ("samples.png", "loss.png", "samples.npy", "metrics.json", "model.pt", "checkpoint.pt"):
        assert (out / f).stat().st_size > 0, f
    m = json.loads((out / "metrics.json").read_text())
    assert m["method"] == method and m["config"]["method"] == method and 0 <= m["modes_covered"] <= 25
    if method == "rs-imle":
        assert m["config"]["rejection_radius"] == cli.RS_RADIUS["grid-gmm"] > 0
    else:
        assert m["config"]["per_batch"] is True and m["reselected_fraction"][0] == [0, 1.0]


@pytest.mark.parametrize("data", ["grid-gmm", "digits"])
def test_train_cimle_writes_run_folder(tmp_path, data):
    out = tmp_path / data
    assert cli.main(["train", "--method", "cimle", "--data", data, "--epochs", "2", "--n-samples", "300",
                     "--no-progress", "--no-baseline", "--out", str(out)]) == 0
    for f in ("samples.png", "loss.png", "samples.npy", "metrics.json", "model.pt"):
        assert (out / f).stat().st_size > 0, f
    m = json.loads((out / "metrics.json").read_text())
    assert m["method"] == "cimle" and m["conditioned_on"].startswith("test split")
    assert m["config"]["n_candidates"] >= 1 and m["final_loss"] > 0
    if data == "digits":
        assert 0 <= m["precision"] <= 1 and 0 <= m["recall"] <= 1
        assert np.load(out / "samples.npy").shape == (300, 8, 8)
    else:
        assert 0 <= m["modes_covered"] <= 25
    with pytest.raises(ValueError, match="--pool-factor does not apply"):
        cli.main(["train", "--method", "cimle", "--data", data, "--epochs", "1", "--pool-factor", "3",
                  "--no-progress", "--out", str(tmp_path / "bad")])
    with pytest.raises(SystemExit, match="--resume applies"):
        cli.main(["train", "--method", "cimle", "--data", data, "--epochs", "1", "--resume",
                  "--no-progress", "--out", str(out)])


def test_cli_resume_equals_uninterrupted_run(tmp_path):
    import torch

    common = ["train", "--method", "adaptive-imle", "--data", "grid-gmm", "--n-samples", "300", "--no-progress",
              "--checkpoint-every", "2", "--max-age", "2"]
    a, b = tmp_path / "a", tmp_path / "b"
    assert cli.main(common + ["--epochs", "4", "--out", str(a)]) == 0
    assert cli.main(common + ["--epochs", "2", "--out", str(b)]) == 0
    assert cli.main(["train", "--method", "adaptive-imle", "--data", "grid-gmm", "--n-samples", "300",
                     "--no-progress", "--epochs", "4", "--resume", "--out", str(b)]) == 0
    ga = torch.load(a / "model.pt")["generator"]
    gb = torch.load(b / "model.pt")["generator"]
    assert all(torch.equal(ga[k], gb[k]) for k in ga)
    ma, mb = (json.loads((p / "metrics.json").read_text()) for p in (a, b))
    assert mb["resumed_from_epoch"] == 2 and mb["config"] == ma["config"]
    for k in ("final_loss", "modes_covered", "high_quality_fraction", "reselected_fraction"):
        assert ma[k] == mb[k], k
    assert np.array_equal(np.load(a / "samples.npy"), np.load(b / "samples.npy"))


@pytest.mark.parametrize("argv, exc, match", [
    (["train", "--checkpoint-every", "-1"], SystemExit, None),
    (["train", "--method", "spread", "--resume"], SystemExit, None),
    (["train", "--method", "adaptive-imle", "--data", "grid-gmm", "--epochs", "1", "--gamma", "1.5"],
     ValueError, "gamma"),
    (["train", "--method", "rs-imle", "--data", "grid-gmm", "--epochs", "1", "--rejection-radius", "0"],
     ValueError, "rejection_radius"),
])
def test_bad_method_arguments(tmp_path, argv, exc, match):
    with pytest.raises(exc, match=match) as e:
        cli.main(argv + ["--no-progress", "--out", str(tmp_path / "x")])
    if exc is SystemExit:
        assert e.value.code != 0
