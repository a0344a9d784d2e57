"""soft_margin_loss: parity with torch, the stable form where torch overflows,
errors, autograd."""

import pytest
import torch
import torch.nn.functional as F

import fusedloss.functional as FF
from conftest import DEVICES, FLOAT_DTYPES, REDUCTIONS, make
from fusedloss import _composite
from fusedloss.testing import assert_matches_torch

NAME = "soft_margin_loss"
SHAPES = [(), (0,), (10,), (5, 5), (3, 4, 5), (4, 9000)]


def pm1(shape, dtype, device):
    return (torch.randint(0, 2, shape).to(torch.float64) * 2 - 1).to(device=device, dtype=dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_parity(device, dtype, shape, reduction):
    # |y x| < 20: where torch's own form is accurate.
    x = make(shape, dtype, device, -20, 20, requires_grad=True)
    assert_matches_torch(NAME, x, pm1(shape, dtype, device), reduction=reduction)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_soft_targets_and_broadcast(device, reduction):
    x = make((6, 7), torch.float32, device, requires_grad=True)
    assert_matches_torch(NAME, x, make((6, 7), torch.float32, device, -2, 2), reduction=reduction)
    assert_matches_torch(NAME, x, pm1((1, 7), torch.float32, device), reduction=reduction)
    assert_matches_torch(NAME, x, pm1((7,), torch.float64, device), reduction=reduction)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_stable_where_torch_overflows(device, dtype):
    # torch: log1p(exp(100)) = inf in fp32 (pytorch#77529); the value is ~100.
    x = torch.tensor([-100.0, 100.0, -1e4, 30.0], dtype=dtype, device=device, requires_grad=True)
    y = torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=dtype, device=device)
    out = FF.soft_margin_loss(x, y, reduction="none")
    assert torch.isfinite(out).all()
    assert_matches_torch(NAME, x, y, reduction="none", native=_composite.soft_margin_loss)
    (g,) = torch.autograd.grad(out.sum(), x)
    assert torch.isfinite(g).all()
    assert torch.isinf(F.soft_margin_loss(x.detach().float(), y.float(), reduction="none")[0])


@pytest.mark.parametrize("device", DEVICES)
def test_special_values(device):
    nan, inf = float("nan"), float("inf")
    x = torch.tensor([nan, inf, -inf, 0.0], device=device, requires_grad=True)
    y = torch.tensor([1.0, 1.0, -1.0, 1.0], device=device)
    assert_matches_torch(NAME, x, y, reduction="none", native=_composite.soft_margin_loss)


def test_empty_mean_is_nan():
    assert torch.isnan(FF.soft_margin_loss(torch.empty(0), torch.empty(0)))


ERROR_CASES = [
    ("bad reduction", (torch.randn(3), torch.ones(3)), {"reduction": "avg"}),
    ("not broadcastable", (torch.randn(3), torch.ones(4)), {}),
    ("target grows output", (torch.randn(4), torch.ones(3, 4)), {}),
    ("integer input", (torch.ones(3, dtype=torch.long), torch.ones(3)), {}),
    ("target requires grad", (torch.randn(3), torch.ones(3, requires_grad=True)), {}),
]


@pytest.mark.parametrize("case", ERROR_CASES, ids=lambda c: c[0])
def test_errors_match_torch(case):
    _, args, kwargs = case
    with pytest.raises(Exception) as native_err:
        F.soft_margin_loss(*args, **kwargs)
    with pytest.raises(type(native_err.value)) as fused_err:
        FF.soft_margin_loss(*args, **kwargs)
    assert str(fused_err.value) == str(native_err.value)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradcheck_and_gradgradcheck(reduction):
    x = make((4, 5), torch.float64, "cpu", -4, 4, requires_grad=True)
    y = make((4, 5), torch.float64, "cpu", -1, 1)
    fn = lambda a: FF.soft_margin_loss(a, y, reduction=reduction)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x,), check_forward_ad=True, check_batched_grad=True, check_undefined_grad=True)
    assert torch.autograd.gradgradcheck(fn, (x,), gen_non_contig_grad_outputs=True)
