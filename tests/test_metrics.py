"""fastgen.metrics on known cases and against a brute-force numpy implementation."""
import numpy as np
import pytest
import torch

from fastgen import data, metrics


def _brute_pr(real, fake, k):
    real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)

    def radii(x):
        d = ((x[:, None] - x[None]) ** 2).sum(-1)
        return np.sort(d, 1)[:, k]

    def inside(p, c, r2):
        d = ((p[:, None] - c[None]) ** 2).sum(-1)
        return (d <= r2[None]).any(1)

    return inside(fake, real, radii(real)).mean(), inside(real, fake, radii(fake)).mean()


def test_real_set_against_itself():
    x = np.random.RandomState(0).randn(200, 16).astype(np.float32)
    assert metrics.precision_recall(x, x) == (1.0, 1.0)


@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("seed", [0, 1])
def test_precision_recall_matches_brute_force(k, seed):
    rs = np.random.RandomState(seed)
    real = rs.randn(150, 6).astype(np.float32) + 100.0
    fake = (rs.randn(230, 6) * 1.3 + 0.4).astype(np.float32) + 100.0
    p, r = metrics.precision_recall(real, fake, k=k)
    bp, br = _brute_pr(real, fake, k)
    assert p == pytest.approx(bp, abs=1e-12) and r == pytest.approx(br, abs=1e-12)
    assert 0 < p < 1 and 0 < r < 1


def test_disjoint_sets_and_collapse():
    rs = np.random.RandomState(2)
    real = rs.randn(100, 4)
    assert metrics.precision_recall(real, real + 100.0) == (0.0, 0.0)
    # a collapsed generator (every sample on one real point): precision 1, recall small
    fake = np.repeat(real[:1], 50, 0)
    p, r = metrics.precision_recall(real, fake)
    assert p == 1.0 and r == pytest.approx(1 / 100)


def test_in_manifold_boundary_is_inside():
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0]])
    r2 = torch.tensor([1.0, 4.0], dtype=torch.float64)
    pts = torch.tensor([[1.0, 0.0], [0.0, 1.0001], [12.0, 0.0], [12.0, 0.01], [5.0, 5.0]])
    assert metrics.in_manifold(pts, centres, r2).tolist() == [True, False, True, False, False]


def test_training_digits_are_a_plausible_generator():
    s = data.digits()
    p, r = metrics.precision_recall(s.x_test, s.x_train)
    assert 0.8 < p < 0.95 and 0.8 < r < 0.95


def test_class_coverage():
    s = data.digits()
    clf = metrics.digits_classifier(s.x_train, s.y_train)
    assert (clf.predict(s.x_test) == s.y_test).mean() > 0.9
    cc, frac = metrics.class_coverage(s.x_test, clf)
    assert cc == 10 and sum(frac) == pytest.approx(1.0)
    ones = s.x_test[s.y_test == 1]
    cc, frac = metrics.class_coverage(ones, clf)
    assert cc == 1 and frac[1] > 0.9
    # 3 classes, one of them below 5 %
    mix = np.concatenate([s.x_test[s.y_test == 0][:30], s.x_test[s.y_test == 7][:30], s.x_test[s.y_test == 3][:2]])
    assert metrics.class_coverage(mix, clf)[0] == 2


def test_grid_modes():
    c = data.grid_centres()
    assert c.shape == (25, 2) and set(np.unique(c)) == {-4.0, -2.0, 0.0, 2.0, 4.0}
    split = data.grid_gmm(n_train=3000, n_test=10, seed=1)
    g = metrics.grid_modes(split.x_train, c, data.GRID_STD)
    assert g["modes_covered"] == 25 and g["high_quality_fraction"] > 0.98
    three = np.concatenate([np.repeat(c[[0]], 40, 0), np.repeat(c[[5]], 40, 0), np.repeat(c[[7]], 19, 0),
                            np.full((1, 2), 1.0)]).astype(np.float32)
    g = metrics.grid_modes(three, c, data.GRID_STD)
    assert g["modes_covered"] == 3 and g["high_quality_fraction"] == pytest.approx(0.99)
    assert metrics.grid_modes(c + 0.16, c, data.GRID_STD)["modes_covered"] == 0   # 0.16 * sqrt 2 > 3 std


def test_datasets():
    s = data.digits()
    assert s.x_train.shape == (1437, 64) and s.x_test.shape == (360, 64) and s.x_train.dtype == np.float32
    assert s.x_train.min() == 0 and s.x_train.max() == 16
    with pytest.raises(ValueError, match="data"):
        data.load("mnist")
    with pytest.raises(ValueError, match="std"):
        data.grid_gmm(std=0.0)


@pytest.mark.parametrize("real,fake,kw,exc,name", [
    (np.zeros((0, 3)), np.zeros((5, 3)), {}, ValueError, "real"),
    (np.zeros((5, 3)), np.zeros((5, 4)), {}, ValueError, "features"),
    (np.zeros((5, 3)), [[0.0] * 3] * 5, {}, TypeError, "fake"),
    (np.zeros(5), np.zeros((5, 3)), {}, ValueError, "real"),
    (np.full((5, 3), np.nan), np.zeros((5, 3)), {}, ValueError, "real"),
    (np.zeros((5, 3)), np.zeros((5, 3)), {"k": 0}, ValueError, "k"),
    (np.random.randn(3, 3), np.random.randn(9, 3), {}, ValueError, "k"),
])
def test_bad_input(real, fake, kw, exc, name):
    with pytest.raises(exc, match=name):
        metrics.precision_recall(real, fake, **kw)


def test_grid_modes_bad_input():
    with pytest.raises(ValueError, match="features"):
        metrics.grid_modes(np.zeros((4, 3)), data.grid_centres(), 0.05)
    with pytest.raises(ValueError, match="std"):
        metrics.grid_modes(np.zeros((4, 2)), data.grid_centres(), -1.0)
