"""The torch.func matrix of every public op (bench/func_matrix.py) and forward-over-forward AD."""
import pytest
import torch
from torch.func import jacfwd

import fastgen
from bench import func_matrix
from fastgen.reference import imle_loss as ref_imle


@pytest.mark.parametrize("op", list(func_matrix.cases()))
def test_matrix_all_yes(op):
    f, ref, inputs = func_matrix.cases()[op]
    res, errs = func_matrix.run_checks(op, f, ref, inputs)
    assert set(res) == set(func_matrix.CHECKS)
    assert all(v == "yes" for v in res.values()), (res, errs)


@pytest.mark.parametrize("op", ["gaussian_nll_loss", "spread_noise", "spread_log_likelihood", "knn"])
def test_forward_over_forward_raises_not_silently_wrong(op):
    # the ops' jvp formulas are not themselves forward-differentiable: jacfwd(jacfwd(f)) must
    # raise, not return a Hessian that misses the second-order term
    f, _, inputs = func_matrix.cases()[op]
    rest = inputs[1:]
    with pytest.raises(NotImplementedError, match="forward-over-forward"):
        jacfwd(jacfwd(lambda a: f(a, *rest).sum()))(inputs[0])


def test_forward_over_forward_imle_loss_matches_reference():
    # imle_loss is plain torch around a non-differentiable search: every order of AD is exact
    f, _, (samples, data) = func_matrix.cases()["imle_loss"]
    h = jacfwd(jacfwd(lambda s: fastgen.imle_loss(s, data)))(samples)
    hr = jacfwd(jacfwd(lambda s: ref_imle.imle_loss(s, data)))(samples)
    torch.testing.assert_close(h, hr)
