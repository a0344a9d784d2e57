"""Binary (SVM) hinge loss, against the composite torch.clamp(margin - y x, min=0)
(squared: ** 2): values, gradients for input and target, kink, errors."""

import pytest
import torch

import fusedloss
import fusedloss.functional as FF
from conftest import DEVICES, FLOAT_DTYPES, REDUCTIONS, make
from fusedloss.testing import assert_matches_torch

NAME = "hinge_loss"
SHAPES = [(), (0,), (10,), (5, 5), (3, 4, 5), (4, 9000)]


def pm1(shape, dtype, device, requires_grad=False):
    y = (torch.randint(0, 2, shape).to(torch.float64) * 2 - 1).to(device=device, dtype=dtype)
    return y.requires_grad_(requires_grad)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("squared", [False, True])
def test_parity(device, dtype, shape, reduction, squared):
    x = make(shape, dtype, device, -3, 3, requires_grad=True)
    y = pm1(shape, dtype, device, requires_grad=True)
    assert_matches_torch(NAME, x, y, margin=0.8, squared=squared, reduction=reduction)


@pytest.mark.parametrize("device", DEVICES)
def test_broadcast_mixed_dtype_and_kink(device):
    x = make((5, 6), torch.float32, device, requires_grad=True)
    assert_matches_torch(NAME, x, pm1((6,), torch.float64, device, True))
    # exactly at the kink margin - y x = 0, and NaN/inf
    k = torch.tensor([1.0, -1.0, float("nan"), float("inf"), 2.0], device=device, requires_grad=True)
    yk = torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0], device=device, requires_grad=True)
    for squared in (False, True):
        assert_matches_torch(NAME, k, yk, squared=squared, reduction="none")


def test_module():
    m = fusedloss.nn.HingeLoss(margin=2.0, squared=True, reduction="sum")
    assert "squared=True" in repr(m)
    x = torch.randn(8)
    y = torch.sign(torch.randn(8))
    torch.testing.assert_close(m(x, y), torch.clamp(2.0 - y * x, min=0).pow(2).sum())


def test_bad_reduction():
    with pytest.raises(ValueError, match="avg is not a valid value for reduction"):
        FF.hinge_loss(torch.randn(3), torch.ones(3), reduction="avg")


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("squared", [False, True])
def test_gradcheck_and_gradgradcheck(reduction, squared):
    x = make((4, 5), torch.float64, "cpu", -3, 3, requires_grad=True)
    y = make((4, 5), torch.float64, "cpu", -1, 1, requires_grad=True)
    fn = lambda a, b: FF.hinge_loss(a, b, margin=0.5, squared=squared, reduction=reduction)  # noqa: E731
    assert torch.autograd.gradcheck(
        fn, (x, y), check_forward_ad=True, check_batched_grad=True, check_undefined_grad=True
    )
    assert torch.autograd.gradgradcheck(fn, (x, y), gen_non_contig_grad_outputs=True)
