"""binary_cross_entropy_with_logits: parity with torch (values and gradients for
input and target), options, layouts, special values, errors, autograd."""

import itertools

import pytest
import torch
import torch.nn.functional as F

import fusedloss
import fusedloss.functional as FF
from conftest import DEVICES, FLOAT_DTYPES, REDUCTIONS, make
from fusedloss.testing import assert_matches_torch, ulp

NAME = "binary_cross_entropy_with_logits"
# (4, 9000) spans several CPU chunks and CUDA blocks, with a ragged tail.
SHAPES = [(), (0,), (1,), (5,), (5, 5), (5, 5, 5), (2, 3, 4, 5), (4, 9000)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_parity(device, dtype, shape, reduction):
    x = make(shape, dtype, device, -8, 8, requires_grad=True)
    y = make(shape, dtype, device, 0, 1, requires_grad=True)  # soft labels: the target gets a gradient
    assert_matches_torch(NAME, x, y, reduction=reduction)


# (input shape, weight shape or None, pos_weight shape or None)
WEIGHTINGS = [
    ((4, 6), (6,), None),
    ((4, 6), (1,), None),
    ((4, 6), (), None),
    ((4, 6), (4, 1), None),
    ((4, 6), (4, 6), None),
    ((4, 6), (1, 6), None),
    ((4, 6), None, (6,)),
    ((4, 6), None, (1,)),
    ((4, 6), None, (4, 6)),
    ((4, 6), None, ()),
    ((4, 6), (6,), (6,)),
    ((2, 3, 4, 5), None, (3, 1, 1)),  # per-channel pos_weight of an (N, C, H, W) map
    ((2, 3, 4, 5), (3, 1, 1), (5,)),
    ((2, 3, 4, 5), (2, 1, 4, 1), (4, 1)),  # fits no (i / inner) % period layout: copied
    ((7, 3000), (3000,), (3000,)),
    ((3000, 7), (3000, 1), (7,)),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape,wshape,pwshape", WEIGHTINGS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_weight_and_pos_weight(device, dtype, shape, wshape, pwshape, reduction):
    x = make(shape, dtype, device, -6, 6, requires_grad=True)
    y = make(shape, dtype, device, 0, 1, requires_grad=True)
    kw = {}
    if wshape is not None:
        kw["weight"] = make(wshape, dtype, device, 0, 2)
    if pwshape is not None:
        kw["pos_weight"] = make(pwshape, dtype, device, 0, 4)
    assert_matches_torch(NAME, x, y, reduction=reduction, **kw)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["transposed", "offset", "strided"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_layouts(device, dtype, layout, reduction):
    shape = (37, 53)
    x = make(shape, dtype, device, -5, 5, requires_grad=True, layout=layout)
    y = make(shape, dtype, device, 0, 1, requires_grad=True, layout=layout)
    w = make((53,), dtype, device, 0, 2, layout="strided")
    pw = make((37, 1), dtype, device, 0, 3, layout="offset")
    assert_matches_torch(NAME, x, y, weight=w, pos_weight=pw, reduction=reduction)
    # The same values in contiguous memory give the same loss, to the last bit
    # on CPU (a different vector alignment may round differently on CUDA).
    out = FF.binary_cross_entropy_with_logits(x, y, w, pos_weight=pw, reduction=reduction)
    ref = FF.binary_cross_entropy_with_logits(
        x.contiguous(), y.contiguous(), w.contiguous(), pos_weight=pw.contiguous(), reduction=reduction
    )
    if device == "cpu":
        assert torch.equal(out, ref)
    else:
        torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("device", DEVICES)
def test_expanded_target(device):
    x = make((6, 40), torch.float32, device, requires_grad=True)
    y = make((6, 1), torch.float32, device, 0, 1).expand(6, 40).requires_grad_()
    assert_matches_torch(NAME, x, y, reduction="sum")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("pos_weight", [None, 3.0, 0.0])
def test_special_values(device, dtype, pos_weight):
    xs = [-float("inf"), -1e307, -120, -88, -20, -1, 0, 1, 20, 88, 1e307, float("inf"), float("nan")]
    ys = [0.0, 0.5, 1.0]
    grid = list(itertools.product(xs, ys))
    x = torch.tensor([a for a, _ in grid], dtype=dtype, device=device, requires_grad=True)
    y = torch.tensor([b for _, b in grid], dtype=dtype, device=device, requires_grad=True)
    kw = {} if pos_weight is None else {"pos_weight": torch.full_like(x, pos_weight).detach()}
    assert_matches_torch(NAME, x, y, reduction="none", **kw)


@pytest.mark.parametrize("device", DEVICES)
def test_fp16_overflow_points(device):
    x = torch.tensor([-100.0, 100.0, -60000.0, 60000.0], dtype=torch.float16, device=device, requires_grad=True)
    for target in (0.0, 1.0):
        y = torch.full_like(x, target).detach()
        assert_matches_torch(NAME, x, y, reduction="none")
        assert_matches_torch(NAME, x, y, reduction="sum")
    y0 = torch.zeros(1, dtype=torch.float16, device=device)
    out = FF.binary_cross_entropy_with_logits(torch.tensor([100.0], dtype=torch.float16, device=device), y0)
    assert out.item() == 100.0


@pytest.mark.parametrize("device", DEVICES)
def test_pos_weight_ones_equals_none_bitwise(device):
    x = make((64, 33), torch.float32, device, -10, 10, requires_grad=True)
    y = make((64, 33), torch.float32, device, 0, 1)
    a = FF.binary_cross_entropy_with_logits(x, y, reduction="none")
    b = FF.binary_cross_entropy_with_logits(x, y, reduction="none", pos_weight=torch.ones(33, device=device))
    assert torch.equal(a, b)
    (ga,) = torch.autograd.grad(a.sum(), x)
    (gb,) = torch.autograd.grad(b.sum(), x)
    assert torch.equal(ga, gb)


@pytest.mark.parametrize("device", DEVICES)
def test_grad_at_zero_with_unit_pos_weight(device):
    # torch's regression test for pos_weight gradients (MPS bug): d/dx at x=0, y=0 is 0.5.
    x = torch.zeros(1, device=device, requires_grad=True)
    y = torch.zeros(1, device=device)
    FF.binary_cross_entropy_with_logits(x, y, pos_weight=torch.ones(1, device=device)).backward()
    assert x.grad.item() == 0.5


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "xdt,ydt",
    [
        (torch.float32, torch.float64),
        (torch.float64, torch.float32),
        (torch.bfloat16, torch.float32),
        (torch.float32, torch.bfloat16),
    ],
)
def test_mixed_dtypes(device, xdt, ydt):
    # torch's result has the target's dtype.
    x = make((8, 5), xdt, device, requires_grad=True)
    y = make((8, 5), ydt, device, 0, 1, requires_grad=True)
    assert_matches_torch(NAME, x, y)
    w = make((5,), torch.float64, device, 0, 2)
    assert_matches_torch(NAME, x, y, weight=w, pos_weight=w.to(torch.int64))


@pytest.mark.parametrize("device", DEVICES)
def test_legacy_size_average_and_reduce(device):
    x = make((4, 3), torch.float32, device, requires_grad=True)
    y = make((4, 3), torch.float32, device, 0, 1)
    for size_average, reduce in itertools.product([None, True, False], repeat=2):
        with pytest.warns(UserWarning) if (size_average, reduce) != (None, None) else _nullcontext():
            assert_matches_torch(NAME, x, y, size_average=size_average, reduce=reduce)


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def _same_error(fused, native):
    with pytest.raises(Exception) as native_err:
        native()
    with pytest.raises(type(native_err.value)) as fused_err:
        fused()
    assert str(fused_err.value) == str(native_err.value)


def _error_cases(device):
    x = torch.randn(2, 3, device=device)
    y = torch.rand(2, 3, device=device)
    r = lambda *s, **k: torch.rand(*s, device=device, **k)  # noqa: E731
    return {
        "target shape": ((x, r(2, 1)), {}),
        "reduction": ((x, y), {"reduction": "avg"}),
        "weight broadcast": ((x, y), {"weight": r(4)}),
        "weight grows output": ((x, y), {"weight": r(4, 2, 3)}),
        "pos_weight broadcast": ((x, y), {"pos_weight": r(4)}),
        "pos_weight 2-d broadcast": ((x, y), {"pos_weight": r(5, 4)}),
        "pos_weight grows output": ((x, y), {"pos_weight": r(4, 2, 3)}),
        "pos_weight per channel of NCHW": (
            (torch.randn(2, 3, 4, 5, device=device), r(2, 3, 4, 5)),
            {"pos_weight": r(3)},
        ),
        "weight requires grad": ((x, y), {"weight": r(3, requires_grad=True)}),
        "pos_weight requires grad": ((x, y), {"pos_weight": r(3, requires_grad=True)}),
        "both require grad": ((x, y), {"weight": r(3, requires_grad=True), "pos_weight": r(3, requires_grad=True)}),
        "integer input": ((torch.ones(2, 3, dtype=torch.long, device=device), y), {}),
        "integer input and target": (
            (torch.ones(2, 3, dtype=torch.long, device=device), torch.ones(2, 3, dtype=torch.long, device=device)),
            {},
        ),
        "integer target": ((x, torch.ones(2, 3, dtype=torch.long, device=device)), {}),
        "bool target": ((x, torch.ones(2, 3, dtype=torch.bool, device=device)), {}),
        "target on meta": ((x, torch.rand(2, 3, device="meta")), {}),
    }


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(_error_cases("cpu")))
def test_errors_match_torch(device, case):
    args, kwargs = _error_cases(device)[case]
    _same_error(
        lambda: FF.binary_cross_entropy_with_logits(*args, **kwargs),
        lambda: F.binary_cross_entropy_with_logits(*args, **kwargs),
    )


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("weighted", [False, True])
def test_gradcheck_and_gradgradcheck(reduction, weighted):
    x = make((3, 4), torch.float64, "cpu", -3, 3, requires_grad=True)
    y = make((3, 4), torch.float64, "cpu", 0, 1, requires_grad=True)
    kw = (
        {"weight": make((4,), torch.float64, "cpu", 0.5, 2), "pos_weight": make((3, 1), torch.float64, "cpu", 0.5, 3)}
        if weighted
        else {}
    )
    fn = lambda a, b: FF.binary_cross_entropy_with_logits(a, b, reduction=reduction, **kw)  # noqa: E731
    assert torch.autograd.gradcheck(
        fn, (x, y), check_forward_ad=True, check_batched_grad=True, check_undefined_grad=True
    )
    assert torch.autograd.gradgradcheck(fn, (x, y), gen_non_contig_grad_outputs=False)
    assert torch.autograd.gradgradcheck(fn, (x, y), gen_non_contig_grad_outputs=True)


@pytest.mark.parametrize("device", DEVICES)
def test_double_backward_matches_torch(device):
    x = make((5, 7), torch.float64, device, requires_grad=True)
    y = make((5, 7), torch.float64, device, 0, 1, requires_grad=True)
    pw = make((7,), torch.float64, device, 0.5, 2)
    results = []
    for fn in (FF.binary_cross_entropy_with_logits, F.binary_cross_entropy_with_logits):
        loss = fn(x, y, pos_weight=pw)
        gx, gy = torch.autograd.grad(loss, (x, y), create_graph=True)
        results.append(torch.autograd.grad((gx.square().sum() + gy.sum()), (x, y)))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("device", DEVICES)
def test_saves_only_its_inputs(device):
    x = make((64, 100), torch.float32, device, requires_grad=True)
    y = make((64, 100), torch.float32, device, 0, 1)
    pw = make((100,), torch.float32, device, 0, 2)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        FF.binary_cross_entropy_with_logits(x, y, pos_weight=pw)
    inputs = {x.data_ptr(), y.data_ptr(), pw.data_ptr()}
    assert saved and all(t.data_ptr() in inputs for t in saved)


@pytest.mark.parametrize("device", DEVICES)
def test_does_not_modify_inputs(device):
    x = make((16, 33), torch.float32, device, requires_grad=True)
    y = make((16, 33), torch.float32, device, 0, 1, requires_grad=True)
    x0, y0 = x.detach().clone(), y.detach().clone()
    g = torch.randn(16, 33, device=device)
    g0 = g.clone()
    FF.binary_cross_entropy_with_logits(x, y, reduction="none").backward(g)
    assert torch.equal(x, x0) and torch.equal(y, y0) and torch.equal(g, g0)


def test_deterministic_across_runs_and_threads():
    x = make((300, 1001), torch.float32, "cpu", -5, 5)
    y = make((300, 1001), torch.float32, "cpu", 0, 1)
    pw = make((1001,), torch.float32, "cpu", 0, 2)
    threads = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2, threads, 1):
            torch.set_num_threads(n)
            outs.append(FF.binary_cross_entropy_with_logits(x, y, pos_weight=pw, reduction="sum"))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(o, outs[0]) for o in outs)


def test_unreduced_loss_and_grads_are_contiguous_and_correct_after_transpose():
    x = make((30, 20), torch.float32, "cpu", requires_grad=True, layout="transposed")
    y = make((30, 20), torch.float32, "cpu", 0, 1)
    out = FF.binary_cross_entropy_with_logits(x, y, reduction="none")
    assert out.is_contiguous()
    assert torch.equal(out, FF.binary_cross_entropy_with_logits(x.contiguous(), y, reduction="none"))


def test_empty_mean_is_nan_sum_is_zero():
    x = torch.empty(0, 3, requires_grad=True)
    y = torch.empty(0, 3)
    assert torch.isnan(FF.binary_cross_entropy_with_logits(x, y))
    s = FF.binary_cross_entropy_with_logits(x, y, reduction="sum")
    assert s.item() == 0.0
    s.backward()
    assert x.grad.shape == (0, 3)


def test_op_is_differentiable_in_cpp():
    """The loss op carries its own (C++) autograd: one op call, no Python node,
    and the old autograd.Function name still applies it."""
    x = torch.randn(4, 5, requires_grad=True)
    y = torch.rand(4, 5)
    legacy = fusedloss.autograd.BCEWithLogitsFunction.apply(x, y, None, None, 1)
    for out in (fusedloss.ops.bce_with_logits(x, y), legacy):
        torch.testing.assert_close(out, F.binary_cross_entropy_with_logits(x, y))
        assert not isinstance(out.grad_fn, torch.autograd.function.BackwardCFunction)
        assert type(out.grad_fn).__name__ == "CppFunction"
        (g,) = torch.autograd.grad(out, x)
        (e,) = torch.autograd.grad(F.binary_cross_entropy_with_logits(x, y), x)
        torch.testing.assert_close(g, e)


def test_cpu_exp_of_positive_arguments_within_2_5_ulp():
    """The CPU kernels' fp32 exp (vec_ops.h vec_exp) for positive arguments,
    through BCE's gradient: for x in [-88, -17] and target 0 it is
    sigmoid(x) = 1 / (1 + exp(-x)), where 1 + exp(-x) rounds to exp(-x)
    (at least 2**24), so it is exp(x) with exp's error plus two roundings.
    Within 2.5 ulp of float64's sigmoid (exp itself: 1.01 ulp at most over
    every float). x = -89 (exp(89) overflows to inf) gives exactly 0, NaN
    stays NaN. Negative arguments: test_cross_entropy.py."""
    x = torch.linspace(-88.0, -17.0, 65536, dtype=torch.float64).to(torch.float32)
    x = torch.cat([x, torch.tensor([-89.0, float("nan")])]).requires_grad_()
    FF.binary_cross_entropy_with_logits(x, torch.zeros_like(x), reduction="sum").backward()
    ref = torch.sigmoid(x[:-2].detach().double())
    err = ((x.grad[:-2].double() - ref).abs() / ulp(ref, torch.float32)).max().item()
    assert err <= 2.5, err
    assert x.grad[-2].item() == 0.0
    assert torch.isnan(x.grad[-1])
