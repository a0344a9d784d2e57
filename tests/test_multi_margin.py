"""multi_margin_loss: parity with torch (fp32/fp64 natively; fp16/bf16
element-wise against torch in float64), p, margin, weight, shapes, errors,
autograd incl. the second derivatives torch lacks."""

import pytest
import torch
import torch.nn.functional as F

import fusedloss
import fusedloss.functional as FF
from conftest import DEVICES, REDUCTIONS, make
from fusedloss.testing import assert_matches_torch

NAME = "multi_margin_loss"
SHAPES = [
    ((), ()),
    ((7,), ()),
    ((7,), (1,)),
    ((5, 10), (5,)),
    ((10, 5), (10,)),
    ((6, 1), (6,)),
    ((3, 5000), (3,)),
    ((300, 33), (300,)),
]


def classes(tshape, C, device):
    return torch.randint(0, C, tshape, device=device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape,tshape", SHAPES)
@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("margin", [0.0, 0.5, 1.0, 7.0, -3.14])
def test_parity(device, dtype, shape, tshape, p, margin):
    C = shape[-1] if shape else 1
    x = make(shape, dtype, device, -3, 3, requires_grad=True)
    t = classes(tshape, C, device)
    w = make((C,), dtype, device, -10, 10)
    for red in REDUCTIONS:
        assert_matches_torch(NAME, x, t, p=p, margin=margin, reduction=red)
        assert_matches_torch(NAME, x, t, p=p, margin=margin, weight=w, reduction=red)


def _torch_in_float64(x, t, weight=None, **kw):
    """torch's multi_margin_loss on the float64 copy of the inputs, rounded once
    to the input's dtype: the best a float16/bfloat16 kernel can return (torch's
    CPU has none), standing in for torch's result in the element-wise rule."""
    out = F.multi_margin_loss(x.double(), t, weight=None if weight is None else weight.double(), **kw)
    return out.to(x.dtype)


def _check_low_precision(device, dtype, p, fused=None):
    x = make((64, 100), dtype, device, -3, 3, requires_grad=True)
    t = classes((64,), 100, device)
    w = make((100,), dtype, device, 0, 2)
    for red in REDUCTIONS:
        for kw in ({}, {"weight": w}):
            # A random grad_output and the element-wise rule: every entry of
            # the gradient, the target's and the others', against float64.
            assert_matches_torch(NAME, x, t, p=p, reduction=red, fused=fused, native=_torch_in_float64, **kw)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("p", [1, 2])
def test_low_precision_against_float64(device, dtype, p):
    _check_low_precision(device, dtype, p)


class _ScaleGradient(torch.autograd.Function):
    """The identity, whose backward multiplies the gradient by `factor`."""

    @staticmethod
    def forward(ctx, x, factor):
        ctx.save_for_backward(factor)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        (factor,) = ctx.saved_tensors
        return g * factor, None


def test_low_precision_check_sees_non_target_entries():
    # Non-target entries 10% too large: unweighted, each is grad_output / C
    # (0.01 for the old check's unit grad_output), and its atol of 2e-3 let
    # that through.
    def non_target_entries_off(x, t, **kw):
        factor = 1.1 - 0.1 * F.one_hot(t, x.shape[-1]).to(x.dtype)
        return FF.multi_margin_loss(_ScaleGradient.apply(x, factor), t, **kw)

    with pytest.raises(AssertionError, match="grad arg0"):
        _check_low_precision("cpu", torch.bfloat16, 1, fused=non_target_entries_off)


@pytest.mark.parametrize("device", DEVICES)
def test_nan_margins_count_nothing_like_torch(device):
    x = torch.tensor([[0.1, float("nan"), 0.3, float("inf")]], device=device, requires_grad=True)
    assert_matches_torch(NAME, x, torch.tensor([0], device=device), reduction="none")


@pytest.mark.parametrize("device", DEVICES)
def test_c_equals_one_and_empty_batch(device):
    x = make((4, 1), torch.float32, device, requires_grad=True)
    assert FF.multi_margin_loss(x, torch.zeros(4, dtype=torch.long, device=device)).item() == 0.0
    empty = FF.multi_margin_loss(torch.empty(0, 5, device=device), torch.empty(0, dtype=torch.long, device=device))
    assert torch.isnan(empty)  # defined as NaN (torch returns an unspecified value)
    assert (
        FF.multi_margin_loss(
            torch.empty(0, 5, device=device), torch.empty(0, dtype=torch.long, device=device), reduction="sum"
        ).item()
        == 0.0
    )


def _error_cases():
    x = torch.randn(3, 4)
    t = torch.tensor([0, 1, 2])
    return {
        "p=3": ((x, t), {"p": 3}),
        "2-d weight": ((x, t), {"weight": torch.rand(4, 1)}),
        "0-d weight": ((x, t), {"weight": torch.tensor(1.0)}),
        "weight size": ((x, t), {"weight": torch.rand(5)}),
        "weight dtype": ((x, t), {"weight": torch.rand(4, dtype=torch.float64)}),
        "weight requires grad": ((x, t), {"weight": torch.rand(4, requires_grad=True)}),
        "target out of range": ((x, torch.tensor([0, 1, 4])), {}),
        "negative target": ((x, torch.tensor([0, -1, 2])), {}),
        "no classes": ((torch.randn(5, 0), torch.zeros(5, dtype=torch.long)), {}),
        "3-d input": ((torch.randn(2, 3, 4), torch.zeros(2, dtype=torch.long)), {}),
        "2-d target": ((x, torch.zeros(3, 1, dtype=torch.long)), {}),
        "batch mismatch": ((x, torch.zeros(2, dtype=torch.long)), {}),
        "float target": ((x, torch.zeros(3)), {}),
        "int32 target": ((x, torch.zeros(3, dtype=torch.int)), {}),
        "bad reduction": ((x, t), {"reduction": "avg"}),
        "integer input": ((torch.ones(3, 4, dtype=torch.long), t), {}),
    }


@pytest.mark.parametrize("case", list(_error_cases()))
def test_errors_match_torch(case):
    args, kwargs = _error_cases()[case]
    with pytest.raises(Exception) as native_err:
        F.multi_margin_loss(*args, **kwargs)
    with pytest.raises(type(native_err.value)) as fused_err:
        FF.multi_margin_loss(*args, **kwargs)
    assert str(fused_err.value) == str(native_err.value)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("p", [1, 2])
def test_gradcheck_and_gradgradcheck(reduction, p):
    x = make((4, 6), torch.float64, "cpu", -2, 2, requires_grad=True)
    t = torch.tensor([0, 5, 2, 2])
    w = make((6,), torch.float64, "cpu", 0.5, 2)
    fn = lambda a: FF.multi_margin_loss(a, t, p=p, margin=0.7, weight=w, reduction=reduction)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x,), check_forward_ad=True, check_batched_grad=True, check_undefined_grad=True)
    # torch raises "derivative for aten::multi_margin_loss_backward is not implemented";
    # fusedloss supports second derivatives.
    assert torch.autograd.gradgradcheck(fn, (x,), gen_non_contig_grad_outputs=True)


def test_target_mutated_between_forward_and_backward_is_caught():
    x = torch.randn(4, 6, requires_grad=True)
    t = torch.tensor([0, 5, 2, 2])
    loss = FF.multi_margin_loss(x, t)
    t[0] = 3
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_deterministic_across_threads():
    x = make((3000, 333), torch.float32, "cpu")
    t = classes((3000,), 333, "cpu")
    n = torch.get_num_threads()
    try:
        outs = []
        for k in (1, 2, n):
            torch.set_num_threads(k)
            outs.append(FF.multi_margin_loss(x, t, reduction="sum"))
    finally:
        torch.set_num_threads(n)
    assert all(torch.equal(o, outs[0]) for o in outs)


def test_cuda_strict_mode_message():
    from fusedloss import _validation

    assert not _validation.enabled()
    fusedloss.set_validation(True)
    try:
        # Strict mode only adds the host check on accelerators; the CPU always checks.
        with pytest.raises(RuntimeError, match="^target out of range$"):
            FF.multi_margin_loss(torch.randn(2, 3), torch.tensor([0, 3]))
    finally:
        fusedloss.set_validation(False)


@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("C", [1, 2, 3, 7, 10, 15])
def test_short_rows_sum_in_class_order(C, p):
    """Rows shorter than one vector take the CPU's scalar loop: each term and
    its sum in class order, from 0, exactly as written here in fp32 (the order
    the vector loop's single partial vector sums in)."""
    torch.manual_seed(C)
    x = make((64, C), torch.float32, "cpu", -2, 2, requires_grad=True)
    t = torch.randint(0, C, (64,))
    margin = 0.7
    loss = FF.multi_margin_loss(x, t, p=p, margin=margin, reduction="none")
    (grad,) = torch.autograd.grad(loss, x, torch.ones_like(loss))

    xd = x.detach()
    base = torch.tensor(margin, dtype=torch.float32) - xd.gather(1, t[:, None])[:, 0]
    inv_c = torch.tensor(1.0, dtype=torch.float32) / C
    total = torch.zeros(64)
    grad_sum = torch.zeros(64)
    want_grad = torch.zeros(64, C)
    for c in range(C):
        z = base + xd[:, c]
        keep = (z > 0) & (t != c)
        term = torch.where(keep, z if p == 1 else z * z, torch.zeros(()))
        d = torch.where(keep, torch.ones(()) if p == 1 else 2 * z, torch.zeros(())) * inv_c
        total = total + term
        grad_sum = grad_sum + d
        want_grad[:, c] = d
    want_grad[torch.arange(64), t] = -grad_sum
    assert torch.equal(loss, total * inv_c)
    assert torch.equal(grad, want_grad)
