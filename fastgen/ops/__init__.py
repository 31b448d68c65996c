"""One module per op: Triton kernels, autograd Functions and backend registrations."""
# knn_triton registers the "triton" kNN backend; it imports triton lazily (import works without it).
from . import gaussian_nll, imle_loss, knn, knn_triton, spread_log_likelihood, spread_noise  # noqa: F401
