"""sigmoid_focal_loss: parity with torchvision's own function (values, input
and soft-target gradients, dtypes, shapes, alpha incl. -1, gamma incl. 0,
reductions, special values), its errors, autograd, the module."""

import pytest
import torch
import torch.nn.functional as F

import fusedloss
import fusedloss.functional as FF
from conftest import DEVICES, FLOAT_DTYPES, REDUCTIONS, make
from fusedloss import _composite
from fusedloss.testing import assert_matches_torch

tv_ops = pytest.importorskip("torchvision.ops")

NAME = "sigmoid_focal_loss"
SHAPES = [(), (0,), (13,), (6, 7), (2, 3, 5, 5), (3, 2100)]


def torchvision_focal(inputs, targets, alpha=0.25, gamma=2, reduction="none"):
    return tv_ops.sigmoid_focal_loss(inputs, targets, alpha=alpha, gamma=gamma, reduction=reduction)


def torchvision_in_float64(inputs, targets, **kwargs):
    """torchvision's loss on the float64 copy of the inputs, rounded once to
    their dtype: where torchvision rounds 1 - p_t to 0 in fp32 (|x| > ~17), its
    float64 run is still exact."""
    return torchvision_focal(inputs.double(), targets.double(), **kwargs).to(inputs.dtype)


def check(*args, **kwargs):
    return assert_matches_torch(NAME, *args, native=torchvision_focal, **kwargs)


def hard(shape, dtype, device):
    return torch.randint(0, 2, shape).to(device=device, dtype=dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_parity_soft_targets(device, dtype, shape, reduction):
    x = make(shape, dtype, device, -6, 6, requires_grad=True)
    y = make(shape, dtype, device, 0, 1, requires_grad=True)
    check(x, y, reduction=reduction)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("alpha", [0.25, 0.0, 1.0, 0.8, -1])
@pytest.mark.parametrize("gamma", [2, 0, 1, 0.5, 3.5])
def test_alpha_and_gamma(device, dtype, alpha, gamma):
    x = make((16, 37), dtype, device, -8, 8, requires_grad=True)
    for y in (make((16, 37), dtype, device, 0, 1, requires_grad=True), hard((16, 37), dtype, device)):
        for reduction in REDUCTIONS:
            check(x, y, alpha=alpha, gamma=gamma, reduction=reduction)


@pytest.mark.parametrize("device", DEVICES)
def test_dense_detection_layout(device):
    # RetinaNet's (N, A*K, H, W) class logits with mostly-negative one-hot targets.
    x = make((2, 80, 12, 12), torch.float32, device, -8, 4, requires_grad=True)
    y = (torch.rand(2, 80, 12, 12) < 0.01).to(device=device, dtype=torch.float32)
    for reduction in REDUCTIONS:
        check(x, y, reduction=reduction)
    check(x.detach().bfloat16().requires_grad_(), y.bfloat16(), reduction="sum")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gamma_zero_without_alpha_is_bce(device, reduction):
    x = make((9, 11), torch.float32, device, -5, 5, requires_grad=True)
    y = make((9, 11), torch.float32, device, 0, 1, requires_grad=True)
    assert_matches_torch(
        NAME,
        x,
        y,
        alpha=-1,
        gamma=0,
        reduction=reduction,
        native=lambda a, b, alpha, gamma, reduction: F.binary_cross_entropy_with_logits(a, b, reduction=reduction),
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["transposed", "offset", "strided"])
def test_non_contiguous_inputs(device, layout):
    x = make((33, 17), torch.float32, device, -5, 5, layout=layout, requires_grad=True)
    y = make((33, 17), torch.float32, device, 0, 1, layout=layout, requires_grad=True)
    check(x, y, reduction="none")
    out = FF.sigmoid_focal_loss(x, y, reduction="sum")
    ref = FF.sigmoid_focal_loss(x.detach().contiguous(), y.detach().contiguous(), reduction="sum")
    assert torch.equal(out.detach(), ref)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_special_values_match_torchvision(device, dtype):
    inf, nan = float("inf"), float("nan")
    xs = [-inf, -1e4, -120.0, -20.0, -1.0, 0.0, 1.0, 20.0, 120.0, 1e4, inf, nan]
    ys = [0.0, 0.5, 1.0]
    x = torch.tensor([v for v in xs for _ in ys], dtype=dtype, device=device, requires_grad=True)
    y = torch.tensor([t for _ in xs for t in ys], dtype=dtype, device=device)
    # NaN/inf positions exactly torchvision's (NaN at x = -inf, at x = +inf with
    # y = 1, at NaN; +inf at x = +inf with y < 1), finite values as close.
    check(x, y, reduction="none")
    # gamma < 1: torchvision's gradient is NaN at x = +-20 in fp32, where its
    # 1 - p_t rounds to 0 and pow's gradient there is infinite; the exact
    # gradient is finite (~1e-14), as fusedloss's and torchvision's in float64.
    assert (
        torch.isnan(torch.autograd.grad(torchvision_focal(x, y, gamma=0.5).sum(), x)[0]).sum()
        > torch.isnan(torch.autograd.grad(FF.sigmoid_focal_loss(x, y, gamma=0.5).sum(), x)[0]).sum()
    )
    assert_matches_torch(NAME, x, y, gamma=0.5, alpha=-1, reduction="none", native=torchvision_in_float64)


@pytest.mark.parametrize("device", DEVICES)
def test_exact_where_torchvision_rounds_to_zero(device):
    # x = 20 with y = 1: sigmoid rounds to 1 in fp32, so torchvision's 1 - p_t
    # is 0; the exact loss is ~1e-27, which fusedloss returns (in float64
    # torchvision agrees).
    x = torch.tensor([20.0, -20.0], device=device)
    y = torch.tensor([1.0, 0.0], device=device)
    fused = FF.sigmoid_focal_loss(x, y)
    exact = torchvision_focal(x.double(), y.double())
    assert torch.equal(torchvision_focal(x, y), torch.zeros(2, device=device))
    torch.testing.assert_close(fused.double(), exact, rtol=1e-5, atol=0)
    assert (fused > 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_out_dtype_and_autocast(device):
    x = make((8, 9), torch.bfloat16, device, requires_grad=True)
    y = make((8, 9), torch.bfloat16, device, 0, 1)
    exact = torchvision_focal(x.detach().double(), y.double(), reduction="sum")
    out = FF.sigmoid_focal_loss(x, y, reduction="sum", out_dtype=torch.float32)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), exact, rtol=1e-6, atol=1e-6)
    # torchvision's BCE is on autocast's fp32 list: an fp32 loss, bf16 gradients.
    # (torchvision's sigmoid and p_t stay in bf16 there, fusedloss's in fp32.)
    with torch.autocast(device, torch.bfloat16):
        ours = FF.sigmoid_focal_loss(x, y, reduction="mean")
        theirs = torchvision_focal(x, y, reduction="mean")
    assert ours.dtype == theirs.dtype == torch.float32
    exact = torchvision_focal(x.detach().double(), y.double(), reduction="mean")
    torch.testing.assert_close(ours.double(), exact, rtol=1e-6, atol=1e-7)
    assert (ours.double() - exact).abs() <= (theirs.double() - exact).abs()
    (g,) = torch.autograd.grad(ours, x)
    assert g.dtype == torch.bfloat16


def test_mixed_dtypes_promote_like_torchvision():
    x = make((5, 6), torch.bfloat16, "cpu", requires_grad=True)
    y = make((5, 6), torch.float32, "cpu", 0, 1, requires_grad=True)
    assert FF.sigmoid_focal_loss(x, y).dtype == torchvision_focal(x, y).dtype == torch.float32
    check(x, y, reduction="sum")
    y64 = y.detach().double()
    assert FF.sigmoid_focal_loss(x.float(), y64).dtype == torchvision_focal(x.float(), y64).dtype == torch.float64


def _error_cases():
    x, y = torch.randn(4, 5), torch.rand(4, 5)
    return {
        "alpha > 1": ((x, y), {"alpha": 2}),
        "negative alpha other than -1": ((x, y), {"alpha": -0.5}),
        "nan alpha": ((x, y), {"alpha": float("nan")}),
        "bad reduction": ((x, y), {"reduction": "avg"}),
        "target shape": ((x, y[:, :3]), {}),
        "target batch": ((x, y[:1]), {}),
        "integer target": ((x, (y > 0.5).long()), {}),
        "integer input": ((x.long(), y), {}),
        "bool target": ((x, y > 0.5), {}),
        "integer target and bad reduction": ((x, y.long()), {"reduction": "avg"}),
    }


@pytest.mark.parametrize("case", list(_error_cases()))
def test_errors_match_torchvision(case):
    args, kwargs = _error_cases()[case]
    with pytest.raises(Exception) as native_err:
        torchvision_focal(*args, **kwargs)
    with pytest.raises(type(native_err.value)) as fused_err:
        FF.sigmoid_focal_loss(*args, **kwargs)
    assert str(fused_err.value) == str(native_err.value)


def test_defaults_are_torchvisions():
    import inspect

    ours = inspect.signature(FF.sigmoid_focal_loss).parameters
    theirs = inspect.signature(tv_ops.sigmoid_focal_loss).parameters
    assert list(ours)[: len(theirs)] == list(theirs)
    assert all(ours[n].default == p.default for n, p in theirs.items())
    assert ours["out_dtype"].kind is inspect.Parameter.KEYWORD_ONLY


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("alpha,gamma", [(0.25, 2.0), (-1, 1.5), (0.7, 0.0), (0.4, 3.0)])
def test_gradcheck_and_gradgradcheck(reduction, alpha, gamma):
    x = make((3, 5), torch.float64, "cpu", -3, 3, requires_grad=True)
    y = make((3, 5), torch.float64, "cpu", 0.05, 0.95, requires_grad=True)
    fn = lambda a, b: FF.sigmoid_focal_loss(a, b, alpha=alpha, gamma=gamma, reduction=reduction)  # noqa: E731
    assert torch.autograd.gradcheck(
        fn, (x, y), check_forward_ad=True, check_batched_grad=True, check_undefined_grad=True
    )
    assert torch.autograd.gradgradcheck(fn, (x, y), gen_non_contig_grad_outputs=True)


def test_composite_is_torchvision_in_float64():
    x = make((7, 9), torch.float64, "cpu", -6, 6)
    y = make((7, 9), torch.float64, "cpu", 0, 1)
    for alpha, gamma in ((0.25, 2), (-1, 0.5)):
        torch.testing.assert_close(
            _composite.sigmoid_focal_loss(x, y, alpha, gamma), torchvision_focal(x, y, alpha, gamma)
        )


class _ScaleGradient(torch.autograd.Function):
    """The identity, whose backward multiplies the gradient by `factor`."""

    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * ctx.factor, None


@pytest.mark.parametrize("which", ["input", "target"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_comparison_catches_a_wrong_gradient(which, dtype):
    # A gradient 3% off must fail the rule (bf16 ulp is 0.4-0.8%), so a missing
    # or scaled term in a gradient cannot pass these tests.
    def wrong(a, b, **kw):
        if which == "input":
            a = _ScaleGradient.apply(a, 1.03)
        else:
            b = _ScaleGradient.apply(b, 1.03)
        return FF.sigmoid_focal_loss(a, b, **kw)

    x = make((16, 37), dtype, "cpu", -6, 6, requires_grad=True)
    y = make((16, 37), dtype, "cpu", 0, 1, requires_grad=True)
    check(x, y, reduction="none")
    with pytest.raises(AssertionError, match="grad arg1" if which == "target" else "grad arg0"):
        assert_matches_torch(NAME, x, y, reduction="none", fused=wrong, native=torchvision_focal)


@pytest.mark.parametrize("device", DEVICES)
def test_module(device):
    m = fusedloss.nn.SigmoidFocalLoss(alpha=0.5, gamma=1.5, reduction="mean")
    assert repr(m) == "SigmoidFocalLoss(alpha=0.5, gamma=1.5, reduction='mean')"
    assert m.__constants__ == ["alpha", "gamma", "reduction"]
    assert dict(m.state_dict()) == {}
    d = fusedloss.nn.SigmoidFocalLoss()
    assert (d.alpha, d.gamma, d.reduction) == (0.25, 2, "none")
    x = make((6, 5), torch.float32, device, requires_grad=True)
    y = make((6, 5), torch.float32, device, 0, 1)
    assert_matches_torch(
        "module", x, y, fused=m, native=lambda a, b: torchvision_focal(a, b, alpha=0.5, gamma=1.5, reduction="mean")
    )


def test_thread_count_invariance_and_repeatability():
    x = make((257, 1031), torch.float32, "cpu", -6, 6, requires_grad=True)
    y = make((257, 1031), torch.float32, "cpu", 0, 1)
    n = torch.get_num_threads()

    def run():
        out = FF.sigmoid_focal_loss(x, y, reduction="mean")
        return out.detach(), torch.autograd.grad(out, x)[0]

    try:
        torch.set_num_threads(1)
        one = run()
        torch.set_num_threads(max(n, 2))
        many = [run() for _ in range(3)]
    finally:
        torch.set_num_threads(n)
    for out, g in many:
        assert torch.equal(out, one[0]) and torch.equal(g, one[1])


def test_torch_func_transforms():
    x, y = make((4, 6, 7), torch.float64, "cpu"), make((4, 6, 7), torch.float64, "cpu", 0, 1)
    batched = torch.func.vmap(lambda u, v: FF.sigmoid_focal_loss(u, v, reduction="sum"))(x, y)
    torch.testing.assert_close(batched, torch.stack([torchvision_focal(x[i], y[i], reduction="sum") for i in range(4)]))
