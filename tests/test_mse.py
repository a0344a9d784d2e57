"""mse_loss: parity with torch (values; gradients for input, target and weight),
broadcasting, the weight= argument, special values, errors, autograd."""

import inspect
import itertools
import warnings

import pytest
import torch
import torch.nn.functional as F

import fusedloss.functional as FF
from conftest import DEVICES, FLOAT_DTYPES, REDUCTIONS, make
from fusedloss.testing import assert_matches_torch

NAME = "mse_loss"
SHAPES = [(), (0,), (5,), (5, 5), (5, 5, 5), (2, 3, 4, 5), (4, 9000)]
TORCH_HAS_WEIGHT = "weight" in inspect.signature(F.mse_loss).parameters
needs_weight = pytest.mark.skipif(not TORCH_HAS_WEIGHT, reason="this torch's mse_loss has no weight=")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_parity(device, dtype, shape, reduction):
    x = make(shape, dtype, device, requires_grad=True)
    y = make(shape, dtype, device, requires_grad=True)
    assert_matches_torch(NAME, x, y, reduction=reduction)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["transposed", "offset", "strided"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_layouts(device, dtype, layout, reduction):
    x = make((33, 65), dtype, device, requires_grad=True, layout=layout)
    y = make((33, 65), dtype, device, requires_grad=True, layout=layout)
    assert_matches_torch(NAME, x, y, reduction=reduction)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "xshape,yshape", [((4, 3), (4, 1)), ((4, 1), (4, 3)), ((), (1,)), ((5, 1, 3), (1, 4, 1)), ((3,), (2, 3))]
)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_broadcasting_warns_and_matches(device, xshape, yshape, reduction):
    x = make(xshape, torch.float32, device, requires_grad=True)
    y = make(yshape, torch.float32, device, requires_grad=True)
    with pytest.warns(UserWarning, match="Using a target size") as record:
        assert_matches_torch(NAME, x, y, reduction=reduction)
    fused_msgs = {str(w.message) for w in record}
    assert len(fused_msgs) == 1  # both implementations warned with the same text


def test_warning_points_at_the_caller():
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        FF.mse_loss(torch.zeros(4, 3), torch.zeros(4, 1))
    assert w[0].filename == __file__


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@needs_weight
def test_weight(device, dtype, reduction):
    x = make((6, 40), dtype, device, requires_grad=True)
    y = make((6, 40), dtype, device, requires_grad=True)
    w = make((6, 40), dtype, device, 0, 2, requires_grad=True)
    assert_matches_torch(NAME, x, y, reduction=reduction, weight=w)


@pytest.mark.parametrize("device", DEVICES)
@needs_weight
def test_weight_with_broadcast_target_and_other_dtype(device):
    x = make((5, 1), torch.float32, device, requires_grad=True)
    y = make((5, 7), torch.float32, device, requires_grad=True)
    w = make((5, 1), torch.float64, device, 0, 2, requires_grad=True)
    with pytest.warns(UserWarning):
        assert_matches_torch(NAME, x, y, weight=w)
    with pytest.warns(UserWarning):
        assert_matches_torch(NAME, x, y, weight=w.detach(), reduction="none")


@pytest.mark.parametrize("device", DEVICES)
@needs_weight
def test_weight_empty_mean_is_nan(device):
    x = torch.empty(0, device=device)
    out = FF.mse_loss(x, x, weight=torch.empty(0, device=device))
    assert torch.isnan(out)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "xdt,ydt",
    [
        (torch.float32, torch.float64),
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.bfloat16),
        (torch.int64, torch.float32),
        (torch.float32, torch.int64),
    ],
)
def test_mixed_dtypes_promote(device, xdt, ydt):
    x = make((8, 5), torch.float64, device).to(xdt)
    y = make((8, 5), torch.float64, device).to(ydt)
    if x.is_floating_point():
        x.requires_grad_()
    if y.is_floating_point():
        y.requires_grad_()
    # torch promotes to a common dtype; the reference promotes explicitly
    # (torch 2.11's CUDA mse backward fails on mixed dtypes by itself).
    dtype = torch.promote_types(xdt, ydt)
    assert_matches_torch(NAME, x, y, native=lambda a, b: F.mse_loss(a.to(dtype), b.to(dtype)))


@pytest.mark.parametrize("device", DEVICES)
def test_special_values(device):
    x = torch.tensor([300.0, float("inf"), float("inf"), -float("inf"), float("nan"), 1.0, 1.0000001], device=device)
    y = torch.tensor([0.0, float("inf"), 1.0, 1.0, 0.0, float("nan"), 1.0], device=device)
    for dtype in (torch.float32, torch.float16):
        xs, ys = x.to(dtype).requires_grad_(), y.to(dtype).requires_grad_()
        assert_matches_torch(NAME, xs, ys, reduction="none")


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_sum_of_a_million_ones(device):
    x = torch.ones(10**6, dtype=torch.bfloat16, device=device)
    out = FF.mse_loss(x, torch.zeros_like(x), reduction="sum")
    assert out.dtype == torch.bfloat16 and out.item() == 999424.0
    assert out.item() == F.mse_loss(x, torch.zeros_like(x), reduction="sum").item()


def test_empty():
    x = torch.empty(0, requires_grad=True)
    assert torch.isnan(FF.mse_loss(x, x.detach()))
    assert FF.mse_loss(x, x.detach(), reduction="sum").item() == 0.0


def _error_cases(device):
    r = lambda *s, **k: torch.rand(*s, device=device, **k)  # noqa: E731
    long = lambda *s: torch.ones(*s, dtype=torch.long, device=device)  # noqa: E731
    cases = {
        "not broadcastable": ((r(4), r(5)), {}),
        "reduction": ((r(3), r(3)), {"reduction": "avg"}),
        "reduction int": ((r(3), r(3)), {"reduction": 1}),
        "integer input and target": ((long(3), long(3)), {}),
        "target on meta": ((r(3), torch.rand(3, device="meta")), {}),
    }
    if TORCH_HAS_WEIGHT:
        cases.update(
            {
                "weight wrong size": ((r(4, 3), r(4, 3)), {"weight": r(3)}),
                "weight of broadcast shape": ((r(4, 1), r(4, 3)), {"weight": r(4, 3)}),
                "weighted bad reduction": ((r(4, 3), r(4, 3)), {"weight": r(4, 3), "reduction": "avg"}),
            }
        )
    return cases


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(_error_cases("cpu")))
def test_errors_match_torch(device, case):
    args, kwargs = _error_cases(device)[case]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(Exception) as native_err:
            F.mse_loss(*args, **kwargs)
        with pytest.raises(type(native_err.value)) as fused_err:
            FF.mse_loss(*args, **kwargs)
    assert str(fused_err.value) == str(native_err.value)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("weighted", [False, True])
def test_gradcheck_and_gradgradcheck(reduction, weighted):
    if weighted and not TORCH_HAS_WEIGHT:
        pytest.skip("this torch's mse_loss has no weight=")
    x = make((3, 4), torch.float64, "cpu", requires_grad=True)
    y = make((3, 4), torch.float64, "cpu", requires_grad=True)
    args = (x, y)
    if weighted:
        args += (make((3, 4), torch.float64, "cpu", 0.5, 2, requires_grad=True),)
        fn = lambda a, b, w: FF.mse_loss(a, b, reduction=reduction, weight=w)  # noqa: E731
    else:
        fn = lambda a, b: FF.mse_loss(a, b, reduction=reduction)  # noqa: E731
    assert torch.autograd.gradcheck(fn, args, check_forward_ad=True, check_batched_grad=True, check_undefined_grad=True)
    assert torch.autograd.gradgradcheck(fn, args, gen_non_contig_grad_outputs=True)


def test_gradcheck_broadcast_target():
    x = make((3, 4), torch.float64, "cpu", requires_grad=True)
    y = make((3, 1), torch.float64, "cpu", requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert torch.autograd.gradcheck(lambda a, b: FF.mse_loss(a, b), (x, y))
        assert torch.autograd.gradgradcheck(lambda a, b: FF.mse_loss(a, b), (x, y))


def test_deterministic_across_runs_and_threads():
    x = make((500, 999), torch.float32, "cpu")
    y = make((500, 999), torch.float32, "cpu")
    threads = torch.get_num_threads()
    try:
        outs = []
        for n in itertools.chain([1, 2, threads], [1]):
            torch.set_num_threads(n)
            outs.append(FF.mse_loss(x, y, reduction="sum"))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(o, outs[0]) for o in outs)


@pytest.mark.parametrize("device", DEVICES)
def test_saves_only_its_inputs(device):
    x = make((64, 100), torch.float32, device, requires_grad=True)
    y = make((64, 100), torch.float32, device)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        FF.mse_loss(x, y)
    assert saved and all(t.data_ptr() in (x.data_ptr(), y.data_ptr()) for t in saved if t.numel() > 1)
    assert sum(t.numel() for t in saved if t.data_ptr() not in (x.data_ptr(), y.data_ptr())) <= 2


def test_signature_tracks_installed_torch():
    """torch's parameters, in torch's order, kinds and defaults; fusedloss's
    extras (out_dtype, and weight on torch < 2.13) only keyword-only after them."""
    ours = inspect.signature(FF.mse_loss).parameters
    theirs = inspect.signature(F.mse_loss).parameters
    assert list(ours)[: len(theirs)] == list(theirs)
    for name, p in theirs.items():
        assert ours[name].kind == p.kind and ours[name].default == p.default, name
    assert all(ours[name].kind is inspect.Parameter.KEYWORD_ONLY for name in list(ours)[len(theirs) :])
    assert "weight" in ours
