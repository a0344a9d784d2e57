"""hinge_embedding_loss: parity with torch, targets outside {-1, 1}, broadcasting,
special values, errors, autograd."""

import pytest
import torch
import torch.nn.functional as F

import fusedloss.functional as FF
from conftest import DEVICES, FLOAT_DTYPES, REDUCTIONS, make
from fusedloss.testing import assert_matches_torch

NAME = "hinge_embedding_loss"
SHAPES = [(), (0,), (10,), (5, 5), (5, 5, 5), (4, 9000)]


def pm1(shape, dtype, device, other=False):
    y = torch.randint(0, 2, shape).to(torch.float64) * 2 - 1
    if other and y.numel():
        y.view(-1)[::3] = torch.tensor([0.0, 2.0, 0.5]).repeat(y.numel())[: y.view(-1)[::3].numel()]
    return y.to(device=device, dtype=dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("margin", [1.0, -2.5, 6.0])
def test_parity(device, dtype, shape, reduction, margin):
    x = make(shape, dtype, device, -9, 9, requires_grad=True)
    assert_matches_torch(NAME, x, pm1(shape, dtype, device, other=True), margin=margin, reduction=reduction)


@pytest.mark.parametrize("device", DEVICES)
def test_targets_outside_pm1_take_both_terms(device):
    x = torch.tensor([0.5, 0.5, 0.5, 3.0], device=device)
    y = torch.tensor([0.0, 2.0, 1.0, -1.0], device=device)
    out = FF.hinge_embedding_loss(x, y, reduction="none")
    assert out.tolist() == [1.0, 1.0, 0.5, 0.0]
    assert torch.equal(out, F.hinge_embedding_loss(x, y, reduction="none"))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("xshape,yshape", [((5, 5), (1, 5)), ((5,), (3, 5)), ((4, 1, 3), (1, 2, 1))])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_broadcasting(device, xshape, yshape, reduction):
    x = make(xshape, torch.float32, device, requires_grad=True)
    assert_matches_torch(NAME, x, pm1(yshape, torch.float32, device), reduction=reduction)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["transposed", "offset", "strided"])
def test_layouts(device, layout):
    x = make((33, 65), torch.float32, device, requires_grad=True, layout=layout)
    y = pm1((65, 33), torch.float32, device).t()
    assert_matches_torch(NAME, x, y, reduction="sum")


@pytest.mark.parametrize("device", DEVICES)
def test_special_values_and_kink(device):
    inf, nan = float("inf"), float("nan")
    x = torch.tensor([nan, inf, -inf, 1.0, 1.0, nan, 0.3], device=device, requires_grad=True)
    y = torch.tensor([-1.0, -1.0, -1.0, -1.0, 1.0, 1.0, 0.0], device=device)
    assert_matches_torch(NAME, x, y, reduction="none")  # includes x == margin (torch's gradient there: 0)


@pytest.mark.parametrize("device", DEVICES)
def test_integer_and_other_dtype_targets(device):
    x = make((6, 4), torch.float16, device, requires_grad=True)
    assert_matches_torch(NAME, x, pm1((6, 4), torch.float32, device))
    assert_matches_torch(
        NAME, make((6, 4), torch.float32, device, requires_grad=True), pm1((6, 4), torch.float32, device).long()
    )


def test_empty_mean_is_nan():
    assert torch.isnan(FF.hinge_embedding_loss(torch.empty(0), torch.empty(0)))


ERROR_CASES = [
    ("bad reduction", (torch.randn(3), torch.ones(3)), {"reduction": "avg"}),
    ("not broadcastable", (torch.randn(3), torch.ones(4)), {}),
    ("integer input", (torch.ones(3, dtype=torch.long), torch.ones(3)), {}),
]


@pytest.mark.parametrize("case", ERROR_CASES, ids=lambda c: c[0])
def test_errors_match_torch(case):
    _, args, kwargs = case
    with pytest.raises(Exception) as native_err:
        F.hinge_embedding_loss(*args, **kwargs)
    with pytest.raises(type(native_err.value)) as fused_err:
        FF.hinge_embedding_loss(*args, **kwargs)
    assert str(fused_err.value) == str(native_err.value)


def test_target_gets_no_gradient_like_torch():
    x = torch.randn(3, 4, requires_grad=True)
    y = torch.ones(3, 4, requires_grad=True)
    with pytest.raises(RuntimeError, match="appears to not have been used in the graph"):
        torch.autograd.grad(FF.hinge_embedding_loss(x, y), y)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradcheck_and_gradgradcheck(reduction):
    x = make((4, 5), torch.float64, "cpu", -3, 3, requires_grad=True)
    with torch.no_grad():  # keep samples off the kink at x == margin
        x.copy_(torch.where((x - 1.0).abs() < 1e-2, x + 0.1, x))
    y = pm1((4, 5), torch.float64, "cpu", other=True)
    fn = lambda a: FF.hinge_embedding_loss(a, y, margin=1.0, reduction=reduction)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x,), check_forward_ad=True, check_batched_grad=True, check_undefined_grad=True)
    assert torch.autograd.gradgradcheck(fn, (x,), gen_non_contig_grad_outputs=True)


def test_deterministic_across_threads():
    x = make((700, 999), torch.float32, "cpu")
    y = pm1((700, 999), torch.float32, "cpu")
    n = torch.get_num_threads()
    try:
        outs = []
        for k in (1, 2, n):
            torch.set_num_threads(k)
            outs.append(FF.hinge_embedding_loss(x, y, reduction="sum"))
    finally:
        torch.set_num_threads(n)
    assert all(torch.equal(o, outs[0]) for o in outs)
