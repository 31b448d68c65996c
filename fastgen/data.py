"""Datasets of the command line, all embedded (no download).

* ``digits``: the scikit-learn digits (UCI optical recognition of handwritten digits test set;
  1797 images of 8 x 8 pixels, integer values 0..16, 10 classes), split 80 / 20 with
  ``train_test_split(test_size=0.2, random_state=0)``: 1437 train and 360 test images.
* ``grid-gmm``: the 2-D mixture of 25 equally weighted Gaussians centred on {-4,-2,0,2,4}^2
  with std 0.05, the mode-collapse benchmark of e.g. PacGAN (Lin et al. 2018) and VEEGAN
  (Srivastava et al. 2017).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DIGITS_MAX = 16.0            # pixel values of load_digits are integers 0..16
GRID_STD = 0.05
GRID_VALUES = (-4.0, -2.0, 0.0, 2.0, 4.0)


@dataclass
class Split:
    """A train / test split: x float32 [n, D] (flattened), y int64 [n] (labels or mode ids)."""
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    shape: tuple          # shape of one example (8, 8) for digits, (2,) for grid-gmm
    name: str


def digits(test_size: float = 0.2, random_state: int = 0) -> Split:
    """The scikit-learn digits, flattened to [n, 64] float32 in pixel units 0..16."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = d.images.reshape(len(d.images), -1).astype(np.float32)
    y = d.target.astype(np.int64)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=test_size, random_state=random_state)
    return Split(xtr, ytr, xte, yte, (8, 8), "digits")


def grid_centres() -> np.ndarray:
    """The 25 centres of grid-gmm, float32 [25, 2], row-major over (x, y)."""
    g = np.array(GRID_VALUES, dtype=np.float32)
    return np.stack(np.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)


def grid_gmm(n_train: int = 5000, n_test: int = 1000, std: float = GRID_STD, seed: int = 0) -> Split:
    """Samples of the 25-mode grid mixture (equal weights); y = index of the mode (0..24)."""
    if n_train < 1 or n_test < 1:
        raise ValueError(f"n_train and n_test must be >= 1, got {n_train}, {n_test}")
    if not std > 0:
        raise ValueError(f"std must be > 0, got {std}")
    rs = np.random.RandomState(seed)
    c = grid_centres()

    def draw(n):
        y = rs.randint(0, len(c), size=n)
        return (c[y] + std * rs.randn(n, 2)).astype(np.float32), y.astype(np.int64)

    xtr, ytr = draw(n_train)
    xte, yte = draw(n_test)
    return Split(xtr, ytr, xte, yte, (2,), "grid-gmm")


def load(name: str, seed: int = 0) -> Split:
    """``digits`` or ``grid-gmm`` (``seed`` only affects grid-gmm's draw)."""
    if name == "digits":
        return digits()
    if name in ("grid-gmm", "grid_gmm"):
        return grid_gmm(seed=seed)
    raise ValueError(f"data must be 'digits' or 'grid-gmm', got {name!r}")
