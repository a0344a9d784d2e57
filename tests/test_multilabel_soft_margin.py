"""multilabel_soft_margin_loss: parity with torch (values, input and target
gradients, class weight, shapes, dtypes, integer and broadcast targets, special
values), torch's errors, autograd incl. the weight's gradient, the module."""

import pytest
import torch
import torch.nn.functional as F

import fusedloss
import fusedloss.functional as FF
from conftest import DEVICES, FLOAT_DTYPES, REDUCTIONS, make
from fusedloss.testing import assert_matches_torch

NAME = "multilabel_soft_margin_loss"
SHAPES = [(7,), (5, 5), (0, 5), (3, 0), (2, 3, 9), (64, 80), (4, 3000)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_parity(device, dtype, shape, reduction):
    x = make(shape, dtype, device, -8, 8, requires_grad=True)
    y = make(shape, dtype, device, 0, 1, requires_grad=True)
    C = shape[-1]
    assert_matches_torch(NAME, x, y, reduction=reduction)
    assert_matches_torch(NAME, x, y, weight=make((C,), dtype, device, 0, 2), reduction=reduction)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_weights_targets_and_broadcasts(device, reduction):
    x = make((6, 11), torch.float32, device, -5, 5, requires_grad=True)
    y01 = torch.randint(0, 2, (6, 11), device=device)
    cases = [
        (y01, {}),  # integer multi-hot targets
        (y01.to(torch.uint8), {}),
        (y01.float(), {"weight": make((6, 11), torch.float32, device, 0, 2)}),  # per-element weight
        (y01.float(), {"weight": make((1, 11), torch.float32, device, 0, 2)}),
        (y01.float(), {"weight": make((6, 1), torch.float32, device, 0, 2)}),
        (y01.float(), {"weight": torch.tensor(1.5, device=device)}),
        (y01.float(), {"weight": make((11,), torch.float64, device, 0, 2)}),  # promotes to fp64
        (make((11,), torch.float32, device, 0, 1, requires_grad=True), {}),  # broadcast target, its grad summed
        (make((1, 11), torch.float32, device, 0, 1, requires_grad=True), {}),
        (make((6, 11), torch.float64, device, 0, 1, requires_grad=True), {}),
        (make((6, 11), torch.float32, device, -1, 2, requires_grad=True), {}),  # targets outside [0, 1]
    ]
    for y, kw in cases:
        assert_matches_torch(NAME, x, y, reduction=reduction, **kw)
    # a weight that requires grad: differentiated as torch does (through the composite)
    w = make((11,), torch.float32, device, 0, 2, requires_grad=True)
    assert_matches_torch(NAME, x, y01.float(), weight=w, reduction=reduction)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["transposed", "offset", "strided"])
def test_non_contiguous(device, layout):
    x = make((37, 21), torch.float32, device, -5, 5, layout=layout, requires_grad=True)
    y = make((37, 21), torch.float32, device, 0, 1, layout=layout, requires_grad=True)
    w = make((21,), torch.float32, device, 0, 2, layout=layout)
    assert_matches_torch(NAME, x, y, weight=w, reduction="none")
    out = FF.multilabel_soft_margin_loss(x, y, weight=w, reduction="none")
    ref = FF.multilabel_soft_margin_loss(
        x.detach().contiguous(), y.detach().contiguous(), w.contiguous(), reduction="none"
    )
    assert torch.equal(out.detach(), ref)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_special_values_match_torch(device, dtype):
    # torch's form -(y log_sigmoid(x) + (1 - y) log_sigmoid(-x)): +inf at x = -inf
    # with y > 0 (where the BCE form (1 - y) x - log_sigmoid(x) gives NaN).
    inf, nan = float("inf"), float("nan")
    xs = [-inf, -1e4, -120.0, -20.0, -1.0, 0.0, 1.0, 20.0, 120.0, 1e4, inf, nan]
    ys = [0.0, 0.5, 1.0]
    x = torch.tensor([[v for _ in ys] for v in xs], dtype=dtype, device=device, requires_grad=True)
    y = torch.tensor([ys for _ in xs], dtype=dtype, device=device, requires_grad=True)
    assert_matches_torch(NAME, x, y, reduction="none")
    assert_matches_torch(NAME, x.reshape(1, -1), y.reshape(1, -1), reduction="none")


def test_autocast_keeps_the_dtype_on_cpu():
    # None of its ops is on the CPU autocast lists: torch's loss stays bf16.
    x = make((8, 9), torch.bfloat16, "cpu", requires_grad=True)
    y = make((8, 9), torch.bfloat16, "cpu", 0, 1)
    with torch.autocast("cpu", torch.bfloat16):
        ours = FF.multilabel_soft_margin_loss(x, y)
        theirs = F.multilabel_soft_margin_loss(x, y)
    assert ours.dtype == theirs.dtype == torch.bfloat16
    assert FF.multilabel_soft_margin_loss(x, y, out_dtype=torch.float32).dtype == torch.float32


def _error_cases():
    x, y = torch.randn(4, 5), torch.rand(4, 5)
    return {
        "bad reduction": ((x, y), {"reduction": "avg"}),
        "target not broadcastable": ((x, y[:, :3]), {}),
        "weight not broadcastable": ((x, y), {"weight": torch.rand(3)}),
        "0-d input": ((torch.randn(()), torch.rand(())), {}),
        "bool target": ((x, y > 0.5), {}),
        "integer input": ((x.long(), y), {}),
        "integer input and bad reduction": ((x.long(), y), {"reduction": "avg"}),
    }


@pytest.mark.parametrize("case", list(_error_cases()))
def test_errors_match_torch(case):
    args, kwargs = _error_cases()[case]
    with pytest.raises(Exception) as native_err:
        F.multilabel_soft_margin_loss(*args, **kwargs)
    with pytest.raises(type(native_err.value)) as fused_err:
        FF.multilabel_soft_margin_loss(*args, **kwargs)
    assert str(fused_err.value) == str(native_err.value)


def test_legacy_reduction_arguments():
    x, y = torch.randn(4, 5), torch.rand(4, 5)
    for kw in ({"size_average": False}, {"reduce": False}, {"size_average": True, "reduce": True}):
        with pytest.warns(UserWarning):
            ours = FF.multilabel_soft_margin_loss(x, y, **kw)
        with pytest.warns(UserWarning):
            theirs = F.multilabel_soft_margin_loss(x, y, **kw)
        torch.testing.assert_close(ours, theirs)


def test_empty_rows_and_classes():
    # no rows: mean NaN, sum 0; no classes: each row is 0 / 0 = NaN, as torch
    for shape in ((0, 5), (3, 0)):
        for reduction in REDUCTIONS:
            ours = FF.multilabel_soft_margin_loss(torch.empty(shape), torch.empty(shape), reduction=reduction)
            theirs = F.multilabel_soft_margin_loss(torch.empty(shape), torch.empty(shape), reduction=reduction)
            torch.testing.assert_close(ours, theirs, equal_nan=True)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradcheck_and_gradgradcheck(reduction):
    x = make((4, 6), torch.float64, "cpu", -4, 4, requires_grad=True)
    y = make((4, 6), torch.float64, "cpu", 0, 1, requires_grad=True)
    w = make((6,), torch.float64, "cpu", 0.5, 2)
    fn = lambda a, b: FF.multilabel_soft_margin_loss(a, b, weight=w, reduction=reduction)  # noqa: E731
    assert torch.autograd.gradcheck(
        fn, (x, y), check_forward_ad=True, check_batched_grad=True, check_undefined_grad=True
    )
    assert torch.autograd.gradgradcheck(fn, (x, y), gen_non_contig_grad_outputs=True)
    wg = w.clone().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda a, v: FF.multilabel_soft_margin_loss(a, y.detach(), weight=v, reduction=reduction), (x, wg)
    )


class _ScaleGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * ctx.factor, None


@pytest.mark.parametrize("which", [0, 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_comparison_catches_a_wrong_gradient(which, dtype):
    def wrong(a, b, **kw):
        args = [a, b]
        args[which] = _ScaleGradient.apply(args[which], 1.03)
        return FF.multilabel_soft_margin_loss(*args, **kw)

    x = make((16, 37), dtype, "cpu", -5, 5, requires_grad=True)
    y = make((16, 37), dtype, "cpu", 0, 1, requires_grad=True)
    assert_matches_torch(NAME, x, y, reduction="mean")
    with pytest.raises(AssertionError, match=f"grad arg{which}"):
        assert_matches_torch(NAME, x, y, reduction="mean", fused=wrong)


@pytest.mark.parametrize("device", DEVICES)
def test_module(device):
    ours, theirs = fusedloss.nn.MultiLabelSoftMarginLoss, torch.nn.MultiLabelSoftMarginLoss
    assert issubclass(ours, theirs) and ours.__name__ == theirs.__name__
    w = make((5,), torch.float32, device, 0.5, 2)
    m, t = ours(weight=w, reduction="sum"), theirs(weight=w, reduction="sum")
    assert repr(m) == repr(t)
    assert dict(m.named_buffers()).keys() == {"weight"}
    m.load_state_dict(t.state_dict())
    x = make((6, 5), torch.float32, device, requires_grad=True)
    y = torch.randint(0, 2, (6, 5), device=device).float()
    assert_matches_torch("module", x, y, fused=m, native=t)


def test_thread_count_invariance_and_repeatability():
    x = make((257, 1031), torch.float32, "cpu", -6, 6, requires_grad=True)
    y = make((257, 1031), torch.float32, "cpu", 0, 1)
    w = make((1031,), torch.float32, "cpu", 0.5, 2)
    n = torch.get_num_threads()

    def run(reduction):
        out = FF.multilabel_soft_margin_loss(x, y, weight=w, reduction=reduction)
        return out.detach(), torch.autograd.grad(out.sum(), x)[0]

    try:
        for reduction in ("none", "mean"):
            torch.set_num_threads(1)
            one = run(reduction)
            torch.set_num_threads(max(n, 2))
            for out, g in [run(reduction) for _ in range(3)]:
                assert torch.equal(out, one[0]) and torch.equal(g, one[1])
    finally:
        torch.set_num_threads(n)


def test_torch_func_transforms():
    x, y = make((4, 6, 7), torch.float64, "cpu"), make((4, 6, 7), torch.float64, "cpu", 0, 1)
    batched = torch.func.vmap(lambda u, v: FF.multilabel_soft_margin_loss(u, v))(x, y)
    torch.testing.assert_close(batched, torch.stack([F.multilabel_soft_margin_loss(x[i], y[i]) for i in range(4)]))
