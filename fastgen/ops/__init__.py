"""One module per op: Triton kernels, autograd Functions and backend registrations."""
from . import gaussian_nll, imle_loss, knn, spread_log_likelihood, spread_noise  # noqa: F401
