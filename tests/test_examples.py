"""The articles' experiments (examples/*.py) run with small settings; each asserts the reproduced
numbers within stated tolerances. Marked ``slow``. Set FASTGEN_FULL_EXAMPLES=1 to also run the
25-mode grid at the example's default settings (about a minute of CPU)."""
import importlib.util
import json
import math
import os

import pytest
import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "examples")
pytestmark = pytest.mark.slow


def D_BOUND(sigma, D=8):
    return D * (math.log(sigma) + 0.5 * math.log(2 * math.pi))


def _load(name):
    spec = importlib.util.spec_from_file_location(f"fastgen_example_{name}", os.path.join(ROOT, f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _outputs(out, name, res):
    assert os.path.getsize(os.path.join(out, f"{name}.png")) > 10_000
    with open(os.path.join(out, f"{name}.json")) as f:
        assert json.load(f) == json.loads(json.dumps(res))


def test_mle_mean_seeking(tmp_path):
    torch.set_num_threads(1)
    n = 20_000
    res = _load("mle_mean_seeking").main(["--out", str(tmp_path), "--n", str(n), "--steps", "600"])
    _outputs(tmp_path, "mle_mean_seeking", res)
    cf, gd = res["ml_closed_form"], res["ml_gradient_fastgen_nll"]
    # article: mu = 8, sigma = 8.06. Sample mean: std error 8.06 / sqrt(n) = 0.057 -> 4 s.e.;
    # sample std: std error sigma sqrt((kurtosis - 1) / 4n) = 0.007 (kurtosis 1.061) -> 0.05.
    assert abs(cf["mu"] - 8.0) < 4 * 8.06 / math.sqrt(n)
    assert abs(cf["sigma"] - math.sqrt(65.0)) < 0.05
    assert round(cf["sigma"], 2) in (8.05, 8.06, 8.07)
    # gradient fit on fastgen.gaussian_nll_loss reaches the closed form
    assert abs(gd["mu"] - cf["mu"]) < 2e-3 and abs(gd["sigma"] - cf["sigma"]) < 2e-3
    # reverse KL: one mode each, sigma 1, KL = log 2 (deterministic quadrature)
    r0, r1 = res["reverse_kl_fits"]
    assert abs(r0["mu"]) < 1e-3 and abs(r1["mu"] - 16.0) < 1e-3
    for r in (r0, r1):
        assert abs(r["sigma"] - 1.0) < 1e-3 and abs(r["kl"] - math.log(2.0)) < 1e-6
    u = res["unrealistic_fraction_3std"]
    assert abs(u["ml_fit"] - 0.637) < 0.01 and u["data"] < 0.003 and u["reverse_kl_fit"] < 0.003
    assert res["ml_q_density_at_model_mode"] < 1e-13


def test_spread_deltas(tmp_path):
    res = _load("spread_deltas").main(["--out", str(tmp_path), "--mc-draws", "50000", "--delta-steps", "300",
                                       "--grid-steps", "200", "--grid-samples", "512", "--sigma-start", "1.0",
                                       "--sigma-end", "0.1"])
    _outputs(tmp_path, "spread_deltas", res)
    cases = res["two_deltas"]["cases"]
    assert len(cases) == 18 and {c["kind"] for c in cases} == {"gaussian", "laplace"}
    # Monte-Carlo estimate vs closed form: within 4.5 standard errors in each of the 18 cases
    # (chance of any false alarm < 1e-4 under normality)
    assert res["two_deltas"]["max_abs_z"] < 4.5
    for c in cases:
        d, s = c["d"], c["sigma"]
        exact = d * d / (2 * s * s) if c["kind"] == "gaussian" else d / s + math.exp(-d / s) - 1
        assert c["closed_form"] == pytest.approx(exact, rel=1e-12)
    # delta model fitted by spread divergence lands on the data delta (ML has no gradient here)
    for kind in ("gaussian", "laplace"):
        f = res["delta_model"][kind]
        assert f["distance"] < 0.01, (kind, f)
        assert f["spread_kl_end"] < 1e-3 * f["spread_kl_start"]
    # short grid run: the spread objective decreases (coverage needs the default settings, below)
    log = res["grid"]["log"]
    assert log[-1]["loss"] < log[0]["loss"] - 1.0


@pytest.mark.skipif(os.environ.get("FASTGEN_FULL_EXAMPLES") != "1", reason="set FASTGEN_FULL_EXAMPLES=1 (1-2 min)")
def test_spread_deltas_grid_default_settings(tmp_path):
    res = _load("spread_deltas").main(["--out", str(tmp_path), "--mc-draws", "1000", "--delta-steps", "10"])
    g = res["grid"]
    # the `fastgen train --method spread --data grid-gmm` settings: measured 25/25 on seeds 0-5,
    # high-quality fraction 0.62 (seed 0)
    assert g["modes_covered"] >= 24 and g["high_quality_fraction"] > 0.45


def test_vae_sigma_collapse(tmp_path):
    res = _load("vae_sigma_collapse").main(["--out", str(tmp_path), "--steps", "1200"])
    _outputs(tmp_path, "vae_sigma_collapse", res)
    A, B, C = (res["runs"][k] for k in ("learned", "sigma_vae_floor", "spread"))
    floor, bound = res["sigma_floor"], res["neg_elbo_lower_bound_with_floor"]
    # A: the learned variance collapses and keeps falling; the likelihood keeps rising
    assert A["sigma_end"] < 0.5 * floor
    assert A["log_sigma_slope_per_1000_steps_last_quarter"] < -0.1
    assert A["neg_elbo_end"] < B["neg_elbo_end"] - 3.0
    # B: sigma^2 = MSE with a soft floor: sigma stays above the floor, -ELBO above its bound
    assert B["sigma_end"] >= floor
    assert B["neg_elbo_min"] >= bound - 1e-3
    # C: spread data: sigma settles near the spread level (0.1) without a floor
    assert 0.05 < C["sigma_end"] < 0.2
    assert abs(C["log_sigma_slope_per_1000_steps_last_quarter"]) < 0.25 * abs(A["log_sigma_slope_per_1000_steps_last_quarter"])
    # D: spread VAE (fixed decoder sigma = spread): trained, and bounded by construction
    Dr = res["runs"]["spread_vae"]
    assert Dr["neg_elbo_end"] < Dr["neg_elbo_start"] - 50
    assert Dr["neg_elbo_min"] > D_BOUND(res["spread_sigma"])
    for r in res["runs"].values():
        assert r["samples"]["arc_coverage"] > 0.9 and r["samples"]["rms_distance_to_curve"] < 1.5
