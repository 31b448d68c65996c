import os

# Triton reads TRITON_INTERPRET when a kernel is decorated: set it before fastgen is imported,
# so that the Triton kernels run on CPU in the interpreter when no GPU is present.
try:
    import torch as _torch

    _has_cuda = _torch.cuda.is_available()
except Exception:  # pragma: no cover
    _has_cuda = False
if not _has_cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def has_triton() -> bool:
    try:
        import triton  # noqa: F401
        return True
    except Exception:
        return False


def has_faiss() -> bool:
    try:
        import faiss  # noqa: F401
        return True
    except Exception:
        return False


def has_ext_kernel(op: str) -> bool:
    from fastgen import _backend

    return _backend.has_kernel(op, "CPU")


# Backends every op test should run on this machine: "torch" always, "cpu" when fastgen._C is
# built, "triton" in the interpreter (CPU) or on a GPU.
def backends_for(op: str) -> list:
    out = ["torch"]
    params = [pytest.param("cpu", marks=pytest.mark.skipif(not has_ext_kernel(op), reason="fastgen._C not built"))]
    params.append(pytest.param("triton", marks=pytest.mark.skipif(not has_triton(), reason="triton not installed")))
    return out + params


# gradcheck flags of the torch.func tests (issue #12): every mode torch can check
GRAD_FLAGS = dict(check_forward_ad=True, check_backward_ad=True, check_batched_grad=True,
                  check_batched_forward_grad=True)


def knn_backends() -> list:
    """The knn backends the exact (non-interpreted) torch.func tests run on: torch, cpu, faiss."""
    return ["torch",
            pytest.param("cpu", marks=pytest.mark.skipif(not has_ext_kernel("knn"), reason="fastgen._C not built")),
            pytest.param("faiss", marks=pytest.mark.skipif(not has_faiss(), reason="faiss not installed"))]


TRITON = pytest.param("triton", marks=pytest.mark.skipif(not has_triton(), reason="triton not installed"))
