"""One module per op: Triton kernels, autograd Functions and backend registrations."""
from . import gaussian_nll, imle_loss, knn, spread_log_likelihood, spread_noise  # noqa: F401

try:  # the Triton kNN registers itself; absent module (being written) must not break import
    from . import knn_triton  # noqa: F401
except ImportError:
    pass
