"""create_graph=True for every loss and every input/target shape torch accepts:
the first derivative comes from the composite, which must produce exactly the
forward's output shape (a (C) multi_margin input with a (1) target used to fail
with a shape mismatch), and it must equal torch's; so must the second."""

import pytest
import torch
import torch.nn.functional as F

import fusedloss.functional as FF
from fusedloss.testing import reference


def _hinge_ref(input, target, reduction="mean"):
    return reference("hinge_loss")(input, target, squared=True, reduction=reduction)


def _sign(shape):
    return torch.randint(0, 2, shape, dtype=torch.float64) * 2 - 1


# (name, fused, torch reference, input shape, target maker, torch supports double backward)
CASES = (
    [
        ("bce", FF.binary_cross_entropy_with_logits, F.binary_cross_entropy_with_logits, s, torch.rand, True)
        for s in [(), (5,), (3, 4)]
    ]
    + [("mse", FF.mse_loss, F.mse_loss, s, torch.randn, True) for s in [(), (5,), (3, 4)]]
    + [("hinge_embedding", FF.hinge_embedding_loss, F.hinge_embedding_loss, s, _sign, True) for s in [(), (5,), (3, 4)]]
    + [("soft_margin", FF.soft_margin_loss, F.soft_margin_loss, s, _sign, True) for s in [(), (5,), (3, 4)]]
    + [
        (
            "hinge",
            lambda x, y, reduction: FF.hinge_loss(x, y, squared=True, reduction=reduction),
            _hinge_ref,
            s,
            _sign,
            True,
        )
        for s in [(), (5,), (3, 4)]
    ]
)

# (input shape, target shape) pairs torch's multi_margin_loss accepts.
MULTI_MARGIN_SHAPES = [((4, 6), (4,)), ((6,), ()), ((6,), (1,)), ((), ()), ((), (1,))]
# and cross_entropy's (class indices), whose backward torch also runs.
CROSS_ENTROPY_SHAPES = [((4, 6), (4,)), ((6,), ()), ((2, 6, 3), (2, 3)), ((0, 6), (0,))]


def _first_and_second(loss_fn, x, g):
    out = loss_fn(x)
    (g1,) = torch.autograd.grad(out, x, g, create_graph=True)
    if not g1.requires_grad:  # piecewise-linear losses: the second derivative is 0
        return out, g1, torch.zeros_like(x)
    (g2,) = torch.autograd.grad((g1 * g1).sum(), x, allow_unused=True)
    return out, g1, torch.zeros_like(x) if g2 is None else g2


def _check(fused, native, x, native_second=True):
    xf = x.clone().requires_grad_()
    xn = x.clone().requires_grad_()
    with torch.no_grad():
        g = torch.randn(native(xn).shape, dtype=x.dtype)
    out_f, g1_f, g2_f = _first_and_second(fused, xf, g)
    assert out_f.shape == native(xn).shape
    if native_second:
        out_n, g1_n, g2_n = _first_and_second(native, xn, g)
        torch.testing.assert_close(g2_f, g2_n)
    else:
        out_n = native(xn)
        (g1_n,) = torch.autograd.grad(out_n, xn, g)
    torch.testing.assert_close(g1_f, g1_n)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-{c[3]}" for c in CASES])
def test_elementwise_losses(case, reduction):
    _, fused, native, shape, make_target, _ = case
    x = torch.randn(shape, dtype=torch.float64)
    y = make_target(shape, dtype=torch.float64) if make_target in (torch.rand, torch.randn) else make_target(shape)
    _check(lambda a: fused(a, y, reduction=reduction), lambda a: native(a, y, reduction=reduction), x)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("shapes", MULTI_MARGIN_SHAPES, ids=str)
@pytest.mark.parametrize("p", [1, 2])
def test_multi_margin(shapes, reduction, p):
    xshape, tshape = shapes
    c = xshape[-1] if xshape else 1
    x = torch.randn(xshape, dtype=torch.float64)
    t = torch.randint(0, c, tshape)
    # torch has no second derivative for multi_margin_loss (fusedloss does):
    # its first derivative under create_graph=True is the comparison.
    _check(
        lambda a: FF.multi_margin_loss(a, t, p=p, reduction=reduction),
        lambda a: F.multi_margin_loss(a, t, p=p, reduction=reduction),
        x,
        native_second=False,
    )


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("shapes", CROSS_ENTROPY_SHAPES, ids=str)
def test_cross_entropy(shapes, reduction):
    xshape, tshape = shapes
    x = torch.randn(xshape, dtype=torch.float64)
    t = torch.randint(0, 6, tshape)
    for kw in ({}, {"label_smoothing": 0.1, "weight": torch.rand(6, dtype=torch.float64)}):
        _check(
            lambda a, kw=kw: FF.cross_entropy(a, t, reduction=reduction, **kw),
            lambda a, kw=kw: F.cross_entropy(a, t, reduction=reduction, **kw),
            x,
        )
    p = torch.rand(xshape, dtype=torch.float64)
    _check(
        lambda a: FF.cross_entropy(a, p, reduction=reduction), lambda a: F.cross_entropy(a, p, reduction=reduction), x
    )
