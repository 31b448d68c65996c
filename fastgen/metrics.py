"""Sample-quality metrics of the command line, computed with fastgen.knn.

* :func:`precision_recall`: improved precision and recall (Kynkaanniemi, Karras, Laine,
  Lehtinen, Aila, NeurIPS 2019, arXiv 1904.06991, eq. 1-3): the manifold of a set is the union
  of balls centred on its points with radius the distance to the k-th nearest other point of
  the set; precision = fraction of generated samples inside the real manifold, recall =
  fraction of real points inside the generated manifold. Here in pixel space with k = 3.
* :func:`class_coverage`: number of classes holding >= 5 % of the samples under a classifier.
* :func:`grid_modes`: modes covered and high-quality fraction on the 25-mode grid
  (Srivastava et al. 2017 "VEEGAN", Lin et al. 2018 "PacGAN").
"""
from __future__ import annotations

import numpy as np
import torch


def _tensor(name: str, x) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a numpy array or torch.Tensor, got {type(x).__name__}")
    if not (x.is_floating_point() or x.dtype in (torch.int32, torch.int64, torch.uint8)):
        raise TypeError(f"{name} must hold real numbers, got {x.dtype}")
    if x.dim() < 2:
        raise ValueError(f"{name} must be [n, ...] with at least 2 dims, got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} must not be empty")
    x = x.reshape(x.shape[0], -1).to(torch.float32)
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or inf")
    return x


def _knn(query, key, k, backend="auto"):
    import fastgen

    return fastgen.knn(query, key, k, backend=backend)


def knn_radii2(x: torch.Tensor, k: int, backend: str = "auto") -> torch.Tensor:
    """Squared distance from each row of x [n, D] to its k-th nearest other row, float64 [n],
    recomputed exactly in float64 from the indices fastgen.knn returns."""
    if x.shape[0] <= k:
        raise ValueError(f"need more than k = {k} points to compute k-NN radii, got {x.shape[0]}")
    _, idx = _knn(x, x, k + 1, backend)          # the point itself (distance 0) is one of them
    x64 = x.to(torch.float64)
    d = ((x64[:, None, :] - x64[idx]) ** 2).sum(-1)      # [n, k + 1], exact
    return d.sort(dim=1).values[:, k]


def in_manifold(points: torch.Tensor, centres: torch.Tensor, radii2: torch.Tensor, *,
                backend: str = "auto", candidates: int = 8) -> torch.Tensor:
    """bool [n]: whether points[i] lies in some ball (centres[j], sqrt(radii2[j])) (boundary
    included).

    One exact nearest-neighbour query decides it: with R2 = max radii2, the augmented centres
    (c_j, sqrt(R2 - r_j^2)) and points (p, 0) have squared distance ||p - c_j||^2 + R2 - r_j^2,
    so p is inside some ball iff its nearest augmented centre is within R2. The few nearest
    augmented centres are then checked exactly in float64 (immune to fp32 rounding at the
    boundary)."""
    r2 = radii2.to(torch.float64)
    R2 = r2.max()
    extra = torch.sqrt(torch.clamp(R2 - r2, min=0)).to(torch.float32)
    c_aug = torch.cat([centres, extra[:, None]], 1).contiguous()
    p_aug = torch.cat([points, torch.zeros(points.shape[0], 1)], 1).contiguous()
    kc = min(candidates, centres.shape[0])
    _, idx = _knn(p_aug, c_aug, kc, backend)           # [n, kc]
    d = ((points.to(torch.float64)[:, None, :] - centres.to(torch.float64)[idx]) ** 2).sum(-1)
    return (d <= r2[idx]).any(1)


def precision_recall(real, fake, k: int = 3, *, backend: str = "auto") -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019) of ``fake`` w.r.t. ``real``.

    Args:
        real: [n_real, ...] real examples (numpy or torch; flattened; here in pixel units).
        fake: [n_fake, ...] generated samples, same flattened size.
        k: the k of the k-NN radii (the paper's default is 3).
        backend: backend of :func:`fastgen.knn`.

    Returns:
        (precision, recall) as floats in [0, 1]. ``precision_recall(x, x) == (1.0, 1.0)``.

    Raises:
        TypeError for non-array input; ValueError for empty, non-finite or mismatched inputs,
        or sets with at most k points.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    r = _tensor("real", real)
    f = _tensor("fake", fake)
    if r.shape[1] != f.shape[1]:
        raise ValueError(f"real and fake must have the same number of features, got {r.shape[1]} and {f.shape[1]}")
    r_rad = knn_radii2(r, k, backend)
    f_rad = knn_radii2(f, k, backend)
    precision = in_manifold(f, r, r_rad, backend=backend).double().mean().item()
    recall = in_manifold(r, f, f_rad, backend=backend).double().mean().item()
    return precision, recall


def digits_classifier(x_train, y_train):
    """scikit-learn LogisticRegression on pixels / 16 (the class_coverage judge)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import FunctionTransformer

    clf = make_pipeline(FunctionTransformer(lambda a: np.asarray(a, dtype=np.float64).reshape(len(a), -1) / 16.0),
                        LogisticRegression(max_iter=2000))
    return clf.fit(np.asarray(x_train).reshape(len(x_train), -1), np.asarray(y_train))


def class_coverage(samples, classifier, *, n_classes: int = 10, threshold: float = 0.05) -> tuple[int, list[float]]:
    """(number of classes holding >= threshold of the samples, per-class fractions) under
    ``classifier.predict`` (any fitted scikit-learn classifier with integer labels 0..n-1)."""
    x = _tensor("samples", samples).numpy()
    pred = np.asarray(classifier.predict(x))
    frac = np.bincount(pred, minlength=n_classes)[:n_classes] / len(pred)
    return int((frac >= threshold).sum()), [float(v) for v in frac]


def grid_modes(samples, centres, std: float, *, min_fraction: float = 0.01, n_std: float = 3.0,
               backend: str = "auto") -> dict:
    """Mode coverage on a mixture with known centres.

    A sample is high quality when it lies within ``n_std`` std of its nearest centre; a mode
    is covered when >= ``min_fraction`` of all samples are high-quality samples of it.
    Returns dict(modes_covered, n_modes, high_quality_fraction, per_mode fractions)."""
    s = _tensor("samples", samples)
    c = _tensor("centres", centres)
    if s.shape[1] != c.shape[1]:
        raise ValueError(f"samples and centres must have the same number of features, got {s.shape[1]} and {c.shape[1]}")
    if not std > 0:
        raise ValueError(f"std must be > 0, got {std}")
    _, idx = _knn(s, c, 1, backend)
    idx = idx[:, 0]
    d2 = ((s.double() - c.double()[idx]) ** 2).sum(1)
    good = d2 <= (n_std * std) ** 2
    per_mode = torch.bincount(idx[good], minlength=c.shape[0]).double() / s.shape[0]
    return {"modes_covered": int((per_mode >= min_fraction).sum()), "n_modes": int(c.shape[0]),
            "high_quality_fraction": float(good.double().mean()),
            "per_mode": [round(float(v), 5) for v in per_mode]}
